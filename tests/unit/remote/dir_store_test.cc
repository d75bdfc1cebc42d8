#include "remote/dir_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "tests/support/test_sources.h"

namespace imgfs::remote {
namespace {

using imgfs::testing::pattern_bytes;

std::string make_temp_dir() {
  std::string templ = ::testing::TempDir() + "imgfs-dir-store-XXXXXX";
  char* made = ::mkdtemp(templ.data());
  EXPECT_NE(made, nullptr) << std::strerror(errno);
  return templ;
}

void write_file(const std::string& path, const std::vector<std::byte>& bytes) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0) << path << ": " << std::strerror(errno);
  ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  ::close(fd);
}

class DirStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir();
    outside_ = make_temp_dir();
    part0_ = pattern_bytes(100000, 7);
    write_file(root_ + "/a.txt", pattern_bytes(10, 1));
    write_file(root_ + "/bundles/x.part.0", part0_);
    write_file(root_ + "/bundles/x.part.1", pattern_bytes(4096, 8));
    write_file(root_ + "/bundles/sub/deep.bin", pattern_bytes(3, 9));
    write_file(root_ + "/bundles2/y", pattern_bytes(5, 10));
    write_file(root_ + "/empty", {});
    write_file(outside_ + "/secret", pattern_bytes(11, 11));
    auto store = DirStore::open(root_);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    store_ = std::move(store).value();
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
    std::filesystem::remove_all(outside_, ec);
  }

  std::vector<std::string> keys(std::string_view prefix) {
    auto listed = store_->list(prefix);
    EXPECT_TRUE(listed.ok()) << listed.status().to_string();
    std::vector<std::string> out;
    if (listed.ok()) {
      for (const ObjectInfo& o : *listed) out.push_back(o.key);
    }
    return out;
  }

  std::string root_;
  std::string outside_;
  std::vector<std::byte> part0_;
  std::unique_ptr<DirStore> store_;
};

