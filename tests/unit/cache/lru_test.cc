#include "cache/lru.h"

#include <gtest/gtest.h>

#include <string>

namespace imgfs::cache {
namespace {

TEST(LruIndexTest, EmptyIndex) {
  LruIndex<int> lru;
  EXPECT_EQ(lru.total_bytes(), 0u);
  EXPECT_EQ(lru.size(), 0u);
  EXPECT_FALSE(lru.contains(1));
  EXPECT_FALSE(lru.touch(1));
  EXPECT_FALSE(lru.erase(1));
  EXPECT_FALSE(lru.bytes_of(1).has_value());
  EXPECT_TRUE(lru.evict_until(0).empty());
}

TEST(LruIndexTest, EvictsLeastRecentlyUsedFirst) {
  LruIndex<std::string> lru;
  lru.insert("a", 10);
  lru.insert("b", 20);
  lru.insert("c", 30);
  EXPECT_EQ(lru.total_bytes(), 60u);
  EXPECT_TRUE(lru.touch("a"));  // order now (old→new): b, c, a
  EXPECT_EQ(lru.evict_until(60), std::vector<std::string>{});
  EXPECT_EQ(lru.evict_until(35), (std::vector<std::string>{"b", "c"}));
  EXPECT_EQ(lru.total_bytes(), 10u);
  EXPECT_TRUE(lru.contains("a"));
  EXPECT_FALSE(lru.contains("b"));
  EXPECT_EQ(lru.evict_until(0), std::vector<std::string>{"a"});
  EXPECT_EQ(lru.size(), 0u);
  EXPECT_EQ(lru.total_bytes(), 0u);
}

TEST(LruIndexTest, InsertUpdatesSizeAndRecency) {
  LruIndex<int> lru;
  lru.insert(1, 100);
  lru.insert(2, 100);
  lru.insert(1, 5);  // now the most recent, and smaller
  EXPECT_EQ(lru.total_bytes(), 105u);
  EXPECT_EQ(lru.bytes_of(1), 5u);
  EXPECT_EQ(lru.size(), 2u);
  EXPECT_EQ(lru.evict_until(50), std::vector<int>{2});
  EXPECT_EQ(lru.total_bytes(), 5u);
}

TEST(LruIndexTest, EraseAdjustsTotal) {
  LruIndex<int> lru;
  lru.insert(1, 7);
  lru.insert(2, 8);
  EXPECT_TRUE(lru.erase(1));
  EXPECT_FALSE(lru.erase(1));
  EXPECT_EQ(lru.total_bytes(), 8u);
  EXPECT_EQ(lru.evict_until(0), std::vector<int>{2});
}

TEST(LruIndexTest, ZeroByteEntriesAreKeptUnderLimitZero) {
  LruIndex<int> lru;
  lru.insert(2, 3);
  lru.insert(1, 0);
  EXPECT_EQ(lru.evict_until(0), std::vector<int>{2});
  EXPECT_TRUE(lru.contains(1));
}

TEST(LruIndexTest, CustomHashAndManyKeys) {
  struct Mod7 {
    size_t operator()(int k) const { return static_cast<size_t>(k % 7); }
  };
  LruIndex<int, Mod7> lru;
  for (int i = 0; i < 1000; ++i) lru.insert(i, 1);
  for (int i = 0; i < 1000; i += 2) lru.touch(i);  // evens become the most recent
  const std::vector<int> evicted = lru.evict_until(500);
  ASSERT_EQ(evicted.size(), 500u);
  for (size_t i = 0; i < evicted.size(); ++i) EXPECT_EQ(evicted[i], static_cast<int>(2 * i + 1));
  EXPECT_EQ(lru.total_bytes(), 500u);
}

}  // namespace
}  // namespace imgfs::cache
