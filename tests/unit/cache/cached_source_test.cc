#include "cache/cached_source.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "tests/support/test_sources.h"

namespace imgfs::cache {
namespace {

namespace fs = std::filesystem;
using imgfs::testing::pattern_bytes;
using imgfs::testing::pattern_source;

constexpr uint32_t kBlock = 4096;

// A lower source that records every read by the kBlock offsets it covers, and can fail, be
// slow, or hold reads until released.
class ProbeSource final : public BlockSource {
 public:
  explicit ProbeSource(std::unique_ptr<BlockSource> lower) : lower_(std::move(lower)) {}
  uint64_t size() const override { return lower_->size(); }
  uint32_t block_size() const override { return 512; }
  Result<Extent> map(uint64_t offset) const override {
    return Extent{Extent::Kind::kZero, size() - offset};
  }
  std::string describe() const override { return "probe(" + lower_->describe() + ")"; }
  Status read_at(uint64_t offset, std::span<std::byte> out) const override {
    {
      // Counted per kBlock-sized block covered, so one read of a run counts each of its blocks.
      std::unique_lock<std::mutex> lock(mu_);
      ++calls_;
      ++reads_[offset];
      for (uint64_t at = offset + kBlock; at < offset + out.size(); at += kBlock) ++reads_[at];
      released_cv_.wait(lock, [this] { return !held_; });
    }
    if (delay_us_ > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us_));
    if (failing_.load()) return Status::IOError("injected lower fault");
    return lower_->read_at(offset, out);
  }

  void set_failing(bool failing) { failing_.store(failing); }
  void set_delay_us(int delay_us) { delay_us_ = delay_us; }
  void hold() {
    std::lock_guard<std::mutex> lock(mu_);
    held_ = true;
  }
  void release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      held_ = false;
    }
    released_cv_.notify_all();
  }
  std::map<uint64_t, int> reads() const {
    std::lock_guard<std::mutex> lock(mu_);
    return reads_;
  }
  // Lower reads made (a run of blocks is one).
  int total_reads() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  std::unique_ptr<BlockSource> lower_;
  std::atomic<bool> failing_{false};
  int delay_us_ = 0;
  mutable std::mutex mu_;
  mutable std::condition_variable released_cv_;
  bool held_ = false;
  mutable std::map<uint64_t, int> reads_;
  mutable int calls_ = 0;
};

constexpr uint64_t kSize = 10 * kBlock + 123;  // a short last block

class CachedSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = ::testing::TempDir() + "imgfs-cached-source-XXXXXX";
    ASSERT_NE(::mkdtemp(base_.data()), nullptr);
    reference_ = pattern_bytes(kSize, 9);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(base_, ec);
  }

  void open_store(uint64_t capacity) {
    auto store = BlockStore::open(base_ + "/cache", capacity, nullptr);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    store_ = std::move(store).value();
  }

  // A CachedSource over a ProbeSource over pattern data of `size` bytes; *probe is set.
  std::unique_ptr<CachedSource> make(ProbeSource** probe, uint64_t size = kSize,
                                     uint32_t block = kBlock, std::string etag = "e1") {
    auto lower = std::make_unique<ProbeSource>(pattern_source(size, 9));
    *probe = lower.get();
    return std::make_unique<CachedSource>(std::move(lower), *store_, "bucket/img", etag, block,
                                          &counters_);
  }

  void expect_read(const BlockSource& source, uint64_t offset, uint64_t length) {
    std::vector<std::byte> buf(length);
    Status s = source.read_at(offset, buf);
    ASSERT_TRUE(s.ok()) << s.to_string() << " at " << offset << "+" << length;
    ASSERT_TRUE(std::equal(buf.begin(), buf.end(), reference_.begin() + offset))
        << offset << "+" << length;
  }

  uint64_t hits() const { return counters_.get(IoCounters::kCacheHits); }
  uint64_t misses() const { return counters_.get(IoCounters::kCacheMisses); }

  std::string base_;
  std::vector<std::byte> reference_;
  std::unique_ptr<BlockStore> store_;
  IoCounters counters_;
};

