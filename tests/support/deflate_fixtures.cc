#include "tests/support/deflate_fixtures.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace imgfs::testing {

std::vector<std::byte> zlib_compress(std::span<const std::byte> data, int window_bits, int level,
                                     uint64_t flush_every, int mem_level, int strategy) {
  z_stream strm{};
  EXPECT_EQ(deflateInit2(&strm, level, Z_DEFLATED, window_bits, mem_level, strategy), Z_OK);
  std::vector<std::byte> out(deflateBound(&strm, data.size()) + 4096 +
                             (flush_every ? 16 * (data.size() / flush_every + 1) : 0));
  strm.next_out = reinterpret_cast<Bytef*>(out.data());
  strm.avail_out = static_cast<uInt>(out.size());
  const uint64_t step = flush_every ? flush_every : data.size() + 1;
  uint64_t pos = 0;
  int flushes = 0;
  do {
    const uint64_t length = std::min<uint64_t>(step, data.size() - pos);
    strm.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(data.data() + pos));
    strm.avail_in = static_cast<uInt>(length);
    pos += length;
    const bool last = pos == data.size();
    const int flush = last ? Z_FINISH : (flushes++ % 2 ? Z_FULL_FLUSH : Z_SYNC_FLUSH);
    EXPECT_EQ(deflate(&strm, flush), last ? Z_STREAM_END : Z_OK);
    EXPECT_EQ(strm.avail_in, 0u);
  } while (pos < data.size());
  out.resize(strm.total_out);
  deflateEnd(&strm);
  return out;
}

}  // namespace imgfs::testing
