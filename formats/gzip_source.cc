#include "formats/gzip_source.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "formats/byte_order.h"
#include "formats/checked_math.h"
#include "formats/inflater.h"
#include "formats/scope_exit.h"

namespace imgfs::formats {

namespace {

// Cache and decoding keys of spans from a loaded partial index, apart from the frontier's.
constexpr size_t kLoadedSpanKey = size_t{1} << (sizeof(size_t) * 8 - 1);
// Compressed bytes asked of lower per read: small enough that a first 4 KiB read stays cheap.
constexpr uint64_t kInputChunkBytes = 64 * 1024;
// First guess at a member header's length; grown while the header is incomplete.
constexpr uint64_t kHeaderProbeBytes = 4 * 1024;
// The smallest gzip member: 10-byte header, an empty deflate block, 8-byte trailer.
constexpr uint64_t kMinGzipBytes = 18;
constexpr uint64_t kTrailerBytes = 8;

std::string hex(std::span<const uint8_t> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text;
  for (uint8_t b : bytes) {
    text += kDigits[b >> 4];
    text += kDigits[b & 15];
  }
  return text;
}

uint32_t crc32_of(uint32_t crc, std::span<const std::byte> bytes) {
  return crc32_update(crc, bytes);
}

// Reads and scans the member header at `offset`, growing the probe while it is incomplete.
// Returns the header length.
Result<uint64_t> read_member_header(const BlockSource& lower, uint64_t offset,
                                    uint64_t lower_size) {
  const uint64_t available = lower_size - offset;
  uint64_t probe_length = std::min(kHeaderProbeBytes, available);
  for (;;) {
    std::vector<std::byte> probe(probe_length);
    if (Status s = lower.read_at(offset, probe); !s.ok()) return s;
    Result<GzipHeaderScan> scan = scan_gzip_header(probe);
    if (!scan.ok()) {
      return Status::Corruption(scan.status().message() + " at compressed offset " +
                                std::to_string(offset));
    }
    if (scan->complete) return uint64_t{scan->length};
    if (probe_length == available) {
      return Status::Corruption(
          "gzip stream is truncated in a member header at compressed offset " +
          std::to_string(offset));
    }
    probe_length = std::min({probe_length * 4, available, uint64_t{kGzipMaxHeaderBytes}});
  }
}

// Copies span bytes [offset, offset + dst.size()) out of pieces of GzipSource::kPieceBytes, where
// pieces[0] is the piece that holds offset.
void copy_from_pieces(std::span<const std::byte* const> pieces, uint64_t offset,
                      std::span<std::byte> dst) {
  constexpr uint64_t kPiece = GzipSource::kPieceBytes;
  size_t piece = 0;
  uint64_t within = offset % kPiece;
  size_t done = 0;
  while (done < dst.size()) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kPiece - within, dst.size() - done));
    std::memcpy(dst.data() + done, pieces[piece] + within, n);
    done += n;
    within = 0;
    ++piece;
  }
}

// Compressed offset of the first byte an inflation from `checkpoint` reads: the byte holding its
// pending bits, if it has any.
uint64_t first_input_byte(const GzipCheckpoint& checkpoint) {
  return checkpoint.in_offset - (checkpoint.bits != 0 ? 1 : 0);
}

// Readies `inflater` to go on from `checkpoint`, given the window before it and the input from
// first_input_byte(checkpoint) on; returns that input past the byte of pending bits.
Result<std::span<const std::byte>> start_at(Inflater& inflater, const GzipCheckpoint& checkpoint,
                                            std::span<const std::byte> window,
                                            std::span<const std::byte> input) {
  uint8_t first_bits = 0;
  if (checkpoint.bits != 0) {
    if (input.empty()) return Status::Corruption("no input at a checkpoint");
    first_bits = static_cast<uint8_t>(std::to_integer<unsigned>(input[0]) >> (8 - checkpoint.bits));
    input = input.subspan(1);
  }
  if (Status s = inflater.reset(window, checkpoint.bits, first_bits); !s.ok()) return s;
  return input;
}

// Input per inflate call while the frontier looks for a block boundary with an engine that does
// not stop at one (ISA-L): a boundary shows when a call's input runs out in the next block's
// header, and a dynamic header is some 60 to 100 bytes. Measured on a 256 MiB tar of /usr: 32-byte
// steps found a boundary within about one block for 231 of 256 spans, for 7% of the input.
constexpr size_t kBoundaryStepBytes = 32;
// Input looked through for a boundary before the frontier gives up on that engine for the member:
// many blocks of a dynamic stream, where boundaries show within one or two.
constexpr uint64_t kBoundarySearchBytes = 256 * 1024;
// Output inflated with zlib from a boundary ISA-L reported, compared before it becomes a
// checkpoint: a wrong bit position cannot reproduce 4 KiB of the stream.
constexpr uint64_t kCandidateCheckBytes = 4096;

}  // namespace

// The sequential inflater and everything only it touches. Owned by the reader that set
// advancing_ under mu_; the mutex hand-over orders one owner's writes before the next's reads.
struct GzipSource::Frontier {
  enum class State { kBody, kTrailer, kNextMember, kDone };

  std::unique_ptr<Inflater> inflater;
  std::unique_ptr<Inflater> checker;  // zlib, for candidates
  bool on_fallback = false;           // this member went on with zlib (fall_back_to_zlib)
  State state = State::kBody;
  std::vector<std::byte> input = std::vector<std::byte>(kInputChunkBytes);
  std::span<const std::byte> pending;  // the end of `input` not yet taken by the inflater
  uint64_t input_start = 0;            // compressed offset of input[0]
  uint64_t in_end = 0;                 // compressed offset just past the buffered input
  uint64_t trailer_at = 0;          // compressed offset of the member trailer, once the body ended
  uint64_t boundary_search_in = 0;  // input passed in small steps while looking for a boundary
  std::optional<Candidate> candidate;  // a boundary ISA-L reported, until settled
  uint64_t out_total = 0;  // bytes inflated, including output held back until a trailer checks
  uint64_t published = 0;  // mirror of published_out_, which only the frontier's owner changes

