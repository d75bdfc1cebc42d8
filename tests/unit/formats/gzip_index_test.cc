#include "formats/gzip_index.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cstring>
#include <string>
#include <vector>

#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

std::vector<std::byte> bytes_of(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

// A gzip member made by zlib itself, with every optional header field.
std::vector<std::byte> zlib_gzip_with_header(bool with_hcrc) {
  z_stream strm{};
  EXPECT_EQ(deflateInit2(&strm, 6, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY), Z_OK);
  static Bytef extra[] = {'A', 'B', 3, 0, 'x', 'y', 'z'};
  static char name[] = "disk.img";
  static char comment[] = "a comment";
  gz_header header{};
  header.extra = extra;
  header.extra_len = sizeof(extra);
  header.name = reinterpret_cast<Bytef*>(name);
  header.comment = reinterpret_cast<Bytef*>(comment);
  header.hcrc = with_hcrc ? 1 : 0;
  EXPECT_EQ(deflateSetHeader(&strm, &header), Z_OK);
  std::vector<std::byte> out(4096);
  Bytef input[] = "hello";
  strm.next_in = input;
  strm.avail_in = 5;
  strm.next_out = reinterpret_cast<Bytef*>(out.data());
  strm.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&strm, Z_FINISH), Z_STREAM_END);
  out.resize(strm.total_out);
  deflateEnd(&strm);
  return out;
}

TEST(GzipHeaderTest, MinimalHeader) {
  const auto header = bytes_of({0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3});
  Result<GzipHeaderScan> scan = scan_gzip_header(header);
  ASSERT_TRUE(scan.ok()) << scan.status().to_string();
  EXPECT_TRUE(scan->complete);
  EXPECT_EQ(scan->length, 10u);
}

TEST(GzipHeaderTest, AllOptionalFieldsFromZlib) {
  for (bool hcrc : {false, true}) {
    const std::vector<std::byte> member = zlib_gzip_with_header(hcrc);
    const size_t expected = 10 + 2 + 7 + sizeof("disk.img") + sizeof("a comment") + (hcrc ? 2 : 0);
    Result<GzipHeaderScan> scan = scan_gzip_header(member);
    ASSERT_TRUE(scan.ok()) << scan.status().to_string();
    ASSERT_TRUE(scan->complete);
    EXPECT_EQ(scan->length, expected);
    // Every strict prefix of the header is incomplete, never an error or a wrong length.
    for (size_t n = 0; n < expected; ++n) {
      Result<GzipHeaderScan> partial = scan_gzip_header(std::span(member).first(n));
      ASSERT_TRUE(partial.ok()) << n << ": " << partial.status().to_string();
      EXPECT_FALSE(partial->complete) << n;
    }
  }
}

TEST(GzipHeaderTest, BadHeadersAreCorruption) {
  const auto bad_magic = bytes_of({0x1f, 0x8c, 8, 0, 0, 0, 0, 0, 0, 3});
  const auto bad_method = bytes_of({0x1f, 0x8b, 7, 0, 0, 0, 0, 0, 0, 3});
  const auto reserved = bytes_of({0x1f, 0x8b, 8, 0x20, 0, 0, 0, 0, 0, 3});
  const auto short_bad = bytes_of({0x00});
  for (const auto& header : {bad_magic, bad_method, reserved, short_bad}) {
    Result<GzipHeaderScan> scan = scan_gzip_header(header);
    ASSERT_FALSE(scan.ok());
    EXPECT_EQ(scan.status().code(), StatusCode::kCorruption);
  }
  std::vector<std::byte> member = zlib_gzip_with_header(true);
  const size_t hcrc_at = 10 + 2 + 7 + sizeof("disk.img") + sizeof("a comment");
  member[hcrc_at] ^= std::byte{1};
  Result<GzipHeaderScan> scan = scan_gzip_header(member);
  ASSERT_FALSE(scan.ok());
  EXPECT_EQ(scan.status().code(), StatusCode::kCorruption);
}

