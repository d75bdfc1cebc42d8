// gzip index: the pure parts of zran-style random access into a gzip stream (FORMATS.md (c),
// zlib examples/zran.c). Turns gzip header bytes into the offset of the deflate data, keeps the
// last 32 KiB of output as a sliding window, and packs a checkpoint's window with deflate level 1
// (images are mostly zeros, so a 32 KiB window usually packs to a few hundred bytes).
// Also turns a checkpoint index into bytes for a file and back (serialize_gzip_index,
// parse_gzip_index), so a later open resumes from checkpoints instead of inflating from the start.
// No I/O and no locks here: gzip_source does the reading and the threading.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "formats/status.h"

namespace imgfs::formats {

// Deflate's history: a back-reference reaches at most this far.
inline constexpr size_t kGzipWindowBytes = 32 * 1024;

// Headers longer than this (a huge FNAME/FCOMMENT) are treated as Corruption.
inline constexpr size_t kGzipMaxHeaderBytes = 1 << 20;

// The result of scanning the start of a gzip member (RFC 1952 section 2.3).
struct GzipHeaderScan {
  // False when `bytes` ended before the header did: call again with more bytes.
  bool complete = false;
  // When complete: the header length, i.e. the offset of the deflate data in the member.
  size_t length = 0;
};

// Scans the gzip member header at the start of `bytes`: magic 1f 8b, CM 8, no reserved flags,
// FEXTRA, FNAME, FCOMMENT (bounds-checked) and FHCRC (verified).
// Errors: Corruption (not a gzip header, reserved flags, a bad header CRC, longer than
// kGzipMaxHeaderBytes). Pure function.
Result<GzipHeaderScan> scan_gzip_header(std::span<const std::byte> bytes);

// The uncompressed size of a single-member gzip stream: the smallest n >= min_size with
// n mod 2^32 == isize (ISIZE, the last 4 bytes of the stream).
// Errors: InvalidArgument when no such n fits in 64 bits.
Result<uint64_t> size_from_isize(uint32_t isize, uint64_t min_size);

// An access point into the deflate data of one gzip member, where inflation can resume.
struct GzipCheckpoint {
  uint64_t out_offset = 0;  // uncompressed offset of the first byte after the point
  uint64_t in_offset = 0;   // compressed offset of the first full byte after the point
  uint8_t bits = 0;  // 0..7: the top `bits` bits of byte in_offset - 1 are the first input bits
  // Length of the unpacked window: < 32 KiB near a member start, 0 at a member start (which
  // also has no bits, as deflate data starts on a byte).
  uint32_t window_bytes = 0;
  std::vector<std::byte> packed_window;  // the window, zlib-wrapped deflate level 1
};

// Packs the output preceding a checkpoint (at most kGzipWindowBytes) with deflate level 1.
// Errors: InvalidArgument for a window longer than kGzipWindowBytes; Corruption if zlib fails.
Result<std::vector<std::byte>> pack_window(std::span<const std::byte> window);

// Unpacks `checkpoint`'s window into out, which must be exactly window_bytes long.
// Errors: Corruption when the packed bytes do not unpack to exactly window_bytes.
Status unpack_window(const GzipCheckpoint& checkpoint, std::span<std::byte> out);

// A checkpoint index as it is saved and loaded: everything a GzipSource needs to read any span
// at once. Span i is the output [checkpoints[i].out_offset, checkpoints[i + 1].out_offset), the
// last span ends at uncompressed_size. Invariants (checked by validate_gzip_index):
// checkpoints[0] is the first member start (out 0, no bits, no window); in_offset strictly
// increases and out_offset never decreases (an empty member gives an empty span); every offset is
// within the sizes; span_crcs holds one CRC32 per complete span: all of them when complete,
// all but the last (still being inflated) otherwise.
struct GzipIndexSnapshot {
  uint64_t compressed_size = 0;
  uint64_t uncompressed_size = 0;
  // The whole stream was inflated and every check passed (member CRC32s and ISIZEs, the total
  // size, and the SHA1 in `sha1` when it is set). Only a complete snapshot is verified.
  bool verified = false;
  // The SHA1 of the whole output that the verification matched, when one was expected.
  std::optional<std::array<uint8_t, 20>> sha1;
  std::vector<GzipCheckpoint> checkpoints;
  std::vector<uint32_t> span_crcs;

  bool complete() const { return !checkpoints.empty() && span_crcs.size() == checkpoints.size(); }
};

// A loaded span longer than this is refused: re-inflating it would need too much memory. The
// frontier cuts spans near span_bytes (at most one deflate block, a few MiB, later).
inline constexpr uint64_t kGzipMaxIndexSpanBytes = uint64_t{1} << 30;

// Checks the invariants above, that packed windows are no longer than zlib's bound for their
// window, and that a verified snapshot is complete.
// Errors: Corruption naming the first bad field. Pure function.
Status validate_gzip_index(const GzipIndexSnapshot& index);

// The on-disk form: magic "IMGFSGZI", version, flags, sizes, SHA1, counts, checkpoint records
// (windows stay packed), span CRC32s, then a SHA-256 over everything before it. Little-endian.
// Pure function; the snapshot should satisfy validate_gzip_index (else parsing it fails).
std::vector<std::byte> serialize_gzip_index(const GzipIndexSnapshot& index);

// Parses bytes from serialize_gzip_index, treating them as untrusted: the checksum, magic,
// version, flags, every count and offset, and the sizes against the stream being opened.
// Errors: Corruption for anything wrong (the caller ignores the file and builds a new index).
// Pure function.
Result<GzipIndexSnapshot> parse_gzip_index(std::span<const std::byte> bytes,
                                           uint64_t expected_compressed_size,
                                           uint64_t expected_uncompressed_size);

// The last kGzipWindowBytes bytes written: the dictionary a checkpoint needs. Not thread-safe.
class SlidingWindow {
 public:
  SlidingWindow() : ring_(kGzipWindowBytes) {}

  // Forgets everything (a new gzip member starts with an empty history).
  void clear() {
    length_ = 0;
    next_ = 0;
  }

  void append(std::span<const std::byte> bytes);

  // Number of valid bytes, at most kGzipWindowBytes.
  size_t length() const { return length_; }

  // The valid bytes, oldest first; out must be length() bytes long.
  void copy_to(std::span<std::byte> out) const;

 private:
  std::vector<std::byte> ring_;
  size_t length_ = 0;
  size_t next_ = 0;  // ring position the next byte goes to
};

}  // namespace imgfs::formats
