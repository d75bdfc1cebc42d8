#include "cache/block_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <shared_mutex>
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

// Sets the file's mtime to `seconds` after the epoch (the LRU order open() rebuilds).
void set_mtime(const std::string& path, time_t seconds) {
  const struct timespec times[2] = {{seconds, 0}, {seconds, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0) << path;
}

void write_file(const std::string& path, std::span<const std::byte> bytes) {
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  ::close(fd);
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

BlockKey key_at(uint64_t index) { return BlockKey{kKey.source_id, kKey.etag, index}; }

// The path of block `key`'s file, found as the only file a fresh put of it adds.
std::string path_of_new_block(BlockStore& store, const BlockKey& key,
                              std::span<const std::byte> data) {
  const std::vector<std::string> before = block_files(store.blocks_dir());
  EXPECT_TRUE(store.put(key, data).ok());
  for (const std::string& path : block_files(store.blocks_dir())) {
    if (std::find(before.begin(), before.end(), path) == before.end()) return path;
  }
  ADD_FAILURE() << "no new file for block " << key.index;
  return "";
}

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
  // The cache is full: eviction runs down to the low watermark (2.7 files) minus the new one,
  // so the two least recent blocks go.
  ASSERT_TRUE(store->put(key(3), pattern_bytes(1000, 3)).ok());
  EXPECT_EQ(store->bytes_used(), 2 * file);
  EXPECT_FALSE(*store->get(key(1), out));
  EXPECT_FALSE(*store->get(key(2), out));
  for (uint64_t i : {0, 3}) {
    ASSERT_TRUE(*store->get(key(i), out)) << i;
    EXPECT_EQ(out, pattern_bytes(1000, i));
  }
  const DirUsage usage = usage_of(store->blocks_dir());
  EXPECT_EQ(usage.files, 2u);
  EXPECT_EQ(usage.bytes, 2 * file);
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

TEST_F(BlockStoreTest, WatermarksEvictInBatches) {
  const uint64_t file = BlockStore::file_bytes(kKey, 1000);
  auto store = open_store(10 * file);
  EXPECT_EQ(store->low_watermark_bytes(), 10 * file - file);
  for (uint64_t i = 0; i < 10; ++i) ASSERT_TRUE(store->put(key_at(i), pattern_bytes(1000, i)).ok());
  EXPECT_EQ(store->bytes_used(), 10 * file);  // up to the cap, nothing is evicted
  // Over the cap: evict to 9 files minus the new one, i.e. the two oldest (0 and 1).
  ASSERT_TRUE(store->put(key_at(10), pattern_bytes(1000, 10)).ok());
  EXPECT_EQ(store->bytes_used(), 9 * file);
  // The next put fits under the cap and evicts nothing.
  ASSERT_TRUE(store->put(key_at(11), pattern_bytes(1000, 11)).ok());
  EXPECT_EQ(store->bytes_used(), 10 * file);
  std::vector<std::byte> out(1000);
  for (uint64_t i = 0; i < 12; ++i) {
    EXPECT_EQ(*store->get(key_at(i), out), i >= 2) << i;
  }
  EXPECT_EQ(usage_of(store->blocks_dir()).bytes, store->bytes_used());
}

TEST_F(BlockStoreTest, BlocksSurviveReopen) {
  auto store = open_store(1 << 20);
  const std::string blocks = store->blocks_dir();
  for (uint64_t i = 0; i < 5; ++i) {
    ASSERT_TRUE(store->put(key_at(i), pattern_bytes(3000 + i, i)).ok());
  }
  const BlockKey other{"another-image", "e2", 7};
  ASSERT_TRUE(store->put(other, pattern_bytes(10, 9)).ok());
  const uint64_t used = store->bytes_used();
  const uint64_t used_by = store->bytes_used_by(kKey.source_id, kKey.etag);
  store.reset();

  store = open_store(1 << 20);
  EXPECT_EQ(store->bytes_used(), used);
  EXPECT_EQ(store->bytes_used_by(kKey.source_id, kKey.etag), used_by);
  EXPECT_EQ(store->bytes_used_by(other.source_id, other.etag), BlockStore::file_bytes(other, 10));
  EXPECT_EQ(usage_of(blocks).bytes, used);
  for (uint64_t i = 0; i < 5; ++i) {
    std::vector<std::byte> out(3000 + i);
    ASSERT_TRUE(*store->get(key_at(i), out)) << i;
    EXPECT_EQ(out, pattern_bytes(3000 + i, i));
  }
  std::vector<std::byte> out(10);
  ASSERT_TRUE(*store->get(other, out));
  EXPECT_EQ(out, pattern_bytes(10, 9));
  EXPECT_EQ(store->bytes_used(), used);
}

TEST_F(BlockStoreTest, OpenRemovesTempFilesAndKeepsForeignFiles) {
  auto store = open_store(1 << 20);
  ASSERT_TRUE(store->put(kKey, pattern_bytes(100, 1)).ok());
  const std::string blocks = store->blocks_dir();
  const std::vector<std::string> block_paths = block_files(blocks);
  write_file(blocks + "/.tmp-leftover", pattern_bytes(5000));
  write_file(blocks + "/README", pattern_bytes(7));
  store.reset();
  store = open_store(1 << 20);
  EXPECT_EQ(store->bytes_used(), BlockStore::file_bytes(kKey, 100));
  std::vector<std::string> expected = block_paths;
  expected.push_back(blocks + "/README");
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(block_files(blocks), expected);
  std::vector<std::byte> out(100);
  EXPECT_TRUE(*store->get(kKey, out));
}

TEST_F(BlockStoreTest, ReopenWithSmallerCapacityEvictsOldestAtOpen) {
  const uint64_t file = BlockStore::file_bytes(kKey, 1000);
  auto store = open_store(1 << 20);
  const std::string blocks = store->blocks_dir();
  std::vector<std::string> paths;
  for (uint64_t i = 0; i < 10; ++i) {
    paths.push_back(path_of_new_block(*store, key_at(i), pattern_bytes(1000, i)));
  }
  store.reset();
  // Block i was last used at time 1000 + i, except block 0, used last of all.
  for (uint64_t i = 0; i < 10; ++i) set_mtime(paths[i], i == 0 ? 5000 : 1000 + i);

  store = open_store(5 * file);
  // Over the cap at open: evicted down to the low watermark (4.5 files), oldest first.
  EXPECT_EQ(store->bytes_used(), 4 * file);
  EXPECT_EQ(usage_of(blocks).bytes, 4 * file);
  std::vector<std::byte> out(1000);
  for (uint64_t i = 0; i < 10; ++i) {
    EXPECT_EQ(*store->get(key_at(i), out), i == 0 || i >= 7) << i;
  }
}

TEST_F(BlockStoreTest, HitsAreRememberedAcrossReopen) {
  const uint64_t file = BlockStore::file_bytes(kKey, 1000);
  auto store = open_store(1 << 20);
  std::vector<std::string> paths;
  for (uint64_t i = 0; i < 4; ++i) {
    paths.push_back(path_of_new_block(*store, key_at(i), pattern_bytes(1000, i)));
  }
  for (uint64_t i = 0; i < 4; ++i) set_mtime(paths[i], 1000 + i);
  std::vector<std::byte> out(1000);
  ASSERT_TRUE(*store->get(key_at(0), out));  // the oldest becomes the newest on disk
  store.reset();

  store = open_store(2 * file);
  EXPECT_EQ(store->bytes_used(), file);  // low watermark 1.8 files: one block is kept
  EXPECT_TRUE(*store->get(key_at(0), out));
  for (uint64_t i = 1; i < 4; ++i) EXPECT_FALSE(*store->get(key_at(i), out)) << i;
}

// What kill -9 can leave behind (a temp file, since renames are atomic), plus damage a crash
// of the machine or a bad disk can: truncated, zero-length, bit-flipped and garbage block
// files. None is served; each is removed when read, and the accounting matches the folder.
TEST_F(BlockStoreTest, CrashLeftoversAreMissesAndAccountingIsExact) {
  auto store = open_store(1 << 20);
  const std::string blocks = store->blocks_dir();
  std::vector<std::string> paths;
  for (uint64_t i = 0; i < 7; ++i) {
    paths.push_back(path_of_new_block(*store, key_at(i), pattern_bytes(4096, i)));
  }
  store.reset();
  // Blocks 0 and 1 stay good.
  ASSERT_EQ(::truncate(paths[2].c_str(), 3000), 0);       // cut in the data
  ASSERT_EQ(::truncate(paths[3].c_str(), 20), 0);         // cut in the header
  ASSERT_EQ(::truncate(paths[4].c_str(), 0), 0);          // renamed before its data was written
  flip_byte(paths[5], static_cast<off_t>(BlockStore::file_bytes(kKey, 0) + 1234));
  write_file(paths[6], pattern_bytes(4200, 99));          // garbage of about the right size
  write_file(blocks + "/.tmp-" + fs::path(paths[0]).filename().string() + "-17",
             pattern_bytes(2000));                        // a put cut short

  store = open_store(1 << 20);
  DirUsage usage = usage_of(blocks);
  EXPECT_EQ(usage.temp_files, 0u);
  EXPECT_EQ(usage.files, 7u);
  EXPECT_EQ(store->bytes_used(), usage.bytes);

  std::vector<std::byte> out(4096);
  for (uint64_t i = 0; i < 7; ++i) {
    auto got = store->get(key_at(i), out);
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(*got, i < 2) << i;
    if (*got) {
      EXPECT_EQ(out, pattern_bytes(4096, i));
    }
  }
  usage = usage_of(blocks);
  EXPECT_EQ(usage.files, 2u);
  EXPECT_EQ(usage.bytes, 2 * BlockStore::file_bytes(kKey, 4096));
  EXPECT_EQ(store->bytes_used(), usage.bytes);
  EXPECT_EQ(block_files(blocks), (std::vector<std::string>{paths[0], paths[1]}));

  // The store keeps working: a bad block is simply fetched and stored again.
  ASSERT_TRUE(store->put(key_at(5), pattern_bytes(4096, 5)).ok());
  ASSERT_TRUE(*store->get(key_at(5), out));
  EXPECT_EQ(out, pattern_bytes(4096, 5));
  EXPECT_EQ(store->bytes_used(), usage_of(blocks).bytes);
}

// Open reads no block data: it lists the folder and stats each file. Prints the open time
// (not asserted: timing is not a test). 1000 blocks keep the test fast; 10k took 155-210 ms in
// a Debug build on a loaded machine.
TEST_F(BlockStoreTest, ReopenIndexesManyBlocks) {
  constexpr uint64_t kBlocks = 1000;
  auto store = open_store(1 << 30);
  const std::vector<std::byte> data = pattern_bytes(16, 3);
  for (uint64_t i = 0; i < kBlocks; ++i) ASSERT_TRUE(store->put(key_at(i), data).ok());
  const uint64_t used = store->bytes_used();
  store.reset();
  const auto start = std::chrono::steady_clock::now();
  store = open_store(1 << 30);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  std::printf("open indexed %llu blocks in %.1f ms\n", static_cast<unsigned long long>(kBlocks),
              std::chrono::duration<double, std::milli>(elapsed).count());
  EXPECT_EQ(store->bytes_used(), used);
  EXPECT_EQ(usage_of(store->blocks_dir()).files, kBlocks);
  std::vector<std::byte> out(16);
  EXPECT_TRUE(*store->get(key_at(kBlocks - 1), out));
  EXPECT_EQ(out, data);
}

// A real kill -9 at a random moment of a busy, full store (puts, evictions and replacements
// running): the next open is consistent, within the cap, and serves only right bytes.
TEST_F(BlockStoreTest, SurvivesKillNineAtRandomMoments) {
  const uint64_t file = BlockStore::file_bytes(kKey, 3000);
  const uint64_t capacity = 8 * file;
  const std::string dir = base_ + "/killed";
  std::mt19937 rng(42);
  for (int round = 0; round < 6; ++round) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      auto store = BlockStore::open(dir, capacity, nullptr);
      if (!store.ok()) ::_exit(1);
      std::vector<std::byte> out(3000);
      for (uint64_t i = 0;; ++i) {
        const uint64_t index = (i * 7) % 20;
        (void)(*store)->put(key_at(index), pattern_bytes(3000, static_cast<uint32_t>(index)));
        (void)(*store)->get(key_at((i * 3) % 20), out);
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(2000 + rng() % 20000));
    ASSERT_EQ(::kill(child, SIGKILL), 0);
    int wait_status = 0;
    ASSERT_EQ(::waitpid(child, &wait_status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(wait_status)) << "child exited early, round " << round;

    auto store = BlockStore::open(dir, capacity, nullptr);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    const DirUsage usage = usage_of((*store)->blocks_dir());
    EXPECT_EQ(usage.temp_files, 0u);
    EXPECT_EQ(usage.bytes, (*store)->bytes_used());
    EXPECT_LE(usage.bytes, capacity);
    std::vector<std::byte> out(3000);
    for (uint64_t index = 0; index < 20; ++index) {
      auto got = (*store)->get(key_at(index), out);
      ASSERT_TRUE(got.ok());
      if (*got) {
        EXPECT_EQ(out, pattern_bytes(3000, static_cast<uint32_t>(index))) << index;
      }
    }
    EXPECT_EQ(usage_of((*store)->blocks_dir()).bytes, (*store)->bytes_used());
  }
}

TEST_F(BlockStoreTest, ConcurrentPutsAndGetsStayCorrectAndBounded) {
  const uint64_t file = BlockStore::file_bytes(BlockKey{"src", "etag", 10}, 2048);
  const uint64_t capacity = 10 * file;
  auto store = open_store(capacity);
  std::atomic<int> wrong{0};
  std::atomic<int> hits{0};
  std::atomic<int> over_cap_on_disk{0};
  std::atomic<int> workers_done{0};
  // Workers hold it shared around each call; the checker takes it exclusively, so it lists
  // the folder between calls (a listing taken during an eviction could see a removed file and
  // its replacement together, which never coexist).
  std::shared_mutex pause;
  std::thread checker([&] {
    while (workers_done.load() < 8) {
      {
        std::unique_lock<std::shared_mutex> lock(pause);
        const DirUsage usage = usage_of(store->blocks_dir());
        if (usage.bytes > capacity || usage.bytes != store->bytes_used()) {
          over_cap_on_disk.fetch_add(1);
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<std::byte> out(2048);
      for (int i = 0; i < 300; ++i) {
        std::shared_lock<std::shared_mutex> lock(pause);
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
      workers_done.fetch_add(1);
    });
  }
  for (std::thread& t : threads) t.join();
  checker.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(over_cap_on_disk.load(), 0);
  EXPECT_GT(hits.load(), 0);
  const DirUsage usage = usage_of(store->blocks_dir());
  EXPECT_EQ(usage.temp_files, 0u);
  EXPECT_EQ(usage.bytes, store->bytes_used());
  EXPECT_LE(usage.bytes, capacity);
}

}  // namespace
}  // namespace imgfs::cache
