#include "formats/gzip_source.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tests/support/deflate_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::CountingSource;

constexpr uint64_t kSpan = 64 * 1024;
constexpr uint64_t kDataSize = 5 * 1024 * 1024 + 12345;

// Image-like data: incompressible pattern runs, long zero runs and repetitive text.
std::vector<std::byte> make_data(uint64_t size, uint32_t seed) {
  std::vector<std::byte> data(size);
  const std::vector<std::byte> noise = testing::pattern_bytes(size, seed);
  static constexpr std::string_view kText =
      "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n";
  std::mt19937_64 rng(seed);
  uint64_t pos = 0;
  while (pos < size) {
    const uint64_t length = std::min<uint64_t>(size - pos, 1 + rng() % (300 * 1024));
    switch (rng() % 3) {
      case 0:
        std::memcpy(data.data() + pos, noise.data() + pos, length);
        break;
      case 1:
        break;  // zeros
      default:
        for (uint64_t i = 0; i < length; ++i) {
          data[pos + i] = static_cast<std::byte>(kText[(pos + i) % kText.size()]);
        }
    }
    pos += length;
  }
  return data;
}

// `data` as one gzip member; with flush_every > 0, blocks end as pigz ends them.
std::vector<std::byte> gzip(std::span<const std::byte> data, int level, uint64_t flush_every = 0) {
  return testing::zlib_compress(data, 31, level, flush_every);
}

std::array<uint8_t, 20> sha1(std::span<const std::byte> data) {
  std::array<uint8_t, 20> digest{};
  unsigned int length = 0;
  EXPECT_EQ(EVP_Digest(data.data(), data.size(), digest.data(), &length, EVP_sha1(), nullptr), 1);
  return digest;
}

struct Fixture {
  std::vector<std::byte> data;
  std::vector<std::byte> compressed;
};

// Compressed streams are built once per test binary run (level 9 is the slow part).
const Fixture& fixture(int level, uint64_t flush_every = 0) {
  static std::map<std::pair<int, uint64_t>, Fixture> fixtures;
  static std::mutex mu;
  std::lock_guard lock(mu);
  auto [it, inserted] = fixtures.try_emplace({level, flush_every});
  if (inserted) {
    it->second.data = make_data(kDataSize, static_cast<uint32_t>(level));
    it->second.compressed = gzip(it->second.data, level, flush_every);
  }
  return it->second;
}

struct Opened {
  std::unique_ptr<GzipSource> gzip;
  const CountingSource* counting = nullptr;
};

Opened open(std::vector<std::byte> compressed, GzipOptions options = {}) {
  if (options.span_bytes == GzipOptions{}.span_bytes) options.span_bytes = kSpan;
  auto counting =
      std::make_unique<CountingSource>(std::make_unique<MemorySource>(std::move(compressed)));
  Opened opened;
  opened.counting = counting.get();
  Result<std::unique_ptr<GzipSource>> source = open_gzip(std::move(counting), options);
  EXPECT_TRUE(source.ok()) << source.status().to_string();
  if (source.ok()) opened.gzip = std::move(*source);
  return opened;
}

// Reads [offset, offset + length) and compares with the reference.
void expect_range(const BlockSource& source, const std::vector<std::byte>& reference,
                  uint64_t offset, uint64_t length) {
  std::vector<std::byte> out(length);
  Status s = source.read_at(offset, out);
  ASSERT_TRUE(s.ok()) << "read " << length << " at " << offset << ": " << s.to_string();
  ASSERT_TRUE(std::equal(out.begin(), out.end(), reference.begin() + offset))
      << "wrong bytes in " << length << " at " << offset;
}

// Reads at 0, at the end, around every checkpoint, then random ranges.
void check_everything(const GzipSource& source, const std::vector<std::byte>& data) {
  ASSERT_EQ(source.size(), data.size());
  expect_range(source, data, 0, 4096);
  expect_range(source, data, data.size() - 1, 1);
  EXPECT_TRUE(source.fully_indexed());
  const std::vector<uint64_t> offsets = source.checkpoint_offsets();
  EXPECT_GT(offsets.size(), data.size() / kSpan / 4);
  for (uint64_t b : offsets) {
    if (b > 0) expect_range(source, data, b - 1, 1);
    if (b < data.size()) expect_range(source, data, b, 1);
    if (b + 1 < data.size()) expect_range(source, data, b + 1, 1);
    const uint64_t from = b > 3000 ? b - 3000 : 0;
    expect_range(source, data, from, std::min<uint64_t>(6001, data.size() - from));
  }
  std::mt19937_64 rng(42);
  for (int i = 0; i < 100; ++i) {
    const uint64_t offset = rng() % data.size();
    const uint64_t length = std::min<uint64_t>(data.size() - offset, 1 + rng() % (200 * 1024));
    expect_range(source, data, offset, length);
  }
  expect_range(source, data, 0, data.size());
}

class GzipLevelTest : public ::testing::TestWithParam<std::tuple<int, uint64_t>> {};

TEST_P(GzipLevelTest, ReadsMatchReference) {
  const auto [level, flush_every] = GetParam();
  const Fixture& f = fixture(level, flush_every);
  Opened opened = open(f.compressed);
  ASSERT_NE(opened.gzip, nullptr);
  check_everything(*opened.gzip, f.data);
  // Again with a cache of one span, so the boundary reads re-inflate from checkpoints.
  GzipOptions tiny;
  tiny.span_cache_bytes = 1;
  Opened uncached = open(f.compressed, tiny);
  ASSERT_NE(uncached.gzip, nullptr);
  check_everything(*uncached.gzip, f.data);
}

INSTANTIATE_TEST_SUITE_P(LevelsAndFlushes, GzipLevelTest,
                         ::testing::Values(std::tuple{1, 0}, std::tuple{6, 0}, std::tuple{9, 0},
                                           std::tuple{6, 128 * 1024}, std::tuple{1, 100000}));

