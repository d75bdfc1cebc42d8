#include "formats/extent_seek.h"

#include <gtest/gtest.h>

#include <vector>

namespace imgfs::formats {
namespace {

// A source whose allocation map is a list of runs; reads are never needed by seeking.
class RunsSource final : public BlockSource {
 public:
  explicit RunsSource(std::vector<Extent> runs) : runs_(std::move(runs)) {
    for (const Extent& run : runs_) size_ += run.length;
  }
  uint64_t size() const override { return size_; }
  Status read_at(uint64_t, std::span<std::byte>) const override {
    return Status::IOError("seeking must not read");
  }
  std::string describe() const override { return "runs"; }
  Result<Extent> map(uint64_t offset) const override {
    ++map_calls;
    uint64_t start = 0;
    for (const Extent& run : runs_) {
      if (offset < start + run.length) return Extent{run.kind, start + run.length - offset};
      start += run.length;
    }
    return Status::InvalidArgument("map past the end");
  }
  mutable int map_calls = 0;

 private:
  std::vector<Extent> runs_;
  uint64_t size_ = 0;
};

constexpr auto kData = Extent::Kind::kData;
constexpr auto kZero = Extent::Kind::kZero;

TEST(ExtentSeekTest, FindsDataAndHolesAcrossRuns) {
  // data [0,100) hole [100,300) data [300,350) hole [350,1000)
  RunsSource source({{kData, 100}, {kZero, 200}, {kData, 50}, {kZero, 650}});
  EXPECT_EQ(*seek_extent(source, 0, SeekTarget::kData), 0u);
  EXPECT_EQ(*seek_extent(source, 0, SeekTarget::kHole), 100u);
  EXPECT_EQ(*seek_extent(source, 99, SeekTarget::kHole), 100u);
  EXPECT_EQ(*seek_extent(source, 100, SeekTarget::kData), 300u);
  EXPECT_EQ(*seek_extent(source, 150, SeekTarget::kHole), 150u);
  EXPECT_EQ(*seek_extent(source, 320, SeekTarget::kData), 320u);
  EXPECT_EQ(*seek_extent(source, 320, SeekTarget::kHole), 350u);
  auto none = seek_extent(source, 351, SeekTarget::kData);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(*seek_extent(source, 999, SeekTarget::kHole), 999u);
}

TEST(ExtentSeekTest, EndOfAFullyAllocatedSourceIsAHole) {
  RunsSource source({{kData, 4096}});
  EXPECT_EQ(*seek_extent(source, 10, SeekTarget::kHole), 4096u);
  EXPECT_EQ(*seek_extent(source, 10, SeekTarget::kData), 10u);
}

TEST(ExtentSeekTest, OffsetAtOrPastTheEndIsNotFound) {
  RunsSource source({{kData, 10}});
  EXPECT_EQ(seek_extent(source, 10, SeekTarget::kData).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(seek_extent(source, 11, SeekTarget::kHole).status().code(), StatusCode::kNotFound);
}

TEST(ExtentSeekTest, AdjacentRunsOfOneKindAreWalkedWithoutReading) {
  std::vector<Extent> runs(1000, Extent{kZero, 512});
  runs.push_back({kData, 1});
  RunsSource source(std::move(runs));
  EXPECT_EQ(*seek_extent(source, 0, SeekTarget::kData), 512000u);
  EXPECT_EQ(source.map_calls, 1000 + 1);
}

// A map that claims an empty run would loop forever; it is refused instead.
class EmptyRunSource final : public BlockSource {
 public:
  uint64_t size() const override { return 100; }
  Status read_at(uint64_t, std::span<std::byte>) const override { return Status::OK(); }
  std::string describe() const override { return "empty-runs"; }
  Result<Extent> map(uint64_t) const override { return Extent{kZero, 0}; }
};

TEST(ExtentSeekTest, EmptyRunIsCorruption) {
  EmptyRunSource source;
  EXPECT_EQ(seek_extent(source, 0, SeekTarget::kData).status().code(), StatusCode::kCorruption);
}

}  // namespace
}  // namespace imgfs::formats