  uint32_t member_crc = 0;
  uint64_t member_out = 0;
  SlidingWindow history;  // this member's last 32 KiB of output

  std::shared_ptr<Span> span;  // the span being filled (also building_)
  uint64_t span_start = 0;
  uint32_t span_crc = 0;
  std::byte* piece = nullptr;  // last piece of `span`
  size_t piece_used = 0;

  EVP_MD_CTX* sha = nullptr;            // whole output; only when expected_sha1 is set
  EVP_MD_CTX* alternate_sha = nullptr;  // alternate_sha1_range; only when that is set too

  ~Frontier() {
    EVP_MD_CTX_free(sha);
    EVP_MD_CTX_free(alternate_sha);
  }
};

// What one frontier step makes visible to readers, applied under mu_.
struct GzipSource::Publication {
  uint64_t published_out = 0;
  // When set: checkpoint for a new span; the current span is complete with this CRC.
  std::optional<GzipCheckpoint> checkpoint;
  uint32_t completed_span_crc = 0;
  std::shared_ptr<Span> next_span;
  bool done = false;  // the stream ended and every check passed
};

Result<std::unique_ptr<GzipSource>> open_gzip(std::unique_ptr<BlockSource> lower,
                                              const GzipOptions& options) {
  if (lower == nullptr) return Status::InvalidArgument("open_gzip: no lower source");
  const std::string name = "gzip(" + lower->describe() + ")";
  if (options.span_bytes == 0) return Status::InvalidArgument(name + ": span_bytes is 0");
  if (options.span_engine && !inflate_engine_available(*options.span_engine)) {
    return Status::NotSupported(name + ": the requested inflate engine is not built in");
  }
  if (options.alternate_sha1_range &&
      !checked_add(options.alternate_sha1_range->first, options.alternate_sha1_range->second)) {
    return Status::InvalidArgument(name + ": alternate_sha1_range overflows");
  }
  const uint64_t lower_size = lower->size();
  if (lower_size < kMinGzipBytes) {
    return Status::Corruption(name + ": " + std::to_string(lower_size) +
                              " bytes is too short for a gzip stream");
  }
  Result<uint64_t> header_length = read_member_header(*lower, 0, lower_size);
  if (!header_length.ok()) return header_length.status().with_context(name);
  if (lower_size - *header_length < kTrailerBytes) {
    return Status::Corruption(name + ": gzip stream is truncated after its header");
  }
  std::byte isize_bytes[4];
  if (Status s = lower->read_at(lower_size - 4, isize_bytes); !s.ok()) {
    return s.with_context(name + ": reading ISIZE");
  }
  uint64_t size = 0;
  if (options.exact_uncompressed_size) {
    size = *options.exact_uncompressed_size;
  } else {
    Result<uint64_t> from_isize =
        size_from_isize(load_le32(isize_bytes), options.min_uncompressed_size);
    if (!from_isize.ok()) return from_isize.status().with_context(name);
    size = *from_isize;
  }

  if (options.frontier_engine && !inflate_engine_available(*options.frontier_engine)) {
    return Status::NotSupported(name + ": the requested inflate engine is not built in");
  }
  auto frontier = std::make_unique<GzipSource::Frontier>();
  Result<std::unique_ptr<Inflater>> inflater =
      make_inflater(options.frontier_engine.value_or(fastest_inflate_engine()));
  if (!inflater.ok()) return inflater.status().with_context(name);
  frontier->inflater = std::move(*inflater);
  if (Status s = frontier->inflater->reset({}, 0, 0); !s.ok()) return s.with_context(name);
  if (options.expected_sha1) {
    frontier->sha = EVP_MD_CTX_new();
    if (frontier->sha == nullptr || EVP_DigestInit_ex(frontier->sha, EVP_sha1(), nullptr) != 1) {
      return Status::Corruption(name + ": cannot start SHA1");
    }
    if (options.alternate_sha1_range) {
      frontier->alternate_sha = EVP_MD_CTX_new();
      if (frontier->alternate_sha == nullptr ||
          EVP_DigestInit_ex(frontier->alternate_sha, EVP_sha1(), nullptr) != 1) {
        return Status::Corruption(name + ": cannot start SHA1");
      }
    }
  }
  frontier->in_end = *header_length;
  frontier->member_crc = crc32_of(0, {});
  frontier->span_crc = frontier->member_crc;
  frontier->span = std::make_shared<GzipSource::Span>();

  GzipCheckpoint first;
  first.in_offset = *header_length;

  // A given index is used only when it describes this stream; otherwise it is ignored and the
  // index is built again, as if none was given.
  std::shared_ptr<const GzipIndexSnapshot> index = options.initial_index;
  if (index != nullptr && (index->compressed_size != lower_size ||
                           index->uncompressed_size != size || !validate_gzip_index(*index).ok() ||
                           index->checkpoints.front().in_offset != first.in_offset)) {
    index.reset();
  }
  // Verified for these options: a SHA1 the caller expects must be the one the index matched.
  const bool verified = index != nullptr && index->verified &&
                        (!options.expected_sha1 || index->sha1 == options.expected_sha1);
  if (verified) frontier->state = GzipSource::Frontier::State::kDone;
  GzipOptions kept = options;
  kept.initial_index.reset();  // the source copies what it needs
  return std::unique_ptr<GzipSource>(new GzipSource(
      std::move(lower), kept, size, std::move(frontier), std::move(first), index.get(), verified));
}

