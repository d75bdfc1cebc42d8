#include "remote/object_source.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "remote/dir_store.h"
#include "tests/support/test_sources.h"

namespace imgfs::remote {
namespace {

using imgfs::testing::pattern_bytes;

class ObjectSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = ::testing::TempDir() + "imgfs-object-source-XXXXXX";
    ASSERT_NE(::mkdtemp(root_.data()), nullptr);
    data_ = pattern_bytes(70000, 3);
    write("images/disk.img", data_);
    auto store = DirStore::open(root_);
    ASSERT_TRUE(store.ok());
    store_ = std::move(store).value();
    auto info = store_->head("images/disk.img");
    ASSERT_TRUE(info.ok());
    info_ = *info;
    mount_.values[0] = 0;
    image_.parent = &mount_;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
  }
  void write(const std::string& key, const std::vector<std::byte>& bytes) {
    std::error_code ec;
    std::filesystem::create_directories(std::filesystem::path(root_ + "/" + key).parent_path(), ec);
    const int fd = ::open((root_ + "/" + key).c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    ::close(fd);
  }

  std::string root_;
  std::vector<std::byte> data_;
  std::unique_ptr<DirStore> store_;
  ObjectInfo info_;
  IoCounters mount_;
  IoCounters image_;
};

TEST_F(ObjectSourceTest, ReadsAndCounts) {
  ObjectSource source(*store_, info_, &image_);
  EXPECT_EQ(source.size(), 70000u);
  EXPECT_EQ(source.describe(), "object(images/disk.img)");
  EXPECT_EQ(source.object().etag, info_.etag);

  std::vector<std::byte> buf(100);
  ASSERT_TRUE(source.read_at(0, buf).ok());
  EXPECT_TRUE(std::equal(buf.begin(), buf.end(), data_.begin()));
  ASSERT_TRUE(source.read_at(69900, buf).ok());
  EXPECT_TRUE(std::equal(buf.begin(), buf.end(), data_.begin() + 69900));
  EXPECT_EQ(image_.get(IoCounters::kRequests), 2u);
  EXPECT_EQ(image_.get(IoCounters::kBytesFetched), 200u);
  EXPECT_EQ(mount_.get(IoCounters::kRequests), 2u);
  EXPECT_EQ(mount_.get(IoCounters::kBytesFetched), 200u);

  EXPECT_EQ(imgfs::testing::read_all(source), data_);
  EXPECT_EQ(image_.get(IoCounters::kBytesFetched), 70200u);
}

TEST_F(ObjectSourceTest, RandomAndConcurrentReads) {
  ObjectSource source(*store_, info_, nullptr);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int i = 0; i < 100; ++i) {
        const uint64_t offset = rng() % data_.size();
        std::vector<std::byte> buf(rng() % (data_.size() - offset + 1));
        if (!source.read_at(offset, buf).ok() ||
            !std::equal(buf.begin(), buf.end(), data_.begin() + offset)) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(ObjectSourceTest, RangePastSizeIsRefusedWithoutRequest) {
  ObjectSource source(*store_, info_, &image_);
  std::vector<std::byte> buf(2);
  EXPECT_EQ(source.read_at(69999, buf).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(source.read_at(UINT64_MAX, buf).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(image_.get(IoCounters::kRequests), 0u);
}

TEST_F(ObjectSourceTest, ChangedObjectFailsWithKeyContextAndCountsOnlyTheRequest) {
  ObjectSource source(*store_, info_, &image_);
  write("images/disk.img", pattern_bytes(70001, 4));
  std::vector<std::byte> buf(10);
  Status s = source.read_at(0, buf);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_TRUE(s.message().starts_with("images/disk.img: ")) << s.to_string();
  EXPECT_NE(s.message().find("changed since it was opened"), std::string::npos);
  EXPECT_EQ(image_.get(IoCounters::kRequests), 1u);
  EXPECT_EQ(image_.get(IoCounters::kBytesFetched), 0u);
}

}  // namespace
}  // namespace imgfs::remote
