// BlockSource: the one interface every layer implements and composes through.
// An immutable, random-access byte stream of known size (leveldb RandomAccessFile).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "formats/status.h"

namespace imgfs {

// A run of bytes that reads as data, or as zeros that are not stored (a hole).
struct Extent {
  enum class Kind { kData, kZero };
  Kind kind = Kind::kData;
  uint64_t length = 0;
};

class BlockSource {
 public:
  virtual ~BlockSource() = default;

  // Known once the source is open; never changes.
  virtual uint64_t size() const = 0;

  // Fills all of `out` with the bytes at [offset, offset + out.size()) or fails.
  // Requires offset + out.size() <= size(): there are no short reads (callers clip at EOF).
  // Thread-safe: called concurrently from many threads.
  // Errors: Corruption (bad input bytes), IOError (store or local I/O), NotSupported,
  // InvalidArgument (a range past size()).
  virtual Status read_at(uint64_t offset, std::span<std::byte> out) const = 0;

  // One-line identity for logs and errors, e.g. "tar(gzip(cbc(concat(3 parts))))".
  virtual std::string describe() const = 0;

  // The natural unit of this layer (16 for CBC, the cluster size for qcow2); caches align to it.
  virtual uint32_t block_size() const { return 1; }

  // The run starting at `offset` (< size()): data or zeros, and how long it lasts.
  virtual Result<Extent> map(uint64_t offset) const {
    return Extent{Extent::Kind::kData, size() - offset};
  }
};

// InvalidArgument unless [offset, offset + length) lies within [0, size). Overflow-safe.
inline Status check_read_range(const BlockSource& source, uint64_t offset, uint64_t length) {
  const uint64_t size = source.size();
  if (offset > size || length > size - offset) {
    return Status::InvalidArgument(source.describe() + ": read of " + std::to_string(length) +
                                   " bytes at " + std::to_string(offset) + " is past size " +
                                   std::to_string(size));
  }
  return Status::OK();
}

}  // namespace imgfs
