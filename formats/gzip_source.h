// GzipSource: turns a gzip stream (one or more concatenated members) into its uncompressed bytes,
// lazily and with random access, the zran way (FORMATS.md (c), zlib examples/zran.c).
//
// One "frontier" inflater walks the stream sequentially, only as far as reads need. On the way it
// records a checkpoint (compressed offset, bit offset, packed 32 KiB window) at deflate block
// boundaries about every span_bytes of output, and at every member start. Span i is the output
// [checkpoint i, checkpoint i+1). Spans behind the frontier are re-inflated from their checkpoint
// on demand and kept in a byte-bounded LRU (a GzipSpanPool, which a mount shares between its
// images). The frontier also checks each member's CRC32 and ISIZE, the total size, and the SHA1
// of the whole output against the manifest.
//
// Both inflations use the fastest engine built in (ISA-L when present, formats/inflater.h).
// zlib stops at every block end; ISA-L does not, so an ISA-L frontier looks for a boundary in
// small input steps once a span is long enough, checks each one it finds by inflating a little
// from it with zlib before using it, and goes on with zlib for the rest of a member where no
// boundary shows (streams of fixed-Huffman blocks).
//
// The index can be saved (snapshot_index) and given to a later open (GzipOptions::initial_index),
// which then reads any span at once from its checkpoint; every such span is still checked
// against the CRC32 the first inflation recorded.
//
// Lock order: mu_ is the only lock and no lock is held across a lower read or an inflate call.
// The frontier's inflater state belongs to the one reader that set advancing_ (under mu_); the
// others wait on cv_. Span re-inflation is single-flight per span through decoding_.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "formats/block_source.h"
#include "formats/buffer_pool.h"
#include "formats/gzip_index.h"
#include "formats/inflater.h"
#include "formats/status.h"

namespace imgfs::formats {

// One inflated span, in fixed-size pieces of GzipSource::kPieceBytes (the last one partly used).
// Pieces never move once allocated, so readers copy from the published part of a span the
// frontier is still appending to.
struct GzipSpan {
  std::vector<std::unique_ptr<std::byte[]>> pieces;
};

// Inflated spans of every gzip stream of a mount, under one budget.
using GzipSpanPool = BufferPool<GzipSpan>;

struct GzipOptions {
  // The uncompressed size is the smallest n >= min_uncompressed_size with n % 2^32 == ISIZE
  // (the last 4 bytes of the stream), read at open. Verified when the stream end is reached.
  uint64_t min_uncompressed_size = 0;
  // The exact uncompressed size when the caller knows it; overrides the ISIZE rule above. A stream
  // of several members needs it: ISIZE then describes only the last member.
  std::optional<uint64_t> exact_uncompressed_size;
  uint64_t span_bytes = 1 << 20;  // checkpoint spacing in output bytes; > 0
  // Inflated spans are kept in this pool, shared with other streams; it must outlive the source.
  // Unset: the source keeps a pool of span_cache_bytes of its own. Either way the source also
  // holds on to the span it inflated last.
  GzipSpanPool* span_pool = nullptr;
  uint64_t span_cache_bytes = 16 << 20;
  std::optional<std::array<uint8_t, 20>> expected_sha1;  // SHA1 of the whole output (tar stream)
  // Accept also a SHA1 match over this output range instead (euca2ools <=1.3.1 digested the
  // image, not the tar stream): {offset, length}.
  std::optional<std::pair<uint64_t, uint64_t>> alternate_sha1_range;
  // A read that leaves at most this many bytes before the end inflates to the end, so the
  // end-of-stream checks (CRC32, ISIZE, SHA1) run when a reader reaches the last bytes it uses
  // (a tar stream ends in padding nobody reads).
  uint64_t finish_tail_bytes = 0;
  // A checkpoint index saved from an earlier GzipSource over the same stream (snapshot_index,
  // then serialize_gzip_index and parse_gzip_index). Used only when it is valid and its sizes
  // and first checkpoint match this stream; otherwise ignored (see used_initial_index()). A
  // verified index (with the same SHA1 when expected_sha1 is set) makes the source fully
  // indexed at once. Any other index serves reads from its spans at once while the frontier
  // still runs from the start for the end-of-stream checks, which the reads of the last
  // finish_tail_bytes + 1 bytes wait for. Either way each span decoded from it must match its
  // stored CRC32, so a stale or forged window gives Corruption, not wrong bytes.
  std::shared_ptr<const GzipIndexSnapshot> initial_index;
  // The engine that re-inflates spans from checkpoints; unset means the fastest one built in
  // (ISA-L when present).
  std::optional<InflateEngine> span_engine;
  // The engine of the first, sequential inflation; unset means the fastest one built in.
  std::optional<InflateEngine> frontier_engine;
};

class GzipSource final : public BlockSource {
 public:
  // Size of a GzipSpan's pieces.
  static constexpr size_t kPieceBytes = 64 * 1024;

