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
  if (out.empty()) return Status::OK();
  const uint64_t first = offset / cache_block_bytes_;
  const uint64_t last = (offset + out.size() - 1) / cache_block_bytes_;
  Result<std::vector<Block>> blocks = fetch_blocks(first, last);
  if (!blocks.ok()) return blocks.status();
  size_t done = 0;
  for (uint64_t index = first; index <= last; ++index) {
    const Block& block = (*blocks)[index - first];
    const uint64_t position = offset + done;
    const uint64_t within = position - index * cache_block_bytes_;
    const size_t length = std::min<uint64_t>(out.size() - done, block->size() - within);
    std::memcpy(out.data() + done, block->data() + within, length);
    done += length;
  }
  return Status::OK();
}

Result<std::vector<CachedSource::Block>> CachedSource::fetch_blocks(uint64_t first,
                                                                    uint64_t last) const {
  const size_t count = last - first + 1;
  std::vector<Block> blocks(count);
  std::vector<std::shared_ptr<Fill>> waiting(count);  // other readers' fills
  std::vector<std::shared_ptr<Fill>> claimed(count);  // this reader's fills
  uint64_t hits = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < count; ++i) {
      const uint64_t index = first + i;
      auto recent = std::find_if(recent_.begin(), recent_.end(),
                                 [index](const auto& entry) { return entry.first == index; });
      if (recent != recent_.end()) {
        recent_.splice(recent_.begin(), recent_, recent);
        blocks[i] = recent->second;
        ++hits;
      } else if (auto it = fills_.find(index); it != fills_.end()) {
        waiting[i] = it->second;
      } else {
        claimed[i] = std::make_shared<Fill>();
        fills_.emplace(index, claimed[i]);
      }
    }
  }

  // This reader's fills are loaded and published before it waits for anyone else's, so two
  // readers that claimed parts of each other's ranges never wait on each other.
  const Status loaded = load_blocks(first, claimed, blocks);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < count; ++i) {
      if (!claimed[i]) continue;
      Fill& fill = *claimed[i];
      fill.done = true;
      fill.status = blocks[i] ? Status::OK() : loaded;
      fill.block = blocks[i];
      if (blocks[i]) {
        recent_.emplace_front(first + i, blocks[i]);
        if (recent_.size() > kRecentBlocks) recent_.pop_back();
      }
      fills_.erase(first + i);
    }
  }
  for (const auto& fill : claimed) {
    if (fill) fill->done_cv.notify_all();
  }
  if (!loaded.ok()) return loaded;

  {
    std::unique_lock<std::mutex> lock(mu_);
    for (size_t i = 0; i < count; ++i) {
      if (!waiting[i]) continue;
      const std::shared_ptr<Fill>& running = waiting[i];
      running->done_cv.wait(lock, [&running] { return running->done; });
      if (!running->status.ok()) return running->status;
      blocks[i] = running->block;
      ++hits;
    }
  }
  if (counters_ != nullptr && hits > 0) counters_->add(IoCounters::kCacheHits, hits);
  return blocks;
}

Status CachedSource::load_blocks(uint64_t first, const std::vector<std::shared_ptr<Fill>>& claimed,
                                 std::vector<Block>& blocks) const {
  const size_t count = claimed.size();
  auto block_length = [this](uint64_t index) {
    return std::min<uint64_t>(cache_block_bytes_, size_ - index * cache_block_bytes_);
  };
  // A store error is only a lost cache entry: the block is read from lower instead.
  for (size_t i = 0; i < count; ++i) {
    if (!claimed[i]) continue;
    auto bytes = std::make_shared<std::vector<std::byte>>(block_length(first + i));
    if (Result<bool> hit = store_.get(BlockKey{source_id_, etag_, first + i}, *bytes);
        hit.ok() && *hit) {
      if (counters_ != nullptr) counters_->add(IoCounters::kCacheHits, 1);
      blocks[i] = std::move(bytes);
    }
  }
  // Each run of consecutive misses is one lower read (one range request for a remote object).
  for (size_t i = 0; i < count;) {
    if (!claimed[i] || blocks[i]) {
      ++i;
      continue;
    }
    size_t end = i;
    uint64_t length = 0;
    while (end < count && claimed[end] && !blocks[end]) length += block_length(first + end++);
    if (counters_ != nullptr) counters_->add(IoCounters::kCacheMisses, 1);
    std::vector<std::byte> run(length);
    if (Status s = lower_->read_at((first + i) * cache_block_bytes_, run); !s.ok()) return s;
    uint64_t position = 0;
    for (; i < end; ++i) {
      const uint64_t size = block_length(first + i);
      auto bytes = std::make_shared<std::vector<std::byte>>(run.begin() + position,
                                                             run.begin() + position + size);
      position += size;
      // The cache is best effort: a block the store cannot keep is still served.
      (void)store_.put(BlockKey{source_id_, etag_, first + i}, *bytes);
      blocks[i] = std::move(bytes);
    }
  }
  return Status::OK();
}

std::string CachedSource::describe() const { return "cached(" + lower_->describe() + ")"; }

}  // namespace imgfs::cache