TEST(GzipSourceTest, DescribeAndSize) {
  const Fixture& f = fixture(6);
  Opened opened = open(f.compressed);
  EXPECT_EQ(opened.gzip->describe(),
            "gzip(counting(memory(" + std::to_string(f.compressed.size()) + " bytes)))");
  EXPECT_EQ(opened.gzip->size(), f.data.size());
  EXPECT_EQ(opened.gzip->inflated_bytes(), 0u);
  EXPECT_EQ(opened.gzip->checkpoint_count(), 1u);
  EXPECT_FALSE(opened.gzip->fully_indexed());
  std::vector<std::byte> none;
  EXPECT_TRUE(opened.gzip->read_at(f.data.size(), none).ok());
  std::vector<std::byte> past(2);
  EXPECT_EQ(opened.gzip->read_at(f.data.size() - 1, past).code(), StatusCode::kInvalidArgument);
}

TEST(GzipSourceTest, FirstReadIsLazy) {
  const Fixture& f = fixture(6);
  Opened opened = open(f.compressed);
  const uint64_t at_open = opened.counting->bytes_read();
  EXPECT_LT(at_open, 8u * 1024);
  expect_range(*opened.gzip, f.data, 0, 4096);
  EXPECT_LT(opened.counting->bytes_read(), 200u * 1024);
  EXPECT_LT(opened.gzip->inflated_bytes(), f.data.size() / 4);
}

TEST(GzipSourceTest, FarBackReadCostsAboutOneSpan) {
  const Fixture& f = fixture(6);
  GzipOptions options;
  options.span_cache_bytes = 1;
  Opened opened = open(f.compressed, options);
  expect_range(*opened.gzip, f.data, 0, f.data.size());
  const std::vector<uint64_t> offsets = opened.gzip->checkpoint_offsets();
  ASSERT_GT(offsets.size(), 8u);
  // The largest compressed distance between two checkpoints bounds one span's input.
  uint64_t max_span_output = 0;
  for (size_t i = 1; i < offsets.size(); ++i) {
    max_span_output = std::max(max_span_output, offsets[i] - offsets[i - 1]);
  }
  std::mt19937_64 rng(7);
  for (int i = 0; i < 20; ++i) {
    const uint64_t offset = rng() % (f.data.size() / 2);
    const uint64_t before = opened.counting->bytes_read();
    expect_range(*opened.gzip, f.data, offset, 100);
    const uint64_t delta = opened.counting->bytes_read() - before;
    // Compressed input never exceeds the output by more than deflate's stored-block overhead.
    EXPECT_LE(delta, max_span_output + max_span_output / 100 + 1024) << "at " << offset;
  }
  std::cout << "checkpoints: " << opened.gzip->checkpoint_count()
            << ", packed windows: " << opened.gzip->checkpoint_window_bytes() << " bytes ("
            << opened.gzip->checkpoint_window_bytes() / opened.gzip->checkpoint_count()
            << " per checkpoint), largest span " << max_span_output << " bytes\n";
}

TEST(GzipSourceTest, WindowsOfMostlyZeroDataPackSmall) {
  // Zeros with a sprinkle of text, like a sparse filesystem image.
  std::vector<std::byte> data(4 * 1024 * 1024);
  for (size_t i = 0; i < data.size(); i += 256 * 1024) {
    std::memcpy(data.data() + i, "ext4 superblock-ish text", 24);
  }
  GzipOptions options;
  options.span_bytes = 64 * 1024;
  Opened opened = open(gzip(data, 6, 64 * 1024), options);
  expect_range(*opened.gzip, data, 0, data.size());
  const size_t count = opened.gzip->checkpoint_count();
  ASSERT_GT(count, 1u);
  EXPECT_LT(opened.gzip->checkpoint_window_bytes() / count, 1024u);
  std::cout << "mostly zeros: " << count << " checkpoints, "
            << opened.gzip->checkpoint_window_bytes() / count << " packed window bytes each\n";
}

TEST(GzipSourceTest, ReadFromCachedSpansIntoTheFrontier) {
  const Fixture& f = fixture(6);
  Opened opened = open(f.compressed);
  expect_range(*opened.gzip, f.data, 0, 1024 * 1024);
  const uint64_t frontier = opened.gzip->inflated_bytes();
  ASSERT_LT(frontier, f.data.size());
  expect_range(*opened.gzip, f.data, 512 * 1024, 3 * 1024 * 1024);
  EXPECT_GE(opened.gzip->inflated_bytes(), 512u * 1024 + 3 * 1024 * 1024);
  // Skipping ahead inflates through the gap (once) and indexes it on the way.
  expect_range(*opened.gzip, f.data, f.data.size() - 5000, 5000);
  expect_range(*opened.gzip, f.data, 10, 5 * 1024 * 1024);
}

TEST(GzipSourceTest, TinyCacheStillReturnsRightBytes) {
  const Fixture& f = fixture(1);
  GzipOptions options;
  options.span_cache_bytes = 100 * 1024;  // about one span
  Opened opened = open(f.compressed, options);
  std::mt19937_64 rng(3);
  for (int i = 0; i < 300; ++i) {
    const uint64_t offset = rng() % f.data.size();
    const uint64_t length = std::min<uint64_t>(f.data.size() - offset, 1 + rng() % 200000);
    expect_range(*opened.gzip, f.data, offset, length);
  }
}

