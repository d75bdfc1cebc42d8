#include "formats/gzip_index.h"

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
