#include "formats/inflater.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "formats/gzip_index.h"
#include "tests/support/deflate_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

// Image-like data: incompressible runs, zero runs and repetitive text, in random lengths up to
// max_run; max_run 0 gives incompressible bytes only.
std::vector<std::byte> make_data(uint64_t size, uint32_t seed, uint64_t max_run) {
  const std::vector<std::byte> noise = testing::pattern_bytes(size, seed);
  if (max_run == 0) return noise;
  std::vector<std::byte> data(size);
  static constexpr std::string_view kText =
      "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n";
  std::mt19937_64 rng(seed);
  for (uint64_t pos = 0; pos < size;) {
    const uint64_t length = std::min<uint64_t>(size - pos, 1 + rng() % max_run);
    switch (rng() % 3) {
      case 0:
        std::memcpy(data.data() + pos, noise.data() + pos, length);
        break;
      case 1:
        break;
      default:
        for (uint64_t i = 0; i < length; ++i) {
          data[pos + i] = static_cast<std::byte>(kText[(pos + i + seed) % kText.size()]);
        }
    }
    pos += length;
  }
  return data;
}

// Raw deflate of `data` with zlib; flush_every > 0 ends a block there, as pigz does.
std::vector<std::byte> deflate_raw(std::span<const std::byte> data, int level, int mem_level,
                                   int strategy, uint64_t flush_every = 0) {
  return testing::zlib_compress(data, -15, level, flush_every, mem_level, strategy);
}

// A block boundary found by walking the stream with zlib's Z_BLOCK, as gzip_source's frontier
// does: the next bit is `bits` bits before byte in_offset.
struct Boundary {
  uint64_t out_offset = 0;
  uint64_t in_offset = 0;
  int bits = 0;
};

std::vector<Boundary> block_boundaries(std::span<const std::byte> compressed) {
  std::vector<Boundary> boundaries{Boundary{}};
  z_stream strm{};
  EXPECT_EQ(inflateInit2(&strm, -15), Z_OK);
  std::vector<Bytef> out(64 * 1024);
  strm.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(compressed.data()));
  strm.avail_in = static_cast<uInt>(compressed.size());
  for (;;) {
    strm.next_out = out.data();
    strm.avail_out = static_cast<uInt>(out.size());
    const int ret = inflate(&strm, Z_BLOCK);
    EXPECT_TRUE(ret == Z_OK || ret == Z_STREAM_END) << ret;
    if (ret != Z_OK) break;
    if ((strm.data_type & 0xc0) == 0x80) {
      boundaries.push_back(Boundary{strm.total_out, strm.total_in, strm.data_type & 7});
    }
  }
  inflateEnd(&strm);
  return boundaries;
}

// Inflates from `from` up to out_end with `inflater`, feeding at most in_step input bytes and
// out_step bytes of room per call, and no input at or past in_end (the next checkpoint's
// in_offset: a span must decode from its own compressed bytes, as gzip_source reads them).
// Returns the bytes; stream_end says whether the end was seen.
std::vector<std::byte> inflate_from(Inflater& inflater, std::span<const std::byte> compressed,
                                    std::span<const std::byte> data, const Boundary& from,
                                    uint64_t out_end, uint64_t in_end, size_t in_step,
                                    size_t out_step, bool* stream_end) {
  const uint64_t window_start =
      from.out_offset - std::min<uint64_t>(from.out_offset, kGzipWindowBytes);
  const uint8_t first_bits =
      from.bits == 0
          ? 0
          : static_cast<uint8_t>(std::to_integer<unsigned>(compressed[from.in_offset - 1]) >>
                                 (8 - from.bits));
  Status s = inflater.reset(data.subspan(window_start, from.out_offset - window_start), from.bits,
                            first_bits);
  EXPECT_TRUE(s.ok()) << s.to_string();
  std::vector<std::byte> out(out_end - from.out_offset);
  size_t in_pos = from.in_offset;
  size_t produced = 0;
  *stream_end = false;
  while (produced < out.size()) {
    const size_t in_length = std::min(in_step, in_end - in_pos);
    const size_t room = std::min(out_step, out.size() - produced);
    Result<InflateProgress> progress = inflater.inflate(compressed.subspan(in_pos, in_length),
                                                        std::span(out).subspan(produced, room));
    EXPECT_TRUE(progress.ok()) << progress.status().to_string();
    if (!progress.ok()) break;
    in_pos += progress->consumed;
    produced += progress->produced;
    *stream_end = progress->stream_end;
    // With no input left an engine may still deliver output it decoded ahead: stop only when
    // a call makes no progress at all.
    if (progress->consumed == 0 && progress->produced == 0) break;
  }
  out.resize(produced);
  return out;
}