void concurrent_readers(const Fixture& f, GzipOptions options) {
  Opened opened = open(f.compressed, options);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int i = 0; i < 60; ++i) {
        // Bias toward the start so readers overlap and contend for the same spans.
        const uint64_t limit = i < 20 ? f.data.size() / 8 : f.data.size();
        const uint64_t offset = rng() % limit;
        const uint64_t length = std::min<uint64_t>(f.data.size() - offset, 1 + rng() % 150000);
        std::vector<std::byte> out(length);
        Status s = opened.gzip->read_at(offset, out);
        if (!s.ok() || !std::equal(out.begin(), out.end(), f.data.begin() + offset)) ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(GzipSourceTest, ConcurrentReaders) { concurrent_readers(fixture(6), GzipOptions{}); }

TEST(GzipSourceTest, ConcurrentReadersWithTinyCache) {
  GzipOptions options;
  options.span_cache_bytes = 1;
  concurrent_readers(fixture(6, 128 * 1024), options);
}

TEST(GzipSourceTest, ConcurrentReadersOfOneSpanShareOneInflation) {
  const Fixture& f = fixture(6);
  Opened opened = open(f.compressed);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      std::vector<std::byte> out(f.data.size());
      if (!opened.gzip->read_at(0, out).ok() || out != f.data) ++failures;
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  // One sequential pass: the stream was read about once (plus the open probes).
  EXPECT_LT(opened.counting->bytes_read(), f.compressed.size() + 16 * 1024);
}

TEST(GzipSourceTest, ConcurrentReadersOfAnEvictedSpanShareOneDecode) {
  const Fixture& f = fixture(6);
  GzipOptions options;
  options.span_cache_bytes = 1;  // only the newest span stays cached
  Opened opened = open(f.compressed, options);
  expect_range(*opened.gzip, f.data, 0, f.data.size());
  const std::vector<uint64_t> offsets = opened.gzip->checkpoint_offsets();
  ASSERT_GT(offsets.size(), 2u);
  const uint64_t span_length = offsets[1] - offsets[0];
  const uint64_t before = opened.counting->bytes_read();
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      std::vector<std::byte> out(span_length);
      if (!opened.gzip->read_at(0, out).ok() ||
          !std::equal(out.begin(), out.end(), f.data.begin())) {
        ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  // The first span's compressed bytes were fetched once, not once per reader.
  EXPECT_LE(opened.counting->bytes_read() - before, offsets[1] + 1024);
}

TEST(GzipSourceTest, MultiMemberStreams) {
  const std::vector<std::byte> a = make_data(700000, 11);
  const std::vector<std::byte> b = make_data(1234, 12);
  const std::vector<std::byte> c = make_data(2 * 1024 * 1024 + 3, 13);
  for (int members : {2, 3}) {
    std::vector<std::byte> data = a;
    std::vector<std::byte> compressed = gzip(a, 6);
    const std::vector<std::byte> second = members == 2 ? c : b;
    data.insert(data.end(), second.begin(), second.end());
    const std::vector<std::byte> second_gz = gzip(second, 9, 100000);
    compressed.insert(compressed.end(), second_gz.begin(), second_gz.end());
    if (members == 3) {
      data.insert(data.end(), c.begin(), c.end());
      const std::vector<std::byte> third_gz = gzip(c, 1);
      compressed.insert(compressed.end(), third_gz.begin(), third_gz.end());
    }
    GzipOptions options;
    options.exact_uncompressed_size = data.size();
    options.expected_sha1 = sha1(data);
    Opened opened = open(compressed, options);
    check_everything(*opened.gzip, data);
    // Each member start is a checkpoint.
    const std::vector<uint64_t> offsets = opened.gzip->checkpoint_offsets();
    EXPECT_TRUE(std::binary_search(offsets.begin(), offsets.end(), a.size()));
    if (members == 3) {
      EXPECT_TRUE(std::binary_search(offsets.begin(), offsets.end(), a.size() + b.size()));
    }
    options.span_cache_bytes = 1;
    Opened uncached = open(compressed, options);
    check_everything(*uncached.gzip, data);
  }
}

// Three gzip members, the middle one empty, and what they inflate to.
std::pair<std::vector<std::byte>, std::vector<std::byte>> members_with_an_empty_one() {
  const std::vector<std::byte> a = make_data(300000, 21);
  const std::vector<std::byte> c = make_data(200000, 22);
  std::vector<std::byte> compressed = gzip(a, 6);
  for (const std::vector<std::byte>& member : {gzip({}, 6), gzip(c, 6)}) {
    compressed.insert(compressed.end(), member.begin(), member.end());
  }
  std::vector<std::byte> data = a;
  data.insert(data.end(), c.begin(), c.end());
  return {std::move(compressed), std::move(data)};
}

TEST(GzipSourceTest, EmptyMemberInTheMiddle) {
  const auto [compressed, data] = members_with_an_empty_one();
  GzipOptions options;
  options.exact_uncompressed_size = data.size();
  options.span_cache_bytes = 1;
  Opened opened = open(compressed, options);
  check_everything(*opened.gzip, data);
}

TEST(GzipSourceTest, EmptyStream) {
  Opened opened = open(gzip({}, 6));
  EXPECT_EQ(opened.gzip->size(), 0u);
  std::vector<std::byte> none;
  EXPECT_TRUE(opened.gzip->read_at(0, none).ok());
}

// Reads the whole source in chunks; returns the first error (OK if none).
Status read_through(const BlockSource& source, uint64_t chunk = 64 * 1024) {
  std::vector<std::byte> out(chunk);
  for (uint64_t pos = 0; pos < source.size(); pos += chunk) {
    const uint64_t length = std::min(chunk, source.size() - pos);
    Status s = source.read_at(pos, std::span(out).first(length));
    if (!s.ok()) return s;
  }
  return Status::OK();
}

TEST(GzipSourceTest, CorruptedByteIsCorruptionAndSticky) {
  const Fixture& f = fixture(6);
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 6; ++trial) {
    std::vector<std::byte> compressed = f.compressed;
    const uint64_t at = 20 + rng() % (compressed.size() - 40);
    compressed[at] ^= static_cast<std::byte>(1 + rng() % 255);
    Opened opened = open(compressed);
    Status s = read_through(*opened.gzip);
    ASSERT_FALSE(s.ok()) << "flipped byte at " << at;
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
    std::vector<std::byte> out(10);
    EXPECT_EQ(opened.gzip->read_at(0, out).code(), StatusCode::kCorruption);
    EXPECT_EQ(opened.gzip->read_at(f.data.size() - 10, out).code(), StatusCode::kCorruption);
  }
}

TEST(GzipSourceTest, BadTrailerCrcFailsTheReadThatReachesTheEnd) {
  const Fixture& f = fixture(6);
  std::vector<std::byte> compressed = f.compressed;
  compressed[compressed.size() - 8] ^= std::byte{0x40};
  Opened opened = open(compressed);
  expect_range(*opened.gzip, f.data, 0, 4096);
  std::vector<std::byte> last(1);
  Status s = opened.gzip->read_at(f.data.size() - 1, last);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("CRC32"), std::string::npos) << s.to_string();
  EXPECT_FALSE(opened.gzip->fully_indexed());
}

