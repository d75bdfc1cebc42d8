// CachedSource: a decorator that turns any BlockSource into one whose blocks are kept in a
// shared on-disk BlockStore, so a block is read from below once and then served from disk
// (and the last few from memory). Sits at the top of a chain, under FUSE.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cache/block_store.h"
#include "formats/block_source.h"
#include "formats/io_counters.h"

namespace imgfs::cache {

class CachedSource final : public BlockSource {
 public:
  // Largest cache block accepted by open_cached (each fill buffers one block in memory).
  static constexpr uint32_t kMaxCacheBlockBytes = 64u << 20;
  // How many recently used blocks stay in memory, so sequential small reads within a block do
  // not each read the block file.
  static constexpr size_t kRecentBlocks = 4;

  // Requires lower != nullptr and 0 < cache_block_bytes <= kMaxCacheBlockBytes (open_cached
  // checks). `store` and `counters` (may be null) outlive this source. Blocks are stored under
  // source_id + the block size (so two block sizes never share a key) and `etag`.
  CachedSource(std::unique_ptr<BlockSource> lower, BlockStore& store, std::string source_id,
               std::string etag, uint32_t cache_block_bytes, IoCounters* counters);

  uint64_t size() const override { return size_; }

  // Serves each cache block of the range (block i = [i*B, min((i+1)*B, size()))) from memory,
  // from the store, or by reading whole blocks from lower (one read for each run of
  // consecutive missing blocks) and storing them. One fill per block at a time: concurrent
  // readers of a block being filled wait and share its bytes.
  // Counts kCacheHits per block served without a lower read and kCacheMisses per lower read.
  // A lower error goes to every reader waiting on that fill and is not cached; the next read
  // tries again. A block the store fails to keep is still served. Thread-safe.
  // Errors: InvalidArgument (range past size()), and whatever lower returns.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "cached(" + lower's describe() + ")".
  std::string describe() const override;

  uint32_t block_size() const override { return lower_->block_size(); }
  Result<Extent> map(uint64_t offset) const override { return lower_->map(offset); }

  // Bytes this source's blocks take in the store now (headers included). Thread-safe.
  uint64_t cached_bytes() const { return store_.bytes_used_by(source_id_, etag_); }

 private:
  using Block = std::shared_ptr<const std::vector<std::byte>>;

  // One block being fetched; shared by its filler and its waiters.
  struct Fill {
    std::condition_variable done_cv;
    bool done = false;  // guarded by CachedSource::mu_
    Status status;      // guarded by CachedSource::mu_
    Block block;        // guarded by CachedSource::mu_
  };

  // The bytes of blocks [first, last], each from memory, a fill in progress, the store or
  // lower; the blocks this reader claims are filled by it.
  Result<std::vector<Block>> fetch_blocks(uint64_t first, uint64_t last) const;
  // Fills blocks[i] for each claimed[i] (block first + i) from the store, or from lower with one
  // read per run of consecutive misses; outside any lock. Returns the first lower error (the
  // blocks it left unfilled stay null).
  Status load_blocks(uint64_t first, const std::vector<std::shared_ptr<Fill>>& claimed,
                     std::vector<Block>& blocks) const;

  const std::unique_ptr<BlockSource> lower_;
  BlockStore& store_;
  const std::string source_id_;
  const std::string etag_;
  const uint32_t cache_block_bytes_;
  IoCounters* const counters_;
  const uint64_t size_;

  // Guards fills_ and recent_. A leaf lock: never held across a store or lower call, and no
  // other lock is taken under it.
  mutable std::mutex mu_;
  mutable std::unordered_map<uint64_t, std::shared_ptr<Fill>> fills_;
  mutable std::list<std::pair<uint64_t, Block>> recent_;  // most recent first
};

// Validates the arguments and builds a CachedSource.
// Errors: InvalidArgument (null lower, cache_block_bytes of 0 or above kMaxCacheBlockBytes).
Result<std::unique_ptr<BlockSource>> open_cached(std::unique_ptr<BlockSource> lower,
                                                 BlockStore& store, std::string source_id,
                                                 std::string etag, uint32_t cache_block_bytes,
                                                 IoCounters* counters);

}  // namespace imgfs::cache
