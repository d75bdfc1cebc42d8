#include "formats/gzip_index.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <random>
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

// A small index with real packed windows: a member start, a checkpoint with bits and a short
// window, and one with a full window.
GzipIndexSnapshot small_index(bool complete) {
  GzipIndexSnapshot index;
  index.compressed_size = 50000;
  index.uncompressed_size = 200000;
  GzipCheckpoint start;
  start.in_offset = 10;
  index.checkpoints.push_back(start);
  // Noise then zeros: the windows pack small, so the byte-by-byte tests below stay fast.
  std::vector<std::byte> data(kGzipWindowBytes);
  const std::vector<std::byte> noise = testing::pattern_bytes(64, 3);
  std::copy(noise.begin(), noise.end(), data.begin());
  GzipCheckpoint middle;
  middle.out_offset = 1000;
  middle.in_offset = 700;
  middle.bits = 3;
  middle.window_bytes = 1000;
  middle.packed_window = *pack_window(std::span(data).first(1000));
  index.checkpoints.push_back(middle);
  GzipCheckpoint late;
  late.out_offset = 150000;
  late.in_offset = 40000;
  late.window_bytes = kGzipWindowBytes;
  late.packed_window = *pack_window(data);
  index.checkpoints.push_back(late);
  index.span_crcs = {0x12345678, 0x9abcdef0};
  if (complete) {
    index.span_crcs.push_back(0xdeadbeef);
    index.verified = true;
    index.sha1 = std::array<uint8_t, 20>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17};
  }
  return index;
}

void expect_same(const GzipIndexSnapshot& a, const GzipIndexSnapshot& b) {
  EXPECT_EQ(a.compressed_size, b.compressed_size);
  EXPECT_EQ(a.uncompressed_size, b.uncompressed_size);
  EXPECT_EQ(a.verified, b.verified);
  EXPECT_EQ(a.sha1, b.sha1);
  EXPECT_EQ(a.span_crcs, b.span_crcs);
  ASSERT_EQ(a.checkpoints.size(), b.checkpoints.size());
  for (size_t i = 0; i < a.checkpoints.size(); ++i) {
    EXPECT_EQ(a.checkpoints[i].out_offset, b.checkpoints[i].out_offset);
    EXPECT_EQ(a.checkpoints[i].in_offset, b.checkpoints[i].in_offset);
    EXPECT_EQ(a.checkpoints[i].bits, b.checkpoints[i].bits);
    EXPECT_EQ(a.checkpoints[i].window_bytes, b.checkpoints[i].window_bytes);
    EXPECT_EQ(a.checkpoints[i].packed_window, b.checkpoints[i].packed_window);
  }
}

// Recomputes the trailing SHA-256, as a forger (or a bug that writes bad fields) would.
void restamp(std::vector<std::byte>* bytes) {
  const size_t body = bytes->size() - 32;
  unsigned int length = 0;
  ASSERT_EQ(EVP_Digest(bytes->data(), body, reinterpret_cast<unsigned char*>(bytes->data() + body),
                       &length, EVP_sha256(), nullptr),
            1);
}

Result<GzipIndexSnapshot> parse(std::span<const std::byte> bytes) {
  return parse_gzip_index(bytes, 50000, 200000);
}

TEST(GzipIndexFileTest, RoundTrips) {
  for (bool complete : {false, true}) {
    const GzipIndexSnapshot index = small_index(complete);
    ASSERT_TRUE(validate_gzip_index(index).ok()) << validate_gzip_index(index).to_string();
    EXPECT_EQ(index.complete(), complete);
    const std::vector<std::byte> bytes = serialize_gzip_index(index);
    EXPECT_EQ(std::memcmp(bytes.data(), "IMGFSGZI", 8), 0);
    Result<GzipIndexSnapshot> parsed = parse(bytes);
    ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
    expect_same(index, *parsed);
    EXPECT_EQ(serialize_gzip_index(*parsed), bytes);
  }
}

