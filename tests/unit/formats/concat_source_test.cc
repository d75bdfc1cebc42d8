#include "formats/concat_source.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <thread>

#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::expect_read;

using imgfs::testing::FaultySource;
using imgfs::testing::pattern_bytes;

// Splits a pattern of the sum of `sizes` into parts of those sizes; returns the reference.
std::vector<std::byte> make_parts(const std::vector<uint64_t>& sizes,
                                  std::vector<std::unique_ptr<BlockSource>>* parts) {
  uint64_t total = 0;
  for (uint64_t s : sizes) total += s;
  std::vector<std::byte> all = pattern_bytes(total, 7);
  uint64_t at = 0;
  for (uint64_t s : sizes) {
    parts->push_back(std::make_unique<MemorySource>(
        std::vector<std::byte>(all.begin() + at, all.begin() + at + s), "part"));
    at += s;
  }
  return all;
}

// Reads around every part boundary, from a few bytes before to a few bytes after, plus 0,
// the end, the whole size and random ranges.
void check_all_reads(const std::vector<uint64_t>& sizes) {
  std::vector<std::unique_ptr<BlockSource>> parts;
  std::vector<std::byte> ref = make_parts(sizes, &parts);
  Result<std::unique_ptr<BlockSource>> opened = open_concat(std::move(parts));
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  const BlockSource& source = **opened;
  ASSERT_EQ(ref.size(), source.size());
  EXPECT_EQ("concat(" + std::to_string(sizes.size()) + " parts)", source.describe());
  expect_read(source, ref, 0, ref.size());
  expect_read(source, ref, ref.size(), 0);
  if (!ref.empty()) {
    expect_read(source, ref, 0, 1);
    expect_read(source, ref, ref.size() - 1, 1);
  }
  uint64_t boundary = 0;
  for (uint64_t s : sizes) {
    boundary += s;
    for (uint64_t before : {0, 1, 17}) {
      for (uint64_t after : {1, 2, 33, 70000}) {
        if (before > boundary) continue;
        const uint64_t offset = boundary - before;
        const uint64_t length = std::min<uint64_t>(before + after, ref.size() - offset);
        expect_read(source, ref, offset, length);
      }
    }
  }
  std::mt19937_64 rng(42);
  for (int i = 0; i < 200 && !ref.empty(); ++i) {
    const uint64_t offset = rng() % ref.size();
    const uint64_t length = rng() % (ref.size() - offset + 1);
    expect_read(source, ref, offset, length);
  }
}

TEST(ConcatSourceTest, MebibyteParts) { check_all_reads({1 << 20, 1 << 20, 1 << 20, 12345}); }

TEST(ConcatSourceTest, OddSizes) { check_all_reads({1, 17, 4099, 65537, 3, 100001}); }

TEST(ConcatSourceTest, ZeroLengthPartAtEnd) { check_all_reads({1 << 20, 1 << 20, 0}); }

TEST(ConcatSourceTest, ZeroLengthPartsInMiddleAndStart) {
  check_all_reads({0, 1000, 0, 0, 2001, 0, 5, 0});
}

TEST(ConcatSourceTest, SinglePart) { check_all_reads({777}); }

TEST(ConcatSourceTest, AllPartsEmpty) { check_all_reads({0, 0}); }

TEST(ConcatSourceTest, ReadPastEndIsInvalidArgument) {
  std::vector<std::unique_ptr<BlockSource>> parts;
  make_parts({10, 20}, &parts);
  auto opened = open_concat(std::move(parts));
  ASSERT_TRUE(opened.ok());
  std::vector<std::byte> out(2);
  EXPECT_EQ(StatusCode::kInvalidArgument, (*opened)->read_at(29, out).code());
  EXPECT_EQ(StatusCode::kInvalidArgument, (*opened)->read_at(UINT64_MAX, out).code());
}

TEST(ConcatSourceTest, NoPartsOrNullPartIsInvalidArgument) {
  EXPECT_EQ(StatusCode::kInvalidArgument, open_concat({}).status().code());
  std::vector<std::unique_ptr<BlockSource>> parts;
  parts.push_back(imgfs::testing::pattern_source(10));
  parts.push_back(nullptr);
  EXPECT_EQ(StatusCode::kInvalidArgument, open_concat(std::move(parts)).status().code());
}

// A part that claims a huge size, to test the overflow check without memory.
class HugeSource final : public BlockSource {
 public:
  uint64_t size() const override { return UINT64_MAX / 2 + 1; }
  Status read_at(uint64_t, std::span<std::byte>) const override {
    return Status::IOError("not readable");
  }
  std::string describe() const override { return "huge"; }
};

TEST(ConcatSourceTest, TotalSizeOverflowIsRejected) {
  std::vector<std::unique_ptr<BlockSource>> parts;
  parts.push_back(std::make_unique<HugeSource>());
  parts.push_back(std::make_unique<HugeSource>());
  EXPECT_EQ(StatusCode::kInvalidArgument, open_concat(std::move(parts)).status().code());
}

TEST(ConcatSourceTest, PartErrorNamesThePartIndex) {
  const std::vector<uint64_t> sizes = {100, 100, 100, 100, 100, 100, 100};
  std::vector<std::unique_ptr<BlockSource>> parts;
  std::vector<std::byte> ref = make_parts(sizes, &parts);
  parts[3] = std::make_unique<FaultySource>(std::move(parts[3]), 50, 10);
  auto opened = open_concat(std::move(parts));
  ASSERT_TRUE(opened.ok());
  const BlockSource& source = **opened;
  std::vector<std::byte> out(100);
  Status s = source.read_at(320, out);
  EXPECT_EQ(StatusCode::kIOError, s.code());
  EXPECT_EQ("part 3/7: injected fault", s.message());
  // Reads that avoid the faulty range still work, even inside part 3.
  expect_read(source, ref, 290, 50);
  expect_read(source, ref, 361, 200);
}

TEST(ConcatSourceTest, ConcurrentReaders) {
  const std::vector<uint64_t> sizes = {65536, 0, 40000, 12345, 99999, 0};
  std::vector<std::unique_ptr<BlockSource>> parts;
  std::vector<std::byte> ref = make_parts(sizes, &parts);
  auto opened = open_concat(std::move(parts));
  ASSERT_TRUE(opened.ok());
  const BlockSource& source = **opened;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<std::byte> out;
      for (int i = 0; i < 300; ++i) {
        const uint64_t offset = rng() % ref.size();
        const uint64_t length = rng() % std::min<uint64_t>(ref.size() - offset + 1, 100000);
        out.resize(length);
        if (!source.read_at(offset, out).ok() ||
            (length > 0 && std::memcmp(out.data(), ref.data() + offset, length) != 0)) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(0, failures.load());
}

}  // namespace
}  // namespace imgfs::formats