TEST(GzipSourceTest, TruncatedStream) {
  const Fixture& f = fixture(6);
  const std::vector<std::byte> half(f.compressed.begin(),
                                    f.compressed.begin() + f.compressed.size() / 2);
  GzipOptions options;
  options.exact_uncompressed_size = f.data.size();
  Opened opened = open(half, options);
  Status s = read_through(*opened.gzip);
  EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
  // Without the size, ISIZE comes from the wrong bytes; reading still ends in Corruption.
  Opened guessed = open(half);
  const uint64_t chunk = 1024 * 1024;
  Status t;
  std::vector<std::byte> out(chunk);
  for (uint64_t pos = 0; t.ok() && pos < guessed.gzip->size(); pos += chunk) {
    t = guessed.gzip->read_at(pos,
                              std::span(out).first(std::min(chunk, guessed.gzip->size() - pos)));
  }
  EXPECT_EQ(t.code(), StatusCode::kCorruption) << t.to_string();
  // Cut inside the trailer too.
  const std::vector<std::byte> no_trailer(f.compressed.begin(), f.compressed.end() - 5);
  Opened cut = open(no_trailer, options);
  EXPECT_EQ(read_through(*cut.gzip).code(), StatusCode::kCorruption);
}

TEST(GzipSourceTest, Sha1MatchMismatchAndAlternateRange) {
  const Fixture& f = fixture(1);
  GzipOptions good;
  good.expected_sha1 = sha1(f.data);
  Opened matching = open(f.compressed, good);
  EXPECT_TRUE(read_through(*matching.gzip).ok());
  EXPECT_TRUE(matching.gzip->fully_indexed());

  GzipOptions bad;
  bad.expected_sha1 = sha1(std::span(f.data).first(100));
  Opened mismatching = open(f.compressed, bad);
  expect_range(*mismatching.gzip, f.data, 0, 4096);
  std::vector<std::byte> out(4096);
  Status s = mismatching.gzip->read_at(f.data.size() - out.size(), out);
  ASSERT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("tar stream SHA1 mismatch: manifest says "), std::string::npos)
      << s.to_string();
  EXPECT_EQ(mismatching.gzip->read_at(0, out).code(), StatusCode::kCorruption);
  EXPECT_FALSE(mismatching.gzip->fully_indexed());

  GzipOptions alternate;
  alternate.expected_sha1 = sha1(std::span(f.data).subspan(512, 3 * 1024 * 1024));
  alternate.alternate_sha1_range = {512, 3 * 1024 * 1024};
  Opened alt = open(f.compressed, alternate);
  EXPECT_TRUE(read_through(*alt.gzip).ok());
  // The same alternate digest without the range configured is a mismatch.
  alternate.alternate_sha1_range.reset();
  Opened no_alt = open(f.compressed, alternate);
  EXPECT_EQ(read_through(*no_alt.gzip).code(), StatusCode::kCorruption);
  // A range past the end never matches.
  alternate.alternate_sha1_range = {512, f.data.size()};
  Opened past_end = open(f.compressed, alternate);
  EXPECT_EQ(read_through(*past_end.gzip).code(), StatusCode::kCorruption);
}

TEST(GzipSourceTest, ReadNearTheEndFinishesTheStreamAndItsChecks) {
  const Fixture& f = fixture(1);
  GzipOptions bad;
  bad.expected_sha1 = sha1(std::span(f.data).first(100));
  bad.finish_tail_bytes = 20000;
  Opened opened = open(f.compressed, bad);
  std::vector<std::byte> out(4096);
  // Ends 20000 bytes before the end of the stream: the stream is finished and checked anyway.
  Status s = opened.gzip->read_at(f.data.size() - 20000 - out.size(), out);
  EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();

  GzipOptions good;
  good.expected_sha1 = sha1(f.data);
  good.finish_tail_bytes = 20000;
  Opened fine = open(f.compressed, good);
  expect_range(*fine.gzip, f.data, f.data.size() - 20000 - 4096, 4096);
  EXPECT_TRUE(fine.gzip->fully_indexed());
  // Further from the end, the frontier stays lazy.
  Opened lazy = open(f.compressed, good);
  expect_range(*lazy.gzip, f.data, f.data.size() - 20001 - 4096, 4096);
  EXPECT_FALSE(lazy.gzip->fully_indexed());
}

TEST(GzipSourceTest, MinimumSizeAndIsize) {
  const Fixture& f = fixture(6);
  GzipOptions exact_min;
  exact_min.min_uncompressed_size = f.data.size();
  EXPECT_EQ(open(f.compressed, exact_min).gzip->size(), f.data.size());
  // A 4 GiB larger image would have the same ISIZE: the minimum picks the next candidate,
  // and reaching the real end then reports the short stream.
  GzipOptions larger;
  larger.min_uncompressed_size = f.data.size() + 1;
  Opened opened = open(f.compressed, larger);
  EXPECT_EQ(opened.gzip->size(), f.data.size() + (1ull << 32));
  expect_range(*opened.gzip, f.data, 0, 4096);
  std::vector<std::byte> out(1);
  Status s = opened.gzip->read_at(f.data.size(), out);
  ASSERT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("gzip stream is " + std::to_string(f.data.size()) +
                             " bytes, expected " + std::to_string(f.data.size() + (1ull << 32))),
            std::string::npos)
      << s.to_string();
  // A wrong ISIZE gives a wrong size(), and the trailer check catches it.
  std::vector<std::byte> bad_isize = f.compressed;
  bad_isize[bad_isize.size() - 1] ^= std::byte{0x01};
  Opened wrong = open(bad_isize);
  EXPECT_NE(wrong.gzip->size(), f.data.size());
  EXPECT_EQ(read_through(*wrong.gzip, 1024 * 1024).code(), StatusCode::kCorruption);
  // An exact size smaller than the stream: the extra output is Corruption, not bytes.
  GzipOptions too_small;
  too_small.exact_uncompressed_size = f.data.size() - 100;
  Opened small = open(f.compressed, too_small);
  EXPECT_EQ(read_through(*small.gzip).code(), StatusCode::kCorruption);
}

