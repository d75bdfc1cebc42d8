#include "formats/gzip_index.h"

#include <openssl/evp.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "formats/byte_order.h"

namespace imgfs::formats {

namespace {

// RFC 1952 FLG bits.
constexpr uint8_t kFlagHcrc = 0x02;
constexpr uint8_t kFlagExtra = 0x04;
constexpr uint8_t kFlagName = 0x08;
constexpr uint8_t kFlagComment = 0x10;
constexpr uint8_t kFlagReserved = 0xe0;

constexpr size_t kFixedHeaderBytes = 10;

// Index file layout (little-endian).
constexpr char kIndexMagic[8] = {'I', 'M', 'G', 'F', 'S', 'G', 'Z', 'I'};
constexpr uint32_t kIndexVersion = 1;
constexpr uint32_t kIndexFlagVerified = 1;
constexpr uint32_t kIndexFlagSha1 = 2;
// magic, version, flags, compressed size, uncompressed size, SHA1, checkpoint and CRC counts.
constexpr size_t kIndexHeaderBytes = 8 + 4 + 4 + 8 + 8 + 20 + 8 + 8;
// out offset, in offset, bits, 3 zero bytes, window length, packed length.
constexpr size_t kIndexRecordBytes = 8 + 8 + 1 + 3 + 4 + 4;
constexpr size_t kIndexDigestBytes = 32;

// SHA-256 of `bytes`; false only if OpenSSL fails.
bool sha256(std::span<const std::byte> bytes, std::array<uint8_t, kIndexDigestBytes>* digest) {
  unsigned int length = 0;
  return EVP_Digest(bytes.data(), bytes.size(), digest->data(), &length, EVP_sha256(), nullptr) ==
             1 &&
         length == digest->size();
}

// Sequential little-endian reader over untrusted bytes; every take is bounds-checked.
class IndexReader {
 public:
  explicit IndexReader(std::span<const std::byte> bytes) : bytes_(bytes) {}
  size_t remaining() const { return bytes_.size() - pos_; }
  bool take(size_t length, std::span<const std::byte>* out) {
    if (remaining() < length) return false;
    *out = bytes_.subspan(pos_, length);
    pos_ += length;
    return true;
  }
  bool u8(uint8_t* v) {
    std::span<const std::byte> b;
    if (!take(1, &b)) return false;
    *v = std::to_integer<uint8_t>(b[0]);
    return true;
  }
  bool u32(uint32_t* v) {
    std::span<const std::byte> b;
    if (!take(4, &b)) return false;
    *v = load_le32(b.data());
    return true;
  }
  bool u64(uint64_t* v) {
    std::span<const std::byte> b;
    if (!take(8, &b)) return false;
    *v = load_le64(b.data());
    return true;
  }