TEST_F(CachedSourceTest, OpenValidates) {
  open_store(1 << 20);
  EXPECT_EQ(open_cached(nullptr, *store_, "s", "e", kBlock, nullptr).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(open_cached(pattern_source(10), *store_, "s", "e", 0, nullptr).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(open_cached(pattern_source(10), *store_, "s", "e",
                        CachedSource::kMaxCacheBlockBytes + 1, nullptr)
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  auto ok = open_cached(pattern_source(10), *store_, "s", "e", kBlock, nullptr);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ((*ok)->size(), 10u);
  EXPECT_EQ((*ok)->describe(), "cached(pattern(10 bytes))");
}

TEST_F(CachedSourceTest, DelegatesHints) {
  open_store(1 << 20);
  ProbeSource* probe;
  auto source = make(&probe);
  EXPECT_EQ(source->size(), kSize);
  EXPECT_EQ(source->block_size(), 512u);
  auto extent = source->map(100);
  ASSERT_TRUE(extent.ok());
  EXPECT_EQ(extent->kind, Extent::Kind::kZero);
  EXPECT_EQ(extent->length, kSize - 100);
  EXPECT_EQ(source->describe(), "cached(probe(pattern(" + std::to_string(kSize) + " bytes)))");
}

TEST_F(CachedSourceTest, ReadsMatchAtEdgesAndBoundaries) {
  open_store(1 << 20);
  ProbeSource* probe;
  auto source = make(&probe);
  expect_read(*source, 0, 1);
  expect_read(*source, kSize - 1, 1);
  expect_read(*source, kSize - 123, 123);
  expect_read(*source, 0, kSize);
  expect_read(*source, 5, 0);
  for (uint64_t b = 1; b <= 10; ++b) {
    expect_read(*source, b * kBlock - 1, 2);
    expect_read(*source, b * kBlock - 100, std::min<uint64_t>(200, kSize - (b * kBlock - 100)));
  }
  expect_read(*source, kBlock - 7, 3 * kBlock + 14);  // spans four blocks
  std::mt19937_64 rng(1);
  for (int i = 0; i < 300; ++i) {
    const uint64_t offset = rng() % kSize;
    expect_read(*source, offset, rng() % (kSize - offset + 1));
  }
  // Every block came from lower exactly once, whole and aligned.
  const std::map<uint64_t, int> reads = probe->reads();
  ASSERT_EQ(reads.size(), 11u);
  for (const auto& [offset, count] : reads) {
    EXPECT_EQ(offset % kBlock, 0u);
    EXPECT_EQ(count, 1) << offset;
  }
  std::vector<std::byte> buf(2);
  EXPECT_EQ(source->read_at(kSize - 1, buf).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(source->read_at(UINT64_MAX, buf).code(), StatusCode::kInvalidArgument);
}

TEST_F(CachedSourceTest, SecondReadComesFromTheStore) {
  open_store(1 << 20);
  ProbeSource* probe;
  auto first = make(&probe);
  expect_read(*first, 1000, 3 * kBlock);  // blocks 0..3, in one lower read
  EXPECT_EQ(probe->total_reads(), 1);
  EXPECT_EQ(probe->reads().size(), 4u);
  EXPECT_EQ(misses(), 1u);
  expect_read(*first, 1000, 3 * kBlock);
  EXPECT_EQ(probe->total_reads(), 1);

  // A fresh source (empty memory) over the same store and key: no lower reads at all.
  ProbeSource* probe2;
  auto second = make(&probe2);
  const uint64_t hits_before = hits();
  expect_read(*second, 1000, 3 * kBlock);
  EXPECT_EQ(probe2->total_reads(), 0);
  EXPECT_EQ(hits(), hits_before + 4);
  EXPECT_EQ(misses(), 1u);

  // Another etag is another object version: nothing shared.
  ProbeSource* probe3;
  auto other = make(&probe3, kSize, kBlock, "e2");
  expect_read(*other, 1000, 10);
  EXPECT_EQ(probe3->total_reads(), 1);
}

TEST_F(CachedSourceTest, SequentialSmallReadsReadTheBlockOnce) {
  open_store(1 << 20);
  ProbeSource* probe;
  auto source = make(&probe, 4 * 65536, 65536);
  reference_ = pattern_bytes(4 * 65536, 9);
  for (uint64_t offset = 0; offset < 65536; offset += 4096) expect_read(*source, offset, 4096);
  EXPECT_EQ(probe->total_reads(), 1);
  EXPECT_EQ(misses(), 1u);
  EXPECT_EQ(hits(), 15u);
}

TEST_F(CachedSourceTest, DifferentBlockSizesDoNotShareBlocks) {
  open_store(1 << 20);
  ProbeSource* probe;
  auto small = make(&probe, kSize, 4096);
  expect_read(*small, 0, kSize);
  ProbeSource* probe2;
  auto large = make(&probe2, kSize, 8192);
  expect_read(*large, 0, kSize);
  expect_read(*large, 8000, 500);
}

TEST_F(CachedSourceTest, CapacityIsNeverExceededAndModesArePrivate) {
  const uint64_t file = BlockStore::file_bytes(BlockKey{"bucket/img#block=4096", "e1", 99}, kBlock);
  const uint64_t capacity = 8 * file;
  open_store(capacity);
  const uint64_t size = 3 * 8 * kBlock;  // three times what fits
  reference_ = pattern_bytes(size, 9);
  ProbeSource* probe;
  auto source = make(&probe, size);
  const std::string blocks = store_->blocks_dir();
  auto disk_bytes = [&] {
    uint64_t total = 0;
    for (const fs::directory_entry& entry : fs::directory_iterator(blocks)) {
      struct stat st;
      EXPECT_EQ(::lstat(entry.path().c_str(), &st), 0);
      EXPECT_EQ(st.st_mode & 07777, 0600u) << entry.path();
      total += static_cast<uint64_t>(st.st_size);
    }
    return total;
  };
  for (uint64_t offset = 0; offset < size; offset += 3000) {
    expect_read(*source, offset, std::min<uint64_t>(3000, size - offset));
    ASSERT_LE(store_->bytes_used(), capacity);
    ASSERT_LE(disk_bytes(), capacity);
  }
  std::mt19937_64 rng(2);
  for (int i = 0; i < 200; ++i) {
    const uint64_t offset = rng() % size;
    expect_read(*source, offset, rng() % std::min<uint64_t>(size - offset + 1, 3 * kBlock));
    ASSERT_LE(store_->bytes_used(), capacity);
  }
  EXPECT_EQ(store_->bytes_used(), capacity);
  EXPECT_EQ(disk_bytes(), store_->bytes_used());
  struct stat st;
  ASSERT_EQ(::stat((base_ + "/cache").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);
  ASSERT_EQ(::stat(blocks.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);
}

TEST_F(CachedSourceTest, CorruptBlockFileIsRefetched) {
  open_store(1 << 20);
  ProbeSource* probe;
  auto first = make(&probe);
  expect_read(*first, 0, 100);
  std::vector<fs::path> files;
  for (const fs::directory_entry& entry : fs::directory_iterator(store_->blocks_dir())) {
    files.push_back(entry.path());
  }
  ASSERT_EQ(files.size(), 1u);
  // Flip one data byte (the last byte of block 0).
  const int fd = ::open(files[0].c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  struct stat st;
  ASSERT_EQ(::fstat(fd, &st), 0);
  std::byte b;
  ASSERT_EQ(::pread(fd, &b, 1, st.st_size - 1), 1);
  b ^= std::byte{0x80};
  ASSERT_EQ(::pwrite(fd, &b, 1, st.st_size - 1), 1);
  ::close(fd);

  ProbeSource* probe2;
  auto second = make(&probe2);
  const uint64_t misses_before = misses();
  expect_read(*second, 0, kBlock);
  EXPECT_EQ(probe2->total_reads(), 1);
  EXPECT_EQ(misses(), misses_before + 1);
  // The re-fetched block was stored again, correctly.
  ProbeSource* probe3;
  auto third = make(&probe3);
  expect_read(*third, 0, kBlock);
  EXPECT_EQ(probe3->total_reads(), 0);
}

TEST_F(CachedSourceTest, WorksWhenTheStoreKeepsNothing) {
  open_store(100);  // smaller than any block file
  ProbeSource* probe;
  auto source = make(&probe);
  expect_read(*source, 0, kSize);  // 11 blocks in one lower read
  EXPECT_EQ(store_->bytes_used(), 0u);
  EXPECT_EQ(probe->total_reads(), 1);
  // The last kRecentBlocks blocks stay in memory; older ones are read from lower again.
  const uint64_t recent_start = (11 - CachedSource::kRecentBlocks) * kBlock;
  expect_read(*source, recent_start, kSize - recent_start);
  EXPECT_EQ(probe->total_reads(), 1);
  expect_read(*source, 0, kSize);
  EXPECT_EQ(probe->total_reads(), 2);
  const auto reads = probe->reads();
  EXPECT_EQ(reads.at(0), 2);
  EXPECT_EQ(reads.at(10 * kBlock), 1);
}

TEST_F(CachedSourceTest, ConcurrentReadersFetchEachBlockOnce) {
  open_store(64 << 20);
  const uint64_t size = 64 * kBlock + 77;
  reference_ = pattern_bytes(size, 9);
  ProbeSource* probe;
  auto source = make(&probe, size);
  probe->set_delay_us(200);  // widen the window in which readers meet on one fill
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  std::mutex touched_mu;
  std::set<uint64_t> touched;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t / 2);  // pairs of threads issue identical ranges
      for (int i = 0; i < 40; ++i) {
        const uint64_t offset = rng() % size;
        const uint64_t length = rng() % std::min<uint64_t>(size - offset + 1, 5 * kBlock);
        std::vector<std::byte> buf(length);
        if (!source->read_at(offset, buf).ok() ||
            !std::equal(buf.begin(), buf.end(), reference_.begin() + offset)) {
          failures.fetch_add(1);
        }
        if (length > 0) {
          std::lock_guard<std::mutex> lock(touched_mu);
          for (uint64_t b = offset / kBlock; b <= (offset + length - 1) / kBlock; ++b) {
            touched.insert(b * kBlock);
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  const std::map<uint64_t, int> reads = probe->reads();
  EXPECT_EQ(reads.size(), touched.size());
  for (const auto& [offset, count] : reads) {
    EXPECT_TRUE(touched.contains(offset));
    EXPECT_EQ(count, 1) << "block at " << offset;
  }
  // Runs of missing blocks are read at once: at most one miss per block.
  EXPECT_LE(misses(), touched.size());
  EXPECT_GE(misses(), 1u);
}

TEST_F(CachedSourceTest, LowerErrorPropagatesIsNotCachedAndIsRetried) {
  open_store(1 << 20);
  ProbeSource* probe;
  auto source = make(&probe);
  probe->set_failing(true);
  std::vector<std::byte> buf(10);
  Status s = source->read_at(2 * kBlock + 5, buf);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_EQ(s.message(), "injected lower fault");
  EXPECT_EQ(store_->bytes_used(), 0u);
  probe->set_failing(false);
  expect_read(*source, 2 * kBlock + 5, 10);
  EXPECT_EQ(probe->reads().at(2 * kBlock), 2);
}

TEST_F(CachedSourceTest, WaitersOnAFailedFillAllGetTheError) {
  open_store(1 << 20);
  ProbeSource* probe;
  auto source = make(&probe);
  probe->set_failing(true);
  probe->hold();
  std::vector<Status> results(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::byte> buf(100);
      results[t] = source->read_at(kBlock + 10 * t, buf);
    });
  }
  // Let the readers pile up on the held fill, then fail it. (Readers arriving later fail too,
  // since lower keeps failing: the outcome does not depend on timing.)
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  probe->release();
  for (std::thread& t : threads) t.join();
  for (const Status& r : results) EXPECT_EQ(r.code(), StatusCode::kIOError) << r.to_string();
  EXPECT_GE(probe->total_reads(), 1);
  EXPECT_EQ(store_->bytes_used(), 0u);
  probe->set_failing(false);
  expect_read(*source, kBlock, 100);
}

}  // namespace
}  // namespace imgfs::cache
