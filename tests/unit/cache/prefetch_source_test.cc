#include "cache/prefetch_source.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "tests/support/test_sources.h"

namespace imgfs::cache {
namespace {

using imgfs::testing::pattern_bytes;
using imgfs::testing::pattern_source;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

// A lower source that can be slow, can fail reads touching a range, and counts its reads,
// telling apart those made by the test's own thread from those of prefetch workers.
class DelayedSource final : public BlockSource {
 public:
  explicit DelayedSource(std::unique_ptr<BlockSource> lower)
      : lower_(std::move(lower)), foreground_(std::this_thread::get_id()) {}
  uint64_t size() const override { return lower_->size(); }
  uint32_t block_size() const override { return 4096; }
  Result<Extent> map(uint64_t offset) const override {
    return Extent{Extent::Kind::kZero, size() - offset};
  }
  std::string describe() const override { return "delayed(" + lower_->describe() + ")"; }
  Status read_at(uint64_t offset, std::span<std::byte> out) const override {
    reads_.fetch_add(1);
    if (std::this_thread::get_id() != foreground_) other_thread_reads_.fetch_add(1);
    const int delay_us = delay_us_.load();
    if (delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (offset < fail_end_ && offset + out.size() > fail_start_) {
        return Status::IOError("injected fault at " + std::to_string(offset));
      }
    }
    return lower_->read_at(offset, out);
  }

  void set_delay_us(int delay_us) { delay_us_.store(delay_us); }
  void fail_range(uint64_t start, uint64_t end) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_start_ = start;
    fail_end_ = end;
  }
  uint64_t reads() const { return reads_.load(); }
  // Reads made by any thread other than the one that built this source.
  uint64_t other_thread_reads() const { return other_thread_reads_.load(); }

 private:
  std::unique_ptr<BlockSource> lower_;
  const std::thread::id foreground_;
  std::atomic<int> delay_us_{0};
  mutable std::mutex mu_;
  uint64_t fail_start_ = 0;
  uint64_t fail_end_ = 0;
  mutable std::atomic<uint64_t> reads_{0};
  mutable std::atomic<uint64_t> other_thread_reads_{0};
};

// A PrefetchSource over a DelayedSource over pattern data, keeping a pointer to the middle.
struct Fixture {
  Fixture(uint64_t size, PrefetchOptions options, MemoryBudget& budget, int delay_us = 0)
      : reference(pattern_bytes(size, 7)) {
    auto delayed = std::make_unique<DelayedSource>(pattern_source(size, 7));
    lower = delayed.get();
    lower->set_delay_us(delay_us);
    Result<std::unique_ptr<PrefetchSource>> opened =
        open_prefetch(std::move(delayed), options, budget);
    EXPECT_TRUE(opened.ok()) << opened.status().to_string();
    source = std::move(*opened);
  }

  // Reads [offset, offset + length) and checks it against the reference.
  void expect_read(uint64_t offset, uint64_t length) const {
    std::vector<std::byte> out(length);
    Status s = source->read_at(offset, out);
    ASSERT_TRUE(s.ok()) << s.to_string() << " at " << offset;
    ASSERT_EQ(0, std::memcmp(out.data(), reference.data() + offset, length))
        << "wrong bytes at " << offset << " length " << length;
  }

