// VerifiedPartSource: turns one bundle part (ciphertext, FORMATS.md a.1 step 6) into the same
// bytes, released only after the whole part matched the SHA1 the manifest lists for it. Verified
// parts live in a VerifiedPartPool, a byte-budgeted LRU shared by every part of every image; an
// evicted part is fetched and verified again on its next read.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "formats/block_source.h"
#include "formats/buffer_pool.h"

namespace imgfs::formats {

// Verified part buffers, shared by every part of every image of a mount (formats/buffer_pool.h).
using VerifiedPartPool = BufferPool<std::vector<std::byte>>;

class VerifiedPartSource final : public BlockSource {
 public:
  // Use open_verified_part().
  VerifiedPartSource(std::unique_ptr<BlockSource> lower, std::array<uint8_t, 20> expected_sha1,
                     std::string part_name, VerifiedPartPool& pool);
  // Drops this part's buffer from the pool.
  ~VerifiedPartSource() override;

  uint64_t size() const override { return lower_->size(); }

  // Copies from the verified part buffer. When the part is not resident, one reader (single
  // flight) reads the whole part from lower in chunks of up to 4 MiB, checks its SHA1 and puts it
  // in the pool; concurrent readers wait for that result. A failure is not remembered: the next
  // read tries again. Thread-safe.
  // Errors: InvalidArgument (range past size()); Corruption ("<part_name>: SHA1 mismatch: ...");
  // IOError (OpenSSL failure); any error of lower, with the part name as context.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "sha1(" + lower->describe() + ")".
  std::string describe() const override;

 private:
  // The outcome of one fetch, shared by the reader doing it and the readers waiting for it.
  struct Fill {
    bool done = false;
    Status status;
    VerifiedPartPool::Buffer buffer;
  };

  // Reads the whole part and checks its digest. No lock held.
  Result<VerifiedPartPool::Buffer> fetch_and_verify() const;

  const std::unique_ptr<BlockSource> lower_;
  const std::array<uint8_t, 20> expected_sha1_;
  const std::string part_name_;
  VerifiedPartPool& pool_;
  const uint64_t pool_key_;

  // Lock order: mu_, then the pool's mutex. Never held across lower reads.
  mutable std::mutex mu_;
  mutable std::condition_variable fill_done_;
  mutable std::shared_ptr<Fill> in_flight_;  // Guarded by mu_; null when no fetch is running.
};

// Wraps one part whose bytes must have SHA1 `expected_sha1` (from the manifest). Reads nothing
// now, except that a zero-length part is checked at once against the SHA1 of no bytes.
// `part_name` names the part in errors; `pool` must outlive the source.
// Errors: InvalidArgument (null lower); Corruption (a zero-length part whose digest differs).
Result<std::unique_ptr<BlockSource>> open_verified_part(std::unique_ptr<BlockSource> lower,
                                                        std::array<uint8_t, 20> expected_sha1,
                                                        std::string part_name,
                                                        VerifiedPartPool& pool);

}  // namespace imgfs::formats