std::vector<InflateEngine> engines() {
  std::vector<InflateEngine> built_in;
  for (InflateEngine engine : {InflateEngine::kZlib, InflateEngine::kIsal}) {
    if (inflate_engine_available(engine)) built_in.push_back(engine);
  }
  return built_in;
}

struct StreamCase {
  const char* name;
  int level;
  int mem_level;
  int strategy;
  uint64_t flush_every;
  uint64_t size;
  uint64_t max_run;
};

class InflaterStreamTest : public ::testing::TestWithParam<StreamCase> {};

// A case's data and its raw deflate stream.
struct Stream {
  std::vector<std::byte> data;
  std::vector<std::byte> deflated;
};

Stream make_stream(const StreamCase& c) {
  Stream stream;
  stream.data = make_data(c.size, static_cast<uint32_t>(c.size + c.level), c.max_run);
  stream.deflated = deflate_raw(stream.data, c.level, c.mem_level, c.strategy, c.flush_every);
  return stream;
}

// From every sampled block boundary of many kinds of stream, each engine reproduces the
// reference bytes up to the next sampled boundary (and to the end), whatever the step sizes.
TEST_P(InflaterStreamTest, EveryEngineResumesAtBlockBoundaries) {
  const StreamCase& c = GetParam();
  const auto [data, compressed] = make_stream(c);
  std::vector<Boundary> boundaries = block_boundaries(compressed);
  ASSERT_GE(boundaries.size(), 1u);
  // About 24 starting points spread over the stream, the last one, and up to 12 more that start
  // mid-byte (stored blocks end on a byte, so spreading alone may pick few of those).
  std::vector<Boundary> sampled;
  const size_t stride = std::max<size_t>(1, boundaries.size() / 24);
  int mid_byte_extra = 0;
  for (size_t i = 0; i < boundaries.size(); ++i) {
    const bool extra = boundaries[i].bits != 0 && mid_byte_extra < 12;
    if (i % stride == 0 || i + 1 == boundaries.size() || extra) {
      sampled.push_back(boundaries[i]);
      mid_byte_extra += extra;
    }
  }
  int with_bits = 0;
  for (const Boundary& b : sampled) with_bits += b.bits != 0;
  for (InflateEngine engine : engines()) {
    Result<std::unique_ptr<Inflater>> inflater = make_inflater(engine);
    ASSERT_TRUE(inflater.ok()) << inflater.status().to_string();
    const struct {
      size_t in_step, out_step;
    } steps[] = {{64 * 1024, 64 * 1024}, {1, 1 << 20}, {7, 1}, {4096, 333}, {1 << 20, 1 << 20}};
    for (size_t i = 0; i < sampled.size(); ++i) {
      const bool last = i + 1 == sampled.size();
      const uint64_t end = last ? data.size() : sampled[i + 1].out_offset;
      const uint64_t in_end = last ? compressed.size() : sampled[i + 1].in_offset;
      const auto& step = steps[i % std::size(steps)];
      bool stream_end = false;
      const std::vector<std::byte> out =
          inflate_from(**inflater, compressed, data, sampled[i], end, in_end, step.in_step,
                       step.out_step, &stream_end);
      ASSERT_EQ(out.size(), end - sampled[i].out_offset)
          << (*inflater)->name() << " from " << sampled[i].out_offset;
      ASSERT_TRUE(std::equal(out.begin(), out.end(), data.begin() + sampled[i].out_offset))
          << (*inflater)->name() << " wrong bytes from boundary at " << sampled[i].out_offset
          << " bits " << sampled[i].bits;
    }
    // The whole stream in one go ends with stream_end.
    bool stream_end = false;
    const std::vector<std::byte> all =
        inflate_from(**inflater, compressed, data, Boundary{}, data.size(), compressed.size(),
                     1 << 20, 1 << 20, &stream_end);
    EXPECT_TRUE(std::equal(all.begin(), all.end(), data.begin()) && all.size() == data.size());
    // One more call with room left reports the end (an engine may deliver the last bytes first).
    if (!stream_end) {
      std::byte spare[16];
      Result<InflateProgress> progress = (*inflater)->inflate({}, spare);
      ASSERT_TRUE(progress.ok());
      EXPECT_EQ(progress->produced, 0u);
      stream_end = progress->stream_end;
    }
    EXPECT_TRUE(stream_end) << (*inflater)->name();
  }
  if (c.level != 0) {
    std::cout << c.name << ": " << boundaries.size() << " blocks, " << with_bits
              << " sampled boundaries mid-byte\n";
  }
}