  std::vector<std::byte> reference;
  DelayedSource* lower = nullptr;
  std::unique_ptr<PrefetchSource> source;
};

PrefetchOptions small_options() {
  PrefetchOptions options;
  options.initial_window = 64 * kKiB;
  options.max_window = 1 * kMiB;
  options.chunk_bytes = 96 * kKiB;  // odd on purpose: chunks do not line up with reads
  options.threads = 2;
  return options;
}

// Polls `done` for up to five seconds.
template <typename Predicate>
bool eventually(Predicate done) {
  for (int i = 0; i < 500; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return done();
}

TEST(MemoryBudgetTest, AcquiresUpToTheLimitAndReleases) {
  MemoryBudget budget(100);
  EXPECT_TRUE(budget.try_acquire(60));
  EXPECT_FALSE(budget.try_acquire(41));
  EXPECT_TRUE(budget.try_acquire(40));
  EXPECT_EQ(budget.in_use(), 100u);
  EXPECT_FALSE(budget.try_acquire(1));
  budget.release(60);
  EXPECT_EQ(budget.in_use(), 40u);
  EXPECT_FALSE(budget.try_acquire(UINT64_MAX));
  EXPECT_TRUE(budget.try_acquire(0));
  budget.release(40);
  EXPECT_EQ(budget.in_use(), 0u);
  EXPECT_EQ(budget.limit(), 100u);
}

TEST(MemoryBudgetTest, ConcurrentAcquireNeverExceedsTheLimit) {
  MemoryBudget budget(1000);
  std::atomic<uint64_t> peak{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&budget, &peak, t] {
      for (int i = 0; i < 5000; ++i) {
        const uint64_t bytes = 1 + (i * 7 + t) % 300;
        if (!budget.try_acquire(bytes)) continue;
        uint64_t seen = budget.in_use();
        uint64_t old = peak.load();
        while (seen > old && !peak.compare_exchange_weak(old, seen)) {
        }
        budget.release(bytes);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_LE(peak.load(), 1000u);
  EXPECT_EQ(budget.in_use(), 0u);
}

TEST(PrefetchSourceTest, OpenRejectsBadOptions) {
  MemoryBudget budget(kMiB);
  EXPECT_EQ(open_prefetch(nullptr, PrefetchOptions{}, budget).status().code(),
            StatusCode::kInvalidArgument);
  auto open_with = [&budget](PrefetchOptions options) {
    return open_prefetch(pattern_source(kMiB), options, budget).status().code();
  };
  PrefetchOptions options;
  options.chunk_bytes = 0;
  EXPECT_EQ(open_with(options), StatusCode::kInvalidArgument);
  options = PrefetchOptions{};
  options.initial_window = 0;
  EXPECT_EQ(open_with(options), StatusCode::kInvalidArgument);
  options = PrefetchOptions{};
  options.max_window = options.initial_window - 1;
  EXPECT_EQ(open_with(options), StatusCode::kInvalidArgument);
  options = PrefetchOptions{};
  options.max_window = PrefetchSource::kMaxWindowBytes + 1;
  EXPECT_EQ(open_with(options), StatusCode::kInvalidArgument);
  options = PrefetchOptions{};
  options.chunk_bytes = 1;
  EXPECT_EQ(open_with(options), StatusCode::kInvalidArgument);
  options = PrefetchOptions{};
  options.threads = PrefetchSource::kMaxThreads + 1;
  EXPECT_EQ(open_with(options), StatusCode::kInvalidArgument);
  EXPECT_TRUE(open_with(PrefetchOptions{}) == StatusCode::kOk);
}

TEST(PrefetchSourceTest, DelegatesIdentityAndMap) {
  MemoryBudget budget(kMiB);
  Fixture f(3 * kMiB + 5, small_options(), budget);
  EXPECT_EQ(f.source->size(), 3 * kMiB + 5);
  EXPECT_EQ(f.source->describe(), "prefetch(" + f.lower->describe() + ")");
  EXPECT_EQ(f.source->block_size(), 4096u);
  Result<Extent> extent = f.source->map(10);
  ASSERT_TRUE(extent.ok());
  EXPECT_EQ(extent->kind, Extent::Kind::kZero);
  EXPECT_EQ(extent->length, 3 * kMiB + 5 - 10);
}

TEST(PrefetchSourceTest, RangeChecksAndEmptyReads) {
  MemoryBudget budget(kMiB);
  Fixture f(kMiB, small_options(), budget);
  std::vector<std::byte> out(10);
  EXPECT_EQ(f.source->read_at(kMiB - 9, out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(f.source->read_at(UINT64_MAX - 2, out).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(f.source->read_at(kMiB, std::span<std::byte>()).ok());
  f.expect_read(0, 1);
  f.expect_read(kMiB - 1, 1);
  f.expect_read(0, kMiB);
}

TEST(PrefetchSourceTest, SequentialReadsOfEverySizeAcrossChunkBoundaries) {
  const uint64_t size = 5 * kMiB + 12345;
  MemoryBudget budget(64 * kMiB);
  for (uint64_t read_size : {uint64_t{1}, uint64_t{4095}, 4 * kKiB, 96 * kKiB, 100 * kKiB + 3,
                             kMiB + 17}) {
    Fixture f(size, small_options(), budget);
    // Tiny reads only over the first part, or the test takes too long.
    const uint64_t stop = read_size < 4096 ? 200 * kKiB : size;
    for (uint64_t offset = 0; offset < stop; offset += read_size) {
      f.expect_read(offset, std::min(read_size, size - offset));
    }
    // The reader itself may fetch queued chunks before a worker does, so count chunk use.
    EXPECT_GT(f.source->stats().bytes_from_prefetch, 0u) << "read size " << read_size;
  }
  EXPECT_TRUE(eventually([&budget] { return budget.in_use() == 0; }));
}

TEST(PrefetchSourceTest, ToleratesSlightlyOutOfOrderReadahead) {
  MemoryBudget budget(64 * kMiB);
  Fixture f(8 * kMiB, small_options(), budget);
  // The kernel's readahead can deliver pairs of requests swapped.
  const uint64_t step = 128 * kKiB;
  for (uint64_t pair = 0; pair + 2 * step <= 8 * kMiB; pair += 2 * step) {
    f.expect_read(pair + step, step);
    f.expect_read(pair, step);
  }
  // The stream stayed sequential: most bytes came from chunks (fetched by a worker or, when
  // the reader got there first, by the reader itself).
  EXPECT_GT(f.source->stats().bytes_from_prefetch, 4 * kMiB);
}

TEST(PrefetchSourceTest, SequentialScanIsServedByBackgroundReads) {
  const uint64_t size = 64 * kMiB;
  const uint64_t step = 128 * kKiB;
  const int delay_us = 5000;
  MemoryBudget budget(256 * kMiB);
  Fixture f(size, PrefetchOptions{}, budget, delay_us);

  const auto start = std::chrono::steady_clock::now();
  std::vector<std::byte> out(size);
  for (uint64_t offset = 0; offset < size; offset += step) {
    Status s = f.source->read_at(offset, std::span<std::byte>(out).subspan(offset, step));
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
  const auto prefetched = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(0, std::memcmp(out.data(), f.reference.data(), size));
  EXPECT_GT(f.lower->other_thread_reads(), 0u);
  EXPECT_GT(f.source->stats().background_reads, 0u);
  // Prefetch reads 1 MiB chunks: far fewer lower reads than the 512 the reader made.
  EXPECT_LT(f.lower->reads(), size / step / 2);

  // A quarter of the scan straight from the (equally slow) lower source, for the printed
  // comparison; the whole of it would only sleep for longer.
  DelayedSource direct(pattern_source(size, 7));
  direct.set_delay_us(delay_us);
  const auto direct_start = std::chrono::steady_clock::now();
  for (uint64_t offset = 0; offset < size / 4; offset += step) {
    ASSERT_TRUE(direct.read_at(offset, std::span<std::byte>(out).subspan(offset, step)).ok());
  }
  const auto unprefetched = 4 * (std::chrono::steady_clock::now() - direct_start);
  using std::chrono::duration_cast;
  using std::chrono::milliseconds;
  std::printf("64 MiB in 128 KiB reads, 5 ms per lower read: prefetch %lld ms (%llu lower reads),"
              " direct about %lld ms (%llu lower reads)\n",
              static_cast<long long>(duration_cast<milliseconds>(prefetched).count()),
              static_cast<unsigned long long>(f.lower->reads()),
              static_cast<long long>(duration_cast<milliseconds>(unprefetched).count()),
              static_cast<unsigned long long>(4 * direct.reads()));
}

TEST(PrefetchSourceTest, RandomReadsCauseFewBackgroundReads) {
  const uint64_t size = 32 * kMiB;
  MemoryBudget budget(256 * kMiB);
  Fixture f(size, PrefetchOptions{}, budget);
  std::mt19937_64 rng(42);
  const int kReads = 2000;
  for (int i = 0; i < kReads; ++i) {
    const uint64_t length = 1 + rng() % (16 * kKiB);
    f.expect_read(rng() % (size - length), length);
  }
  // A random read lands within 1 MiB of one of the few tracked streams now and then.
  EXPECT_LE(f.source->stats().background_reads, kReads / 20u);
  EXPECT_LE(f.lower->reads(), kReads + kReads / 20u);
}

TEST(PrefetchSourceTest, NoThreadsMeansNoPrefetch) {
  MemoryBudget budget(64 * kMiB);
  PrefetchOptions options = small_options();
  options.threads = 0;
  Fixture f(4 * kMiB, options, budget);
  for (uint64_t offset = 0; offset < 4 * kMiB; offset += 64 * kKiB) {
    f.expect_read(offset, 64 * kKiB);
  }
  EXPECT_EQ(f.source->stats().background_reads, 0u);
  EXPECT_EQ(f.lower->other_thread_reads(), 0u);
  EXPECT_EQ(budget.in_use(), 0u);
}

// While read_ahead_now says no, a sequential reader gets its bytes and no read-ahead; once it
// says yes, the window it grew meanwhile is fetched in the background.
TEST(PrefetchSourceTest, ReadAheadWaitsUntilAllowed) {
  MemoryBudget budget(64 * kMiB);
  PrefetchOptions options = small_options();
  std::atomic<bool> allowed{false};
  options.read_ahead_now = [&allowed] { return allowed.load(); };
  Fixture f(8 * kMiB, options, budget);
  uint64_t offset = 0;
  for (; offset < 4 * kMiB; offset += 64 * kKiB) f.expect_read(offset, 64 * kKiB);
  EXPECT_EQ(f.source->stats().background_reads, 0u);
  EXPECT_EQ(f.lower->other_thread_reads(), 0u);
  allowed = true;
  for (; offset < 8 * kMiB; offset += 64 * kKiB) f.expect_read(offset, 64 * kKiB);
  EXPECT_GT(f.source->stats().background_reads, 0u);
}

TEST(PrefetchSourceTest, EmptyBudgetPrefetchesNothingButServesReads) {
  MemoryBudget budget(0);
  Fixture f(4 * kMiB, small_options(), budget);
  for (uint64_t offset = 0; offset < 4 * kMiB; offset += 64 * kKiB) {
    f.expect_read(offset, 64 * kKiB);
  }
  EXPECT_EQ(f.source->stats().background_reads, 0u);
  EXPECT_EQ(f.lower->other_thread_reads(), 0u);
}

TEST(PrefetchSourceTest, SharedBudgetIsNeverExceeded) {
  const uint64_t limit = 3 * kMiB;
  MemoryBudget budget(limit);
  PrefetchOptions options;
  options.initial_window = 256 * kKiB;
  options.max_window = 4 * kMiB;
  options.chunk_bytes = 512 * kKiB;
  // Three sources on one budget, each with two sequential readers.
  std::vector<std::unique_ptr<Fixture>> fixtures;
  for (int i = 0; i < 3; ++i) {
    fixtures.push_back(std::make_unique<Fixture>(16 * kMiB, options, budget, 1000));
  }
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> peak{0};
  std::thread poller([&] {
    while (!stop.load()) {
      peak.store(std::max(peak.load(), budget.in_use()));
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> readers;
  for (int i = 0; i < 6; ++i) {
    readers.emplace_back([&fixtures, i] {
      const Fixture& f = *fixtures[i % 3];
      const uint64_t begin = (i / 3) * 8 * kMiB;
      for (uint64_t offset = begin; offset < begin + 8 * kMiB; offset += 128 * kKiB) {
        f.expect_read(offset, 128 * kKiB);
      }
    });
  }
  for (std::thread& reader : readers) reader.join();
  uint64_t background = 0;
  for (const auto& f : fixtures) background += f->source->stats().background_reads;
  fixtures.clear();
  stop.store(true);
  poller.join();
  EXPECT_LE(peak.load(), limit);
  EXPECT_GT(peak.load(), 0u);
  EXPECT_GT(background, 0u);
  EXPECT_EQ(budget.in_use(), 0u);
}

TEST(PrefetchSourceTest, SeekDropsTheOldWindow) {
  MemoryBudget budget(256 * kMiB);
  Fixture f(64 * kMiB, PrefetchOptions{}, budget);
  for (uint64_t offset = 0; offset < 8 * kMiB; offset += 128 * kKiB) {
    f.expect_read(offset, 128 * kKiB);
  }
  EXPECT_GT(budget.in_use(), 0u);
  // Reads elsewhere, none continuing the old stream nor each other: the old window goes.
  for (uint64_t i = 0; i <= PrefetchSource::kStreamIdleReads; ++i) {
    f.expect_read(12 * kMiB + i * 1536 * kKiB, 4 * kKiB);
  }
  EXPECT_TRUE(eventually([&budget] { return budget.in_use() == 0; })) << budget.in_use();
}

TEST(PrefetchSourceTest, DestructorJoinsWithFetchesInFlight) {
  MemoryBudget budget(256 * kMiB);
  {
    Fixture f(64 * kMiB, PrefetchOptions{}, budget, 50000);
    f.lower->set_delay_us(0);
    for (uint64_t offset = 0; offset < 1 * kMiB; offset += 128 * kKiB) {
      f.expect_read(offset, 128 * kKiB);
    }
    f.lower->set_delay_us(50000);
    f.expect_read(kMiB + 512 * kKiB, 4 * kKiB);  // moves the window: more fetches start
    EXPECT_TRUE(eventually([&f] { return f.lower->other_thread_reads() > 0; }));
    EXPECT_GT(budget.in_use(), 0u);
  }
  EXPECT_EQ(budget.in_use(), 0u);
}

TEST(PrefetchSourceTest, BackgroundErrorSurfacesAndIsNotCached) {
  MemoryBudget budget(256 * kMiB);
  PrefetchOptions options = small_options();
  Fixture f(8 * kMiB, options, budget);
  const uint64_t fault_start = 2 * kMiB + 100;
  const uint64_t fault_end = 2 * kMiB + 5000;
  f.lower->fail_range(fault_start, fault_end);
  uint64_t offset = 0;
  for (; offset + 64 * kKiB <= fault_start; offset += 64 * kKiB) f.expect_read(offset, 64 * kKiB);
  // Let the workers reach (and fail on) the faulty region ahead of the reader.
  EXPECT_TRUE(eventually([&f] { return f.lower->other_thread_reads() > 0; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::vector<std::byte> out(64 * kKiB);
  Status s = f.source->read_at(offset, out);
  EXPECT_EQ(s.code(), StatusCode::kIOError) << s.to_string();
  s = f.source->read_at(offset, out);
  EXPECT_EQ(s.code(), StatusCode::kIOError) << s.to_string();
  f.lower->fail_range(0, 0);
  f.expect_read(offset, 64 * kKiB);
  for (offset += 64 * kKiB; offset < 8 * kMiB; offset += 64 * kKiB) {
    f.expect_read(offset, 64 * kKiB);
  }
}

TEST(PrefetchSourceTest, ConcurrentSequentialReadersAtDifferentOffsets) {
  const uint64_t size = 64 * kMiB;
  MemoryBudget budget(64 * kMiB);
  Fixture f(size, PrefetchOptions{}, budget, 200);
  std::vector<std::thread> readers;
  std::atomic<int> failures{0};
  for (int r = 0; r < 8; ++r) {
    readers.emplace_back([&f, &failures, r] {
      std::mt19937_64 rng(r);
      const uint64_t begin = r * 8 * kMiB + r * 4097;
      const uint64_t end = std::min<uint64_t>(begin + 6 * kMiB, 64 * kMiB);
      std::vector<std::byte> out(256 * kKiB);
      for (uint64_t offset = begin; offset < end;) {
        const uint64_t length = std::min<uint64_t>(1 + rng() % (256 * kKiB), end - offset);
        std::span<std::byte> view(out.data(), length);
        if (!f.source->read_at(offset, view).ok() ||
            std::memcmp(view.data(), f.reference.data() + offset, length) != 0) {
          failures.fetch_add(1);
        }
        offset += length;
      }
    });
  }
  // A random reader alongside, overlapping the streams.
  readers.emplace_back([&f, &failures] {
    std::mt19937_64 rng(99);
    std::vector<std::byte> out(64 * kKiB);
    for (int i = 0; i < 200; ++i) {
      const uint64_t length = 1 + rng() % out.size();
      const uint64_t offset = rng() % (64 * kMiB - length);
      std::span<std::byte> view(out.data(), length);
      if (!f.source->read_at(offset, view).ok() ||
          std::memcmp(view.data(), f.reference.data() + offset, length) != 0) {
        failures.fetch_add(1);
      }
    }
  });
  for (std::thread& reader : readers) reader.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(f.source->stats().background_reads, 0u);
  EXPECT_GT(f.source->stats().bytes_from_prefetch, 0u);
}

}  // namespace
}  // namespace imgfs::cache
