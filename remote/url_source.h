// UrlSource: a leaf BlockSource over a pre-signed URL (an import manifest part reachable only
// through its get-url), read with unsigned range requests through the store's HTTP client.
#pragma once

#include <string>

#include "formats/block_source.h"
#include "formats/io_counters.h"
#include "remote/object_store.h"

namespace imgfs::remote {

class UrlSource final : public BlockSource {
 public:
  // `store` outlives this source; `counters` may be null. `size` comes from a HEAD at open.
  UrlSource(const ObjectStore& store, std::string url, std::string name, uint64_t size,
            IoCounters* counters)
      : store_(store), url_(std::move(url)), name_(std::move(name)), size_(size),
        counters_(counters) {}

  uint64_t size() const override { return size_; }
  // Thread-safe. Errors: IOError (expired URL, transport), InvalidArgument (range past size).
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;
  // "url(NAME)": the part's name, never the URL, whose query string is a credential.
  std::string describe() const override { return "url(" + name_ + ")"; }

 private:
  const ObjectStore& store_;
  const std::string url_;
  const std::string name_;
  const uint64_t size_;
  IoCounters* const counters_;
};

// Opens `url` after a HEAD for its size. Errors as head_url_size().
Result<std::unique_ptr<BlockSource>> open_url_source(const ObjectStore& store, std::string url,
                                                     std::string name, IoCounters* counters);

}  // namespace imgfs::remote