GzipSource::GzipSource(std::unique_ptr<BlockSource> lower, const GzipOptions& options,
                       uint64_t size, std::unique_ptr<Frontier> frontier, GzipCheckpoint first,
                       const GzipIndexSnapshot* index, bool verified)
    : lower_(std::move(lower)),
      options_(options),
      size_(size),
      lower_size_(lower_->size()),
      span_engine_(options.span_engine.value_or(fastest_inflate_engine())),
      frontier_engine_(options.frontier_engine.value_or(fastest_inflate_engine())),
      frontier_(std::move(frontier)),
      used_initial_index_(index != nullptr),
      own_pool_(options.span_pool == nullptr
                    ? std::make_unique<GzipSpanPool>(options.span_cache_bytes)
                    : nullptr),
      pool_(options.span_pool != nullptr ? *options.span_pool : *own_pool_) {
  if (verified) {
    // Every span is known and the whole stream checked out: the frontier is never needed.
    checkpoints_.assign(index->checkpoints.begin(), index->checkpoints.end());
    span_crcs_.assign(index->span_crcs.begin(), index->span_crcs.end());
    for (const GzipCheckpoint& checkpoint : checkpoints_) {
      window_bytes_ += checkpoint.packed_window.size();
    }
    published_out_ = size_;
    frontier_->published = size_;
    done_ = true;
    verified_sha1_ = index->sha1;
    return;
  }
  building_ = frontier_->span;
  checkpoints_.push_back(std::move(first));
  if (index != nullptr) {
    // The spans with a CRC32 (all but the last when incomplete) serve reads ahead of the frontier,
    // which still starts from the beginning to check the stream's CRC32s, ISIZEs and SHA1.
    const size_t spans = index->span_crcs.size();
    loaded_checkpoints_ = index->checkpoints;
    loaded_crcs_ = index->span_crcs;
    loaded_end_ = spans == index->checkpoints.size() ? size_ : index->checkpoints[spans].out_offset;
    for (const GzipCheckpoint& checkpoint : loaded_checkpoints_) {
      window_bytes_ += checkpoint.packed_window.size();
    }
  }
}

GzipSource::~GzipSource() {
  for (const auto& [key, pool_key] : pool_keys_) pool_.erase(pool_key);
}

Status GzipSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  const uint64_t end = offset + out.size();
  if (size_ > 0 && size_ - end <= options_.finish_tail_bytes) {
    // Near the end, the stream is finished first, whoever is advancing the frontier: the last
    // byte is published only after the end-of-stream checks (CRC32, ISIZE, SHA1) passed.
    std::byte last;
    Result<uint64_t> finished = read_some(size_ - 1, size_, std::span(&last, 1));
    if (!finished.ok()) return finished.status();
  }
  uint64_t pos = offset;
  while (pos < end) {
    Result<uint64_t> copied = read_some(pos, end, out.subspan(pos - offset));
    if (!copied.ok()) return copied.status();
    pos += *copied;
  }
  return Status::OK();
}

Result<uint64_t> GzipSource::read_some(uint64_t pos, uint64_t end, std::span<std::byte> dst) const {
  std::unique_lock lock(mu_);
  for (;;) {
    if (!failed_.ok()) return failed_;
    if (pos < published_out_) {
      const size_t index = span_index_locked(pos);
      const uint64_t span_start = checkpoints_[index].out_offset;
      if (!done_ && index + 1 == checkpoints_.size()) {
        // The span being inflated: copy its published part. The pieces never move, and the
        // frontier writes only past published_out_.
        const std::shared_ptr<const Span> span = building_;
        const uint64_t n = std::min(end, published_out_) - pos;
        const size_t first_piece = (pos - span_start) / kPieceBytes;
        const size_t last_piece = (pos - span_start + n - 1) / kPieceBytes;
        std::vector<const std::byte*> pieces;
        for (size_t i = first_piece; i <= last_piece; ++i) pieces.push_back(span->pieces[i].get());
        lock.unlock();
        copy_from_pieces(pieces, pos - span_start, dst.first(n));
        return n;
      }
      const bool last = index + 1 == checkpoints_.size();
      const SpanRef ref{index, &checkpoints_[index],
                        last ? size_ : checkpoints_[index + 1].out_offset,
                        last ? lower_size_ : checkpoints_[index + 1].in_offset, span_crcs_[index]};
      Result<uint64_t> copied = copy_from_span(lock, ref, pos, end, dst);
      if (!copied.ok() || *copied != 0) return copied;
      continue;
    }
    // Ahead of the frontier, a loaded index serves the read at once, except near the end: there
    // the frontier must run so the end-of-stream checks pass before the last bytes are served.
    if (pos < loaded_end_ && size_ - end > options_.finish_tail_bytes) {
      const auto it =
          std::upper_bound(loaded_checkpoints_.begin(), loaded_checkpoints_.end(), pos,
                           [](uint64_t p, const GzipCheckpoint& c) { return p < c.out_offset; });
      const size_t index = static_cast<size_t>(it - loaded_checkpoints_.begin()) - 1;
      const bool last = index + 1 == loaded_checkpoints_.size();
      const SpanRef ref{kLoadedSpanKey | index, &loaded_checkpoints_[index],
                        last ? size_ : loaded_checkpoints_[index + 1].out_offset,
                        last ? lower_size_ : loaded_checkpoints_[index + 1].in_offset,
                        loaded_crcs_[index]};
      Result<uint64_t> copied = copy_from_span(lock, ref, pos, end, dst);
      if (!copied.ok() || *copied != 0) return copied;
      continue;
    }
    if (advancing_) {
      // Woken when the frontier publishes this byte, hands over or fails; not on every step.
      const auto wanted = wanted_.insert(pos + 1);
      cv_.wait(lock);
      wanted_.erase(wanted);
      continue;
    }
    advancing_ = true;
    lock.unlock();
    Status advanced;
    {
      ScopeExit finish([&] {
        std::lock_guard relock(mu_);
        advancing_ = false;
        cv_.notify_all();
      });
      advanced = advance_until(end);
    }
    if (!advanced.ok()) return advanced;
    lock.lock();
  }
}