TEST_F(DirStoreTest, OpenValidatesRoot) {
  EXPECT_EQ(DirStore::open(root_ + "/missing").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(DirStore::open(root_ + "/a.txt").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DirStore::open("").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DirStore::open("file://relative").status().code(), StatusCode::kInvalidArgument);
  auto via_url = DirStore::open("file://" + root_);
  ASSERT_TRUE(via_url.ok()) << via_url.status().to_string();
  EXPECT_EQ((*via_url)->describe(), store_->describe());
  char* real = ::realpath(root_.c_str(), nullptr);
  ASSERT_NE(real, nullptr);
  EXPECT_EQ(store_->describe(), "dir:" + std::string(real));
  std::free(real);
  // A trailing slash names the same directory.
  auto slashed = DirStore::open(root_ + "/");
  ASSERT_TRUE(slashed.ok());
  EXPECT_EQ((*slashed)->describe(), store_->describe());
}

TEST_F(DirStoreTest, ListsRecursivelySortedWithSizes) {
  auto listed = store_->list("");
  ASSERT_TRUE(listed.ok()) << listed.status().to_string();
  std::vector<std::string> want = {
      "a.txt", "bundles/sub/deep.bin", "bundles/x.part.0", "bundles/x.part.1", "bundles2/y",
      "empty"};
  ASSERT_EQ(listed->size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ((*listed)[i].key, want[i]);
    auto head = store_->head(want[i]);
    ASSERT_TRUE(head.ok());
    EXPECT_EQ(head->size, (*listed)[i].size);
    EXPECT_EQ(head->etag, (*listed)[i].etag);
    EXPECT_FALSE(head->etag.empty());
  }
  EXPECT_EQ((*listed)[2].size, 100000u);
  EXPECT_EQ((*listed)[5].size, 0u);
}

TEST_F(DirStoreTest, ListsByPrefix) {
  EXPECT_EQ(keys("bundles/"), (std::vector<std::string>{"bundles/sub/deep.bin", "bundles/x.part.0",
                                                        "bundles/x.part.1"}));
  EXPECT_EQ(keys("bundles"), (std::vector<std::string>{"bundles/sub/deep.bin", "bundles/x.part.0",
                                                       "bundles/x.part.1", "bundles2/y"}));
  EXPECT_EQ(keys("bundles/x.part."),
            (std::vector<std::string>{"bundles/x.part.0", "bundles/x.part.1"}));
  EXPECT_EQ(keys("bundles/sub/deep.bin"), (std::vector<std::string>{"bundles/sub/deep.bin"}));
  EXPECT_TRUE(keys("nothing").empty());
  EXPECT_TRUE(keys("bundles/x.part.0/").empty());
}

TEST_F(DirStoreTest, ListSkipsSymlinkedDirectoriesAndDanglingLinks) {
  ASSERT_EQ(::symlink(outside_.c_str(), (root_ + "/escape").c_str()), 0);
  ASSERT_EQ(::symlink("a.txt", (root_ + "/alias.txt").c_str()), 0);
  ASSERT_EQ(::symlink("nowhere", (root_ + "/dangling").c_str()), 0);
  ASSERT_EQ(::mkfifo((root_ + "/fifo").c_str(), 0600), 0);
  const std::vector<std::string> all = keys("");
  EXPECT_EQ(all, (std::vector<std::string>{"a.txt", "alias.txt", "bundles/sub/deep.bin",
                                           "bundles/x.part.0", "bundles/x.part.1", "bundles2/y",
                                           "empty"}));
  EXPECT_EQ(store_->head("fifo").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->head("dangling").status().code(), StatusCode::kNotFound);
}

TEST_F(DirStoreTest, ListSkipsUnreadableDirectory) {
  write_file(root_ + "/locked/inner", pattern_bytes(4));
  ASSERT_EQ(::chmod((root_ + "/locked").c_str(), 0), 0);
  auto listed = store_->list("");
  ASSERT_TRUE(listed.ok());
  // Root reads it anyway; anyone else skips it. Either way the rest is listed.
  EXPECT_GE(listed->size(), 6u);
  ::chmod((root_ + "/locked").c_str(), 0700);
}

TEST_F(DirStoreTest, HeadMissingIsNotFound) {
  EXPECT_EQ(store_->head("missing").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->head("a.txt/below").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->head("bundles").status().code(), StatusCode::kNotFound);
}

TEST_F(DirStoreTest, RefusesKeysThatCouldEscapeRoot) {
  const std::vector<std::string> bad = {
      "",     "/etc/passwd", "../x",    "a/../../x", "bundles/..",
      "a//b", "a/",          "./a.txt", "..",        std::string("a\0b", 3)};
  for (const std::string& key : bad) {
    EXPECT_EQ(store_->head(key).status().code(), StatusCode::kInvalidArgument) << key;
    std::byte buf[1];
    EXPECT_EQ(store_->read_range(ObjectInfo{key, 1, "x"}, 0, buf).code(),
              StatusCode::kInvalidArgument)
        << key;
  }
  // Dots inside a name are fine.
  write_file(root_ + "/x..y", pattern_bytes(1));
  EXPECT_TRUE(store_->head("x..y").ok());
}

TEST_F(DirStoreTest, RangedReadsMatchFile) {
  auto info = store_->head("bundles/x.part.0");
  ASSERT_TRUE(info.ok());
  auto check = [&](uint64_t offset, uint64_t length) {
    std::vector<std::byte> buf(length);
    Status s = store_->read_range(*info, offset, buf);
    ASSERT_TRUE(s.ok()) << s.to_string();
    ASSERT_TRUE(std::equal(buf.begin(), buf.end(), part0_.begin() + offset))
        << offset << "+" << length;
  };
  check(0, 1);
  check(0, 100000);
  check(99999, 1);
  check(4095, 2);
  check(65536, 34464);
  check(50000, 0);
  std::mt19937_64 rng(42);
  for (int i = 0; i < 200; ++i) {
    const uint64_t offset = rng() % 100000;
    check(offset, rng() % (100000 - offset + 1));
  }
}

TEST_F(DirStoreTest, ReadPastSizeIsInvalid) {
  auto info = store_->head("a.txt");
  ASSERT_TRUE(info.ok());
  std::vector<std::byte> buf(2);
  EXPECT_EQ(store_->read_range(*info, 9, buf).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->read_range(*info, UINT64_MAX, buf).code(), StatusCode::kInvalidArgument);
}

TEST_F(DirStoreTest, ShortFileIsIOError) {
  // An object info claiming more bytes than the file holds (same etag): the read must not
  // return zeros.
  auto info = store_->head("a.txt");
  ASSERT_TRUE(info.ok());
  ObjectInfo longer = *info;
  longer.size = 20;
  std::vector<std::byte> buf(10);
  Status s = store_->read_range(longer, 5, buf);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("short read"), std::string::npos) << s.to_string();
}

