#include "formats/gzip_source.h"

#include <openssl/evp.h>
#include <zlib.h>

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

std::string zlib_message(const z_stream& strm, int ret) {
  if (strm.msg != nullptr) return strm.msg;
  return "zlib error " + std::to_string(ret);
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

// Copies span bytes [offset, offset + dst.size()) out of pieces of GzipSource::kPieceBytes.
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

// Raw-deflate zlib inflater that ends itself, for the frontier. The frontier stays on zlib because
// it must stop at deflate block boundaries to record checkpoints (inflate with Z_BLOCK). ISA-L 2.30
// has no such stop: a boundary shows only when a call happens to return at one, which small input
// steps make likely for dynamic blocks but never for streams of fixed-Huffman blocks. Spans use
// the faster engine (decode_span).
struct RawInflater {
  z_stream strm{};
  bool ready = false;
  Status init() {
    const int ret = inflateInit2(&strm, -15);
    if (ret != Z_OK) return Status::Corruption("inflateInit2 failed: " + zlib_message(strm, ret));
    ready = true;
    return Status::OK();
  }
  ~RawInflater() {
    if (ready) inflateEnd(&strm);
  }
};

}  // namespace

// The sequential inflater and everything only it touches. Owned by the reader that set
// advancing_ under mu_; the mutex hand-over orders one owner's writes before the next's reads.
struct GzipSource::Frontier {
  enum class State { kBody, kTrailer, kNextMember, kDone };

  RawInflater inflater;
  State state = State::kBody;
  std::vector<std::byte> input = std::vector<std::byte>(kInputChunkBytes);
  uint64_t in_end = 0;     // compressed offset just past the buffered input
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

  auto frontier = std::make_unique<GzipSource::Frontier>();
  if (Status s = frontier->inflater.init(); !s.ok()) return s.with_context(name);
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
      frontier_(std::move(frontier)),
      used_initial_index_(index != nullptr) {
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

GzipSource::~GzipSource() = default;

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
      cv_.wait(lock);
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
          cache_insert_locked(ref.key, **decoded, (**decoded)->pieces.size() * kPieceBytes);
        }
        cv_.notify_all();
      });
      // The checkpoint is stable: a deque element never changed, or the const loaded table.
      decoded = decode_span(*ref.checkpoint, ref.end - span_start, ref.in_bound, ref.crc);
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
  z_stream& strm = f.inflater.strm;
  if (strm.avail_in == 0) {
    if (f.in_end >= lower_size_) {
      return fail(Status::Corruption(describe() +
                                     ": gzip stream is truncated at compressed offset " +
                                     std::to_string(f.in_end)));
    }
    const uint64_t length = std::min(kInputChunkBytes, lower_size_ - f.in_end);
    if (Status s = read_lower(f.in_end, std::span(f.input).first(length)); !s.ok()) return s;
    strm.next_in = reinterpret_cast<Bytef*>(f.input.data());
    strm.avail_in = static_cast<uInt>(length);
    f.in_end += length;
  }
  if (f.piece == nullptr || f.piece_used == kPieceBytes) {
    auto piece = std::make_unique_for_overwrite<std::byte[]>(kPieceBytes);
    f.piece = piece.get();
    f.piece_used = 0;
    std::lock_guard lock(mu_);
    f.span->pieces.push_back(std::move(piece));
  }
  std::byte* const out = f.piece + f.piece_used;
  const uInt room = static_cast<uInt>(kPieceBytes - f.piece_used);
  strm.next_out = reinterpret_cast<Bytef*>(out);
  strm.avail_out = room;
  const uInt avail_in_before = strm.avail_in;
  const int ret = inflate(&strm, Z_BLOCK);
  const uint64_t in_offset = f.in_end - strm.avail_in;
  if (ret != Z_OK && ret != Z_STREAM_END && ret != Z_BUF_ERROR) {
    return fail(Status::Corruption(describe() + ": inflate failed near compressed offset " +
                                   std::to_string(in_offset) + ": " + zlib_message(strm, ret)));
  }
  const size_t produced = room - strm.avail_out;
  if (ret == Z_BUF_ERROR && produced == 0 && strm.avail_in == avail_in_before) {
    // inflate had input and room and still could not move: the data cannot be decoded.
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

  if (ret == Z_STREAM_END) {
    // Hold this output back until the trailer's CRC32 and ISIZE (and, at the end, the size and
    // SHA1) check, so the read that reaches a bad end fails instead of returning bytes.
    f.state = Frontier::State::kTrailer;
    return Status::OK();
  }
  Publication publication;
  publication.published_out = f.out_total;
  const bool block_boundary = (strm.data_type & 0xc0) == 0x80;
  if (block_boundary && f.out_total - f.span_start >= options_.span_bytes) {
    GzipCheckpoint checkpoint;
    checkpoint.out_offset = f.out_total;
    checkpoint.in_offset = in_offset;
    checkpoint.bits = static_cast<uint8_t>(strm.data_type & 7);
    checkpoint.window_bytes = static_cast<uint32_t>(f.history.length());
    std::vector<std::byte> window(f.history.length());
    f.history.copy_to(window);
    Result<std::vector<std::byte>> packed = pack_window(window);
    if (!packed.ok()) return fail(packed.status().with_context(describe()));
    checkpoint.packed_window = std::move(*packed);
    start_span(std::move(checkpoint), publication);
  }
  publish(std::move(publication));
  return Status::OK();
}