Result<uint64_t> GzipSource::copy_from_span(std::unique_lock<std::mutex>& lock, const SpanRef& ref,
                                            uint64_t pos, uint64_t end,
                                            std::span<std::byte> dst) const {
  const uint64_t span_start = ref.checkpoint->out_offset;
  const uint64_t n = std::min(end, ref.end) - pos;
  std::shared_ptr<const Span> span = cache_lookup_locked(ref.key);
  if (span == nullptr) {
    if (decoding_.contains(ref.key)) {
      cv_.wait(lock);
      return uint64_t{0};
    }
    decoding_.insert(ref.key);
    lock.unlock();
    std::optional<Result<std::shared_ptr<const Span>>> decoded;
    {
      ScopeExit finish([&] {
        std::lock_guard relock(mu_);
        decoding_.erase(ref.key);
        // Cache before waking the waiters, so they find the span instead of decoding again.
        if (decoded && decoded->ok()) {
          cache_insert_locked(ref.key, **decoded);
        }
        cv_.notify_all();
      });
      // The checkpoint is stable: a deque element never changed, or the const loaded table.
      decoded =
          decode_span(*ref.checkpoint, ref.end - span_start, ref.in_bound, ref.crc, span_engine_);
    }
    if (!decoded->ok()) return decoded->status();
    span = **decoded;
    lock.lock();
    if (!failed_.ok()) return failed_;
  }
  lock.unlock();
  std::vector<const std::byte*> pieces;
  for (const auto& piece : span->pieces) pieces.push_back(piece.get());
  copy_from_pieces(std::span(pieces).subspan((pos - span_start) / kPieceBytes), pos - span_start,
                   dst.first(n));
  return n;
}

uint64_t GzipSource::inflated_bytes() const {
  std::lock_guard lock(mu_);
  return published_out_;
}

size_t GzipSource::checkpoint_count() const {
  std::lock_guard lock(mu_);
  return checkpoints_.size();
}

bool GzipSource::fully_indexed() const {
  std::lock_guard lock(mu_);
  return done_;
}

std::vector<uint64_t> GzipSource::checkpoint_offsets() const {
  std::lock_guard lock(mu_);
  std::vector<uint64_t> offsets;
  for (const GzipCheckpoint& checkpoint : checkpoints_) offsets.push_back(checkpoint.out_offset);
  return offsets;
}

uint64_t GzipSource::checkpoint_window_bytes() const {
  std::lock_guard lock(mu_);
  return window_bytes_;
}

GzipIndexSnapshot GzipSource::snapshot_index() const {
  GzipIndexSnapshot index;
  index.compressed_size = lower_size_;
  index.uncompressed_size = size_;
  std::lock_guard lock(mu_);
  // A loaded partial index that reaches further than the frontier's is the better one to keep.
  const uint64_t covered = done_ ? size_ : checkpoints_.back().out_offset;
  if (covered < loaded_end_) {
    index.checkpoints = loaded_checkpoints_;
    index.span_crcs = loaded_crcs_;
    return index;
  }
  index.verified = done_;
  if (done_) index.sha1 = verified_sha1_;
  index.checkpoints.assign(checkpoints_.begin(), checkpoints_.end());
  index.span_crcs.assign(span_crcs_.begin(), span_crcs_.end());
  return index;
}

bool GzipSource::used_initial_index() const { return used_initial_index_; }

Status GzipSource::advance_until(uint64_t target) const {
  Frontier& f = *frontier_;
  while (f.published < target) {
    if (f.state == Frontier::State::kDone) {
      return fail(Status::Corruption(describe() + ": gzip stream ended before offset " +
                                     std::to_string(target)));
    }
    if (Status s = advance_step(); !s.ok()) return s;
  }
  return Status::OK();
}

Status GzipSource::advance_step() const {
  switch (frontier_->state) {
    case Frontier::State::kBody:
      return step_body();
    case Frontier::State::kTrailer:
      return step_trailer();
    case Frontier::State::kNextMember:
      return step_next_member();
    case Frontier::State::kDone:
      break;
  }
  return Status::OK();
}

