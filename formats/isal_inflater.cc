#include "formats/isal_inflater.h"

#ifdef IMGFS_HAVE_ISAL
#include <isa-l/igzip_lib.h>
#endif

#include <algorithm>
#include <cstdint>
#include <string>

#include "formats/gzip_index.h"

namespace imgfs::formats {

#ifdef IMGFS_HAVE_ISAL

namespace {

std::string isal_message(int ret) {
  switch (ret) {
    case ISAL_INVALID_BLOCK:
      return "invalid deflate block";
    case ISAL_INVALID_SYMBOL:
      return "invalid deflate symbol";
    case ISAL_INVALID_LOOKBACK:
      return "distance too far back";
    default:
      return "isal_inflate error " + std::to_string(ret);
  }
}

class IsalInflater final : public Inflater {
 public:
  // inflate_state carries about 100 KiB of tables and buffers: keep it off the stack.
  IsalInflater() : state_(std::make_unique<inflate_state>()) { isal_inflate_init(state_.get()); }

  Status reset(std::span<const std::byte> window, int bit_count, uint8_t bit_value) override {
    if (window.size() > kGzipWindowBytes) {
      return Status::InvalidArgument("isal inflater: window over 32 KiB");
    }
    if (bit_count < 0 || bit_count > 7) {
      return Status::InvalidArgument("isal inflater: bit count over 7");
    }
    inflate_state& s = *state_;
    isal_inflate_init(&s);
    s.crc_flag = ISAL_DEFLATE;  // raw deflate: gzip_source checks CRC32 and ISIZE itself
    if (!window.empty() &&
        isal_inflate_set_dict(&s, reinterpret_cast<uint8_t*>(const_cast<std::byte*>(window.data())),
                              static_cast<uint32_t>(window.size())) != COMP_OK) {
      return Status::Corruption("isal_inflate_set_dict failed");
    }
    // The bit buffer is public: bits in it are consumed before next_in, lowest bit first.
    s.read_in = bit_value & ((1u << bit_count) - 1);
    s.read_in_length = bit_count;
    return Status::OK();
  }

  Result<InflateProgress> inflate(std::span<const std::byte> in,
                                  std::span<std::byte> out) override {
    inflate_state& s = *state_;
    // ISA-L counts in uint32_t: a larger call just does part of the work, as the contract allows.
    const uint32_t in_length = static_cast<uint32_t>(std::min<size_t>(in.size(), UINT32_MAX));
    const uint32_t out_length = static_cast<uint32_t>(std::min<size_t>(out.size(), UINT32_MAX));
    s.next_in = reinterpret_cast<uint8_t*>(const_cast<std::byte*>(in.data()));
    s.avail_in = in_length;
    s.next_out = reinterpret_cast<uint8_t*>(out.data());
    s.avail_out = out_length;
    const int ret = isal_inflate(&s);
    if (ret != ISAL_DECOMP_OK)
      return Status::Corruption("isal_inflate failed: " + isal_message(ret));
    InflateProgress progress;
    progress.consumed = in_length - s.avail_in;
    progress.produced = out_length - s.avail_out;
    progress.stream_end = s.block_state == ISAL_BLOCK_FINISH;
    return progress;
  }

  std::optional<uint32_t> block_boundary() const override {
    const inflate_state& s = *state_;
    // Between blocks (a header not yet read, or read in part and stashed in tmp_in_buffer with
    // the bit buffer rewound to its start), and no decoded byte held back in tmp_out_buffer.
    const bool between_blocks =
        s.block_state == ISAL_BLOCK_NEW_HDR || s.block_state == ISAL_BLOCK_HDR;
    if (!between_blocks || s.tmp_out_valid != s.tmp_out_processed) return std::nullopt;
    return static_cast<uint32_t>(s.tmp_in_size) * 8 + static_cast<uint32_t>(s.read_in_length);
  }

  bool stops_at_block_ends() const override { return false; }

  size_t stored_block_input_left() const override {
    const inflate_state& s = *state_;
    // Whole bytes already in the bit buffer belong to the block too.
    const int32_t buffered = s.read_in_length / 8;
    if (s.block_state != ISAL_BLOCK_TYPE0 || s.type0_block_len <= buffered) return 0;
    return static_cast<size_t>(s.type0_block_len - buffered);
  }

  // ISA-L leaves the whole bytes it read ahead in its bit buffer when the stream ends.
  size_t overread_bytes() const override {
    const inflate_state& s = *state_;
    return static_cast<size_t>(s.tmp_in_size) + static_cast<size_t>(s.read_in_length / 8);
  }

  const char* name() const override { return "isal"; }

 private:
  std::unique_ptr<inflate_state> state_;
};

}  // namespace

Result<std::unique_ptr<Inflater>> make_isal_inflater() {
  return std::unique_ptr<Inflater>(std::make_unique<IsalInflater>());
}

#else

Result<std::unique_ptr<Inflater>> make_isal_inflater() {
  return Status::NotSupported("inflate engine isal: this imgfs was built without ISA-L (libisal)");
}

#endif

}  // namespace imgfs::formats
