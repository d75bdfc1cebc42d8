#include "formats/verified_part_source.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <barrier>
#include <cstring>
#include <random>
#include <thread>

#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::expect_read;

using imgfs::testing::CountingSource;
using imgfs::testing::FaultySource;
using imgfs::testing::pattern_bytes;

std::array<uint8_t, 20> sha1(const std::vector<std::byte>& data) {
  std::array<uint8_t, 20> digest{};
  unsigned int length = 0;
  EXPECT_EQ(1, EVP_Digest(data.data(), data.size(), digest.data(), &length, EVP_sha1(), nullptr));
  return digest;
}

// A verified part over pattern data, with a CountingSource below it to see lower passes.
struct Part {
  std::vector<std::byte> bytes;
  const CountingSource* counter = nullptr;
  std::unique_ptr<BlockSource> source;
};

Part make_part(VerifiedPartPool& pool, uint64_t size, uint32_t seed, bool corrupt_digest = false) {
  Part part;
  part.bytes = pattern_bytes(size, seed);
  auto counting = std::make_unique<CountingSource>(std::make_unique<MemorySource>(part.bytes));
  part.counter = counting.get();
  std::array<uint8_t, 20> digest = sha1(part.bytes);
  if (corrupt_digest) digest[7] ^= 0x01;
  auto opened =
      open_verified_part(std::move(counting), digest, "img.part." + std::to_string(seed), pool);
  EXPECT_TRUE(opened.ok()) << opened.status().to_string();
  part.source = std::move(*opened);
  return part;
}

TEST(VerifiedPartSourceTest, ReadsMatchAndFetchOnce) {
  VerifiedPartPool pool(64 << 20);
  // Over 4 MiB, so the fetch takes several lower reads.
  const uint64_t size = (9 << 20) + 3;
  Part part = make_part(pool, size, 1);
  EXPECT_EQ(size, part.source->size());
  EXPECT_EQ("sha1(counting(memory(" + std::to_string(size) + " bytes)))", part.source->describe());
  EXPECT_EQ(0u, part.counter->reads());  // Lazy: nothing read at open.
  expect_read(*part.source, part.bytes, 0, 1);
  EXPECT_EQ(size, part.counter->bytes_read());
  EXPECT_EQ(3u, part.counter->reads());
  expect_read(*part.source, part.bytes, size - 1, 1);
  expect_read(*part.source, part.bytes, 0, size);
  for (uint64_t boundary : {uint64_t{4} << 20, uint64_t{8} << 20}) {
    expect_read(*part.source, part.bytes, boundary - 5, 10);
  }
  std::mt19937_64 rng(1);
  for (int i = 0; i < 100; ++i) {
    const uint64_t offset = rng() % size;
    expect_read(*part.source, part.bytes, offset,
                rng() % std::min<uint64_t>(size - offset + 1, 1 << 20));
  }
  EXPECT_EQ(size, part.counter->bytes_read());  // Every later read came from the pool.
  EXPECT_EQ(size, pool.resident_bytes());
  std::vector<std::byte> out(2);
  EXPECT_EQ(StatusCode::kInvalidArgument, part.source->read_at(size - 1, out).code());
}

TEST(VerifiedPartSourceTest, WrongDigestIsCorruptionAndRetried) {
  VerifiedPartPool pool(1 << 20);
  Part part = make_part(pool, 5000, 2, /*corrupt_digest=*/true);
  std::vector<std::byte> out(100, std::byte{0xAA});
  Status s = part.source->read_at(10, out);
  EXPECT_EQ(StatusCode::kCorruption, s.code());
  EXPECT_NE(std::string::npos, s.message().find("img.part.2: SHA1 mismatch: manifest says "))
      << s.message();
  EXPECT_NE(std::string::npos, s.message().find(", data is "));
  for (std::byte b : out) ASSERT_EQ(std::byte{0xAA}, b);  // No bytes handed out.
  EXPECT_EQ(0u, pool.resident_bytes());
  // The failure is not cached: the next read fetches and checks again.
  EXPECT_EQ(StatusCode::kCorruption, part.source->read_at(0, out).code());
  EXPECT_EQ(2 * 5000u, part.counter->bytes_read());
}

TEST(VerifiedPartSourceTest, EvictionUnderSmallBudgetRefetches) {
  VerifiedPartPool pool(25000);  // Room for two 10000-byte parts.
  Part a = make_part(pool, 10000, 3);
  Part b = make_part(pool, 10000, 4);
  Part c = make_part(pool, 10000, 5);
  expect_read(*a.source, a.bytes, 0, 100);
  expect_read(*b.source, b.bytes, 0, 100);
  expect_read(*a.source, a.bytes, 500, 100);  // a is now the most recently used.
  expect_read(*c.source, c.bytes, 0, 100);    // Evicts b.
  EXPECT_EQ(20000u, pool.resident_bytes());
  EXPECT_EQ(10000u, a.counter->bytes_read());
  expect_read(*a.source, a.bytes, 9000, 1000);
  EXPECT_EQ(10000u, a.counter->bytes_read());  // Still resident.
  expect_read(*b.source, b.bytes, 9000, 1000);
  EXPECT_EQ(20000u, b.counter->bytes_read());  // Evicted, fetched and verified again.
  EXPECT_LE(pool.resident_bytes(), pool.budget_bytes());
}