Status GzipSource::step_body() const {
  Frontier& f = *frontier_;
  if (f.pending.empty()) {
    if (f.in_end >= lower_size_) {
      return fail(Status::Corruption(describe() +
                                     ": gzip stream is truncated at compressed offset " +
                                     std::to_string(f.in_end)));
    }
    const uint64_t length = std::min(kInputChunkBytes, lower_size_ - f.in_end);
    if (Status s = read_lower(f.in_end, std::span(f.input).first(length)); !s.ok()) return s;
    f.pending = std::span<const std::byte>(f.input).first(length);
    f.input_start = f.in_end;
    f.in_end += length;
  }
  add_piece_if_full();
  std::byte* const out = f.piece + f.piece_used;
  const size_t room = kPieceBytes - f.piece_used;
  // Small steps make a boundary show with an engine that does not stop at one.
  const bool searching = !f.inflater->stops_at_block_ends() && !f.candidate &&
                         f.out_total - f.span_start >= options_.span_bytes;
  // In a stored block the step ends exactly at the block end.
  const size_t stored_left = f.inflater->stored_block_input_left();
  const size_t step = stored_left > 0 ? stored_left : kBoundaryStepBytes;
  const std::span<const std::byte> in =
      searching ? f.pending.first(std::min(step, f.pending.size())) : f.pending;
  Result<InflateProgress> progress = f.inflater->inflate(in, std::span(out, room));
  if (!progress.ok()) {
    return fail(Status::Corruption(describe() + ": inflate failed near compressed offset " +
                                   std::to_string(f.in_end - f.pending.size()) + ": " +
                                   progress.status().message()));
  }
  f.pending = f.pending.subspan(progress->consumed);
  if (searching) f.boundary_search_in += progress->consumed;
  const uint64_t in_offset = f.in_end - f.pending.size();
  const size_t produced = progress->produced;
  if (progress->consumed == 0 && produced == 0 && !progress->stream_end) {
    // The inflater had input and room and still could not move: the data cannot be decoded.
    return fail(Status::Corruption(describe() + ": inflate made no progress at compressed offset " +
                                   std::to_string(in_offset)));
  }
  if (produced > size_ - f.out_total) {
    return fail(Status::Corruption(describe() + ": gzip stream is more than " +
                                   std::to_string(size_) + " bytes, expected " +
                                   std::to_string(size_)));
  }
  const std::span<const std::byte> bytes(out, produced);
  f.piece_used += produced;
  f.member_crc = crc32_of(f.member_crc, bytes);
  f.member_out += produced;
  f.span_crc = crc32_of(f.span_crc, bytes);
  f.history.append(bytes);
  if (f.sha != nullptr) EVP_DigestUpdate(f.sha, bytes.data(), bytes.size());
  if (f.alternate_sha != nullptr) {
    const uint64_t range_start = options_.alternate_sha1_range->first;
    const uint64_t range_end = range_start + options_.alternate_sha1_range->second;
    const uint64_t from = std::max(range_start, f.out_total);
    const uint64_t to = std::min(range_end, f.out_total + produced);
    if (from < to) EVP_DigestUpdate(f.alternate_sha, out + (from - f.out_total), to - from);
  }
  f.out_total += produced;

  if (progress->stream_end) {
    // Hold this output back until the trailer's CRC32 and ISIZE (and, at the end, the size and
    // SHA1) check, so the read that reaches a bad end fails instead of returning bytes. A
    // candidate this close to the member end is not worth a span of its own.
    const size_t overread = f.inflater->overread_bytes();
    if (overread > in_offset) {
      return fail(Status::Corruption(describe() + ": inflater gave back more input than it took"));
    }
    f.trailer_at = in_offset - overread;
    f.candidate.reset();
    f.state = Frontier::State::kTrailer;
    return Status::OK();
  }
  Publication publication;
  publication.published_out = f.out_total;
  if (f.candidate) {
    if (f.out_total - f.candidate->checkpoint.out_offset < f.candidate->check_length) {
      // Not yet enough output after the candidate to check it: readers wait at the candidate.
      publication.published_out = f.candidate->checkpoint.out_offset;
    } else {
      settle_candidate(publication);
    }
  } else if (const std::optional<uint32_t> back = f.inflater->block_boundary();
             back && f.out_total - f.span_start >= options_.span_bytes) {
    std::vector<std::byte> window(f.history.length());
    f.history.copy_to(window);
    Result<GzipCheckpoint> checkpoint = checkpoint_here(in_offset, *back, window);
    if (!checkpoint.ok()) return fail(checkpoint.status());
    if (f.inflater->stops_at_block_ends()) {
      start_span(std::move(*checkpoint), f.span_crc, publication);
    } else if (Result<Candidate> candidate = check_ahead(std::move(*checkpoint), window);
               candidate.ok()) {
      f.candidate = std::move(*candidate);
      f.boundary_search_in = 0;
    }
    // Otherwise zlib could not inflate from the boundary: the search goes on.
  } else if (searching && f.boundary_search_in > kBoundarySearchBytes) {
    if (Status s = fall_back_to_zlib(); !s.ok()) return s;
  }
  publish(std::move(publication));
  return Status::OK();
}

Result<GzipCheckpoint> GzipSource::checkpoint_here(uint64_t in_offset, uint32_t back,
                                                   std::span<const std::byte> window) const {
  const Frontier& f = *frontier_;
  if (back > in_offset * 8) {
    return Status::Corruption(describe() + ": inflater reported a block boundary before the data");
  }
  const uint64_t bit_position = in_offset * 8 - back;
  GzipCheckpoint checkpoint;
  checkpoint.out_offset = f.out_total;
  checkpoint.in_offset = (bit_position + 7) / 8;
  checkpoint.bits = static_cast<uint8_t>(checkpoint.in_offset * 8 - bit_position);
  checkpoint.window_bytes = static_cast<uint32_t>(window.size());
  Result<std::vector<std::byte>> packed = pack_window(window);
  if (!packed.ok()) return packed.status().with_context(describe());
  checkpoint.packed_window = std::move(*packed);
  return checkpoint;
}

Result<GzipSource::Candidate> GzipSource::check_ahead(GzipCheckpoint checkpoint,
                                                      std::span<const std::byte> window) const {
  Frontier& f = *frontier_;
  const uint64_t from = first_input_byte(checkpoint);
  if (from < f.input_start) return Status::NotFound("the boundary is before the buffered input");
  if (f.checker == nullptr) {
    Result<std::unique_ptr<Inflater>> made = make_inflater(InflateEngine::kZlib);
    if (!made.ok()) return made.status();
    f.checker = std::move(*made);
  }
  Result<std::span<const std::byte>> started =
      start_at(*f.checker, checkpoint, window,
               std::span<const std::byte>(f.input).subspan(from - f.input_start, f.in_end - from));
  if (!started.ok()) return started.status();
  std::span<const std::byte> input = *started;
  std::array<std::byte, kCandidateCheckBytes> expected;
  uint64_t length = 0;
  while (length < expected.size()) {
    Result<InflateProgress> progress =
        f.checker->inflate(input, std::span(expected).subspan(length));
    if (!progress.ok()) return progress.status();
    input = input.subspan(progress->consumed);
    length += progress->produced;
    if (progress->stream_end || (progress->consumed == 0 && progress->produced == 0)) break;
  }
  if (length == 0) return Status::NotFound("nothing inflated after the boundary");
  return Candidate{std::move(checkpoint), f.span_crc, length,
                   crc32_of(crc32_of(0, {}), std::span(expected).first(length))};
}

