#include "formats/zlib_inflater.h"

#include <zlib.h>

#include <algorithm>
#include <climits>
#include <string>

#include "formats/gzip_index.h"

namespace imgfs::formats {

namespace {

std::string zlib_message(const z_stream& strm, int ret) {
  if (strm.msg != nullptr) return strm.msg;
  return "zlib error " + std::to_string(ret);
}

class ZlibInflater final : public Inflater {
 public:
  ZlibInflater() = default;
  ZlibInflater(const ZlibInflater&) = delete;
  ZlibInflater& operator=(const ZlibInflater&) = delete;
  ~ZlibInflater() override {
    if (ready_) inflateEnd(&strm_);
  }

  Status init() {
    const int ret = inflateInit2(&strm_, -15);
    if (ret != Z_OK) return Status::Corruption("inflateInit2 failed: " + zlib_message(strm_, ret));
    ready_ = true;
    return Status::OK();
  }

  Status reset(std::span<const std::byte> window, int bit_count, uint8_t bit_value) override {
    if (window.size() > kGzipWindowBytes) {
      return Status::InvalidArgument("zlib inflater: window over 32 KiB");
    }
    if (bit_count < 0 || bit_count > 7) {
      return Status::InvalidArgument("zlib inflater: bit count over 7");
    }
    if (inflateReset(&strm_) != Z_OK) return Status::Corruption("inflateReset failed");
    if (!window.empty() &&
        inflateSetDictionary(&strm_, reinterpret_cast<const Bytef*>(window.data()),
                             static_cast<uInt>(window.size())) != Z_OK) {
      return Status::Corruption("inflateSetDictionary failed");
    }
    if (bit_count != 0 &&
        inflatePrime(&strm_, bit_count, bit_value & ((1 << bit_count) - 1)) != Z_OK) {
      return Status::Corruption("inflatePrime failed");
    }
    return Status::OK();
  }

  Result<InflateProgress> inflate(std::span<const std::byte> in,
                                  std::span<std::byte> out) override {
    // zlib counts in uInt: a larger call just does part of the work, as the contract allows.
    const uInt in_length = static_cast<uInt>(std::min<size_t>(in.size(), UINT_MAX));
    const uInt out_length = static_cast<uInt>(std::min<size_t>(out.size(), UINT_MAX));
    strm_.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
    strm_.avail_in = in_length;
    strm_.next_out = reinterpret_cast<Bytef*>(out.data());
    strm_.avail_out = out_length;
    // Z_BLOCK returns at each block end, so block_boundary() sees every one.
    int ret = ::inflate(&strm_, Z_BLOCK);
    if (ret == Z_BUF_ERROR && strm_.avail_in == in_length && strm_.avail_out == out_length &&
        (strm_.data_type & 0x80) != 0) {
      // The call only ended a block from bits zlib already held: go on, so that no progress
      // still means the caller must supply input or room.
      ret = ::inflate(&strm_, Z_BLOCK);
    }
    if (ret != Z_OK && ret != Z_STREAM_END && ret != Z_BUF_ERROR) {
      return Status::Corruption("inflate failed: " + zlib_message(strm_, ret));
    }
    InflateProgress progress;
    progress.consumed = in_length - strm_.avail_in;
    progress.produced = out_length - strm_.avail_out;
    progress.stream_end = ret == Z_STREAM_END;
    return progress;
  }

  std::optional<uint32_t> block_boundary() const override {
    // Bit 7: inflate just decoded an end-of-block code; bit 6: that block was the last one.
    if ((strm_.data_type & 0xc0) != 0x80) return std::nullopt;
    return static_cast<uint32_t>(strm_.data_type & 7);
  }

  bool stops_at_block_ends() const override { return true; }

  size_t stored_block_input_left() const override { return 0; }

  // zlib stops taking input at the end of the stream.
  size_t overread_bytes() const override { return 0; }

  const char* name() const override { return "zlib"; }

 private:
  z_stream strm_{};
  bool ready_ = false;
};

}  // namespace

Result<std::unique_ptr<Inflater>> make_zlib_inflater() {
  auto inflater = std::make_unique<ZlibInflater>();
  if (Status s = inflater->init(); !s.ok()) return s;
  return std::unique_ptr<Inflater>(std::move(inflater));
}

}  // namespace imgfs::formats