void GzipSource::start_span(GzipCheckpoint checkpoint, Publication& publication) const {
  Frontier& f = *frontier_;
  publication.checkpoint = std::move(checkpoint);
  publication.completed_span_crc = f.span_crc;
  f.span = std::make_shared<Span>();
  f.span_start = f.out_total;
  f.span_crc = crc32_of(0, {});
  f.piece = nullptr;
  publication.next_span = f.span;
}

Status GzipSource::step_trailer() const {
  Frontier& f = *frontier_;
  z_stream& strm = f.inflater.strm;
  const uint64_t at = f.in_end - strm.avail_in;
  std::byte trailer[kTrailerBytes];
  if (strm.avail_in >= kTrailerBytes) {
    std::memcpy(trailer, strm.next_in, kTrailerBytes);
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
  strm.avail_in = 0;
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
  if (inflateReset(&f.inflater.strm) != Z_OK) {
    return fail(Status::Corruption(describe() + ": inflateReset failed"));
  }
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
  start_span(std::move(checkpoint), publication);
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
  {
    std::lock_guard lock(mu_);
    published_out_ = published;
    if (publication.checkpoint || publication.done) {
      const size_t completed = checkpoints_.size() - 1;
      span_crcs_.push_back(publication.completed_span_crc);
      if (!building_->pieces.empty()) {
        const uint64_t bytes = building_->pieces.size() * kPieceBytes;
        cache_insert_locked(completed, std::move(building_), bytes);
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
  cv_.notify_all();
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
    const GzipCheckpoint& checkpoint, uint64_t span_length, uint64_t in_bound,
    uint32_t span_crc) const {
  const std::string where = describe() + ": re-inflating the span at output offset " +
                            std::to_string(checkpoint.out_offset);
  Result<std::unique_ptr<Inflater>> made = make_inflater(span_engine_);
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
        uint8_t first_bits = 0;
        if (checkpoint.bits != 0) {
          first_bits =
              static_cast<uint8_t>(std::to_integer<unsigned>(pending[0]) >> (8 - checkpoint.bits));
          pending = pending.subspan(1);
        }
        if (Status s = inflater.reset(window, checkpoint.bits, first_bits); !s.ok()) {
          return s.with_context(where);
        }
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

std::shared_ptr<const GzipSource::Span> GzipSource::cache_lookup_locked(size_t index) const {
  const auto it = cache_.find(index);
  if (it == cache_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, it->second.lru_position);
  return it->second.span;
}

void GzipSource::cache_insert_locked(size_t index, std::shared_ptr<const Span> span,
                                     uint64_t bytes) const {
  if (cache_.contains(index)) return;
  lru_.push_front(index);
  cache_.emplace(index, CacheEntry{std::move(span), bytes, lru_.begin()});
  cache_bytes_ += bytes;
  // Keep the newest span even when it alone is over the limit, so the reader that decoded it
  // is not left racing eviction.
  while (cache_bytes_ > options_.span_cache_bytes && cache_.size() > 1) {
    const auto victim = cache_.find(lru_.back());
    cache_bytes_ -= victim->second.bytes;
    cache_.erase(victim);
    lru_.pop_back();
  }
}

}  // namespace imgfs::formats