void GzipSource::settle_candidate(Publication& publication) const {
  Frontier& f = *frontier_;
  Candidate candidate = std::move(*f.candidate);
  f.candidate.reset();
  const uint64_t at = candidate.checkpoint.out_offset;
  std::vector<std::byte> after(f.out_total - at);
  std::vector<const std::byte*> pieces;
  for (const auto& piece : f.span->pieces) pieces.push_back(piece.get());
  copy_from_pieces(std::span(pieces).subspan((at - f.span_start) / kPieceBytes), at - f.span_start,
                   after);
  const std::span<const std::byte> checked = std::span(after).first(candidate.check_length);
  // A boundary that does not reproduce the stream is dropped: the span and the search go on.
  if (crc32_of(crc32_of(0, {}), checked) != candidate.check_crc) return;
  start_span(std::move(candidate.checkpoint), candidate.crc_before, publication);
  append_to_span(after);
}

Status GzipSource::fall_back_to_zlib() const {
  Frontier& f = *frontier_;
  const std::string where =
      describe() + ": going on with zlib at output offset " + std::to_string(f.out_total);
  const GzipCheckpoint* start = nullptr;
  {
    std::lock_guard lock(mu_);
    start = &checkpoints_.back();  // the current span's; deque elements never move
  }
  if (start->out_offset != f.span_start) {
    return fail(Status::Corruption(where + ": the span's checkpoint is not where it began"));
  }
  Result<std::unique_ptr<Inflater>> made = make_inflater(InflateEngine::kZlib);
  if (!made.ok()) return fail(made.status().with_context(where));
  Inflater& inflater = **made;
  std::vector<std::byte> window(start->window_bytes);
  if (start->window_bytes != 0) {
    if (Status s = unpack_window(*start, window); !s.ok()) return fail(s.with_context(where));
  }
  uint64_t in_pos = first_input_byte(*start);
  bool started = false;
  // Its own input buffer: until it succeeds, the frontier's state stays as it was, so a failed
  // lower read can be retried by the next step.
  std::vector<std::byte> input(kInputChunkBytes);
  std::span<const std::byte> pending;
  std::vector<std::byte> scratch(kPieceBytes);
  uint32_t crc = crc32_of(0, {});
  for (uint64_t left = f.out_total - start->out_offset; left > 0;) {
    if (pending.empty()) {
      if (in_pos >= lower_size_) {
        return fail(Status::Corruption(where + ": compressed data ended early"));
      }
      const uint64_t length = std::min(kInputChunkBytes, lower_size_ - in_pos);
      if (Status s = read_lower(in_pos, std::span(input).first(length)); !s.ok()) return s;
      pending = std::span<const std::byte>(input).first(length);
      in_pos += length;
      if (!started) {
        Result<std::span<const std::byte>> rest = start_at(inflater, *start, window, pending);
        if (!rest.ok()) return fail(rest.status().with_context(where));
        pending = *rest;
        started = true;
      }
    }
    const size_t room = static_cast<size_t>(std::min<uint64_t>(scratch.size(), left));
    Result<InflateProgress> progress = inflater.inflate(pending, std::span(scratch).first(room));
    if (!progress.ok()) return fail(progress.status().with_context(where));
    pending = pending.subspan(progress->consumed);
    if ((progress->consumed == 0 && progress->produced == 0 && !pending.empty()) ||
        (progress->stream_end && progress->produced < left)) {
      return fail(Status::Corruption(where + ": the stream does not inflate as it did"));
    }
    crc = crc32_of(crc, std::span(scratch).first(progress->produced));
    left -= progress->produced;
  }
  if (crc != f.span_crc) {
    return fail(Status::Corruption(where + ": the span's CRC32 differs from the first inflation"));
  }
  f.inflater = std::move(*made);
  f.on_fallback = true;
  std::memcpy(f.input.data(), pending.data(), pending.size());
  f.pending = std::span<const std::byte>(f.input).first(pending.size());
  f.input_start = in_pos - pending.size();
  f.in_end = in_pos;
  f.boundary_search_in = 0;
  return Status::OK();
}

void GzipSource::start_span(GzipCheckpoint checkpoint, uint32_t completed_crc,
                            Publication& publication) const {
  Frontier& f = *frontier_;
  f.span_start = checkpoint.out_offset;
  publication.checkpoint = std::move(checkpoint);
  publication.completed_span_crc = completed_crc;
  f.span = std::make_shared<Span>();
  f.span_crc = crc32_of(0, {});
  f.piece = nullptr;
  publication.next_span = f.span;
}

void GzipSource::add_piece_if_full() const {
  Frontier& f = *frontier_;
  if (f.piece != nullptr && f.piece_used < kPieceBytes) return;
  auto piece = std::make_unique_for_overwrite<std::byte[]>(kPieceBytes);
  f.piece = piece.get();
  f.piece_used = 0;
  // Readers take the piece list of the span being filled under mu_.
  std::lock_guard lock(mu_);
  f.span->pieces.push_back(std::move(piece));
}

void GzipSource::append_to_span(std::span<const std::byte> bytes) const {
  Frontier& f = *frontier_;
  f.span_crc = crc32_of(f.span_crc, bytes);
  while (!bytes.empty()) {
    add_piece_if_full();
    const size_t n = std::min(bytes.size(), kPieceBytes - f.piece_used);
    std::memcpy(f.piece + f.piece_used, bytes.data(), n);
    f.piece_used += n;
    bytes = bytes.subspan(n);
  }
}