TEST(GzipSourceTest, TrailingBytes) {
  const Fixture& f = fixture(6);
  GzipOptions options;
  options.exact_uncompressed_size = f.data.size();
  std::vector<std::byte> zeros = f.compressed;
  zeros.resize(zeros.size() + 100000);
  Opened padded = open(zeros, options);
  EXPECT_TRUE(read_through(*padded.gzip).ok());
  EXPECT_TRUE(padded.gzip->fully_indexed());

  for (std::byte garbage : {std::byte{0x1f}, std::byte{0x42}}) {
    std::vector<std::byte> trailing = f.compressed;
    trailing.insert(trailing.end(), 30, garbage);
    Opened opened = open(trailing, options);
    EXPECT_EQ(read_through(*opened.gzip).code(), StatusCode::kCorruption);
  }
  std::vector<std::byte> zeros_then_garbage = zeros;
  zeros_then_garbage.back() = std::byte{1};
  Opened opened = open(zeros_then_garbage, options);
  EXPECT_EQ(read_through(*opened.gzip).code(), StatusCode::kCorruption);
}

// Fails the reads of [offset, end) that `fails` picks while armed; disarming simulates a
// recovered store.
class SwitchableFaultSource final : public BlockSource {
 public:
  SwitchableFaultSource(std::unique_ptr<BlockSource> lower,
                        std::function<bool(uint64_t offset, uint64_t end)> fails)
      : lower_(std::move(lower)), fails_(std::move(fails)) {}
  uint64_t size() const override { return lower_->size(); }
  Status read_at(uint64_t offset, std::span<std::byte> out) const override {
    if (armed_.load() && fails_(offset, offset + out.size())) return Status::IOError("HTTP 503");
    return lower_->read_at(offset, out);
  }
  std::string describe() const override { return "switchable"; }
  void set_armed(bool armed) { armed_.store(armed); }

 private:
  std::unique_ptr<BlockSource> lower_;
  const std::function<bool(uint64_t, uint64_t)> fails_;
  std::atomic<bool> armed_{false};
};

TEST(GzipSourceTest, TransientIoErrorIsNotSticky) {
  const Fixture& f = fixture(6);
  // Reads reaching into the second half fail.
  auto faulty = std::make_unique<SwitchableFaultSource>(
      std::make_unique<MemorySource>(f.compressed),
      [half = f.compressed.size() / 2](uint64_t, uint64_t end) { return end > half; });
  SwitchableFaultSource* switchable = faulty.get();
  GzipOptions options;
  options.span_bytes = kSpan;
  options.span_cache_bytes = 1;
  options.expected_sha1 = sha1(f.data);
  Result<std::unique_ptr<GzipSource>> source = open_gzip(std::move(faulty), options);
  ASSERT_TRUE(source.ok()) << source.status().to_string();
  const GzipSource& gzip = **source;
  switchable->set_armed(true);
  Status s = read_through(gzip);
  ASSERT_EQ(s.code(), StatusCode::kIOError) << s.to_string();
  EXPECT_NE(s.message().find("HTTP 503"), std::string::npos);
  EXPECT_NE(s.message().find("gzip(switchable)"), std::string::npos) << s.to_string();
  const uint64_t frontier = gzip.inflated_bytes();
  EXPECT_GT(frontier, 0u);
  // Bytes behind the frontier are still served (re-inflated from early compressed data).
  expect_range(gzip, f.data, 0, std::min<uint64_t>(frontier, 200000));
  // Retrying while the store is still failing fails again, without poisoning the source.
  std::vector<std::byte> last(1);
  EXPECT_EQ(gzip.read_at(f.data.size() - 1, last).code(), StatusCode::kIOError);
  switchable->set_armed(false);
  check_everything(gzip, f.data);
}

// Saves an index to bytes and loads it back, as a remount would.
std::shared_ptr<const GzipIndexSnapshot> reload(const GzipIndexSnapshot& index,
                                                uint64_t compressed_size,
                                                uint64_t uncompressed_size) {
  Result<GzipIndexSnapshot> parsed =
      parse_gzip_index(serialize_gzip_index(index), compressed_size, uncompressed_size);
  EXPECT_TRUE(parsed.ok()) << parsed.status().to_string();
  if (!parsed.ok()) return nullptr;
  return std::make_shared<const GzipIndexSnapshot>(std::move(*parsed));
}

// The most compressed bytes one span can need: the largest distance between checkpoints.
uint64_t largest_compressed_span(const GzipIndexSnapshot& index) {
  uint64_t largest = index.compressed_size - index.checkpoints.back().in_offset;
  for (size_t i = 1; i < index.checkpoints.size(); ++i) {
    largest =
        std::max(largest, index.checkpoints[i].in_offset - index.checkpoints[i - 1].in_offset);
  }
  return largest;
}

