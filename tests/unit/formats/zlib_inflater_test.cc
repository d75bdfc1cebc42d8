#include "formats/zlib_inflater.h"

#include <gtest/gtest.h>

#include <vector>

#include "tests/support/deflate_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

// The zlib engine is always built in (a build without ISA-L relies on it for everything).
// inflater_test.cc checks it against every other engine on many streams.
TEST(ZlibInflaterTest, InflatesAStreamInPieces) {
  const std::vector<std::byte> data = testing::pattern_bytes(200000, 1);
  const std::vector<std::byte> compressed = testing::zlib_compress(data, -15, 6);

  Result<std::unique_ptr<Inflater>> inflater = make_zlib_inflater();
  ASSERT_TRUE(inflater.ok());
  EXPECT_STREQ((*inflater)->name(), "zlib");
  ASSERT_TRUE((*inflater)->reset({}, 0, 0).ok());
  std::vector<std::byte> out(data.size());
  size_t in_pos = 0;
  size_t produced = 0;
  bool end = false;
  while (!end) {
    Result<InflateProgress> p = (*inflater)->inflate(
        std::span(compressed).subspan(in_pos, std::min<size_t>(1000, compressed.size() - in_pos)),
        std::span(out).subspan(produced, std::min<size_t>(4097, out.size() - produced)));
    ASSERT_TRUE(p.ok()) << p.status().to_string();
    ASSERT_TRUE(p->consumed != 0 || p->produced != 0 || p->stream_end);
    in_pos += p->consumed;
    produced += p->produced;
    end = p->stream_end;
  }
  EXPECT_EQ(in_pos, compressed.size());
  EXPECT_EQ(out, data);
}

}  // namespace
}  // namespace imgfs::formats