Status GzipSource::step_trailer() const {
  Frontier& f = *frontier_;
  const uint64_t at = f.trailer_at;
  std::byte trailer[kTrailerBytes];
  if (at >= f.input_start && at + kTrailerBytes <= f.in_end) {
    std::memcpy(trailer, f.input.data() + (at - f.input_start), kTrailerBytes);
  } else {
    if (lower_size_ - at < kTrailerBytes) {
      return fail(Status::Corruption(
          describe() + ": gzip stream is truncated in a trailer at compressed offset " +
          std::to_string(at)));
    }
    if (Status s = read_lower(at, trailer); !s.ok()) return s;
  }
  if (load_le32(trailer) != f.member_crc) {
    return fail(Status::Corruption(
        describe() + ": gzip member CRC32 mismatch at compressed offset " + std::to_string(at)));
  }
  if (load_le32(trailer + 4) != static_cast<uint32_t>(f.member_out)) {
    return fail(Status::Corruption(
        describe() + ": gzip member ISIZE mismatch at compressed offset " + std::to_string(at)));
  }
  f.in_end = at + kTrailerBytes;
  f.pending = {};
  f.state = Frontier::State::kNextMember;
  return Status::OK();
}

Status GzipSource::step_next_member() const {
  Frontier& f = *frontier_;
  const uint64_t at = f.in_end;
  if (at == lower_size_) return finish_stream();
  std::byte first[1];
  if (Status s = read_lower(at, first); !s.ok()) return s;
  if (first[0] == std::byte{0}) {
    // Zero padding after the last member is tolerated; anything else there is not.
    std::vector<std::byte> chunk(kInputChunkBytes);
    for (uint64_t pos = at; pos < lower_size_;) {
      const uint64_t length = std::min(kInputChunkBytes, lower_size_ - pos);
      const std::span<std::byte> bytes = std::span(chunk).first(length);
      if (Status s = read_lower(pos, bytes); !s.ok()) return s;
      if (std::any_of(bytes.begin(), bytes.end(), [](std::byte b) { return b != std::byte{0}; })) {
        return fail(Status::Corruption(describe() +
                                       ": non-zero bytes after the last gzip member at compressed "
                                       "offset " +
                                       std::to_string(at)));
      }
      pos += length;
    }
    return finish_stream();
  }
  Result<uint64_t> header_length = read_member_header(*lower_, at, lower_size_);
  if (!header_length.ok()) {
    if (header_length.status().code() == StatusCode::kCorruption) {
      return fail(header_length.status().with_context(describe()));
    }
    return header_length.status().with_context(describe());
  }
  if (f.on_fallback) {
    // Each member gets the frontier's engine again: the zlib fallback was for the last one.
    Result<std::unique_ptr<Inflater>> made = make_inflater(frontier_engine_);
    if (!made.ok()) return fail(made.status().with_context(describe()));
    f.inflater = std::move(*made);
    f.on_fallback = false;
  }
  if (Status s = f.inflater->reset({}, 0, 0); !s.ok()) return fail(s.with_context(describe()));
  f.in_end = at + *header_length;
  f.member_crc = crc32_of(0, {});
  f.member_out = 0;
  f.history.clear();
  f.state = Frontier::State::kBody;

  // Every member starts a span: it needs no window, and spans never cross a member boundary.
  Publication publication;
  publication.published_out = f.out_total;
  GzipCheckpoint checkpoint;
  checkpoint.out_offset = f.out_total;
  checkpoint.in_offset = f.in_end;
  start_span(std::move(checkpoint), f.span_crc, publication);
  publish(std::move(publication));
  return Status::OK();
}

Status GzipSource::finish_stream() const {
  Frontier& f = *frontier_;
  if (f.out_total != size_) {
    return fail(Status::Corruption(describe() + ": gzip stream is " + std::to_string(f.out_total) +
                                   " bytes, expected " + std::to_string(size_)));
  }
  if (options_.expected_sha1) {
    std::array<uint8_t, 20> digest{};
    unsigned int length = 0;
    if (EVP_DigestFinal_ex(f.sha, digest.data(), &length) != 1 || length != digest.size()) {
      return fail(Status::Corruption(describe() + ": SHA1 failed"));
    }
    bool matches = digest == *options_.expected_sha1;
    if (!matches && f.alternate_sha != nullptr) {
      const auto [range_offset, range_length] = *options_.alternate_sha1_range;
      std::array<uint8_t, 20> alternate{};
      // A range reaching past the output was never fully digested, so it cannot match.
      if (range_length <= size_ && range_offset <= size_ - range_length &&
          EVP_DigestFinal_ex(f.alternate_sha, alternate.data(), &length) == 1) {
        matches = alternate == *options_.expected_sha1;
      }
    }
    if (!matches) {
      return fail(Status::Corruption(describe() + ": tar stream SHA1 mismatch: manifest says " +
                                     hex(*options_.expected_sha1) + ", data is " + hex(digest)));
    }
  }
  f.state = Frontier::State::kDone;
  Publication publication;
  publication.published_out = f.out_total;
  publication.completed_span_crc = f.span_crc;
  publication.done = true;
  publish(std::move(publication));
  return Status::OK();
}

void GzipSource::publish(Publication publication) const {
  Frontier& f = *frontier_;
  // The last byte stays unpublished until every end check passed: inflate may hand out the
  // final output before it reports the end of the stream.
  const uint64_t published = publication.done
                                 ? publication.published_out
                                 : std::min(publication.published_out, size_ == 0 ? 0 : size_ - 1);
  bool wake = publication.done;
  {
    std::lock_guard lock(mu_);
    published_out_ = published;
    wake = wake || (!wanted_.empty() && *wanted_.begin() <= published);
    if (publication.checkpoint || publication.done) {
      const size_t completed = checkpoints_.size() - 1;
      span_crcs_.push_back(publication.completed_span_crc);
      if (!building_->pieces.empty()) {
        cache_insert_locked(completed, std::move(building_));
      }
      building_.reset();
    }
    if (publication.checkpoint) {
      window_bytes_ += publication.checkpoint->packed_window.size();
      checkpoints_.push_back(std::move(*publication.checkpoint));
      building_ = std::move(publication.next_span);
    }
    if (publication.done) {
      done_ = true;
      verified_sha1_ = options_.expected_sha1;
    }
  }
  f.published = published;
  if (wake) cv_.notify_all();
}

