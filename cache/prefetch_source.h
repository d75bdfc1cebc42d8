// PrefetchSource: a decorator that turns any BlockSource into one that reads ahead for
// sequential readers (mountpoint-s3's prefetcher, Linux readahead). Reads that follow one
// another grow a window of chunks fetched from below by background threads, so a sequential
// scan overlaps lower latency with the reader's work; random reads pass straight through.
// All prefetched bytes of a mount are charged to one shared MemoryBudget (--memory-limit).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "formats/block_source.h"

namespace imgfs::cache {

// A byte budget shared by every prefetcher of a mount. Thread-safe.
class MemoryBudget {
 public:
  explicit MemoryBudget(uint64_t limit_bytes) : limit_(limit_bytes) {}
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // Takes `bytes` if in_use() + bytes stays within the limit; false (and takes nothing)
  // otherwise. Never blocks.
  bool try_acquire(uint64_t bytes);

  // Gives back `bytes` taken by an earlier try_acquire.
  void release(uint64_t bytes);

  // Changes the limit for later try_acquire calls; bytes already taken stay taken. A mount
  // keeps the limit at 0 until it has forked into the background, so no read-ahead (and no
  // worker thread, which would not survive the fork) starts while it lists the bucket.
  void set_limit(uint64_t limit_bytes) { limit_.store(limit_bytes); }

  uint64_t in_use() const { return in_use_.load(); }
  uint64_t limit() const { return limit_.load(); }

 private:
  std::atomic<uint64_t> limit_;
  std::atomic<uint64_t> in_use_{0};
};

struct PrefetchOptions {
  // Read-ahead after the first sequential read; small, so the first bytes come soon.
  uint64_t initial_window = 256 << 10;
  // The window doubles on each sequential read up to this.
  uint64_t max_window = 16 << 20;
  // Size of each background read of lower. Chunks lie on a grid of this size, so the window
  // is rounded out to whole chunks and a reader's small steps never split them.
  uint64_t chunk_bytes = 1 << 20;
  // Background fetch threads owned by each PrefetchSource; 0 turns prefetch off.
  unsigned threads = 2;
  // When set and false, nothing is read ahead (windows still grow): for a lower that can only
  // be produced in order for now, such as a gzip stream before its first inflation ended,
  // parallel fetches would only queue up behind that one inflation. Called without locks held.
  std::function<bool()> read_ahead_now;
};

// Counters since the source was built; for stats and tests.
struct PrefetchStats {
  uint64_t background_reads = 0;     // lower reads done by the worker threads
  uint64_t bytes_prefetched = 0;     // bytes those reads returned
  uint64_t bytes_from_prefetch = 0;  // bytes of read_at served from fetched chunks
};

class PrefetchSource final : public BlockSource {
 public:
  // Most sequential streams tracked at once (several readers of one image, e.g. a guest
  // and a checksum run); a new stream beyond this replaces the least recently used one.
  static constexpr size_t kMaxStreams = 8;
  // A read starting at most this far after (or before, for the kernel's out-of-order
  // readahead) where a stream left off continues that stream.
  static constexpr uint64_t kSequentialSlack = 1 << 20;
  // A stream becomes sequential only with a read this close to where it left off, so random
  // reads rarely start a window by landing near an earlier one.
  static constexpr uint64_t kStartSlack = 4 << 10;
  // A stream not continued by any of this many reads is forgotten and its chunks dropped,
  // so a reader that sought away does not keep its old window.
  static constexpr uint64_t kStreamIdleReads = 4 * kMaxStreams;
  // Largest accepted options (open_prefetch checks).
  static constexpr uint64_t kMaxWindowBytes = 1ull << 30;
  static constexpr unsigned kMaxThreads = 64;
  // Most chunks in one window, which bounds the work each read does on the chunk map.
  static constexpr uint64_t kMaxWindowChunks = 1024;

  // Requires lower != nullptr and options accepted by open_prefetch. `budget` outlives this
  // source. The first read that queues a chunk starts options.threads worker threads, joined
  // by the destructor.
  PrefetchSource(std::unique_ptr<BlockSource> lower, PrefetchOptions options,
                 MemoryBudget& budget);
  // Cancels queued fetches, waits for the ones in flight, and joins the workers. No read_at
  // may be running.
  ~PrefetchSource() override;

  PrefetchSource(const PrefetchSource&) = delete;
  PrefetchSource& operator=(const PrefetchSource&) = delete;

  uint64_t size() const override { return size_; }