 private:
  std::span<const std::byte> bytes_;
  size_t pos_ = 0;
};

void put_u32(std::vector<std::byte>* out, uint32_t v) {
  std::byte b[4];
  store_le32(b, v);
  out->insert(out->end(), b, b + 4);
}

void put_u64(std::vector<std::byte>* out, uint64_t v) {
  std::byte b[8];
  store_le64(b, v);
  out->insert(out->end(), b, b + 8);
}

uint8_t byte_at(std::span<const std::byte> bytes, size_t i) {
  return std::to_integer<uint8_t>(bytes[i]);
}

// Skips a zero-terminated field starting at *pos. False when the terminator is not in `bytes`.
bool skip_zero_terminated(std::span<const std::byte> bytes, size_t* pos) {
  const auto begin = bytes.begin() + static_cast<std::ptrdiff_t>(*pos);
  const auto nul = std::find(begin, bytes.end(), std::byte{0});
  if (nul == bytes.end()) return false;
  *pos = static_cast<size_t>(nul - bytes.begin()) + 1;
  return true;
}

}  // namespace

Result<GzipHeaderScan> scan_gzip_header(std::span<const std::byte> bytes) {
  const GzipHeaderScan incomplete;
  // Check the magic on whatever is there, so a short non-gzip input fails at once.
  if ((bytes.size() >= 1 && byte_at(bytes, 0) != 0x1f) ||
      (bytes.size() >= 2 && byte_at(bytes, 1) != 0x8b)) {
    return Status::Corruption("not a gzip header (bad magic)");
  }
  if (bytes.size() >= 3 && byte_at(bytes, 2) != 8) {
    return Status::Corruption("gzip compression method " + std::to_string(byte_at(bytes, 2)) +
                              " is not deflate");
  }
  if (bytes.size() >= 4 && (byte_at(bytes, 3) & kFlagReserved) != 0) {
    return Status::Corruption("gzip header has reserved flags set");
  }
  if (bytes.size() > kGzipMaxHeaderBytes) bytes = bytes.first(kGzipMaxHeaderBytes);
  const bool may_grow = bytes.size() < kGzipMaxHeaderBytes;
  auto need_more = [&]() -> Result<GzipHeaderScan> {
    if (may_grow) return incomplete;
    return Status::Corruption("gzip header is longer than " + std::to_string(kGzipMaxHeaderBytes) +
                              " bytes");
  };

  if (bytes.size() < kFixedHeaderBytes) return need_more();
  const uint8_t flags = byte_at(bytes, 3);
  size_t pos = kFixedHeaderBytes;
  if (flags & kFlagExtra) {
    if (bytes.size() - pos < 2) return need_more();
    const size_t extra_length = load_le16(bytes.data() + pos);
    pos += 2;
    if (bytes.size() - pos < extra_length) return need_more();
    pos += extra_length;
  }
  if ((flags & kFlagName) && !skip_zero_terminated(bytes, &pos)) return need_more();
  if ((flags & kFlagComment) && !skip_zero_terminated(bytes, &pos)) return need_more();
  if (flags & kFlagHcrc) {
    if (bytes.size() - pos < 2) return need_more();
    const uint32_t crc =
        crc32(0, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(pos));
    if (load_le16(bytes.data() + pos) != (crc & 0xffff)) {
      return Status::Corruption("gzip header CRC mismatch");
    }
    pos += 2;
  }
  return GzipHeaderScan{true, pos};
}

Result<uint64_t> size_from_isize(uint32_t isize, uint64_t min_size) {
  if (min_size <= isize) return uint64_t{isize};
  // Round (min_size - isize) up to a whole number of 2^32 wraps.
  const uint64_t shortfall = min_size - isize;
  const uint64_t wraps = (shortfall >> 32) + ((shortfall & 0xffffffffull) != 0 ? 1 : 0);
  if ((wraps >> 32) != 0) {
    return Status::InvalidArgument("no 64-bit size >= " + std::to_string(min_size) + " has ISIZE " +
                                   std::to_string(isize));
  }
  return (wraps << 32) + isize;
}

Result<std::vector<std::byte>> pack_window(std::span<const std::byte> window) {
  if (window.size() > kGzipWindowBytes) {
    return Status::InvalidArgument("gzip window of " + std::to_string(window.size()) +
                                   " bytes is longer than 32 KiB");
  }
  uLongf packed_length = compressBound(static_cast<uLong>(window.size()));
  std::vector<std::byte> packed(packed_length);
  const int ret = compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_length,
                            reinterpret_cast<const Bytef*>(window.data()),
                            static_cast<uLong>(window.size()), 1);
  if (ret != Z_OK) {
    return Status::Corruption("packing a gzip window failed: zlib error " + std::to_string(ret));
  }
  packed.resize(packed_length);
  packed.shrink_to_fit();
  return packed;
}

Status unpack_window(const GzipCheckpoint& checkpoint, std::span<std::byte> out) {
  if (out.size() != checkpoint.window_bytes || out.size() > kGzipWindowBytes) {
    return Status::Corruption("gzip window buffer has the wrong length");
  }
  if (out.empty()) return Status::OK();
  uLongf out_length = static_cast<uLongf>(out.size());
  const int ret = uncompress(reinterpret_cast<Bytef*>(out.data()), &out_length,
                             reinterpret_cast<const Bytef*>(checkpoint.packed_window.data()),
                             static_cast<uLong>(checkpoint.packed_window.size()));
  if (ret != Z_OK || out_length != out.size()) {
    return Status::Corruption("a packed gzip window does not unpack to " +
                              std::to_string(out.size()) + " bytes");
  }
  return Status::OK();
}