TEST(VerifiedPartSourceTest, PartLargerThanBudgetIsServedNotRetained) {
  VerifiedPartPool pool(1000);
  Part part = make_part(pool, 5000, 6);
  expect_read(*part.source, part.bytes, 0, 5000);
  expect_read(*part.source, part.bytes, 4000, 10);
  EXPECT_EQ(0u, pool.resident_bytes());
  EXPECT_EQ(2 * 5000u, part.counter->bytes_read());
}

TEST(VerifiedPartSourceTest, DestroyingASourceFreesItsBuffer) {
  VerifiedPartPool pool(1 << 20);
  {
    Part part = make_part(pool, 7000, 7);
    expect_read(*part.source, part.bytes, 0, 1);
    EXPECT_EQ(7000u, pool.resident_bytes());
  }
  EXPECT_EQ(0u, pool.resident_bytes());
}

TEST(VerifiedPartSourceTest, ZeroLengthPart) {
  VerifiedPartPool pool(1 << 20);
  Part part = make_part(pool, 0, 8);
  ASSERT_NE(nullptr, part.source);
  EXPECT_EQ(0u, part.source->size());
  std::vector<std::byte> none;
  EXPECT_TRUE(part.source->read_at(0, none).ok());
  // da39a3ee... is the SHA1 of no bytes; any other digest is caught at open.
  std::array<uint8_t, 20> wrong = sha1({});
  EXPECT_EQ(0xda, wrong[0]);
  wrong[0] ^= 1;
  auto opened = open_verified_part(std::make_unique<MemorySource>(std::vector<std::byte>{}), wrong,
                                   "img.part.9", pool);
  EXPECT_EQ(StatusCode::kCorruption, opened.status().code());
}

TEST(VerifiedPartSourceTest, LowerErrorPropagates) {
  VerifiedPartPool pool(1 << 20);
  const std::vector<std::byte> bytes = pattern_bytes(10000, 9);
  auto opened = open_verified_part(
      std::make_unique<FaultySource>(std::make_unique<MemorySource>(bytes), 9000, 1), sha1(bytes),
      "img.part.03", pool);
  ASSERT_TRUE(opened.ok());
  std::vector<std::byte> out(10);
  // Any read needs the whole part, so even a range far from the fault fails.
  Status s = (*opened)->read_at(0, out);
  EXPECT_EQ(StatusCode::kIOError, s.code());
  EXPECT_EQ("img.part.03: injected fault", s.message());
  EXPECT_EQ(0u, pool.resident_bytes());
}

TEST(VerifiedPartSourceTest, ConcurrentFirstReadersFetchOnce) {
  for (int round = 0; round < 20; ++round) {
    VerifiedPartPool pool(16 << 20);
    const uint64_t size = 3 << 20;
    Part part = make_part(pool, size, 10);
    constexpr int kThreads = 8;
    std::barrier start(kThreads);
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(round * 100 + t);
        std::vector<std::byte> out;
        start.arrive_and_wait();
        for (int i = 0; i < 20; ++i) {
          const uint64_t offset = rng() % size;
          const uint64_t length = rng() % std::min<uint64_t>(size - offset + 1, 100000);
          out.resize(length);
          if (!part.source->read_at(offset, out).ok() ||
              (length > 0 && std::memcmp(out.data(), part.bytes.data() + offset, length) != 0)) {
            failures.fetch_add(1);
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(0, failures.load());
    EXPECT_EQ(size, part.counter->bytes_read()) << "round " << round;
  }
}

TEST(VerifiedPartSourceTest, ConcurrentReadersAcrossPartsWithEviction) {
  VerifiedPartPool pool(2 * 50000 + 10);  // Two of the four parts fit.
  std::vector<Part> parts;
  for (uint32_t i = 0; i < 4; ++i) parts.push_back(make_part(pool, 50000, 20 + i));
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<std::byte> out;
      for (int i = 0; i < 200; ++i) {
        const Part& part = parts[rng() % parts.size()];
        const uint64_t offset = rng() % part.bytes.size();
        const uint64_t length = rng() % (part.bytes.size() - offset + 1);
        out.resize(length);
        if (!part.source->read_at(offset, out).ok() ||
            (length > 0 && std::memcmp(out.data(), part.bytes.data() + offset, length) != 0)) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(0, failures.load());
  EXPECT_LE(pool.resident_bytes(), pool.budget_bytes());
}

}  // namespace
}  // namespace imgfs::formats