TEST(GzipSourceTest, LoadedVerifiedIndexReadsAnywhereAtOnce) {
  const Fixture& f = fixture(6);
  GzipOptions options;
  options.expected_sha1 = sha1(f.data);
  Opened first = open(f.compressed, options);
  EXPECT_FALSE(first.gzip->used_initial_index());
  expect_range(*first.gzip, f.data, 0, f.data.size());
  ASSERT_TRUE(first.gzip->fully_indexed());
  const GzipIndexSnapshot snapshot = first.gzip->snapshot_index();
  EXPECT_TRUE(snapshot.verified);
  EXPECT_TRUE(snapshot.complete());
  EXPECT_EQ(snapshot.sha1, options.expected_sha1);
  EXPECT_EQ(snapshot.checkpoints.size(), first.gzip->checkpoint_count());
  EXPECT_EQ(snapshot.compressed_size, f.compressed.size());
  EXPECT_EQ(snapshot.uncompressed_size, f.data.size());

  GzipOptions with_index = options;
  with_index.initial_index = reload(snapshot, f.compressed.size(), f.data.size());
  with_index.span_cache_bytes = 1;
  Opened second = open(f.compressed, with_index);
  EXPECT_TRUE(second.gzip->used_initial_index());
  EXPECT_TRUE(second.gzip->fully_indexed());
  EXPECT_EQ(second.gzip->inflated_bytes(), f.data.size());
  EXPECT_EQ(second.gzip->checkpoint_offsets(), first.gzip->checkpoint_offsets());
  EXPECT_EQ(second.gzip->checkpoint_window_bytes(), first.gzip->checkpoint_window_bytes());
  const uint64_t largest = largest_compressed_span(snapshot);
  std::mt19937_64 rng(17);
  for (int i = 0; i < 30; ++i) {
    // Far into the stream (the last read is the very last byte): one span of input at most.
    const uint64_t offset =
        i == 29 ? f.data.size() - 1 : f.data.size() / 2 + rng() % (f.data.size() / 2);
    const uint64_t before = second.counting->bytes_read();
    expect_range(*second.gzip, f.data, offset, 1);
    EXPECT_LE(second.counting->bytes_read() - before, largest + 1) << "at " << offset;
  }
  check_everything(*second.gzip, f.data);
  // A source opened from an index saves the same index.
  EXPECT_EQ(serialize_gzip_index(second.gzip->snapshot_index()), serialize_gzip_index(snapshot));
}

TEST(GzipSourceTest, LoadedPartialIndexServesReadsWhileTheFrontierChecks) {
  const Fixture& f = fixture(6);
  GzipOptions options;
  options.expected_sha1 = sha1(f.data);
  Opened first = open(f.compressed, options);
  expect_range(*first.gzip, f.data, 0, f.data.size() / 2);
  const GzipIndexSnapshot snapshot = first.gzip->snapshot_index();
  EXPECT_FALSE(snapshot.verified);
  EXPECT_FALSE(snapshot.complete());
  EXPECT_FALSE(snapshot.sha1.has_value());
  ASSERT_EQ(snapshot.span_crcs.size() + 1, snapshot.checkpoints.size());
  const uint64_t covered = snapshot.checkpoints.back().out_offset;
  ASSERT_GT(covered, f.data.size() / 4);

  GzipOptions with_index = options;
  with_index.initial_index = reload(snapshot, f.compressed.size(), f.data.size());
  with_index.span_cache_bytes = 1;
  Opened second = open(f.compressed, with_index);
  EXPECT_TRUE(second.gzip->used_initial_index());
  EXPECT_FALSE(second.gzip->fully_indexed());
  const uint64_t before = second.counting->bytes_read();
  expect_range(*second.gzip, f.data, covered - 5000, 4000);
  EXPECT_EQ(second.gzip->inflated_bytes(), 0u);  // no frontier inflation from the start
  EXPECT_LE(second.counting->bytes_read() - before, 2 * largest_compressed_span(snapshot) + 2);
  // Its snapshot is still the loaded one, which reaches further than the frontier.
  EXPECT_EQ(serialize_gzip_index(second.gzip->snapshot_index()), serialize_gzip_index(snapshot));
  // Past the loaded spans the frontier runs; at the end it checks the SHA1.
  expect_range(*second.gzip, f.data, covered + (f.data.size() - covered) / 2, 1000);
  EXPECT_GT(second.gzip->inflated_bytes(), covered);
  check_everything(*second.gzip, f.data);
  EXPECT_TRUE(second.gzip->snapshot_index().verified);
}

TEST(GzipSourceTest, ConcurrentReadersWithALoadedIndex) {
  const Fixture& f = fixture(6);
  for (bool complete : {true, false}) {
    Opened first = open(f.compressed);
    expect_range(*first.gzip, f.data, 0, complete ? f.data.size() : f.data.size() / 3);
    GzipOptions options;
    options.span_cache_bytes = 3 * kSpan;
    options.initial_index =
        reload(first.gzip->snapshot_index(), f.compressed.size(), f.data.size());
    concurrent_readers(f, options);
  }
}

TEST(GzipSourceTest, TamperedIndexGivesCorruptionNotWrongBytes) {
  // Flushed like pigz: spans then start at the flush points, inside zero and text runs whose
  // first matches reach back into the window (unflushed level 6 cuts blocks mostly in noise).
  const Fixture& f = fixture(6, 128 * 1024);
  Opened first = open(f.compressed);
  expect_range(*first.gzip, f.data, 0, f.data.size());
  const GzipIndexSnapshot snapshot = first.gzip->snapshot_index();
  ASSERT_GT(snapshot.checkpoints.size(), 8u);

  // Every window replaced by another (re-serialized, so the file's checksum is valid).
  GzipIndexSnapshot forged = snapshot;
  for (GzipCheckpoint& checkpoint : forged.checkpoints) {
    if (checkpoint.window_bytes == 0) continue;
    const std::vector<std::byte> garbage(checkpoint.window_bytes, std::byte{0x5a});
    checkpoint.packed_window = *pack_window(garbage);
  }
  // And one span's CRC changed.
  const size_t crc_forged = snapshot.checkpoints.size() / 2;
  forged.span_crcs[crc_forged] ^= 1;
  GzipOptions options;
  options.span_cache_bytes = 1;
  options.initial_index = reload(forged, f.compressed.size(), f.data.size());
  Opened second = open(f.compressed, options);
  ASSERT_TRUE(second.gzip->used_initial_index());
  size_t failed = 0;
  for (size_t i = 0; i < snapshot.checkpoints.size(); ++i) {
    const uint64_t start = snapshot.checkpoints[i].out_offset;
    const uint64_t end = i + 1 < snapshot.checkpoints.size()
                             ? snapshot.checkpoints[i + 1].out_offset
                             : f.data.size();
    std::vector<std::byte> out(end - start);
    Status s = second.gzip->read_at(start, out);
    if (s.ok()) {
      EXPECT_NE(i, crc_forged);
      EXPECT_TRUE(std::equal(out.begin(), out.end(), f.data.begin() + start)) << "span " << i;
    } else {
      EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
      ++failed;
    }
  }
  // Spans that start in noise, or after a full flush, never look at their window (10 of 51 do
  // here); what matters is that none of them returned wrong bytes.
  EXPECT_GE(failed, 5u);
  std::cout << failed << " of " << snapshot.checkpoints.size()
            << " spans refused with forged windows\n";
}

