#include "cache/prefetch_source.h"

#include <algorithm>
#include <cstring>
#include <iterator>

namespace imgfs::cache {

bool MemoryBudget::try_acquire(uint64_t bytes) {
  const uint64_t limit = limit_.load();
  uint64_t current = in_use_.load();
  do {
    if (bytes > limit || current > limit - bytes) return false;
  } while (!in_use_.compare_exchange_weak(current, current + bytes));
  return true;
}

void MemoryBudget::release(uint64_t bytes) { in_use_.fetch_sub(bytes); }

Result<std::unique_ptr<PrefetchSource>> open_prefetch(std::unique_ptr<BlockSource> lower,
                                                      PrefetchOptions options,
                                                      MemoryBudget& budget) {
  if (lower == nullptr) return Status::InvalidArgument("prefetch source needs a lower source");
  if (options.chunk_bytes == 0 || options.initial_window == 0) {
    return Status::InvalidArgument("prefetch chunk size and initial window must not be 0");
  }
  if (options.max_window < options.initial_window ||
      options.max_window > PrefetchSource::kMaxWindowBytes) {
    return Status::InvalidArgument("prefetch max window " + std::to_string(options.max_window) +
                                   " is not in " + std::to_string(options.initial_window) +
                                   ".." + std::to_string(PrefetchSource::kMaxWindowBytes));
  }
  if (options.max_window / options.chunk_bytes > PrefetchSource::kMaxWindowChunks) {
    return Status::InvalidArgument("prefetch max window " + std::to_string(options.max_window) +
                                   " is more than " +
                                   std::to_string(PrefetchSource::kMaxWindowChunks) +
                                   " chunks of " + std::to_string(options.chunk_bytes));
  }
  if (options.threads > PrefetchSource::kMaxThreads) {
    return Status::InvalidArgument("prefetch threads " + std::to_string(options.threads) +
                                   " is above " + std::to_string(PrefetchSource::kMaxThreads));
  }
  return std::make_unique<PrefetchSource>(std::move(lower), options, budget);
}

PrefetchSource::PrefetchSource(std::unique_ptr<BlockSource> lower, PrefetchOptions options,
                               MemoryBudget& budget)
    : lower_(std::move(lower)), options_(options), budget_(budget), size_(lower_->size()) {}

PrefetchSource::~PrefetchSource() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    queue_.clear();
    chunks_.clear();
  }
  work_cv_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

std::string PrefetchSource::describe() const { return "prefetch(" + lower_->describe() + ")"; }

PrefetchStats PrefetchSource::stats() const {
  return PrefetchStats{background_reads_.load(), bytes_prefetched_.load(),
                       bytes_from_prefetch_.load()};
}

Status PrefetchSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  if (out.empty()) return Status::OK();
  const uint64_t end = offset + out.size();
  std::vector<Piece> pieces;
  bool queued = false;
  const bool read_ahead = !options_.read_ahead_now || options_.read_ahead_now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Plan before tracking: tracking may drop chunks this read needs, and the pieces keep
    // their chunks alive.
    pieces = plan_read(offset, end);
    queued = track_read(offset, end, read_ahead);
  }
  if (queued) {
    // The workers start with the first prefetch, not at construction: a mount opens some
    // chains before it forks into the background, and threads do not survive a fork.
    std::call_once(workers_started_, [this] {
      workers_.reserve(options_.threads);
      for (unsigned i = 0; i < options_.threads; ++i) {
        workers_.emplace_back([this] { worker_loop(); });
      }
    });
    work_cv_.notify_all();
  }

  for (size_t i = 0; i < pieces.size(); ++i) {
    const Piece& piece = pieces[i];
    std::span<std::byte> dest = out.subspan(piece.start - offset, piece.end - piece.start);
    // On an error, the chunks this reader claimed but has not loaded are given up, so readers
    // waiting for them read lower themselves instead of waiting forever.
    auto fail = [&](Status s) {
      abandon(std::span(pieces).subspan(i));
      return s;
    };
    if (piece.chunk == nullptr) {
      if (Status s = lower_->read_at(piece.start, dest); !s.ok()) return fail(s);
      continue;
    }
    bool ready = true;
    if (piece.claimed) {
      ready = load(piece.chunk).ok();
    } else {
      std::unique_lock<std::mutex> lock(mu_);
      chunk_cv_.wait(lock, [&piece] {
        return piece.chunk->state == ChunkState::kReady ||
               piece.chunk->state == ChunkState::kFailed;
      });
      ready = piece.chunk->state == ChunkState::kReady;
    }
    if (!ready) {
      // The chunk's fetch failed, perhaps on bytes this read does not need; the error is not
      // kept, so lower is asked for just this piece.
      if (Status s = lower_->read_at(piece.start, dest); !s.ok()) {
        return fail(s);
      }
      continue;
    }
    // A ready chunk's bytes never change again, so they are copied without the lock.
    std::memcpy(dest.data(), piece.chunk->bytes.data() + (piece.start - piece.chunk->start),
                dest.size());
    bytes_from_prefetch_.fetch_add(dest.size());
  }
  return Status::OK();
}