  ~GzipSource() override;

  uint64_t size() const override { return size_; }

  // Inflates what is needed (advancing the frontier, or re-inflating spans from checkpoints).
  // Thread-safe; concurrent readers share one frontier inflation and one decode per span.
  // Errors: InvalidArgument (range past size()), IOError from lower (not sticky: a later read
  // retries), Corruption (bad deflate data, CRC32/ISIZE/size/SHA1 mismatch, trailing garbage;
  // sticky when the frontier finds it: every later read fails too).
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  std::string describe() const override { return "gzip(" + lower_->describe() + ")"; }

  // Uncompressed bytes the frontier has inflated and published so far. Thread-safe.
  uint64_t inflated_bytes() const;
  // Checkpoints recorded so far (the first member start counts). Thread-safe.
  size_t checkpoint_count() const;
  // True once the frontier reached the end and every check passed. Thread-safe.
  bool fully_indexed() const;
  // Uncompressed offsets of the checkpoints recorded so far, ascending. Thread-safe.
  std::vector<uint64_t> checkpoint_offsets() const;
  // Bytes held by packed checkpoint windows (memory cost of the index). Thread-safe.
  uint64_t checkpoint_window_bytes() const;
  // The index so far, to save for the next open. Complete and verified once fully_indexed();
  // before that, the spans completed so far (or a loaded index that reaches further). Copies the
  // packed windows. Thread-safe.
  GzipIndexSnapshot snapshot_index() const;
  // True when options.initial_index was accepted. Thread-safe (fixed at open).
  bool used_initial_index() const;

 private:
  using Span = GzipSpan;
  struct Frontier;
  // A block boundary ISA-L reported, held back until the frontier's output after it can be
  // compared with what zlib inflated from it.
  struct Candidate {
    GzipCheckpoint checkpoint;
    uint32_t crc_before = 0;    // CRC32 of the span's output before the checkpoint
    uint64_t check_length = 0;  // bytes zlib inflated from the checkpoint (> 0)
    uint32_t check_crc = 0;     // and their CRC32
  };
  struct Publication;
  // A span to copy from: its cache key, checkpoint, output end, compressed bound and CRC32.
  struct SpanRef {
    size_t key;
    const GzipCheckpoint* checkpoint;
    uint64_t end;
    uint64_t in_bound;
    uint32_t crc;
  };
  friend Result<std::unique_ptr<GzipSource>> open_gzip(std::unique_ptr<BlockSource> lower,
                                                       const GzipOptions& options);

  GzipSource(std::unique_ptr<BlockSource> lower, const GzipOptions& options, uint64_t size,
             std::unique_ptr<Frontier> frontier, GzipCheckpoint first,
             const GzipIndexSnapshot* index, bool verified);

  // Copies some bytes at pos (< end) into dst; returns how many (> 0).
  Result<uint64_t> read_some(uint64_t pos, uint64_t end, std::span<std::byte> dst) const;
  // Copies bytes at pos from a complete span, decoding it (single-flight) when not cached. Called
  // with `lock` held on mu_; returns it unlocked with the count, or 0 after waiting for another
  // reader's decode (lock held again: the caller looks again).
  Result<uint64_t> copy_from_span(std::unique_lock<std::mutex>& lock, const SpanRef& ref,
                                  uint64_t pos, uint64_t end, std::span<std::byte> dst) const;
  // Runs the frontier until target bytes are published, the stream ends, or an error.
  // Only the reader that set advancing_ calls it, without holding mu_.
  Status advance_until(uint64_t target) const;
  // One unit of frontier work: one inflate call, one trailer, or one member start.
  Status advance_step() const;
  Status step_body() const;
  // Frontier only: the checkpoint at the deflate block boundary the inflater stands at, `back`
  // input bits before in_offset; `window` is the member's last 32 KiB of output (or less).
  Result<GzipCheckpoint> checkpoint_here(uint64_t in_offset, uint32_t back,
                                         std::span<const std::byte> window) const;
  // Frontier only: inflates a little from a boundary ISA-L reported with zlib, from the input
  // still buffered, and returns it as a candidate carrying the length and CRC32 of that output.
  // Errors: any when zlib cannot inflate from there (the boundary is then not used).
  Result<Candidate> check_ahead(GzipCheckpoint checkpoint, std::span<const std::byte> window) const;
  // Frontier only: compares the output after the pending candidate with what check_ahead saw;
  // when it matches, ends the span there, moving the bytes after it to the next span.
  void settle_candidate(Publication& publication) const;
  // Frontier only: re-inflates the current span with zlib up to where the frontier stands and
  // goes on with zlib, which stops at every block end, for the rest of the member.
  Status fall_back_to_zlib() const;
  Status step_trailer() const;
  Status step_next_member() const;
  Status finish_stream() const;
  // Reads compressed bytes at offset; errors get this layer's context.
  Status read_lower(uint64_t offset, std::span<std::byte> out) const;
  // Re-inflates the span starting at `checkpoint` (span_length bytes, compressed data before
  // in_bound) with `engine` and checks it against the CRC32 the frontier saw. Called without mu_.
  Result<std::shared_ptr<const Span>> decode_span(const GzipCheckpoint& checkpoint,
                                                  uint64_t span_length, uint64_t in_bound,
                                                  uint32_t span_crc, InflateEngine engine) const;
  // Publishes frontier progress under mu_ and wakes waiters.
  void publish(Publication publication) const;
  // Frontier only: ends the current span at `checkpoint` (its bytes before it have CRC32
  // `completed_crc`) and opens the next, recording both in `publication` for publish().
  void start_span(GzipCheckpoint checkpoint, uint32_t completed_crc,
                  Publication& publication) const;
  // Frontier only: appends output bytes to the span being filled.
  void append_to_span(std::span<const std::byte> bytes) const;
  // Frontier only: gives the span being filled a new piece when its last one is full.
  void add_piece_if_full() const;
  // Makes the frontier failure sticky and returns it.
  Status fail(Status status) const;