Status validate_gzip_index(const GzipIndexSnapshot& index) {
  const auto bad = [](const std::string& what) {
    return Status::Corruption("gzip index: " + what);
  };
  const std::vector<GzipCheckpoint>& points = index.checkpoints;
  if (points.empty()) return bad("no checkpoints");
  if (index.span_crcs.size() != points.size() && index.span_crcs.size() + 1 != points.size()) {
    return bad(std::to_string(index.span_crcs.size()) + " span CRCs for " +
               std::to_string(points.size()) + " checkpoints");
  }
  if (index.verified && !index.complete()) return bad("verified but incomplete");
  if (!index.verified && index.sha1) return bad("SHA1 set on an unverified index");
  const GzipCheckpoint& first = points.front();
  if (first.out_offset != 0 || first.bits != 0 || first.window_bytes != 0 ||
      !first.packed_window.empty()) {
    return bad("the first checkpoint is not a member start");
  }
  for (size_t i = 0; i < points.size(); ++i) {
    const GzipCheckpoint& point = points[i];
    const std::string where = "checkpoint " + std::to_string(i) + ": ";
    if (point.out_offset > index.uncompressed_size) return bad(where + "out offset past the end");
    if (point.in_offset >= index.compressed_size) return bad(where + "in offset past the end");
    if (point.bits > 7) return bad(where + "bits > 7");
    if (point.bits != 0 && point.in_offset == 0) return bad(where + "bits before offset 0");
    if (point.window_bytes > kGzipWindowBytes || point.window_bytes > point.out_offset) {
      return bad(where + "window too long");
    }
    if (point.window_bytes == 0 ? !point.packed_window.empty()
                                : point.packed_window.empty() ||
                                      point.packed_window.size() >
                                          compressBound(static_cast<uLong>(point.window_bytes))) {
      return bad(where + "packed window length");
    }
    if (i > 0) {
      const GzipCheckpoint& before = points[i - 1];
      if (point.in_offset <= before.in_offset) return bad(where + "in offset does not increase");
      if (point.out_offset < before.out_offset) return bad(where + "out offset decreases");
    }
    const uint64_t span_end =
        i + 1 < points.size() ? points[i + 1].out_offset : index.uncompressed_size;
    if (span_end >= point.out_offset && span_end - point.out_offset > kGzipMaxIndexSpanBytes) {
      return bad(where + "span longer than " + std::to_string(kGzipMaxIndexSpanBytes) + " bytes");
    }
    if (i < index.span_crcs.size() && span_end == point.out_offset && index.span_crcs[i] != 0) {
      return bad(where + "an empty span with a non-zero CRC32");
    }
  }
  return Status::OK();
}

std::vector<std::byte> serialize_gzip_index(const GzipIndexSnapshot& index) {
  std::vector<std::byte> out;
  out.insert(out.end(), reinterpret_cast<const std::byte*>(kIndexMagic),
             reinterpret_cast<const std::byte*>(kIndexMagic) + sizeof kIndexMagic);
  put_u32(&out, kIndexVersion);
  put_u32(&out, (index.verified ? kIndexFlagVerified : 0) | (index.sha1 ? kIndexFlagSha1 : 0));
  put_u64(&out, index.compressed_size);
  put_u64(&out, index.uncompressed_size);
  std::array<uint8_t, 20> sha1{};
  if (index.sha1) sha1 = *index.sha1;
  for (uint8_t b : sha1) out.push_back(std::byte{b});
  put_u64(&out, index.checkpoints.size());
  put_u64(&out, index.span_crcs.size());
  for (const GzipCheckpoint& point : index.checkpoints) {
    put_u64(&out, point.out_offset);
    put_u64(&out, point.in_offset);
    out.push_back(std::byte{point.bits});
    out.insert(out.end(), 3, std::byte{0});
    put_u32(&out, point.window_bytes);
    put_u32(&out, static_cast<uint32_t>(point.packed_window.size()));
    out.insert(out.end(), point.packed_window.begin(), point.packed_window.end());
  }
  for (uint32_t crc : index.span_crcs) put_u32(&out, crc);
  std::array<uint8_t, kIndexDigestBytes> digest{};
  // SHA-256 of a memory buffer does not fail in practice; a zero digest would fail parsing.
  sha256(out, &digest);
  for (uint8_t b : digest) out.push_back(std::byte{b});
  return out;
}