// Every block boundary an engine reports, while walked in the small steps gzip_source's frontier
// uses to look for one, is a real one (zlib reports them all), and after the stream end the
// input an engine took past it is given back exactly.
TEST_P(InflaterStreamTest, ReportedBoundariesAreRealAndTheEndIsExact) {
  const StreamCase& c = GetParam();
  const auto [data, deflated] = make_stream(c);
  std::vector<uint64_t> real;  // bit positions of zlib's boundaries
  for (const Boundary& b : block_boundaries(deflated)) real.push_back(b.in_offset * 8 - b.bits);
  std::vector<std::byte> compressed = deflated;
  const std::vector<std::byte> trailer = testing::pattern_bytes(8, 5);
  compressed.insert(compressed.end(), trailer.begin(), trailer.end());
  for (InflateEngine engine : engines()) {
    Result<std::unique_ptr<Inflater>> made = make_inflater(engine);
    ASSERT_TRUE(made.ok());
    Inflater& inflater = **made;
    ASSERT_TRUE(inflater.reset({}, 0, 0).ok());
    std::vector<std::byte> out(data.size() + 1);
    uint64_t in_pos = 0;
    uint64_t produced = 0;
    size_t reported = 0;
    bool ended = false;
    while (!ended) {
      const size_t stored = inflater.stored_block_input_left();
      const size_t step = std::min<size_t>(stored > 0 ? stored : 32, compressed.size() - in_pos);
      Result<InflateProgress> progress = inflater.inflate(
          std::span(compressed).subspan(in_pos, step), std::span(out).subspan(produced, 65536));
      ASSERT_TRUE(progress.ok()) << progress.status().to_string();
      ASSERT_TRUE(progress->consumed > 0 || progress->produced > 0 || progress->stream_end);
      in_pos += progress->consumed;
      produced += progress->produced;
      ended = progress->stream_end;
      if (const std::optional<uint32_t> back = inflater.block_boundary(); back && !ended) {
        ASSERT_LE(*back, in_pos * 8);
        EXPECT_TRUE(std::binary_search(real.begin(), real.end(), in_pos * 8 - *back))
            << inflater.name() << ": no block boundary at bit " << in_pos * 8 - *back;
        ++reported;
      }
    }
    EXPECT_EQ(produced, data.size());
    EXPECT_TRUE(std::equal(data.begin(), data.end(), out.begin())) << inflater.name();
    EXPECT_EQ(in_pos - inflater.overread_bytes(), deflated.size()) << inflater.name();
    // The first of zlib's boundaries is the stream start, which no engine reports.
    if (inflater.stops_at_block_ends() || c.level == 0) {
      // zlib sees every block end; so does ISA-L in a stored stream, stepping to each block end.
      EXPECT_GE(reported + 1, real.size()) << inflater.name();
    } else if (c.strategy != Z_FIXED && real.size() > 2) {
      // Small steps show ISA-L some block ends wherever headers are longer than a step, which
      // is all but fixed-Huffman blocks: without them its frontier would always fall back.
      EXPECT_GT(reported, 0u) << inflater.name();
    }
    std::cout << c.name << ": " << inflater.name() << " reported " << reported << " of "
              << real.size() - 1 << " block boundaries\n";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Streams, InflaterStreamTest,
    ::testing::Values(StreamCase{"gzip1", 1, 8, Z_DEFAULT_STRATEGY, 0, 3 << 20, 300 << 10},
                      StreamCase{"gzip6", 6, 8, Z_DEFAULT_STRATEGY, 0, 3 << 20, 300 << 10},
                      StreamCase{"gzip9", 9, 9, Z_DEFAULT_STRATEGY, 0, 2 << 20, 300 << 10},
                      StreamCase{"stored", 0, 8, Z_DEFAULT_STRATEGY, 0, 1 << 20, 300 << 10},
                      StreamCase{"fixed", 6, 8, Z_FIXED, 0, 1 << 20, 4 << 10},
                      StreamCase{"huffman_only", 6, 8, Z_HUFFMAN_ONLY, 0, 1 << 20, 300 << 10},
                      StreamCase{"rle", 6, 8, Z_RLE, 0, 1 << 20, 300 << 10},
                      StreamCase{"tiny_blocks", 6, 1, Z_DEFAULT_STRATEGY, 0, 1 << 20, 2 << 10},
                      StreamCase{"flushed", 6, 8, Z_DEFAULT_STRATEGY, 70001, 2 << 20, 64 << 10},
                      StreamCase{"random", 6, 8, Z_DEFAULT_STRATEGY, 0, 1 << 20, 0},
                      StreamCase{"tiny_stream", 6, 8, Z_DEFAULT_STRATEGY, 0, 10, 4}),
    [](const ::testing::TestParamInfo<StreamCase>& info) { return std::string(info.param.name); });

TEST(InflaterTest, ZlibIsAlwaysThere) {
  EXPECT_TRUE(inflate_engine_available(InflateEngine::kZlib));
  EXPECT_TRUE(inflate_engine_available(fastest_inflate_engine()));
#ifdef IMGFS_HAVE_ISAL
  EXPECT_EQ(fastest_inflate_engine(), InflateEngine::kIsal);
#else
  EXPECT_EQ(fastest_inflate_engine(), InflateEngine::kZlib);
  EXPECT_EQ(make_inflater(InflateEngine::kIsal).status().code(), StatusCode::kNotSupported);
#endif
}

TEST(InflaterTest, BadArgumentsAreRefused) {
  const std::vector<std::byte> too_long(kGzipWindowBytes + 1);
  for (InflateEngine engine : engines()) {
    Result<std::unique_ptr<Inflater>> inflater = make_inflater(engine);
    ASSERT_TRUE(inflater.ok());
    EXPECT_EQ((*inflater)->reset(too_long, 0, 0).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ((*inflater)->reset({}, 8, 0).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ((*inflater)->reset({}, -1, 0).code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE((*inflater)->reset(std::span(too_long).first(kGzipWindowBytes), 7, 0x7f).ok());
  }
}

// Bad deflate data gives Corruption, never a crash or endless "progress".
TEST(InflaterTest, CorruptDataIsCorruption) {
  const std::vector<std::byte> data = make_data(1 << 20, 7, 64 << 10);
  const std::vector<std::byte> compressed = deflate_raw(data, 6, 8, Z_DEFAULT_STRATEGY);
  std::mt19937_64 rng(3);
  // Random bytes, a sync flush (a byte-aligned block boundary), then the same bytes again.
  const std::vector<std::byte> half = testing::pattern_bytes(20000, 4);
  std::vector<std::byte> repeated(100000);
  size_t repeated_boundary = 0;
  {
    z_stream strm{};
    ASSERT_EQ(deflateInit2(&strm, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY), Z_OK);
    strm.next_out = reinterpret_cast<Bytef*>(repeated.data());
    strm.avail_out = static_cast<uInt>(repeated.size());
    for (int flush : {Z_SYNC_FLUSH, Z_FINISH}) {
      strm.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(half.data()));
      strm.avail_in = static_cast<uInt>(half.size());
      ASSERT_EQ(deflate(&strm, flush), flush == Z_FINISH ? Z_STREAM_END : Z_OK);
      if (flush == Z_SYNC_FLUSH) repeated_boundary = strm.total_out;
    }
    repeated.resize(strm.total_out);
    deflateEnd(&strm);
  }
  for (InflateEngine engine : engines()) {
    Result<std::unique_ptr<Inflater>> inflater = make_inflater(engine);
    ASSERT_TRUE(inflater.ok());
    // Reserved block type 3 at the very start.
    const std::byte reserved[] = {std::byte{0x07}, std::byte{0}, std::byte{0}, std::byte{0}};
    std::vector<std::byte> out(1024);
    ASSERT_TRUE((*inflater)->reset({}, 0, 0).ok());
    EXPECT_EQ((*inflater)->inflate(reserved, out).status().code(), StatusCode::kCorruption)
        << (*inflater)->name();
    // A back-reference before the start of the output: resumed after a sync flush without the
    // window that the repeated half refers to.
    ASSERT_TRUE((*inflater)->reset({}, 0, 0).ok());
    std::vector<std::byte> big(4 << 20);
    Result<InflateProgress> progress =
        (*inflater)->inflate(std::span(repeated).subspan(repeated_boundary), big);
    EXPECT_EQ(progress.status().code(), StatusCode::kCorruption) << (*inflater)->name();
    // Random byte flips: either an error or some bytes, never a crash or a hang.
    for (int i = 0; i < 50; ++i) {
      std::vector<std::byte> bad = compressed;
      bad[rng() % bad.size()] ^= std::byte{static_cast<unsigned char>(1 + rng() % 255)};
      ASSERT_TRUE((*inflater)->reset({}, 0, 0).ok());
      size_t in_pos = 0;
      size_t produced = 0;
      for (int calls = 0; calls < 10000; ++calls) {
        Result<InflateProgress> p = (*inflater)->inflate(
            std::span(bad).subspan(in_pos),
            std::span(big).first(std::min(big.size(), produced + (64 << 10))).subspan(produced));
        if (!p.ok()) {
          EXPECT_EQ(p.status().code(), StatusCode::kCorruption);
          break;
        }
        in_pos += p->consumed;
        produced += p->produced;
        if (p->stream_end || (p->consumed == 0 && p->produced == 0) || produced == big.size()) {
          break;
        }
      }
    }
  }
}

TEST(InflaterTest, Crc32MatchesZlib) {
  const std::vector<std::byte> data = make_data(3 << 20, 11, 100 << 10);
  std::mt19937_64 rng(5);
  uint32_t ours = crc32_update(0, {});
  uLong theirs = crc32(0, nullptr, 0);
  EXPECT_EQ(ours, theirs);
  for (size_t pos = 0; pos < data.size();) {
    const size_t n = std::min<size_t>(data.size() - pos, rng() % 100000);
    ours = crc32_update(ours, std::span(data).subspan(pos, n));
    theirs = crc32(theirs, reinterpret_cast<const Bytef*>(data.data() + pos), static_cast<uInt>(n));
    ASSERT_EQ(ours, theirs) << "after " << pos + n;
    pos += n;
  }
}

}  // namespace
}  // namespace imgfs::formats