TEST_F(DirStoreTest, ChangedFileIsIOError) {
  auto info = store_->head("bundles/x.part.1");
  ASSERT_TRUE(info.ok());
  std::vector<std::byte> buf(16);
  ASSERT_TRUE(store_->read_range(*info, 0, buf).ok());

  // Same size, new contents and a different mtime.
  write_file(root_ + "/bundles/x.part.1", pattern_bytes(4096, 99));
  struct timespec times[2] = {{1000, 0}, {1000, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, (root_ + "/bundles/x.part.1").c_str(), times, 0), 0);
  Status s = store_->read_range(*info, 0, buf);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("changed since it was opened"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("bundles/x.part.1"), std::string::npos);

  // Grown.
  auto info2 = store_->head("bundles/x.part.1");
  ASSERT_TRUE(info2.ok());
  EXPECT_NE(info2->etag, info->etag);
  write_file(root_ + "/bundles/x.part.1", pattern_bytes(4097, 99));
  EXPECT_EQ(store_->read_range(*info2, 0, buf).code(), StatusCode::kIOError);

  // Replaced by rename (new inode).
  auto info3 = store_->head("bundles/x.part.1");
  ASSERT_TRUE(info3.ok());
  write_file(root_ + "/tmpfile", pattern_bytes(4097, 99));
  ASSERT_EQ(::rename((root_ + "/tmpfile").c_str(), (root_ + "/bundles/x.part.1").c_str()), 0);
  EXPECT_EQ(store_->read_range(*info3, 0, buf).code(), StatusCode::kIOError);

  // Deleted.
  auto info4 = store_->head("bundles/x.part.1");
  ASSERT_TRUE(info4.ok());
  ASSERT_EQ(::unlink((root_ + "/bundles/x.part.1").c_str()), 0);
  s = store_->read_range(*info4, 0, buf);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("changed since it was opened"), std::string::npos) << s.to_string();
}

TEST_F(DirStoreTest, ConcurrentReaders) {
  auto info = store_->head("bundles/x.part.0");
  ASSERT_TRUE(info.ok());
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 100; ++i) {
        const uint64_t offset = rng() % 100000;
        std::vector<std::byte> buf(rng() % std::min<uint64_t>(100000 - offset + 1, 8192));
        if (!store_->read_range(*info, offset, buf).ok() ||
            !std::equal(buf.begin(), buf.end(), part0_.begin() + offset)) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

// ---- put -----------------------------------------------------------------------------------

// The names in a folder, without "." and "..": put leaves no temp file behind.
std::vector<std::string> names_in(const std::string& folder) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(folder)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<std::byte> read_object(const DirStore& store, const std::string& key) {
  auto info = store.head(key);
  EXPECT_TRUE(info.ok()) << info.status().to_string();
  if (!info.ok()) return {};
  std::vector<std::byte> bytes(info->size);
  Status s = store.read_range(*info, 0, bytes);
  EXPECT_TRUE(s.ok()) << s.to_string();
  return bytes;
}

TEST_F(DirStoreTest, PutStoresAWholeObjectWithMode0644) {
  const std::vector<std::byte> bytes = pattern_bytes(70001, 21);
  // A strict umask must not leave the object unreadable to others (a web server, another user).
  const mode_t old_umask = ::umask(077);
  Status s = store_->put("bundles/x.manifest.xml.imgfs-index", bytes);
  ::umask(old_umask);
  ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_EQ(read_object(*store_, "bundles/x.manifest.xml.imgfs-index"), bytes);
  struct stat st;
  ASSERT_EQ(::stat((root_ + "/bundles/x.manifest.xml.imgfs-index").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0644u);
  EXPECT_EQ(
      names_in(root_ + "/bundles"),
      (std::vector<std::string>{"sub", "x.manifest.xml.imgfs-index", "x.part.0", "x.part.1"}));
  // An empty object is an object too.
  ASSERT_TRUE(store_->put("empty-too", {}).ok());
  auto info = store_->head("empty-too");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->size, 0u);
}

TEST_F(DirStoreTest, PutReplacesAnObjectAsANewVersion) {
  auto before = store_->head("bundles/x.part.1");
  ASSERT_TRUE(before.ok());
  const std::vector<std::byte> bytes = pattern_bytes(4096, 22);  // same size as before
  ASSERT_TRUE(store_->put("bundles/x.part.1", bytes).ok());
  EXPECT_EQ(read_object(*store_, "bundles/x.part.1"), bytes);
  auto after = store_->head("bundles/x.part.1");
  ASSERT_TRUE(after.ok());
  EXPECT_NE(after->etag, before->etag);
  // Readers pinned to the old version are told it changed rather than given new bytes.
  std::vector<std::byte> buf(16);
  Status s = store_->read_range(*before, 0, buf);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("changed since it was opened"), std::string::npos) << s.to_string();
}