TEST(GzipIndexFileTest, EveryFlippedByteIsCorruption) {
  const std::vector<std::byte> good = serialize_gzip_index(small_index(true));
  for (size_t i = 0; i < good.size(); ++i) {
    for (int bit : {0, 7}) {
      std::vector<std::byte> bad = good;
      bad[i] ^= std::byte{static_cast<uint8_t>(1 << bit)};
      Result<GzipIndexSnapshot> parsed = parse(bad);
      ASSERT_FALSE(parsed.ok()) << "byte " << i << " bit " << bit;
      EXPECT_EQ(parsed.status().code(), StatusCode::kCorruption);
    }
  }
}

TEST(GzipIndexFileTest, FlippedBytesWithAValidChecksumAreCheckedOrHarmless) {
  // A forged file with a matching checksum: the parser must still bound everything. What it
  // accepts is structurally valid (bad windows and CRCs are caught when spans are read).
  const GzipIndexSnapshot original = small_index(true);
  const std::vector<std::byte> good = serialize_gzip_index(original);
  std::mt19937 rng(5);
  int refused = 0;
  for (size_t i = 0; i + 32 < good.size(); ++i) {
    std::vector<std::byte> bad = good;
    bad[i] ^= std::byte{static_cast<uint8_t>(1 + rng() % 255)};
    restamp(&bad);
    Result<GzipIndexSnapshot> parsed = parse(bad);
    if (!parsed.ok()) {
      EXPECT_EQ(parsed.status().code(), StatusCode::kCorruption);
      ++refused;
      continue;
    }
    EXPECT_TRUE(validate_gzip_index(*parsed).ok()) << "byte " << i;
  }
  // Everything but CRC values, window bytes, the SHA1 and some offsets is refused.
  EXPECT_GT(refused, 50);
}

TEST(GzipIndexFileTest, TruncatedOrExtendedIsCorruption) {
  const std::vector<std::byte> good = serialize_gzip_index(small_index(false));
  for (size_t length = 0; length < good.size(); ++length) {
    std::vector<std::byte> bad(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(length));
    Result<GzipIndexSnapshot> parsed = parse(bad);
    ASSERT_FALSE(parsed.ok()) << length;
    EXPECT_EQ(parsed.status().code(), StatusCode::kCorruption);
    if (length >= 32) {
      // Even with a checksum that matches the shorter file.
      restamp(&bad);
      EXPECT_EQ(parse(bad).status().code(), StatusCode::kCorruption) << length;
    }
  }
  std::vector<std::byte> longer = good;
  longer.insert(longer.end() - 32, std::byte{0});
  restamp(&longer);
  EXPECT_EQ(parse(longer).status().code(), StatusCode::kCorruption);
}

TEST(GzipIndexFileTest, SizesMustMatchTheStream) {
  const std::vector<std::byte> bytes = serialize_gzip_index(small_index(true));
  EXPECT_TRUE(parse_gzip_index(bytes, 50000, 200000).ok());
  EXPECT_EQ(parse_gzip_index(bytes, 50001, 200000).status().code(), StatusCode::kCorruption);
  EXPECT_EQ(parse_gzip_index(bytes, 50000, 199999).status().code(), StatusCode::kCorruption);
}

// Overwrites a little-endian field at `offset` and restamps the checksum.
std::vector<std::byte> with_field(std::vector<std::byte> bytes, size_t offset, uint64_t value,
                                  size_t width) {
  for (size_t i = 0; i < width; ++i) bytes[offset + i] = std::byte{uint8_t(value >> (8 * i))};
  restamp(&bytes);
  return bytes;
}

