#include "cache/cached_source.h"

#include <algorithm>
#include <cstring>

namespace imgfs::cache {

Result<std::unique_ptr<BlockSource>> open_cached(std::unique_ptr<BlockSource> lower,
                                                 BlockStore& store, std::string source_id,
                                                 std::string etag, uint32_t cache_block_bytes,
                                                 IoCounters* counters) {
  if (lower == nullptr) return Status::InvalidArgument("cached source needs a lower source");
  if (cache_block_bytes == 0 || cache_block_bytes > CachedSource::kMaxCacheBlockBytes) {
    return Status::InvalidArgument("cache block size " + std::to_string(cache_block_bytes) +
                                   " is not in 1.." +
                                   std::to_string(CachedSource::kMaxCacheBlockBytes));
  }
  return std::unique_ptr<BlockSource>(std::make_unique<CachedSource>(
      std::move(lower), store, std::move(source_id), std::move(etag), cache_block_bytes, counters));
}

CachedSource::CachedSource(std::unique_ptr<BlockSource> lower, BlockStore& store,
                           std::string source_id, std::string etag, uint32_t cache_block_bytes,
                           IoCounters* counters)
    : lower_(std::move(lower)),
      store_(store),
      source_id_(std::move(source_id) + "#block=" + std::to_string(cache_block_bytes)),
      etag_(std::move(etag)),
      cache_block_bytes_(cache_block_bytes),
      counters_(counters),
      size_(lower_->size()) {}

Status CachedSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  size_t done = 0;
  while (done < out.size()) {
    const uint64_t position = offset + done;
    const uint64_t index = position / cache_block_bytes_;
    Result<Block> block = fetch_block(index);
    if (!block.ok()) return block.status();
    const uint64_t within = position - index * cache_block_bytes_;
    const size_t length = std::min<uint64_t>(out.size() - done, (*block)->size() - within);
    std::memcpy(out.data() + done, (*block)->data() + within, length);
    done += length;
  }
  return Status::OK();
}

Result<CachedSource::Block> CachedSource::fetch_block(uint64_t index) const {
  std::shared_ptr<Fill> fill;
  {
    std::unique_lock<std::mutex> lock(mu_);
    for (auto it = recent_.begin(); it != recent_.end(); ++it) {
      if (it->first != index) continue;
      recent_.splice(recent_.begin(), recent_, it);
      Block block = it->second;
      lock.unlock();
      if (counters_ != nullptr) counters_->add(IoCounters::kCacheHits, 1);
      return block;
    }
    if (auto it = fills_.find(index); it != fills_.end()) {
      // Another reader is filling this block: wait for its bytes (or its error).
      std::shared_ptr<Fill> running = it->second;
      running->done_cv.wait(lock, [&running] { return running->done; });
      if (!running->status.ok()) return running->status;
      Block block = running->block;
      lock.unlock();
      if (counters_ != nullptr) counters_->add(IoCounters::kCacheHits, 1);
      return block;
    }
    fill = std::make_shared<Fill>();
    fills_.emplace(index, fill);
  }

  Result<Block> loaded = load_block(index);

  {
    std::lock_guard<std::mutex> lock(mu_);
    fill->done = true;
    fill->status = loaded.status();
    if (loaded.ok()) {
      fill->block = *loaded;
      recent_.emplace_front(index, *loaded);
      if (recent_.size() > kRecentBlocks) recent_.pop_back();
    }
    fills_.erase(index);
  }
  fill->done_cv.notify_all();
  return loaded;
}

Result<CachedSource::Block> CachedSource::load_block(uint64_t index) const {
  const uint64_t start = index * cache_block_bytes_;
  const uint64_t length = std::min<uint64_t>(cache_block_bytes_, size_ - start);
  auto bytes = std::make_shared<std::vector<std::byte>>(length);
  const BlockKey key{source_id_, etag_, index};
  // A store error is only a lost cache entry: fall back to lower.
  if (Result<bool> hit = store_.get(key, *bytes); hit.ok() && *hit) {
    if (counters_ != nullptr) counters_->add(IoCounters::kCacheHits, 1);
    return Block(std::move(bytes));
  }
  if (counters_ != nullptr) counters_->add(IoCounters::kCacheMisses, 1);
  if (Status s = lower_->read_at(start, *bytes); !s.ok()) return s;
  // The cache is best effort: a block the store cannot keep is still served from `bytes`.
  (void)store_.put(key, *bytes);
  return Block(std::move(bytes));
}

std::string CachedSource::describe() const { return "cached(" + lower_->describe() + ")"; }

}  // namespace imgfs::cache
