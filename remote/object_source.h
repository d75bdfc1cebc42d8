// ObjectSource: the leaf BlockSource of a chain. It turns one pinned object version of an
// ObjectStore into a random-access byte stream, and counts the requests and bytes it fetches.
#pragma once

#include <string>

#include "formats/block_source.h"
#include "formats/io_counters.h"
#include "remote/object_store.h"

namespace imgfs::remote {

class ObjectSource final : public BlockSource {
 public:
  // `store` and `counters` (which may be null) outlive this source. Reads are pinned to
  // object.etag: once the object changes, every read fails with IOError.
  ObjectSource(const ObjectStore& store, ObjectInfo object, IoCounters* counters)
      : store_(store), object_(std::move(object)), counters_(counters) {}

  uint64_t size() const override { return object_.size; }

  // store.read_range with the key as error context. Every attempt counts one kRequests;
  // kBytesFetched grows only on success. Thread-safe.
  // Errors: InvalidArgument (range past size()), and whatever the store returns.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "object(KEY)".
  std::string describe() const override;

  const ObjectInfo& object() const { return object_; }

 private:
  const ObjectStore& store_;
  const ObjectInfo object_;
  IoCounters* const counters_;
};

}  // namespace imgfs::remote