TEST(GzipHeaderTest, OverlongNameIsCorruption) {
  std::vector<std::byte> header = bytes_of({0x1f, 0x8b, 8, 0x08, 0, 0, 0, 0, 0, 3});
  header.resize(kGzipMaxHeaderBytes + 100, std::byte{'a'});
  Result<GzipHeaderScan> scan = scan_gzip_header(header);
  ASSERT_FALSE(scan.ok());
  EXPECT_EQ(scan.status().code(), StatusCode::kCorruption);
  // An extra field whose length runs past the bytes given is incomplete, not an overread.
  const auto extra = bytes_of({0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 1, 2});
  Result<GzipHeaderScan> partial = scan_gzip_header(extra);
  ASSERT_TRUE(partial.ok());
  EXPECT_FALSE(partial->complete);
}

TEST(GzipSizeTest, SizeFromIsize) {
  EXPECT_EQ(*size_from_isize(1000, 0), 1000u);
  EXPECT_EQ(*size_from_isize(1000, 1000), 1000u);
  EXPECT_EQ(*size_from_isize(1000, 1001), 1000u + (1ull << 32));
  EXPECT_EQ(*size_from_isize(0, 1ull << 32), 1ull << 32);
  EXPECT_EQ(*size_from_isize(5, (3ull << 32) + 6), (4ull << 32) + 5);
  EXPECT_EQ(*size_from_isize(0xffffffffu, UINT64_MAX), UINT64_MAX);
  Result<uint64_t> none = size_from_isize(0, UINT64_MAX);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kInvalidArgument);
}

TEST(GzipWindowTest, PackRoundTrip) {
  const std::vector<std::byte> zeros(kGzipWindowBytes);
  const std::vector<std::byte> noise = testing::pattern_bytes(kGzipWindowBytes, 7);
  const std::vector<std::byte> short_window = testing::pattern_bytes(1234, 3);
  for (const auto* window : {&zeros, &noise, &short_window}) {
    Result<std::vector<std::byte>> packed = pack_window(*window);
    ASSERT_TRUE(packed.ok());
    GzipCheckpoint checkpoint;
    checkpoint.window_bytes = static_cast<uint32_t>(window->size());
    checkpoint.packed_window = *packed;
    std::vector<std::byte> out(window->size());
    ASSERT_TRUE(unpack_window(checkpoint, out).ok());
    EXPECT_EQ(out, *window);
  }
  // Zeros pack to almost nothing: the point of packing windows.
  EXPECT_LT(pack_window(zeros)->size(), 200u);
}

TEST(GzipWindowTest, BadPackedWindowIsCorruption) {
  GzipCheckpoint checkpoint;
  checkpoint.window_bytes = 100;
  checkpoint.packed_window = *pack_window(testing::pattern_bytes(99));
  std::vector<std::byte> out(100);
  EXPECT_EQ(unpack_window(checkpoint, out).code(), StatusCode::kCorruption);
  checkpoint.packed_window = testing::pattern_bytes(50);
  EXPECT_EQ(unpack_window(checkpoint, out).code(), StatusCode::kCorruption);
  std::vector<std::byte> wrong_length(10);
  EXPECT_EQ(unpack_window(checkpoint, wrong_length).code(), StatusCode::kCorruption);
  EXPECT_EQ(pack_window(std::vector<std::byte>(kGzipWindowBytes + 1)).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(SlidingWindowTest, KeepsTheLast32KiB) {
  const std::vector<std::byte> data = testing::pattern_bytes(200000, 5);
  SlidingWindow window;
  std::vector<std::byte> reference;
  size_t pos = 0;
  // Uneven appends, some bigger than the window, exercise the wrap-around.
  const size_t steps[] = {1, 100, 40000, 7, 32767, 32768, 32769, 5000, 0, 12345};
  for (size_t step : steps) {
    window.append(std::span(data).subspan(pos, step));
    pos += step;
    const size_t expected_length = std::min(pos, kGzipWindowBytes);
    ASSERT_EQ(window.length(), expected_length);
    std::vector<std::byte> out(window.length());
    window.copy_to(out);
    EXPECT_TRUE(std::equal(out.begin(), out.end(), data.begin() + (pos - expected_length)))
        << "after " << pos;
  }
  window.clear();
  EXPECT_EQ(window.length(), 0u);
  window.append(std::span(data).first(3));
  std::vector<std::byte> out(3);
  window.copy_to(out);
  EXPECT_TRUE(std::equal(out.begin(), out.end(), data.begin()));
}

}  // namespace
}  // namespace imgfs::formats