TEST(GzipSourceTest, IndexForAnotherStreamOrSha1IsNotTrusted) {
  const Fixture& f = fixture(6);
  GzipOptions options;
  options.expected_sha1 = sha1(f.data);
  Opened first = open(f.compressed, options);
  expect_range(*first.gzip, f.data, 0, f.data.size());
  const GzipIndexSnapshot snapshot = first.gzip->snapshot_index();
  auto loaded = std::make_shared<const GzipIndexSnapshot>(snapshot);

  // Another stream (level 1 of other data, same uncompressed size): ignored, still right.
  const Fixture& other = fixture(1);
  GzipOptions for_other;
  for_other.initial_index = loaded;
  Opened other_source = open(other.compressed, for_other);
  EXPECT_FALSE(other_source.gzip->used_initial_index());
  EXPECT_FALSE(other_source.gzip->fully_indexed());
  expect_range(*other_source.gzip, other.data, 0, other.data.size());

  // The same stream but another expected SHA1: the spans serve reads, but the end is checked.
  GzipOptions wrong_sha1 = options;
  (*wrong_sha1.expected_sha1)[0] ^= 1;
  wrong_sha1.initial_index = loaded;
  Opened suspicious = open(f.compressed, wrong_sha1);
  EXPECT_TRUE(suspicious.gzip->used_initial_index());
  EXPECT_FALSE(suspicious.gzip->fully_indexed());
  expect_range(*suspicious.gzip, f.data, f.data.size() / 2, 1000);
  EXPECT_EQ(suspicious.gzip->inflated_bytes(), 0u);
  std::vector<std::byte> last(1);
  EXPECT_EQ(suspicious.gzip->read_at(f.data.size() - 1, last).code(), StatusCode::kCorruption);

  // No expected SHA1 when the index was made, one now: checked again, and it passes.
  Opened without_sha1 = open(f.compressed);
  expect_range(*without_sha1.gzip, f.data, 0, f.data.size());
  GzipOptions now_expected = options;
  now_expected.initial_index =
      std::make_shared<const GzipIndexSnapshot>(without_sha1.gzip->snapshot_index());
  EXPECT_FALSE(now_expected.initial_index->sha1.has_value());
  Opened rechecked = open(f.compressed, now_expected);
  EXPECT_TRUE(rechecked.gzip->used_initial_index());
  EXPECT_FALSE(rechecked.gzip->fully_indexed());
  check_everything(*rechecked.gzip, f.data);
}

TEST(GzipSourceTest, LoadedIndexOfMultiMemberStreamWithAnEmptyMember) {
  const auto [compressed, data] = members_with_an_empty_one();
  GzipOptions options;
  options.exact_uncompressed_size = data.size();
  options.span_cache_bytes = 1;
  Opened first = open(compressed, options);
  expect_range(*first.gzip, data, 0, data.size());
  const GzipIndexSnapshot snapshot = first.gzip->snapshot_index();
  options.initial_index = reload(snapshot, compressed.size(), data.size());
  Opened second = open(compressed, options);
  EXPECT_TRUE(second.gzip->used_initial_index());
  EXPECT_TRUE(second.gzip->fully_indexed());
  check_everything(*second.gzip, data);
}

TEST(GzipSourceTest, IndexFileBytesPerCheckpoint) {
  std::vector<std::byte> zeros(8 * 1024 * 1024);
  for (size_t i = 0; i < zeros.size(); i += 256 * 1024) {
    std::memcpy(zeros.data() + i, "ext4 superblock-ish text", 24);
  }
  const std::vector<std::byte> noise = testing::pattern_bytes(4 * 1024 * 1024, 9);
  for (const std::vector<std::byte>* data : {&std::as_const(zeros), &noise}) {
    GzipOptions options;
    options.span_bytes = 256 * 1024;
    Opened opened = open(gzip(*data, 6, 256 * 1024), options);
    expect_range(*opened.gzip, *data, 0, data->size());
    const std::vector<std::byte> file = serialize_gzip_index(opened.gzip->snapshot_index());
    const size_t count = opened.gzip->checkpoint_count();
    std::cout << (data == &zeros ? "mostly-zero" : "random") << " data: " << count
              << " checkpoints, index file " << file.size() << " bytes, " << file.size() / count
              << " per checkpoint\n";
    if (data == &zeros) {
      EXPECT_LT(file.size() / count, 1024u);
    }
  }
}

class GzipEngineTest
    : public ::testing::TestWithParam<std::tuple<InflateEngine, InflateEngine, int, uint64_t>> {};

// The checkpoints of a frontier of each engine, and spans re-inflated from them by each engine,
// give the reference bytes, on stored, fast, best and flushed streams, and from a loaded index
// (no frontier).
TEST_P(GzipEngineTest, SpansMatchReference) {
  const auto [engine, frontier_engine, level, flush_every] = GetParam();
  if (!inflate_engine_available(engine) || !inflate_engine_available(frontier_engine)) {
    GTEST_SKIP() << "engine not built in";
  }
  const Fixture& f = fixture(level, flush_every);
  GzipOptions options;
  options.span_engine = engine;
  options.frontier_engine = frontier_engine;
  options.span_cache_bytes = 1;
  options.expected_sha1 = sha1(f.data);
  Opened opened = open(f.compressed, options);
  ASSERT_NE(opened.gzip, nullptr);
  check_everything(*opened.gzip, f.data);
  GzipOptions loaded = options;
  loaded.initial_index = reload(opened.gzip->snapshot_index(), f.compressed.size(), f.data.size());
  Opened second = open(f.compressed, loaded);
  ASSERT_NE(second.gzip, nullptr);
  EXPECT_TRUE(second.gzip->used_initial_index());
  check_everything(*second.gzip, f.data);
}