std::vector<PrefetchSource::Piece> PrefetchSource::plan_read(uint64_t offset,
                                                             uint64_t end) const {
  std::vector<Piece> pieces;
  auto it = chunks_.upper_bound(offset);
  if (it != chunks_.begin()) {
    auto before = std::prev(it);
    if (before->first + before->second->length > offset) it = before;
  }
  uint64_t position = offset;
  while (position < end) {
    if (it != chunks_.end() && it->first <= position) {
      const ChunkPtr& chunk = it->second;
      Piece piece{position, std::min(end, chunk->start + chunk->length), chunk, false};
      if (chunk->state == ChunkState::kQueued) {
        // Rather than wait for a worker to get to it, this reader fetches it now.
        chunk->state = ChunkState::kLoading;
        std::erase(queue_, chunk);
        piece.claimed = true;
      }
      position = piece.end;
      pieces.push_back(std::move(piece));
      ++it;
    } else {
      const uint64_t gap_end = it != chunks_.end() ? std::min(end, it->first) : end;
      pieces.push_back(Piece{position, gap_end, nullptr, false});
      position = gap_end;
    }
  }
  return pieces;
}

bool PrefetchSource::track_read(uint64_t offset, uint64_t end, bool read_ahead) const {
  const uint64_t serial = ++read_serial_;
  std::erase_if(streams_,
                [serial](const Stream& s) { return serial - s.last_read > kStreamIdleReads; });
  Stream* match = nullptr;
  for (Stream& stream : streams_) {
    const uint64_t distance = offset >= stream.next ? offset - stream.next : stream.next - offset;
    if (distance <= (stream.window > 0 ? kSequentialSlack : kStartSlack)) {
      match = &stream;
      break;
    }
  }
  if (match != nullptr) {
    match->window = match->window == 0 ? options_.initial_window
                                       : std::min(match->window * 2, options_.max_window);
    match->next = std::max(match->next, end);
    match->last_read = serial;
  } else {
    // A seek: a new stream, not yet sequential, so it prefetches nothing until continued.
    if (streams_.size() >= kMaxStreams) {
      streams_.erase(std::min_element(
          streams_.begin(), streams_.end(),
          [](const Stream& a, const Stream& b) { return a.last_read < b.last_read; }));
    }
    streams_.push_back(Stream{end, 0, serial});
  }
  drop_unwanted();
  if (match == nullptr || options_.threads == 0 || !read_ahead) return false;
  // window <= kMaxWindowBytes and next <= size_, so this cannot overflow.
  return schedule(match->next, std::min(size_, match->next + match->window));
}

bool PrefetchSource::schedule(uint64_t from, uint64_t to) const {
  bool queued = false;
  if (from >= to) return queued;
  const uint64_t chunk_bytes = options_.chunk_bytes;
  for (uint64_t index = from / chunk_bytes; index <= (to - 1) / chunk_bytes; ++index) {
    const uint64_t start = index * chunk_bytes;
    if (chunks_.contains(start)) continue;
    const uint64_t length = std::min(chunk_bytes, size_ - start);
    // Out of budget: prefetch less; reads go to lower and never wait for memory.
    if (!budget_.try_acquire(length)) break;
    auto chunk = std::make_shared<Chunk>(start, length, budget_);
    chunks_.emplace(start, chunk);
    queue_.push_back(std::move(chunk));
    queued = true;
  }
  return queued;
}

void PrefetchSource::drop_unwanted() const {
  for (auto it = chunks_.begin(); it != chunks_.end();) {
    const Chunk& chunk = *it->second;
    const bool wanted = std::any_of(streams_.begin(), streams_.end(), [&chunk](const Stream& s) {
      const uint64_t low = s.next > kSequentialSlack ? s.next - kSequentialSlack : 0;
      return s.window > 0 && chunk.start + chunk.length > low && chunk.start < s.next + s.window;
    });
    if (wanted) {
      ++it;
      continue;
    }
    // A queued chunk is cancelled here; one being fetched is finished by its loader and then
    // freed with its last reference.
    if (chunk.state == ChunkState::kQueued) std::erase(queue_, it->second);
    it = chunks_.erase(it);
  }
}

void PrefetchSource::abandon(std::span<const Piece> pieces) const {
  bool any = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Piece& piece : pieces) {
      if (!piece.claimed || piece.chunk->state != ChunkState::kLoading) continue;
      piece.chunk->state = ChunkState::kFailed;
      if (auto it = chunks_.find(piece.chunk->start);
          it != chunks_.end() && it->second == piece.chunk) {
        chunks_.erase(it);
      }
      any = true;
    }
  }
  if (any) chunk_cv_.notify_all();
}

Status PrefetchSource::load(const ChunkPtr& chunk) const {
  std::vector<std::byte> bytes(chunk->length);
  Status status = lower_->read_at(chunk->start, bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (status.ok()) {
      chunk->bytes = std::move(bytes);
      chunk->state = ChunkState::kReady;
    } else {
      chunk->state = ChunkState::kFailed;
      if (auto it = chunks_.find(chunk->start); it != chunks_.end() && it->second == chunk) {
        chunks_.erase(it);
      }
    }
  }
  chunk_cv_.notify_all();
  return status;
}

void PrefetchSource::worker_loop() const {
  for (;;) {
    ChunkPtr chunk;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      chunk = std::move(queue_.front());
      queue_.pop_front();
      chunk->state = ChunkState::kLoading;
    }
    const Status status = load(chunk);
    background_reads_.fetch_add(1);
    if (status.ok()) bytes_prefetched_.fetch_add(chunk->length);
  }
}

}  // namespace imgfs::cache
