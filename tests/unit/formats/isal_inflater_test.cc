#include "formats/isal_inflater.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <vector>

#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

#ifdef IMGFS_HAVE_ISAL

// inflater_test.cc checks this engine against zlib from block boundaries of many streams;
// here: a whole stream, with the leading bits and a window given at reset.
TEST(IsalInflaterTest, InflatesAfterADictionaryAndLeadingBits) {
  const std::vector<std::byte> dictionary = testing::pattern_bytes(32 * 1024, 2);
  std::vector<std::byte> data(dictionary.begin() + 1000, dictionary.begin() + 9000);
  data.insert(data.end(), dictionary.begin(), dictionary.begin() + 5000);
  std::vector<std::byte> compressed(compressBound(data.size()) + 64);
  z_stream strm{};
  ASSERT_EQ(deflateInit2(&strm, 9, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY), Z_OK);
  ASSERT_EQ(deflateSetDictionary(&strm, reinterpret_cast<const Bytef*>(dictionary.data()),
                                 static_cast<uInt>(dictionary.size())),
            Z_OK);
  // Three leading bits before the stream: 1, 0, 1 (lowest first).
  ASSERT_EQ(deflatePrime(&strm, 3, 0b101), Z_OK);
  strm.next_in = reinterpret_cast<Bytef*>(data.data());
  strm.avail_in = static_cast<uInt>(data.size());
  strm.next_out = reinterpret_cast<Bytef*>(compressed.data());
  strm.avail_out = static_cast<uInt>(compressed.size());
  ASSERT_EQ(deflate(&strm, Z_FINISH), Z_STREAM_END);
  compressed.resize(strm.total_out);
  deflateEnd(&strm);
  // The stream starts 3 bits into byte 0: give the other 5 bits of it as leading bits.
  const uint8_t first = static_cast<uint8_t>(std::to_integer<unsigned>(compressed[0]) >> 3);

  Result<std::unique_ptr<Inflater>> inflater = make_isal_inflater();
  ASSERT_TRUE(inflater.ok());
  EXPECT_STREQ((*inflater)->name(), "isal");
  ASSERT_TRUE((*inflater)->reset(dictionary, 5, first).ok());
  std::vector<std::byte> out(data.size() + 100);
  Result<InflateProgress> p = (*inflater)->inflate(std::span(compressed).subspan(1), out);
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  ASSERT_EQ(p->produced, data.size());
  out.resize(p->produced);
  EXPECT_EQ(out, data);
  EXPECT_TRUE(p->stream_end);
}

#else

TEST(IsalInflaterTest, NotSupportedWithoutIsal) {
  EXPECT_EQ(make_isal_inflater().status().code(), StatusCode::kNotSupported);
}

#endif

}  // namespace
}  // namespace imgfs::formats
