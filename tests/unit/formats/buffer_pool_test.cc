#include "formats/buffer_pool.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace imgfs::formats {
namespace {

using StringPool = BufferPool<std::string>;

StringPool::Buffer text(size_t length, char c) {
  return std::make_shared<const std::string>(length, c);
}

TEST(BufferPoolTest, KeysAreDistinct) {
  StringPool pool(100);
  const uint64_t a = pool.new_key();
  const uint64_t b = pool.new_key();
  EXPECT_NE(a, b);
}

TEST(BufferPoolTest, LeastRecentlyUsedGoesFirstWithinTheBudget) {
  StringPool pool(100);
  const uint64_t a = pool.new_key(), b = pool.new_key(), c = pool.new_key();
  pool.insert(a, text(40, 'a'), 40);
  pool.insert(b, text(40, 'b'), 40);
  ASSERT_NE(pool.find(a), nullptr);  // a is now the most recent
  pool.insert(c, text(40, 'c'), 40);
  EXPECT_EQ(pool.find(b), nullptr);
  EXPECT_EQ(*pool.find(a), std::string(40, 'a'));
  EXPECT_EQ(*pool.find(c), std::string(40, 'c'));
  EXPECT_EQ(pool.resident_bytes(), 80u);
  EXPECT_EQ(pool.budget_bytes(), 100u);
}

TEST(BufferPoolTest, ReinsertReplacesAndOversizeIsNotRetained) {
  StringPool pool(100);
  const uint64_t a = pool.new_key();
  pool.insert(a, text(10, 'x'), 10);
  pool.insert(a, text(20, 'y'), 20);
  EXPECT_EQ(*pool.find(a), std::string(20, 'y'));
  EXPECT_EQ(pool.resident_bytes(), 20u);
  pool.insert(a, text(101, 'z'), 101);
  EXPECT_EQ(pool.find(a), nullptr);
  EXPECT_EQ(pool.resident_bytes(), 0u);
}

TEST(BufferPoolTest, EvictedBufferLivesForItsHolder) {
  StringPool pool(10);
  const uint64_t a = pool.new_key(), b = pool.new_key();
  pool.insert(a, text(10, 'a'), 10);
  StringPool::Buffer held = pool.find(a);
  pool.insert(b, text(10, 'b'), 10);
  EXPECT_EQ(pool.find(a), nullptr);
  EXPECT_EQ(*held, std::string(10, 'a'));
  pool.erase(b);
  pool.erase(b);
  EXPECT_EQ(pool.resident_bytes(), 0u);
}

TEST(BufferPoolTest, ConcurrentUsersStayWithinTheBudget) {
  StringPool pool(1000);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pool, t] {
      std::vector<uint64_t> keys;
      for (int i = 0; i < 8; ++i) keys.push_back(pool.new_key());
      for (int round = 0; round < 500; ++round) {
        const uint64_t key = keys[round % keys.size()];
        if (StringPool::Buffer found = pool.find(key)) {
          EXPECT_EQ(found->size(), static_cast<size_t>(50 + t));
        } else {
          pool.insert(key, text(50 + t, 'a'), 50 + t);
        }
        EXPECT_LE(pool.resident_bytes(), 1000u);
      }
      for (uint64_t key : keys) pool.erase(key);
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(pool.resident_bytes(), 0u);
}

}  // namespace
}  // namespace imgfs::formats
