// ConcatSource: turns an ordered list of part sources into one byte stream (the bundle's
// ciphertext, FORMATS.md a.1 step 5). Zero-length parts are legal: euca2ools writes an empty
// last part when the ciphertext length is an exact multiple of the part size.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "formats/block_source.h"

namespace imgfs::formats {

class ConcatSource final : public BlockSource {
 public:
  // Use open_concat(), which checks the total size for overflow. `starts` holds each part's
  // offset in the stream plus, last, the total size (parts.size() + 1 entries).
  ConcatSource(std::vector<std::unique_ptr<BlockSource>> parts, std::vector<uint64_t> starts);

  uint64_t size() const override { return starts_.back(); }

  // Reads across as many parts as the range spans, in order.
  // Thread-safe (no mutable state). Errors: InvalidArgument (range past size()); any error of a
  // part, prefixed with "part I/N" (0-based index) so the failing part can be named.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "concat(N parts)".
  std::string describe() const override;

 private:
  const std::vector<std::unique_ptr<BlockSource>> parts_;
  const std::vector<uint64_t> starts_;
};

// Concatenates `parts` in order. Errors: InvalidArgument (no parts, a null part, or a total
// size that overflows 64 bits).
Result<std::unique_ptr<BlockSource>> open_concat(std::vector<std::unique_ptr<BlockSource>> parts);

}  // namespace imgfs::formats
