#include "cache/block_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "tests/support/test_sources.h"

namespace imgfs::cache {
namespace {

namespace fs = std::filesystem;
using imgfs::testing::pattern_bytes;

struct DirUsage {
  uint64_t bytes = 0;
  size_t files = 0;
  size_t temp_files = 0;
};

DirUsage usage_of(const std::string& dir) {
  DirUsage usage;
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, ec)) {
    struct stat st;
    if (::lstat(entry.path().c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    usage.bytes += static_cast<uint64_t>(st.st_size);
    ++usage.files;
    if (entry.path().filename().string().starts_with(".tmp-")) ++usage.temp_files;
  }
  return usage;
}

mode_t mode_of(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

std::vector<std::string> block_files(const std::string& dir) {
  std::vector<std::string> paths;
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, ec)) {
    paths.push_back(entry.path().string());
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

void flip_byte(const std::string& path, off_t offset) {
  const int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::byte b;
  ASSERT_EQ(::pread(fd, &b, 1, offset), 1);
  b ^= std::byte{0x01};
  ASSERT_EQ(::pwrite(fd, &b, 1, offset), 1);
  ::close(fd);
}

class BlockStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = ::testing::TempDir() + "imgfs-block-store-XXXXXX";
    ASSERT_NE(::mkdtemp(base_.data()), nullptr);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(base_, ec);
  }

  std::unique_ptr<BlockStore> open_store(uint64_t capacity, const std::string& sub = "cache") {
    auto store = BlockStore::open(base_ + "/" + sub, capacity, nullptr);
    EXPECT_TRUE(store.ok()) << store.status().to_string();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  std::string base_;
};

const BlockKey kKey{"bucket/img.manifest.xml#etag1", "etag-part", 3};

TEST_F(BlockStoreTest, OpenCreatesPrivateDirectories) {
  auto store = open_store(1 << 20, "a/b/c");
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(mode_of(base_ + "/a/b/c"), 0700u);
  EXPECT_EQ(mode_of(store->blocks_dir()), 0700u);
  EXPECT_EQ(store->blocks_dir(), base_ + "/a/b/c/blocks");
  EXPECT_EQ(store->capacity_bytes(), 1u << 20);
  EXPECT_EQ(store->bytes_used(), 0u);
}

TEST_F(BlockStoreTest, OpenTightensLooseModes) {
  ASSERT_EQ(::mkdir((base_ + "/loose").c_str(), 0755), 0);
  ASSERT_EQ(::chmod((base_ + "/loose").c_str(), 0777), 0);
  auto store = open_store(1 << 20, "loose/");
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(mode_of(base_ + "/loose"), 0700u);
  ASSERT_EQ(::chmod(store->blocks_dir().c_str(), 0755), 0);
  store = open_store(1 << 20, "loose");
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(mode_of(store->blocks_dir()), 0700u);
}

TEST_F(BlockStoreTest, OpenRejectsBadArguments) {
  EXPECT_EQ(BlockStore::open("", 1, nullptr).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(BlockStore::open(base_ + "/c", 0, nullptr).status().code(),
            StatusCode::kInvalidArgument);
  const std::string file = base_ + "/file";
  ::close(::open(file.c_str(), O_CREAT | O_WRONLY, 0600));
  EXPECT_FALSE(BlockStore::open(file, 1 << 20, nullptr).ok());
  EXPECT_FALSE(BlockStore::open(file + "/below", 1 << 20, nullptr).ok());
}

TEST_F(BlockStoreTest, BytesUsedByCountsOneSourceOnly) {
  auto store = open_store(1 << 20);
  const std::vector<std::byte> data = pattern_bytes(1000, 2);
  const BlockKey other{"another-image", "etag-part", 0};
  for (uint64_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(store->put(BlockKey{kKey.source_id, kKey.etag, i}, data).ok());
  }
  ASSERT_TRUE(store->put(other, data).ok());
  EXPECT_EQ(store->bytes_used_by(kKey.source_id, kKey.etag),
            3 * BlockStore::file_bytes(kKey, 1000));
  EXPECT_EQ(store->bytes_used_by(other.source_id, other.etag),
            BlockStore::file_bytes(other, 1000));
  EXPECT_EQ(store->bytes_used_by(kKey.source_id, "another-etag"), 0u);
}

TEST_F(BlockStoreTest, PutThenGetRoundTripsWithPrivateFiles) {
  auto store = open_store(1 << 20);
  const std::vector<std::byte> data = pattern_bytes(5000, 1);
  ASSERT_TRUE(store->put(kKey, data).ok());
  EXPECT_EQ(store->bytes_used(), BlockStore::file_bytes(kKey, 5000));
  EXPECT_GT(BlockStore::file_bytes(kKey, 5000), 5000u);

  std::vector<std::byte> out(5000);
  auto got = store->get(kKey, out);
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(*got);
  EXPECT_EQ(out, data);

  const std::vector<std::string> files = block_files(store->blocks_dir());
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(mode_of(files[0]), 0600u);
  const DirUsage usage = usage_of(store->blocks_dir());
  EXPECT_EQ(usage.bytes, store->bytes_used());
  // The header starts with the magic.
  char magic[8];
  const int fd = ::open(files[0].c_str(), O_RDONLY);
  ASSERT_EQ(::read(fd, magic, 8), 8);
  ::close(fd);
  EXPECT_EQ(std::string(magic, 8), "IMGFSBLK");
}

TEST_F(BlockStoreTest, OtherKeysMiss) {
  auto store = open_store(1 << 20);
  ASSERT_TRUE(store->put(kKey, pattern_bytes(100, 1)).ok());
  std::vector<std::byte> out(100);
  for (BlockKey other : {BlockKey{kKey.source_id, kKey.etag, 4}, BlockKey{kKey.source_id, "x", 3},
                         BlockKey{"other", kKey.etag, 3}}) {
    auto got = store->get(other, out);
    ASSERT_TRUE(got.ok());
    EXPECT_FALSE(*got);
  }
  auto got = store->get(kKey, out);
  ASSERT_TRUE(got.ok() && *got);
}

TEST_F(BlockStoreTest, WrongLengthIsAMissAndDropsTheBlock) {
  auto store = open_store(1 << 20);
  ASSERT_TRUE(store->put(kKey, pattern_bytes(100, 1)).ok());
  std::vector<std::byte> shorter(99);
  auto got = store->get(kKey, shorter);
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(*got);
  EXPECT_EQ(store->bytes_used(), 0u);
  EXPECT_EQ(usage_of(store->blocks_dir()).files, 0u);
}

TEST_F(BlockStoreTest, CorruptFilesAreMissesAndRemoved) {
  auto store = open_store(1 << 20);
  const std::vector<std::byte> data = pattern_bytes(4096, 2);
  const off_t header = static_cast<off_t>(BlockStore::file_bytes(kKey, 0));
  // Flip a byte in the data, in the magic, in the index field and in the header checksum.
  for (off_t offset : {header + 100, off_t{0}, off_t{24}, header - 1, header + 4095}) {
    ASSERT_TRUE(store->put(kKey, data).ok());
    const std::vector<std::string> files = block_files(store->blocks_dir());
    ASSERT_EQ(files.size(), 1u);
    flip_byte(files[0], offset);
    std::vector<std::byte> out(4096);
    auto got = store->get(kKey, out);
    ASSERT_TRUE(got.ok());
    EXPECT_FALSE(*got) << offset;
    EXPECT_EQ(store->bytes_used(), 0u);
    EXPECT_TRUE(block_files(store->blocks_dir()).empty());
  }
}

TEST_F(BlockStoreTest, TruncatedOrDeletedFilesAreMisses) {
  auto store = open_store(1 << 20);
  const std::vector<std::byte> data = pattern_bytes(4096, 2);
  std::vector<std::byte> out(4096);

  ASSERT_TRUE(store->put(kKey, data).ok());
  ASSERT_EQ(::truncate(block_files(store->blocks_dir())[0].c_str(), 2000), 0);
  auto got = store->get(kKey, out);
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(*got);
  EXPECT_EQ(store->bytes_used(), 0u);

  ASSERT_TRUE(store->put(kKey, data).ok());
  ASSERT_EQ(::unlink(block_files(store->blocks_dir())[0].c_str()), 0);
  got = store->get(kKey, out);
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(*got);
  EXPECT_EQ(store->bytes_used(), 0u);
}

TEST_F(BlockStoreTest, EvictsLeastRecentlyUsed) {
  const uint64_t file = BlockStore::file_bytes(kKey, 1000);
  auto store = open_store(3 * file);
  auto key = [](uint64_t index) { return BlockKey{kKey.source_id, kKey.etag, index}; };
  for (uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(store->put(key(i), pattern_bytes(1000, i)).ok());
  EXPECT_EQ(store->bytes_used(), 3 * file);
  std::vector<std::byte> out(1000);
  ASSERT_TRUE(*store->get(key(0), out));  // 0 is now the most recent; 1 is the oldest
  ASSERT_TRUE(store->put(key(3), pattern_bytes(1000, 3)).ok());
  EXPECT_EQ(store->bytes_used(), 3 * file);
  EXPECT_FALSE(*store->get(key(1), out));
  for (uint64_t i : {0, 2, 3}) {
    ASSERT_TRUE(*store->get(key(i), out)) << i;
    EXPECT_EQ(out, pattern_bytes(1000, i));
  }
  const DirUsage usage = usage_of(store->blocks_dir());
  EXPECT_EQ(usage.files, 3u);
  EXPECT_EQ(usage.bytes, 3 * file);
}

TEST_F(BlockStoreTest, BlockLargerThanCapacityIsNotStored) {
  auto store = open_store(BlockStore::file_bytes(kKey, 1000) - 1);
  ASSERT_TRUE(store->put(kKey, pattern_bytes(999, 1)).ok());
  EXPECT_EQ(store->bytes_used(), BlockStore::file_bytes(kKey, 999));
  ASSERT_TRUE(store->put(BlockKey{kKey.source_id, kKey.etag, 4}, pattern_bytes(1000, 1)).ok());
  // The earlier block survives: nothing is evicted for a block that cannot fit anyway.
  EXPECT_EQ(store->bytes_used(), BlockStore::file_bytes(kKey, 999));
  std::vector<std::byte> out(1000);
  EXPECT_FALSE(*store->get(BlockKey{kKey.source_id, kKey.etag, 4}, out));
}

TEST_F(BlockStoreTest, PutReplacesOlderCopy) {
  auto store = open_store(1 << 20);
  ASSERT_TRUE(store->put(kKey, pattern_bytes(100, 1)).ok());
  ASSERT_TRUE(store->put(kKey, pattern_bytes(100, 2)).ok());
  EXPECT_EQ(store->bytes_used(), BlockStore::file_bytes(kKey, 100));
  std::vector<std::byte> out(100);
  ASSERT_TRUE(*store->get(kKey, out));
  EXPECT_EQ(out, pattern_bytes(100, 2));
}

TEST_F(BlockStoreTest, RefusesOverlongIds) {
  auto store = open_store(1 << 20);
  BlockKey key{std::string(BlockStore::kMaxIdBytes + 1, 'x'), "e", 0};
  EXPECT_EQ(store->put(key, pattern_bytes(10)).code(), StatusCode::kInvalidArgument);
}

TEST_F(BlockStoreTest, OpenRemovesOurOldFilesOnly) {
  auto store = open_store(1 << 20);
  ASSERT_TRUE(store->put(kKey, pattern_bytes(100, 1)).ok());
  const std::string blocks = store->blocks_dir();
  ::close(::open((blocks + "/.tmp-leftover").c_str(), O_CREAT | O_WRONLY, 0600));
  ::close(::open((blocks + "/README").c_str(), O_CREAT | O_WRONLY, 0600));
  store.reset();
  store = open_store(1 << 20);
  EXPECT_EQ(store->bytes_used(), 0u);
  EXPECT_EQ(block_files(blocks), std::vector<std::string>{blocks + "/README"});
  std::vector<std::byte> out(100);
  EXPECT_FALSE(*store->get(kKey, out));
}

TEST_F(BlockStoreTest, ConcurrentPutsAndGetsStayCorrectAndBounded) {
  const uint64_t file = BlockStore::file_bytes(BlockKey{"src", "etag", 10}, 2048);
  const uint64_t capacity = 10 * file;
  auto store = open_store(capacity);
  std::atomic<int> wrong{0};
  std::atomic<int> hits{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<std::byte> out(2048);
      for (int i = 0; i < 300; ++i) {
        const uint64_t index = 10 + rng() % 30;
        const BlockKey key{"src", "etag", index};
        if (rng() % 2 == 0) {
          if (!store->put(key, pattern_bytes(2048, static_cast<uint32_t>(index))).ok()) {
            wrong.fetch_add(1);
          }
        } else {
          auto got = store->get(key, out);
          if (!got.ok()) {
            wrong.fetch_add(1);
          } else if (*got) {
            hits.fetch_add(1);
            if (out != pattern_bytes(2048, static_cast<uint32_t>(index))) wrong.fetch_add(1);
          }
        }
        if (store->bytes_used() > capacity) wrong.fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(hits.load(), 0);
  const DirUsage usage = usage_of(store->blocks_dir());
  EXPECT_EQ(usage.temp_files, 0u);
  EXPECT_EQ(usage.bytes, store->bytes_used());
  EXPECT_LE(usage.bytes, capacity);
}

}  // namespace
}  // namespace imgfs::cache