TEST_F(DirStoreTest, PutCreatesMissingFolders) {
  const std::vector<std::byte> bytes = pattern_bytes(10, 23);
  ASSERT_TRUE(store_->put("new/deeper/still/object", bytes).ok());
  EXPECT_EQ(read_object(*store_, "new/deeper/still/object"), bytes);
  EXPECT_EQ(keys("new/"), (std::vector<std::string>{"new/deeper/still/object"}));
}

TEST_F(DirStoreTest, PutRefusesKeysThatCouldEscapeRoot) {
  for (const std::string key : {"", "/abs", "../x", "a/../b", "a//b", "./a", "a/", "a/."}) {
    EXPECT_EQ(store_->put(key, pattern_bytes(3, 1)).code(), StatusCode::kInvalidArgument) << key;
  }
  EXPECT_EQ(store_->put(std::string("a\0b", 3), pattern_bytes(3, 1)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(names_in(outside_), (std::vector<std::string>{"secret"}));
}

TEST_F(DirStoreTest, PutNeverWritesThroughASymlinkedFolder) {
  ASSERT_EQ(::symlink(outside_.c_str(), (root_ + "/link").c_str()), 0);
  Status s = store_->put("link/evil", pattern_bytes(3, 1));
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("is not a folder (or is a symlink)"), std::string::npos)
      << s.to_string();
  EXPECT_EQ(names_in(outside_), (std::vector<std::string>{"secret"}));
}

TEST_F(DirStoreTest, PutUnderAFileOrOntoAFolderFailsCleanly) {
  Status s = store_->put("a.txt/inner", pattern_bytes(3, 1));
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("a.txt is not a folder"), std::string::npos) << s.to_string();
  // Renaming a file over a non-empty folder fails; the temp file goes away with it.
  s = store_->put("bundles/sub", pattern_bytes(3, 1));
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("bundles/sub"), std::string::npos) << s.to_string();
  EXPECT_EQ(names_in(root_ + "/bundles"),
            (std::vector<std::string>{"sub", "x.part.0", "x.part.1"}));
}

TEST_F(DirStoreTest, PutRefusedByPermissionsIsIOError) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores folder permissions";
  ASSERT_EQ(::chmod((root_ + "/bundles").c_str(), 0555), 0);
  Status s = store_->put("bundles/new", pattern_bytes(3, 1));
  ::chmod((root_ + "/bundles").c_str(), 0755);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("bundles/new"), std::string::npos) << s.to_string();
}

// Writers racing on one key and readers of it: every read sees one whole version.
TEST_F(DirStoreTest, ConcurrentPutsAndReadersSeeWholeVersions) {
  constexpr int kWriters = 4;
  std::vector<std::vector<std::byte>> versions;
  for (int v = 0; v < kWriters; ++v) versions.push_back(pattern_bytes(20000 + v, 30 + v));
  ASSERT_TRUE(store_->put("race", versions[0]).ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kWriters; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        if (!store_->put("race", versions[t]).ok()) failures.fetch_add(1);
      }
    });
  }
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        auto info = store_->head("race");
        if (!info.ok()) {
          failures.fetch_add(1);
          continue;
        }
        std::vector<std::byte> buf(info->size);
        // A put between head and read is a changed object, never mixed bytes.
        Status s = store_->read_range(*info, 0, buf);
        if (!s.ok()) continue;
        if (std::find(versions.begin(), versions.end(), buf) == versions.end()) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  const std::vector<std::byte> last = read_object(*store_, "race");
  EXPECT_NE(std::find(versions.begin(), versions.end(), last), versions.end());
  EXPECT_EQ(keys("").size(), 7u);  // the six fixtures and "race": no temp files left
}

// A store without a write path says so.
class ReadOnlyStore final : public ObjectStore {
 public:
  Result<std::vector<ObjectInfo>> list(std::string_view) const override {
    return std::vector<ObjectInfo>{};
  }
  Result<ObjectInfo> head(std::string_view) const override { return Status::NotFound("no"); }
  Status read_range(const ObjectInfo&, uint64_t, std::span<std::byte>) const override {
    return Status::NotFound("no");
  }
  std::string describe() const override { return "read-only"; }
};

TEST(ObjectStoreTest, PutIsNotSupportedByDefault) {
  Status s = ReadOnlyStore().put("k", pattern_bytes(3, 1));
  EXPECT_EQ(s.code(), StatusCode::kNotSupported);
  EXPECT_EQ(s.message(), "read-only cannot store objects");
}

}  // namespace
}  // namespace imgfs::remote
