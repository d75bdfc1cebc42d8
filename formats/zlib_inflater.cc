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
    const int ret = ::inflate(&strm_, Z_NO_FLUSH);
    if (ret != Z_OK && ret != Z_STREAM_END && ret != Z_BUF_ERROR) {
      return Status::Corruption("inflate failed: " + zlib_message(strm_, ret));
    }
    InflateProgress progress;
    progress.consumed = in_length - strm_.avail_in;
    progress.produced = out_length - strm_.avail_out;
    progress.stream_end = ret == Z_STREAM_END;
    return progress;
  }

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