Status GzipSource::fail(Status status) const {
  {
    std::lock_guard lock(mu_);
    if (failed_.ok()) failed_ = status;
  }
  cv_.notify_all();
  return status;
}

Status GzipSource::read_lower(uint64_t offset, std::span<std::byte> out) const {
  Status s = lower_->read_at(offset, out);
  if (!s.ok()) {
    return s.with_context(describe() + ": reading " + std::to_string(out.size()) +
                          " compressed bytes at " + std::to_string(offset));
  }
  return s;
}

Result<std::shared_ptr<const GzipSource::Span>> GzipSource::decode_span(
    const GzipCheckpoint& checkpoint, uint64_t span_length, uint64_t in_bound, uint32_t span_crc,
    InflateEngine engine) const {
  const std::string where = describe() + ": re-inflating the span at output offset " +
                            std::to_string(checkpoint.out_offset);
  Result<std::unique_ptr<Inflater>> made = make_inflater(engine);
  if (!made.ok()) return made.status().with_context(where);
  Inflater& inflater = **made;
  std::vector<std::byte> window(checkpoint.window_bytes);
  if (checkpoint.window_bytes != 0) {
    if (Status s = unpack_window(checkpoint, window); !s.ok()) return s.with_context(where);
  }
  // With pending bits, the span's first bits are the top of the byte before in_offset, which
  // the first chunk then starts with.
  uint64_t in_pos = checkpoint.in_offset;
  if (checkpoint.bits != 0) {
    if (in_pos == 0) return Status::Corruption(where + ": bad checkpoint");
    --in_pos;
  }
  bool started = false;
  auto span = std::make_shared<Span>();
  std::vector<std::byte> input(kInputChunkBytes);
  std::span<const std::byte> pending;  // read but not yet consumed
  uint64_t produced_total = 0;
  uint32_t crc = crc32_of(0, {});
  size_t piece_used = kPieceBytes;
  bool starved = true;  // the engine needs input before it can make progress
  while (produced_total < span_length) {
    // An engine may hold decoded output back (ISA-L decodes ahead into its own buffer), so new
    // input is read only once a call with none left produced nothing.
    if (pending.empty() && starved) {
      starved = false;
      if (in_pos >= in_bound) {
        return Status::Corruption(where + ": compressed data ended early at offset " +
                                  std::to_string(in_pos));
      }
      const uint64_t length = std::min(kInputChunkBytes, in_bound - in_pos);
      if (Status s = read_lower(in_pos, std::span(input).first(length)); !s.ok()) return s;
      pending = std::span<const std::byte>(input).first(length);
      in_pos += length;
      if (!started) {
        Result<std::span<const std::byte>> rest = start_at(inflater, checkpoint, window, pending);
        if (!rest.ok()) return rest.status().with_context(where);
        pending = *rest;
        started = true;
        continue;
      }
    }
    if (piece_used == kPieceBytes) {
      span->pieces.push_back(std::make_unique_for_overwrite<std::byte[]>(kPieceBytes));
      piece_used = 0;
    }
    std::byte* const out = span->pieces.back().get() + piece_used;
    const size_t room = static_cast<size_t>(
        std::min<uint64_t>(kPieceBytes - piece_used, span_length - produced_total));
    Result<InflateProgress> progress = inflater.inflate(pending, std::span(out, room));
    if (!progress.ok()) {
      return Status::Corruption(where + " near compressed offset " +
                                std::to_string(in_pos - pending.size()) + ": " +
                                progress.status().message());
    }
    pending = pending.subspan(progress->consumed);
    if (progress->consumed == 0 && progress->produced == 0 && !pending.empty()) {
      // The engine had input and room and still could not move: the data cannot be decoded.
      return Status::Corruption(where + ": inflate made no progress");
    }
    starved = progress->produced == 0 && pending.empty();
    crc = crc32_of(crc, std::span<const std::byte>(out, progress->produced));
    piece_used += progress->produced;
    produced_total += progress->produced;
    if (progress->stream_end && produced_total < span_length) {
      return Status::Corruption(where + ": the gzip member ended inside the span");
    }
  }
  if (crc != span_crc) {
    // The frontier saw different bytes here: lower did not return the same compressed data.
    return Status::Corruption(where + ": CRC32 differs from the first inflation");
  }
  return std::shared_ptr<const Span>(std::move(span));
}

size_t GzipSource::span_index_locked(uint64_t pos) const {
  // The last checkpoint at or before pos; empty spans (equal offsets) are skipped by taking the
  // last of equals.
  const auto it =
      std::upper_bound(checkpoints_.begin(), checkpoints_.end(), pos,
                       [](uint64_t p, const GzipCheckpoint& c) { return p < c.out_offset; });
  return static_cast<size_t>(it - checkpoints_.begin()) - 1;
}

std::shared_ptr<const GzipSource::Span> GzipSource::cache_lookup_locked(size_t key) const {
  if (last_span_ != nullptr && last_key_ == key) return last_span_;
  const auto it = pool_keys_.find(key);
  return it == pool_keys_.end() ? nullptr : pool_.find(it->second);
}

void GzipSource::cache_insert_locked(size_t key, std::shared_ptr<const Span> span) const {
  auto [it, inserted] = pool_keys_.try_emplace(key, 0);
  if (inserted) it->second = pool_.new_key();
  pool_.insert(it->second, span, span->pieces.size() * kPieceBytes);
  last_key_ = key;
  last_span_ = std::move(span);
}

}  // namespace imgfs::formats