TEST(GzipIndexFileTest, ForgedHeaderFieldsAreCorruption) {
  const std::vector<std::byte> good = serialize_gzip_index(small_index(true));
  // Layout: magic 0, version 8, flags 12, sizes 16 and 24, SHA1 32, counts 52 and 60.
  const struct {
    size_t offset;
    uint64_t value;
    size_t width;
  } cases[] = {
      {0, 'X', 1},                 // magic
      {8, 2, 4},                   // version
      {12, 4, 4},                  // unknown flag
      {12, 2, 4},                  // SHA1 on an unverified index
      {12, 0, 4},                  // both off: see below
      {52, 0, 8},                  // no checkpoints
      {52, uint64_t{1} << 60, 8},  // huge count: refused before allocating
      {52, 4, 8},                  // more checkpoints than records
      {60, 4, 8},                  // more CRCs than checkpoints
      {60, 1, 8},                  // too few CRCs
      {60, uint64_t{1} << 62, 8},  // huge CRC count
  };
  for (const auto& c : cases) {
    Result<GzipIndexSnapshot> parsed = parse(with_field(good, c.offset, c.value, c.width));
    if (c.offset == 12 && c.value == 0) {
      // Clearing both flags: a complete unverified index without SHA1 is valid.
      ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
      EXPECT_FALSE(parsed->verified);
      EXPECT_FALSE(parsed->sha1.has_value());
      continue;
    }
    EXPECT_EQ(parsed.status().code(), StatusCode::kCorruption)
        << "field at " << c.offset << " = " << c.value;
  }
}

TEST(GzipIndexFileTest, ValidateRefusesBadCheckpoints) {
  using Mutate = void (*)(GzipIndexSnapshot*);
  const Mutate mutations[] = {
      [](GzipIndexSnapshot* x) { x->checkpoints.clear(); },
      [](GzipIndexSnapshot* x) { x->checkpoints[0].out_offset = 1; },
      [](GzipIndexSnapshot* x) { x->checkpoints[0].bits = 1; },
      [](GzipIndexSnapshot* x) { x->checkpoints[1].bits = 8; },
      [](GzipIndexSnapshot* x) { x->checkpoints[1].in_offset = 10; },
      [](GzipIndexSnapshot* x) { x->checkpoints[2].in_offset = 700; },
      [](GzipIndexSnapshot* x) { x->checkpoints[2].in_offset = 50000; },
      [](GzipIndexSnapshot* x) { x->checkpoints[2].out_offset = 999; },
      [](GzipIndexSnapshot* x) { x->checkpoints[2].out_offset = 200001; },
      [](GzipIndexSnapshot* x) { x->checkpoints[1].window_bytes = 1001; },
      [](GzipIndexSnapshot* x) { x->checkpoints[2].window_bytes = kGzipWindowBytes + 1; },
      [](GzipIndexSnapshot* x) { x->checkpoints[1].packed_window.clear(); },
      [](GzipIndexSnapshot* x) { x->checkpoints[1].packed_window.resize(5000); },
      [](GzipIndexSnapshot* x) { x->span_crcs.pop_back(); },  // verified but incomplete
      [](GzipIndexSnapshot* x) { x->span_crcs.push_back(0); },
      [](GzipIndexSnapshot* x) { x->verified = false; },  // SHA1 without verification
      [](GzipIndexSnapshot* x) { x->uncompressed_size = uint64_t{3} << 30; },  // huge last span
      [](GzipIndexSnapshot* x) {
        x->checkpoints[2].out_offset = 1000;  // an empty span must have the empty CRC
      },
  };
  ASSERT_TRUE(validate_gzip_index(small_index(true)).ok());
  for (size_t i = 0; i < std::size(mutations); ++i) {
    GzipIndexSnapshot index = small_index(true);
    mutations[i](&index);
    EXPECT_EQ(validate_gzip_index(index).code(), StatusCode::kCorruption) << "mutation " << i;
    // Serialized and parsed, the same index is refused too.
    if (!index.checkpoints.empty()) {
      EXPECT_EQ(parse_gzip_index(serialize_gzip_index(index), index.compressed_size,
                                 index.uncompressed_size)
                    .status()
                    .code(),
                StatusCode::kCorruption)
          << "mutation " << i;
    }
  }
}

}  // namespace
}  // namespace imgfs::formats