  size_t span_index_locked(uint64_t pos) const;
  std::shared_ptr<const Span> cache_lookup_locked(size_t key) const;
  void cache_insert_locked(size_t key, std::shared_ptr<const Span> span) const;

  const std::unique_ptr<BlockSource> lower_;
  const GzipOptions options_;
  const uint64_t size_;
  const uint64_t lower_size_;
  const InflateEngine span_engine_;
  const InflateEngine frontier_engine_;

  // Owned by the reader that set advancing_; handed over through mu_.
  const std::unique_ptr<Frontier> frontier_;

  const bool used_initial_index_;
  // A loaded unverified index: its checkpoints, the CRC32s of its complete spans, and where those
  // end. Fixed at open.
  std::vector<GzipCheckpoint> loaded_checkpoints_;
  std::vector<uint32_t> loaded_crcs_;
  uint64_t loaded_end_ = 0;

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  mutable Status failed_;                           // GUARDED_BY(mu_); sticky frontier error
  mutable bool advancing_ = false;                  // GUARDED_BY(mu_)
  mutable bool done_ = false;                       // GUARDED_BY(mu_)
  mutable uint64_t published_out_ = 0;              // GUARDED_BY(mu_)
  mutable std::deque<GzipCheckpoint> checkpoints_;  // GUARDED_BY(mu_); elements never change
  mutable std::deque<uint32_t> span_crcs_;          // GUARDED_BY(mu_); CRC32 of completed spans
  mutable uint64_t window_bytes_ = 0;               // GUARDED_BY(mu_)
  mutable std::optional<std::array<uint8_t, 20>> verified_sha1_;  // GUARDED_BY(mu_); once done_
  mutable std::shared_ptr<Span> building_;  // GUARDED_BY(mu_) (the vector, not the bytes)
  mutable std::set<size_t> decoding_;       // GUARDED_BY(mu_)
  // One past the byte each reader waiting for the frontier needs, so publish() wakes them only
  // when one of them can go on.
  mutable std::multiset<uint64_t> wanted_;  // GUARDED_BY(mu_)

  // The pool spans live in (own_pool_ when options.span_pool is unset), this source's keys in it
  // by span key, and the span cached last, held outside the pool so that a reader that waited
  // for a decode finds it even when the pool is too small to keep it.
  const std::unique_ptr<GzipSpanPool> own_pool_;
  GzipSpanPool& pool_;
  mutable std::unordered_map<size_t, uint64_t> pool_keys_;  // GUARDED_BY(mu_)
  mutable size_t last_key_ = 0;                             // GUARDED_BY(mu_)
  mutable std::shared_ptr<const Span> last_span_;           // GUARDED_BY(mu_)
};

// Opens a gzip stream over `lower`: checks the first member's header and reads ISIZE to fix
// size(). Nothing is inflated yet.
// Errors: InvalidArgument (bad options), Corruption (bad header, a stream too short to be gzip),
// IOError from lower.
Result<std::unique_ptr<GzipSource>> open_gzip(std::unique_ptr<BlockSource> lower,
                                              const GzipOptions& options);

}  // namespace imgfs::formats