  // Serves the range from fetched chunks where present (waiting for one in flight instead of
  // reading it again) and from lower elsewhere, then moves the read-ahead window of the stream
  // this read continues, or starts a new stream (a seek). Never waits for budget: when it is
  // spent, less is prefetched. A failed background fetch is not kept: readers of those bytes
  // read lower themselves and get lower's error, and a later read tries again. Thread-safe.
  // Errors: InvalidArgument (range past size()), and whatever lower returns.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "prefetch(" + lower's describe() + ")".
  std::string describe() const override;

  uint32_t block_size() const override { return lower_->block_size(); }
  Result<Extent> map(uint64_t offset) const override { return lower_->map(offset); }

  // Thread-safe snapshot.
  PrefetchStats stats() const;

 private:
  enum class ChunkState { kQueued, kLoading, kReady, kFailed };

  // Bytes [start, start + length) of lower, charged to the budget for as long as it lives
  // (the destructor releases), so the budget counts bytes that really exist, including chunks
  // already dropped from chunks_ but still being copied or fetched.
  struct Chunk {
    Chunk(uint64_t start, uint64_t length, MemoryBudget& budget)
        : start(start), length(length), budget(budget) {}
    ~Chunk() { budget.release(length); }
    Chunk(const Chunk&) = delete;
    Chunk& operator=(const Chunk&) = delete;

    const uint64_t start;
    const uint64_t length;
    MemoryBudget& budget;
    ChunkState state = ChunkState::kQueued;  // guarded by PrefetchSource::mu_
    std::vector<std::byte> bytes;            // written by its loader; read once kReady
  };
  using ChunkPtr = std::shared_ptr<Chunk>;

  // One sequential reader as seen from its reads.
  struct Stream {
    uint64_t next = 0;        // end of the furthest read of this stream
    uint64_t window = 0;      // read-ahead beyond `next`; 0 until the stream is sequential
    uint64_t last_read = 0;   // read_serial_ of its latest read
  };

  // A part of one read: served from `chunk`, or from lower when chunk is null.
  struct Piece {
    uint64_t start = 0;
    uint64_t end = 0;
    ChunkPtr chunk;
    bool claimed = false;  // this reader took the queued chunk and loads it itself
  };

  // Splits [offset, end) into pieces over chunks_; claims queued chunks. Requires mu_.
  std::vector<Piece> plan_read(uint64_t offset, uint64_t end) const;
  // Updates streams_ for a read of [offset, end), drops chunks no stream wants and, when
  // `read_ahead`, queues new ones within budget. Returns whether anything was queued. Requires
  // mu_.
  bool track_read(uint64_t offset, uint64_t end, bool read_ahead) const;
  // Queues the chunks overlapping [from, to) not yet in chunks_, while the budget lasts.
  // Requires mu_.
  bool schedule(uint64_t from, uint64_t to) const;
  // Removes chunks outside every stream's window. Requires mu_.
  void drop_unwanted() const;
  // Marks the chunks among `pieces` that this reader claimed and has not loaded as failed, and
  // wakes their waiters. Takes mu_.
  void abandon(std::span<const Piece> pieces) const;
  // Reads the chunk's bytes from lower, outside any lock, and publishes the outcome.
  Status load(const ChunkPtr& chunk) const;
  void worker_loop() const;

  const std::unique_ptr<BlockSource> lower_;
  const PrefetchOptions options_;
  MemoryBudget& budget_;
  const uint64_t size_;

  // Guards everything below except the stats. A leaf lock: never held across a lower read.
  mutable std::mutex mu_;
  mutable std::condition_variable work_cv_;   // queue_ gained work, or stopping_
  mutable std::condition_variable chunk_cv_;  // some chunk left kLoading
  mutable bool stopping_ = false;
  mutable std::map<uint64_t, ChunkPtr> chunks_;  // by start, a multiple of chunk_bytes
  mutable std::deque<ChunkPtr> queue_;           // kQueued chunks, oldest first
  mutable std::vector<Stream> streams_;
  mutable uint64_t read_serial_ = 0;

  mutable std::atomic<uint64_t> background_reads_{0};
  mutable std::atomic<uint64_t> bytes_prefetched_{0};
  mutable std::atomic<uint64_t> bytes_from_prefetch_{0};

  // Started by the first read that queues a chunk, after everything above exists.
  mutable std::once_flag workers_started_;
  mutable std::vector<std::thread> workers_;
};

// Validates the options and builds a PrefetchSource.
// Errors: InvalidArgument (null lower, a zero chunk or initial window, max_window below
// initial_window or above kMaxWindowBytes, a max_window of more than kMaxWindowChunks chunks,
// threads above kMaxThreads).
Result<std::unique_ptr<PrefetchSource>> open_prefetch(std::unique_ptr<BlockSource> lower,
                                                      PrefetchOptions options,
                                                      MemoryBudget& budget);

}  // namespace imgfs::cache