Result<GzipIndexSnapshot> parse_gzip_index(std::span<const std::byte> bytes,
                                           uint64_t expected_compressed_size,
                                           uint64_t expected_uncompressed_size) {
  const auto bad = [](const std::string& what) {
    return Status::Corruption("gzip index: " + what);
  };
  if (bytes.size() < kIndexHeaderBytes + kIndexDigestBytes) return bad("truncated");
  const std::span<const std::byte> body = bytes.first(bytes.size() - kIndexDigestBytes);
  std::array<uint8_t, kIndexDigestBytes> digest{};
  if (!sha256(body, &digest)) return bad("SHA-256 failed");
  if (std::memcmp(digest.data(), bytes.data() + body.size(), digest.size()) != 0) {
    return bad("checksum mismatch");
  }

  IndexReader in(body);
  std::span<const std::byte> magic;
  uint32_t version = 0;
  uint32_t flags = 0;
  GzipIndexSnapshot index;
  std::span<const std::byte> sha1;
  uint64_t checkpoint_count = 0;
  uint64_t crc_count = 0;
  if (!in.take(sizeof kIndexMagic, &magic) || !in.u32(&version) || !in.u32(&flags) ||
      !in.u64(&index.compressed_size) || !in.u64(&index.uncompressed_size) || !in.take(20, &sha1) ||
      !in.u64(&checkpoint_count) || !in.u64(&crc_count)) {
    return bad("truncated header");
  }
  if (std::memcmp(magic.data(), kIndexMagic, sizeof kIndexMagic) != 0) return bad("bad magic");
  if (version != kIndexVersion) return bad("unknown version " + std::to_string(version));
  if ((flags & ~(kIndexFlagVerified | kIndexFlagSha1)) != 0) return bad("unknown flags");
  if (index.compressed_size != expected_compressed_size) {
    return bad("made for a " + std::to_string(index.compressed_size) +
               "-byte stream, this one is " + std::to_string(expected_compressed_size));
  }
  if (index.uncompressed_size != expected_uncompressed_size) {
    return bad("made for " + std::to_string(index.uncompressed_size) +
               " uncompressed bytes, this stream has " +
               std::to_string(expected_uncompressed_size));
  }
  index.verified = (flags & kIndexFlagVerified) != 0;
  if ((flags & kIndexFlagSha1) != 0) {
    std::array<uint8_t, 20> value{};
    for (size_t i = 0; i < value.size(); ++i) value[i] = std::to_integer<uint8_t>(sha1[i]);
    index.sha1 = value;
  }
  // Bound the counts by the bytes present before allocating anything for them.
  if (checkpoint_count == 0 || checkpoint_count > in.remaining() / kIndexRecordBytes) {
    return bad("bad checkpoint count");
  }
  if (crc_count > checkpoint_count) return bad("bad span CRC count");
  index.checkpoints.reserve(static_cast<size_t>(checkpoint_count));
  for (uint64_t i = 0; i < checkpoint_count; ++i) {
    GzipCheckpoint point;
    std::span<const std::byte> zeros;
    uint32_t packed_length = 0;
    std::span<const std::byte> packed;
    if (!in.u64(&point.out_offset) || !in.u64(&point.in_offset) || !in.u8(&point.bits) ||
        !in.take(3, &zeros) || !in.u32(&point.window_bytes) || !in.u32(&packed_length)) {
      return bad("truncated checkpoint " + std::to_string(i));
    }
    if (std::any_of(zeros.begin(), zeros.end(), [](std::byte b) { return b != std::byte{0}; })) {
      return bad("checkpoint " + std::to_string(i) + ": reserved bytes are not zero");
    }
    if (point.window_bytes > kGzipWindowBytes ||
        packed_length > compressBound(static_cast<uLong>(kGzipWindowBytes))) {
      return bad("checkpoint " + std::to_string(i) + ": window too long");
    }
    if (!in.take(packed_length, &packed)) return bad("truncated window " + std::to_string(i));
    point.packed_window.assign(packed.begin(), packed.end());
    index.checkpoints.push_back(std::move(point));
  }
  if (in.remaining() != crc_count * 4) return bad("wrong length for the span CRCs");
  for (uint64_t i = 0; i < crc_count; ++i) {
    uint32_t crc = 0;
    in.u32(&crc);
    index.span_crcs.push_back(crc);
  }
  if (Status s = validate_gzip_index(index); !s.ok()) return s;
  return index;
}

void SlidingWindow::append(std::span<const std::byte> bytes) {
  if (bytes.empty()) return;
  if (bytes.size() >= ring_.size()) {
    std::memcpy(ring_.data(), bytes.data() + bytes.size() - ring_.size(), ring_.size());
    next_ = 0;
    length_ = ring_.size();
    return;
  }
  const size_t first = std::min(bytes.size(), ring_.size() - next_);
  std::memcpy(ring_.data() + next_, bytes.data(), first);
  std::memcpy(ring_.data(), bytes.data() + first, bytes.size() - first);
  next_ = (next_ + bytes.size()) % ring_.size();
  length_ = std::min(ring_.size(), length_ + bytes.size());
}

void SlidingWindow::copy_to(std::span<std::byte> out) const {
  // The oldest valid byte sits length_ bytes before next_, wrapping around the ring.
  const size_t start = (next_ + ring_.size() - length_) % ring_.size();
  if (length_ == 0) return;
  const size_t first = std::min(length_, ring_.size() - start);
  std::memcpy(out.data(), ring_.data() + start, first);
  std::memcpy(out.data() + first, ring_.data(), length_ - first);
}

}  // namespace imgfs::formats