INSTANTIATE_TEST_SUITE_P(EnginesAndLevels, GzipEngineTest,
                         ::testing::Combine(::testing::Values(InflateEngine::kZlib,
                                                              InflateEngine::kIsal),
                                            ::testing::Values(InflateEngine::kZlib,
                                                              InflateEngine::kIsal),
                                            ::testing::Values(0, 1, 9),
                                            ::testing::Values(uint64_t{0}, uint64_t{100000})));

// ISA-L shows no boundary in a stream of fixed-Huffman blocks: the frontier goes on with zlib
// there and still records checkpoints at the usual spacing, member by member (a fixed member
// followed by a dynamic one), as it does on Huffman-only and RLE streams.
TEST(GzipSourceTest, FrontierCheckpointsEveryKindOfBlock) {
  const std::vector<std::byte> data = make_data(kDataSize, 31);
  const std::vector<std::byte> fixed = testing::zlib_compress(data, 31, 6, 0, 8, Z_FIXED);
  std::vector<std::byte> fixed_then_dynamic = fixed;
  const std::vector<std::byte> dynamic = gzip(data, 6);
  fixed_then_dynamic.insert(fixed_then_dynamic.end(), dynamic.begin(), dynamic.end());
  std::vector<std::byte> twice = data;
  twice.insert(twice.end(), data.begin(), data.end());
  const struct {
    const char* name;
    std::vector<std::byte> compressed;
    const std::vector<std::byte>* data;
  } streams[] = {
      {"fixed", fixed, &data},
      {"huffman_only", testing::zlib_compress(data, 31, 6, 0, 8, Z_HUFFMAN_ONLY), &data},
      {"rle", testing::zlib_compress(data, 31, 6, 0, 8, Z_RLE), &data},
      {"fixed then dynamic", fixed_then_dynamic, &twice},
  };
  for (const auto& stream : streams) {
    for (InflateEngine engine : {InflateEngine::kZlib, InflateEngine::kIsal}) {
      if (!inflate_engine_available(engine)) continue;
      SCOPED_TRACE(std::string(stream.name) + " with a frontier of engine " +
                   std::to_string(static_cast<int>(engine)));
      GzipOptions options;
      options.frontier_engine = engine;
      options.span_cache_bytes = 1;
      options.exact_uncompressed_size = stream.data->size();
      options.expected_sha1 = sha1(*stream.data);
      Opened opened = open(stream.compressed, options);
      ASSERT_NE(opened.gzip, nullptr);
      check_everything(*opened.gzip, *stream.data);
    }
  }
}

// Streams given one pool keep their spans in it, within its budget, and take them out when they
// go away.
// The zlib fallback re-reads the span it re-inflates; when one of those reads fails after others
// succeeded, the frontier is left as it was, and once the store answers again every byte is
// right.
TEST(GzipSourceTest, FailedReadDuringTheZlibFallbackIsRetried) {
  if (!inflate_engine_available(InflateEngine::kIsal)) GTEST_SKIP() << "no ISA-L frontier";
  // Text only: fixed-Huffman blocks throughout (no stored block, where ISA-L would find an end).
  std::vector<std::byte> data;
  for (int line = 0; data.size() < kDataSize; ++line) {
    for (char c : "inode " + std::to_string(line * 7919 % 100003) + " mode 0644 size " +
                      std::to_string(line % 4093) + "\n") {
      data.push_back(static_cast<std::byte>(c));
    }
  }
  // Reads that start in [64 KiB, 100 KiB) fail: bytes the frontier has passed by then.
  auto faulty = std::make_unique<SwitchableFaultSource>(
      std::make_unique<MemorySource>(testing::zlib_compress(data, 31, 6, 0, 8, Z_FIXED)),
      [](uint64_t offset, uint64_t) { return offset >= 64 * 1024 && offset < 100 * 1024; });
  SwitchableFaultSource* switchable = faulty.get();
  GzipOptions options;
  options.frontier_engine = InflateEngine::kIsal;
  options.span_bytes = kSpan;
  options.span_cache_bytes = 1;
  options.expected_sha1 = sha1(data);
  Result<std::unique_ptr<GzipSource>> source = open_gzip(std::move(faulty), options);
  ASSERT_TRUE(source.ok()) << source.status().to_string();
  // The frontier passes the failing range, and is still looking for a boundary (it gives up
  // after 256 KiB of input).
  expect_range(**source, data, 0, 512 * 1024);
  switchable->set_armed(true);
  Status s = read_through(**source);
  EXPECT_EQ(s.code(), StatusCode::kIOError) << s.to_string();
  switchable->set_armed(false);
  check_everything(**source, data);
}

TEST(GzipSourceTest, StreamsShareOneSpanPool) {
  GzipSpanPool pool(6 * kSpan);
  GzipOptions options;
  options.span_pool = &pool;
  Opened first = open(fixture(1).compressed, options);
  Opened second = open(fixture(6).compressed, options);
  ASSERT_NE(first.gzip, nullptr);
  ASSERT_NE(second.gzip, nullptr);
  check_everything(*first.gzip, fixture(1).data);
  check_everything(*second.gzip, fixture(6).data);
  EXPECT_GT(pool.resident_bytes(), 0u);
  EXPECT_LE(pool.resident_bytes(), pool.budget_bytes());
  first.gzip.reset();
  second.gzip.reset();
  EXPECT_EQ(pool.resident_bytes(), 0u);
}

TEST(GzipSourceTest, UnavailableEngineIsRefusedAtOpen) {
  for (InflateEngine engine : {InflateEngine::kZlib, InflateEngine::kIsal}) {
    for (const bool frontier : {false, true}) {
      GzipOptions options;
      (frontier ? options.frontier_engine : options.span_engine) = engine;
      Result<std::unique_ptr<GzipSource>> source =
          open_gzip(std::make_unique<MemorySource>(fixture(6).compressed), options);
      if (inflate_engine_available(engine)) {
        EXPECT_TRUE(source.ok());
      } else {
        EXPECT_EQ(source.status().code(), StatusCode::kNotSupported);
      }
    }
  }
}

}  // namespace
}  // namespace imgfs::formats
