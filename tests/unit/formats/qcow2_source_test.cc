#include "formats/qcow2_source.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "formats/byte_order.h"
#include "formats/memory_source.h"
#include "tests/support/file_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::CountingSource;
using testing::read_file;
using testing::run_in;

namespace fs = std::filesystem;

using SiblingOpener = std::function<Result<std::unique_ptr<BlockSource>>(std::string_view name)>;

// Odd on purpose: not a multiple of any cluster size (qemu rounds the disk up to 512 bytes).
constexpr uint64_t kRawSize = 3 * 1024 * 1024 + 12345;

void write_file(const fs::path& path, std::span<const std::byte> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// One temp folder per test process (ctest runs each test in its own) with a seeded raw disk:
// incompressible pattern data, compressible text, written zeros and holes (never written: sparse)
// in runs of odd lengths at odd offsets. Images are made on first use, so tests stay independent.
class Qcow2Fixture {
 public:
  static Qcow2Fixture& get() {
    static Qcow2Fixture fixture;
    return fixture;
  }

  const fs::path& dir() const { return dir_; }

  // Converts base.raw with `options` (qemu-img convert arguments) into `name`, once.
  fs::path convert(const std::string& name, const std::string& options) {
    const fs::path path = dir_ / name;
    if (!fs::exists(path)) {
      EXPECT_TRUE(run_in(dir_, "qemu-img convert -f raw -O qcow2 " + options + " base.raw " + name))
          << name;
    }
    return path;
  }

  // Runs `commands` in the folder unless `name` exists already.
  fs::path make(const std::string& name, const std::vector<std::string>& commands) {
    const fs::path path = dir_ / name;
    if (!fs::exists(path)) {
      for (const std::string& command : commands) EXPECT_TRUE(run_in(dir_, command)) << command;
    }
    return path;
  }

  // base.qcow2 plus overlay.qcow2 on it, with data, zero clusters and a partial cluster written.
  void make_overlay() {
    convert("base.qcow2", "");
    make("overlay.qcow2",
         {"qemu-img create -f qcow2 -F qcow2 -b base.qcow2 overlay.qcow2",
          "qemu-io -c 'write -P 0x5a 1M 64k' -c 'write -z 2M 128k' -c 'write -P 0x77 12345 1000' "
          "overlay.qcow2"});
  }

  // chain2 (5000 KiB) -> chain1 -> chain0 (compressed, the raw disk's size).
  void make_chain() {
    convert("chain0.qcow2", "-c");
    make("chain1.qcow2", {"qemu-img create -f qcow2 -F qcow2 -b chain0.qcow2 chain1.qcow2",
                          "qemu-io -c 'write -P 0x21 100k 300k' chain1.qcow2"});
    make("chain2.qcow2",
         {"qemu-img create -f qcow2 -F qcow2 -b chain1.qcow2 chain2.qcow2 5000k",
          "qemu-io -c 'write -P 0x42 300k 64k' -c 'write -P 0x43 4000k 64k' chain2.qcow2"});
  }

  // The oracle: qemu-img convert -O raw of `name`.
  std::vector<std::byte> oracle(const std::string& name) {
    const std::string raw = name + ".oracle.raw";
    EXPECT_TRUE(run_in(dir_, "qemu-img convert -O raw " + name + " " + raw)) << name;
    return read_file(dir_ / raw);
  }

 private:
  Qcow2Fixture() {
    dir_ = fs::path(::testing::TempDir()) / ("qcow2_source_test." + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    const std::vector<std::byte> noise = testing::pattern_bytes(kRawSize, 7);
    static constexpr std::string_view kText = "root:x:0:0:root:/root:/bin/bash\n";
    std::vector<std::byte> text(kRawSize);
    for (uint64_t i = 0; i < kRawSize; ++i) {
      text[i] = static_cast<std::byte>(kText[(i * 7 + i / 4096) % kText.size()]);
    }
    const int fd = ::open((dir_ / "base.raw").c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    EXPECT_GE(fd, 0);
    std::mt19937_64 rng(42);
    uint64_t pos = 0;
    while (pos < kRawSize) {
      const uint64_t length = std::min<uint64_t>(kRawSize - pos, 1 + rng() % (150 * 1024));
      const int kind = static_cast<int>(rng() % 4);
      if (kind == 0 || kind == 3) {
        const std::byte* from = (kind == 0 ? noise : text).data() + pos;
        EXPECT_EQ(::pwrite(fd, from, length, static_cast<off_t>(pos)),
                  static_cast<ssize_t>(length));
      } else if (kind == 1) {
        const std::vector<std::byte> zeros(length);
        EXPECT_EQ(::pwrite(fd, zeros.data(), length, static_cast<off_t>(pos)),
                  static_cast<ssize_t>(length));
      }
      pos += length;
    }
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(kRawSize)), 0);
    ::close(fd);
  }
  ~Qcow2Fixture() {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  fs::path dir_;
};

// Opens files of the fixture folder by name, as MemorySources.
SiblingOpener sibling_opener(const fs::path& dir, std::atomic<int>* opens = nullptr) {
  return [dir, opens](std::string_view name) -> Result<std::unique_ptr<BlockSource>> {
    const fs::path path = dir / std::string(name);
    if (!fs::exists(path)) return Status::NotFound("no file " + std::string(name));
    if (opens != nullptr) ++*opens;
    return std::unique_ptr<BlockSource>(
        std::make_unique<MemorySource>(read_file(path), std::string(name)));
  };
}

Result<std::unique_ptr<BlockSource>> open_bytes(std::vector<std::byte> bytes,
                                                Qcow2Options options = {}) {
  if (!options.open_sibling) options.open_sibling = sibling_opener(Qcow2Fixture::get().dir());
  return open_qcow2(std::make_unique<MemorySource>(std::move(bytes), "image"), options);
}

Result<std::unique_ptr<BlockSource>> open_file(const std::string& name, Qcow2Options options = {}) {
  return open_bytes(read_file(Qcow2Fixture::get().dir() / name), std::move(options));
}

// qemu-img map's view: for each 512-byte sector, whether it holds data.
std::vector<bool> qemu_data_sectors(const std::string& name, uint64_t size) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  const std::string json = name + ".map.json";
  const std::string command =
      "cd '" + f.dir().string() + "' && qemu-img map --output=json " + name + " > " + json;
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  std::ifstream in(f.dir() / json);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<bool> data((size + 511) / 512);
  const std::regex item(R"re("start": (\d+), "length": (\d+),[^}]*"data": (true|false))re");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), item); it != std::sregex_iterator();
       ++it) {
    const uint64_t start = std::stoull((*it)[1]);
    const uint64_t length = std::stoull((*it)[2]);
    if ((*it)[3] == "true") {
      for (uint64_t s = start / 512; s < (start + length + 511) / 512; ++s) data[s] = true;
    }
  }
  return data;
}

// Our map's view of the same, checking that runs tile [0, size) and zero runs read as zeros.
std::vector<bool> map_data_sectors(const BlockSource& source, std::span<const std::byte> oracle) {
  std::vector<bool> data((source.size() + 511) / 512);
  uint64_t pos = 0;
  while (pos < source.size()) {
    Result<Extent> extent = source.map(pos);
    EXPECT_TRUE(extent.ok()) << extent.status().to_string();
    if (!extent.ok()) break;
    EXPECT_GT(extent->length, 0u);
    EXPECT_LE(extent->length, source.size() - pos);
    if (extent->kind == Extent::Kind::kData) {
      for (uint64_t s = pos / 512; s < (pos + extent->length + 511) / 512; ++s) data[s] = true;
    } else {
      for (uint64_t i = pos; i < pos + extent->length; ++i) {
        if (oracle[i] != std::byte{0}) {
          ADD_FAILURE() << "zero run at " << pos << " has data at " << i;
          break;
        }
      }
    }
    pos += extent->length;
  }
  return data;
}

// Byte-for-byte against the oracle: the whole image, reads around every cluster boundary, random
// reads, and map() against qemu-img map.
// With a raw backing file qemu also sees the raw file's holes, which a MemorySource does not
// report, so there map() may only say data where qemu says zero, never the reverse.
void expect_matches_oracle(const std::string& name, Qcow2Options options = {},
                           bool exact_map = true) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  const std::vector<std::byte> oracle = f.oracle(name);
  Result<std::unique_ptr<BlockSource>> opened = open_file(name, std::move(options));
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  const BlockSource& source = **opened;
  ASSERT_EQ(source.size(), oracle.size());
  EXPECT_EQ(source.describe(),
            "qcow2(image(" + std::to_string(read_file(f.dir() / name).size()) + " bytes))");

  EXPECT_TRUE(testing::read_all(source) == oracle) << name << ": whole image differs";

  const uint64_t cluster = source.block_size();
  std::vector<std::byte> buffer(3 * cluster + 1000);
  for (uint64_t boundary = 0; boundary <= source.size(); boundary += cluster) {
    for (uint64_t back : {uint64_t{1}, uint64_t{700}}) {
      if (boundary < back) continue;
      const uint64_t at = boundary - back;
      const uint64_t length = std::min<uint64_t>({source.size() - at, back + 513, buffer.size()});
      std::span<std::byte> out(buffer.data(), length);
      ASSERT_TRUE(source.read_at(at, out).ok()) << name << " at " << at;
      ASSERT_EQ(std::memcmp(out.data(), oracle.data() + at, length), 0) << name << " at " << at;
    }
  }
  std::mt19937_64 rng(5);
  for (int i = 0; i < 300; ++i) {
    const uint64_t at = rng() % source.size();
    const uint64_t length = std::min<uint64_t>(source.size() - at, 1 + rng() % buffer.size());
    std::span<std::byte> out(buffer.data(), length);
    ASSERT_TRUE(source.read_at(at, out).ok()) << name << " at " << at;
    ASSERT_EQ(std::memcmp(out.data(), oracle.data() + at, length), 0) << name << " at " << at;
  }
  std::vector<std::byte> last(1);
  ASSERT_TRUE(source.read_at(source.size() - 1, last).ok());
  EXPECT_EQ(last[0], oracle.back());
  EXPECT_EQ(source.read_at(source.size(), last).code(), StatusCode::kInvalidArgument);

  const std::vector<bool> ours = map_data_sectors(source, oracle);
  const std::vector<bool> qemus = qemu_data_sectors(name, source.size());
  ASSERT_EQ(ours.size(), qemus.size());
  for (size_t i = 0; i < ours.size(); ++i) {
    if (exact_map ? ours[i] != qemus[i] : (qemus[i] && !ours[i])) {
      ADD_FAILURE() << name << ": map() says " << (ours[i] ? "data" : "zero") << " at sector " << i
                    << ", qemu-img map disagrees";
      break;
    }
  }
}

TEST(Qcow2SourceTest, PlainImageMatchesQemu) {
  Qcow2Fixture::get().convert("plain.qcow2", "");
  expect_matches_oracle("plain.qcow2");
}

TEST(Qcow2SourceTest, DeflateCompressedImageMatchesQemu) {
  Qcow2Fixture::get().convert("deflate.qcow2", "-c");
  expect_matches_oracle("deflate.qcow2");
}

TEST(Qcow2SourceTest, ZstdCompressedImageMatchesQemuOrIsNotSupported) {
  Qcow2Fixture::get().convert("zstd.qcow2", "-c -o compression_type=zstd");
  Result<std::unique_ptr<BlockSource>> opened = open_file("zstd.qcow2");
#ifdef IMGFS_HAVE_ZSTD
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  expect_matches_oracle("zstd.qcow2");
#else
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), StatusCode::kNotSupported);
  EXPECT_NE(opened.status().message().find("need libzstd; this build has none"), std::string::npos)
      << opened.status().to_string();
#endif
}

TEST(Qcow2SourceTest, Version2ImageMatchesQemu) {
  Qcow2Fixture::get().convert("v2.qcow2", "-o compat=0.10");
  Result<std::unique_ptr<BlockSource>> opened = open_file("v2.qcow2");
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ(dynamic_cast<const Qcow2Source&>(**opened).header().version, 2u);
  expect_matches_oracle("v2.qcow2");
  Qcow2Fixture::get().convert("v2c.qcow2", "-c -o compat=0.10");
  expect_matches_oracle("v2c.qcow2");
}

TEST(Qcow2SourceTest, SmallAndLargeClustersMatchQemu) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.convert("c512.qcow2", "-o cluster_size=512");
  expect_matches_oracle("c512.qcow2");
  f.convert("c4k.qcow2", "-o cluster_size=4096");
  expect_matches_oracle("c4k.qcow2");
  f.convert("c4kz.qcow2", "-c -o cluster_size=4096");
  expect_matches_oracle("c4kz.qcow2");
  f.convert("c2m.qcow2", "-o cluster_size=2M");
  expect_matches_oracle("c2m.qcow2");
  f.convert("c2mz.qcow2", "-c -o cluster_size=2M");
  expect_matches_oracle("c2mz.qcow2");
}

TEST(Qcow2SourceTest, ExtendedL2MatchesQemu) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.convert("ext.qcow2", "-o extended_l2=on");
  expect_matches_oracle("ext.qcow2");
  // Partly written clusters: allocated, zero and unallocated subclusters side by side.
  ASSERT_TRUE(run_in(f.dir(), "qemu-img create -f qcow2 -o extended_l2=on ext2.qcow2 3M"));
  ASSERT_TRUE(
      run_in(f.dir(),
             "qemu-io -c 'write -P 0x11 4k 4k' -c 'write -P 0x22 70k 10k' "
             "-c 'write -P 0x33 1M 128k' -c 'write -z 1040k 6k' -c 'write -P 0x44 3068k 4k' "
             "ext2.qcow2"));
  expect_matches_oracle("ext2.qcow2");
}

TEST(Qcow2SourceTest, ExtendedL2OverlayReadsUnallocatedSubclustersFromBacking) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.convert("extbase.qcow2", "");
  ASSERT_TRUE(run_in(f.dir(),
                     "qemu-img create -f qcow2 -o extended_l2=on -F qcow2 -b extbase.qcow2 "
                     "extover.qcow2"));
  ASSERT_TRUE(run_in(f.dir(),
                     "qemu-io -c 'write -P 0x5a 66k 3k' -c 'write -z 200k 8k' "
                     "-c 'write -P 0x66 1M 64k' extover.qcow2"));
  expect_matches_oracle("extover.qcow2");
}

TEST(Qcow2SourceTest, OverlayOnQcow2BackingMatchesQemu) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.make_overlay();
  std::atomic<int> opens = 0;
  Qcow2Options options;
  options.open_sibling = sibling_opener(f.dir(), &opens);
  expect_matches_oracle("overlay.qcow2", options);
  EXPECT_EQ(opens.load(), 1);
  Result<std::unique_ptr<BlockSource>> opened = open_file("overlay.qcow2");
  ASSERT_TRUE(opened.ok());
  const auto& overlay = dynamic_cast<const Qcow2Source&>(**opened);
  EXPECT_EQ(overlay.header().backing_file, "base.qcow2");
  EXPECT_EQ(overlay.header().backing_format, "qcow2");
  ASSERT_NE(overlay.backing(), nullptr);
  EXPECT_EQ(
      overlay.backing()->describe(),
      "qcow2(base.qcow2(" + std::to_string(fs::file_size(f.dir() / "base.qcow2")) + " bytes))");
}

TEST(Qcow2SourceTest, ThreeLevelChainAndLargerOverlayMatchQemu) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  // The top is larger than its backing file: past the backing file's end it reads zeros.
  f.make_chain();
  expect_matches_oracle("chain2.qcow2");

  Qcow2Options shallow;
  shallow.max_chain_depth = 2;
  Result<std::unique_ptr<BlockSource>> opened = open_file("chain2.qcow2", shallow);
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), StatusCode::kNotSupported);
  EXPECT_NE(opened.status().message().find("deeper than 2"), std::string::npos);
}

TEST(Qcow2SourceTest, RawBackingFileMatchesQemu) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  ASSERT_TRUE(run_in(f.dir(), "qemu-img create -f qcow2 -F raw -b base.raw overraw.qcow2"));
  ASSERT_TRUE(run_in(f.dir(), "qemu-io -c 'write -P 0x5a 1M 64k' overraw.qcow2"));
  expect_matches_oracle("overraw.qcow2", {}, /*exact_map=*/false);
}

TEST(Qcow2SourceTest, BackingFileNeedsASiblingOpener) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.convert("base.qcow2", "");
  ASSERT_TRUE(run_in(f.dir(), "qemu-img create -f qcow2 -F qcow2 -b base.qcow2 lonely.qcow2"));
  Result<std::unique_ptr<BlockSource>> opened =
      open_qcow2(std::make_unique<MemorySource>(read_file(f.dir() / "lonely.qcow2"), "image"), {});
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), StatusCode::kNotSupported);
  EXPECT_NE(opened.status().message().find("base.qcow2"), std::string::npos);

  ASSERT_TRUE(
      run_in(f.dir(), "qemu-img create -f qcow2 -u -F qcow2 -b gone.qcow2 orphan.qcow2 1M"));
  opened = open_file("orphan.qcow2");
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), StatusCode::kNotFound);
  EXPECT_NE(opened.status().message().find("gone.qcow2"), std::string::npos);
}

TEST(Qcow2SourceTest, BackingCycleIsCorruption) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  ASSERT_TRUE(
      run_in(f.dir(), "qemu-img create -f qcow2 -u -F qcow2 -b cyc-b.qcow2 cyc-a.qcow2 1M"));
  ASSERT_TRUE(
      run_in(f.dir(), "qemu-img create -f qcow2 -u -F qcow2 -b cyc-a.qcow2 cyc-b.qcow2 1M"));
  Result<std::unique_ptr<BlockSource>> opened = open_file("cyc-a.qcow2");
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), StatusCode::kCorruption);
  EXPECT_NE(opened.status().message().find("qcow2 backing chain has a cycle"), std::string::npos)
      << opened.status().to_string();
  // An image naming itself (qemu-img refuses to make one: rename the backing file in the header).
  ASSERT_TRUE(run_in(f.dir(), "qemu-img create -f qcow2 -u -F qcow2 -b xelf.qcow2 self.qcow2 1M"));
  std::vector<std::byte> self = read_file(f.dir() / "self.qcow2");
  const uint64_t name_at = load_be64(self.data() + 8);
  ASSERT_EQ(self[name_at], std::byte{'x'});
  self[name_at] = std::byte{'s'};
  write_file(f.dir() / "self.qcow2", self);
  opened = open_file("self.qcow2");
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), StatusCode::kCorruption);
}

TEST(Qcow2SourceTest, ColdRandomReadCostsOneL2SliceAndOneDataRead) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.convert("plain.qcow2", "");
  f.convert("c2m.qcow2", "-o cluster_size=2M");
  for (const std::string name : {"plain.qcow2", "c2m.qcow2"}) {
    const std::vector<std::byte> oracle = f.oracle(name);
    // A 4 KiB block past 2 MiB that holds data.
    uint64_t at = 2 * 1024 * 1024;
    while (std::all_of(oracle.begin() + at, oracle.begin() + at + 4096,
                       [](std::byte b) { return b == std::byte{0}; })) {
      at += 4096;
    }
    auto counting =
        std::make_unique<CountingSource>(std::make_unique<MemorySource>(read_file(f.dir() / name)));
    const CountingSource* below = counting.get();
    Result<std::unique_ptr<BlockSource>> opened = open_qcow2(std::move(counting), {});
    ASSERT_TRUE(opened.ok()) << opened.status().to_string();
    EXPECT_EQ(below->reads(), 2u) << name << ": header and L1 table";
    const uint64_t reads = below->reads();
    const uint64_t bytes = below->bytes_read();
    std::vector<std::byte> out(4096);
    ASSERT_TRUE((*opened)->read_at(at, out).ok());
    EXPECT_EQ(std::memcmp(out.data(), oracle.data() + at, out.size()), 0);
    EXPECT_EQ(below->reads() - reads, 2u) << name;
    EXPECT_LE(below->bytes_read() - bytes, 64u * 1024 + 4096) << name;
  }
}

TEST(Qcow2SourceTest, ConcurrentReadersWithTinyCachesMatchQemu) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.convert("deflate.qcow2", "-c");
  f.convert("c4k.qcow2", "-o cluster_size=4096");
  f.make_overlay();
  for (const std::string name : {"deflate.qcow2", "c4k.qcow2", "overlay.qcow2"}) {
    const std::vector<std::byte> oracle = f.oracle(name);
    Qcow2Options options;
    options.l2_cache_bytes = 1;
    options.cluster_cache_bytes = 64 * 1024;
    Result<std::unique_ptr<BlockSource>> opened = open_file(name, options);
    ASSERT_TRUE(opened.ok()) << opened.status().to_string();
    const BlockSource& source = **opened;
    std::atomic<int> mismatches = 0;
    std::vector<std::thread> threads;
    for (int t = 0; t < 6; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(100 + t);
        std::vector<std::byte> buffer(200 * 1024);
        for (int i = 0; i < 150; ++i) {
          // Overlapping ranges: all threads stay in the first 1 MiB half of the time.
          const uint64_t span = i % 2 ? source.size() : 1024 * 1024;
          const uint64_t at = rng() % span;
          const uint64_t length = std::min<uint64_t>(source.size() - at, 1 + rng() % buffer.size());
          std::span<std::byte> out(buffer.data(), length);
          if (!source.read_at(at, out).ok() ||
              std::memcmp(out.data(), oracle.data() + at, length) != 0) {
            ++mismatches;
          }
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    EXPECT_EQ(mismatches.load(), 0) << name;
  }
}

// ---- corruption and refusal -------------------------------------------------------------------

void patch_be32(std::vector<std::byte>& bytes, uint64_t at, uint32_t value) {
  store_be32(bytes.data() + at, value);
}
void patch_be64(std::vector<std::byte>& bytes, uint64_t at, uint64_t value) {
  store_be64(bytes.data() + at, value);
}

// Offset of the first L2 entry (via L1[0]) that stores data; compressed ones only if asked.
uint64_t first_data_l2_entry(const std::vector<std::byte>& bytes, bool compressed = false) {
  const uint64_t l1 = load_be64(bytes.data() + 40);
  const uint64_t l2 = load_be64(bytes.data() + l1) & 0x00fffffffffffe00;
  const uint64_t cluster = uint64_t{1} << load_be32(bytes.data() + 20);
  for (uint64_t i = 0; i < cluster; i += 8) {
    const uint64_t entry = load_be64(bytes.data() + l2 + i);
    const bool is_compressed = (entry >> 62) & 1;
    if (compressed ? is_compressed : (!is_compressed && (entry & 0x00fffffffffffe00) != 0)) {
      return l2 + i;
    }
  }
  ADD_FAILURE() << "no data cluster";
  return 0;
}

Status open_status(std::vector<std::byte> bytes) {
  Result<std::unique_ptr<BlockSource>> opened = open_bytes(std::move(bytes));
  return opened.status();
}

// Opens (must succeed) and reads the whole image (must fail); never returns wrong bytes.
Status read_status(std::vector<std::byte> bytes) {
  Result<std::unique_ptr<BlockSource>> opened = open_bytes(std::move(bytes));
  EXPECT_TRUE(opened.ok()) << opened.status().to_string();
  if (!opened.ok()) return opened.status();
  std::vector<std::byte> all((*opened)->size());
  return (*opened)->read_at(0, all);
}

TEST(Qcow2SourceTest, BadHeadersAreRefused) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  const std::vector<std::byte> good = read_file(f.convert("plain.qcow2", ""));
  ASSERT_TRUE(open_status(good).ok());

  auto bad = good;
  bad[0] = std::byte{'X'};
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  EXPECT_EQ(probe_qcow2(bad), 0);
  EXPECT_EQ(probe_qcow2(good), 100);

  bad = good;
  patch_be32(bad, 4, 4);
  EXPECT_EQ(open_status(bad).code(), StatusCode::kNotSupported);
  patch_be32(bad, 4, 1);
  EXPECT_EQ(open_status(bad).code(), StatusCode::kNotSupported);

  for (uint32_t bits : {8u, 22u, 30u, 0xffffffffu}) {
    bad = good;
    patch_be32(bad, 20, bits);
    const Status s = open_status(bad);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << bits;
    EXPECT_NE(s.message().find("cluster_bits"), std::string::npos) << s.to_string();
  }

  for (uint64_t length : {0, 10, 71, 100, 111, 4000}) {
    EXPECT_FALSE(open_status(std::vector<std::byte>(good.begin(), good.begin() + length)).ok())
        << length;
  }

  bad = good;
  patch_be32(bad, 100, 50);  // header_length
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);

  bad = good;
  patch_be32(bad, 36, 0);  // l1_size too small for the disk
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  patch_be32(bad, 36, 0x7fffffff);
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);

  bad = good;
  patch_be64(bad, 40, good.size());  // L1 table past the end of the file
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  patch_be64(bad, 40, 0xfffffffffff00000);
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  patch_be64(bad, 40, 0x10200);  // not cluster-aligned
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);

  bad = good;
  patch_be64(bad, 24, uint64_t{1} << 62);  // size beyond what L1 covers
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
}

TEST(Qcow2SourceTest, BadTableEntriesAreCorruption) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  const std::vector<std::byte> good = read_file(f.convert("plain.qcow2", ""));
  const uint64_t l1 = load_be64(good.data() + 40);

  auto bad = good;
  patch_be64(bad, l1, (uint64_t{1} << 63) | (good.size() + (1 << 20)));  // L1 entry past EOF
  Status s = open_status(bad);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("L1 entry 0"), std::string::npos) << s.to_string();
  patch_be64(bad, l1, (uint64_t{1} << 63) | 0x10200);  // unaligned L2 table
  EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);

  const uint64_t entry = first_data_l2_entry(good);
  bad = good;
  patch_be64(bad, entry, (uint64_t{1} << 63) | (good.size() + (1 << 20)));  // L2 entry past EOF
  s = read_status(bad);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("past the end of the file"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("qcow2(image("), std::string::npos) << s.to_string();

  bad = good;
  patch_be64(bad, entry, load_be64(good.data() + entry) + 512);  // unaligned data cluster
  EXPECT_EQ(read_status(bad).code(), StatusCode::kCorruption);

  // A cluster that starts in the file but ends past it: a truncated file.
  ASSERT_EQ(good.size() % 65536, 0u);
  bad = good;
  patch_be64(bad, entry, (uint64_t{1} << 63) | good.size());
  bad.resize(good.size() + 1000);
  EXPECT_EQ(read_status(bad).code(), StatusCode::kCorruption);
}

TEST(Qcow2SourceTest, TruncatedImageNeverReturnsBytes) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  for (const std::string name : {"plain.qcow2", "deflate.qcow2"}) {
    const std::vector<std::byte> good =
        read_file(f.convert(name, name == "plain.qcow2" ? "" : "-c"));
    const std::vector<std::byte> oracle = f.oracle(name);
    for (uint64_t cut : {good.size() - 1, good.size() - 70000, good.size() / 2}) {
      Result<std::unique_ptr<BlockSource>> opened =
          open_bytes(std::vector<std::byte>(good.begin(), good.begin() + cut));
      if (!opened.ok()) continue;  // tables past the cut: refused at open
      std::vector<std::byte> all((*opened)->size());
      const Status s = (*opened)->read_at(0, all);
      // Either an error, or the cut took only bytes no read needs (refcount blocks).
      EXPECT_TRUE(!s.ok() || all == oracle) << name << " cut at " << cut;
      if (cut == good.size() / 2) {
        EXPECT_FALSE(s.ok()) << name << " cut at " << cut;
      }
    }
  }
}

TEST(Qcow2SourceTest, DamagedCompressedClusterIsCorruption) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  const std::vector<std::byte> good = read_file(f.convert("deflate.qcow2", "-c"));
  const uint64_t entry = first_data_l2_entry(good, /*compressed=*/true);
  const uint64_t value = load_be64(good.data() + entry);
  ASSERT_NE(value & (uint64_t{1} << 62), 0u);
  const uint64_t host = value & ((uint64_t{1} << 54) - 1);  // 64 KiB clusters: 54 offset bits
  auto bad = good;
  for (uint64_t i = 0; i < 64; ++i) bad[host + i] = static_cast<std::byte>(0xff - i);
  EXPECT_EQ(read_status(bad).code(), StatusCode::kCorruption);

  // Too few sectors: the cluster cannot be filled.
  bad = good;
  patch_be64(bad, entry, value & ~(((uint64_t{1} << 8) - 1) << 54));
  EXPECT_EQ(read_status(bad).code(), StatusCode::kCorruption);
}

TEST(Qcow2SourceTest, UnsupportedFeaturesAreNotSupported) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  const std::vector<std::byte> good = read_file(f.convert("plain.qcow2", ""));

  auto bad = good;
  patch_be64(bad, 72, uint64_t{1} << 10);  // unknown incompatible feature
  Status s = open_status(bad);
  EXPECT_EQ(s.code(), StatusCode::kNotSupported);
  EXPECT_NE(s.message().find("0x400"), std::string::npos) << s.to_string();

  bad = good;
  patch_be32(bad, 32, 2);  // LUKS encryption
  s = open_status(bad);
  EXPECT_EQ(s.code(), StatusCode::kNotSupported);
  EXPECT_NE(s.message().find("encrypted qcow2"), std::string::npos) << s.to_string();

  // A qemu-made AES image (LUKS would be the same crypt_method check, but qemu-img spends seconds
  // of PBKDF2 making one).
  ASSERT_TRUE(run_in(f.dir(),
                     "qemu-img create --object secret,id=sec0,data=abc123 -f qcow2 "
                     "-o encrypt.format=aes,encrypt.key-secret=sec0 aes.qcow2 1M"));
  s = open_file("aes.qcow2").status();
  EXPECT_EQ(s.code(), StatusCode::kNotSupported);
  EXPECT_NE(s.message().find("encrypted qcow2"), std::string::npos) << s.to_string();

  ASSERT_TRUE(
      run_in(f.dir(), "qemu-img create -f qcow2 -o data_file=ext-data.raw extdata.qcow2 1M"));
  s = open_file("extdata.qcow2").status();
  EXPECT_EQ(s.code(), StatusCode::kNotSupported);
  EXPECT_NE(s.message().find("external data file ('ext-data.raw')"), std::string::npos)
      << s.to_string();

  // Dirty and corrupt bits are read anyway: L1 and L2 stay usable.
  bad = good;
  patch_be64(bad, 72, Qcow2Header::kIncompatibleDirty | Qcow2Header::kIncompatibleCorrupt);
  EXPECT_TRUE(open_status(bad).ok());
}

TEST(Qcow2SourceTest, HeaderScanAsksForMoreBytesWhenExtensionsRunOn) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.convert("base.qcow2", "");
  ASSERT_TRUE(run_in(f.dir(), "qemu-img create -f qcow2 -F qcow2 -b base.qcow2 scan.qcow2"));
  const std::vector<std::byte> overlay = read_file(f.dir() / "scan.qcow2");

  Result<Qcow2HeaderScan> scan = scan_qcow2_header(std::span(overlay).first(50), overlay.size());
  ASSERT_TRUE(scan.ok());
  EXPECT_FALSE(scan->complete);
  EXPECT_EQ(scan->bytes_needed, 112u);
  scan = scan_qcow2_header(std::span(overlay).first(112), overlay.size());
  ASSERT_TRUE(scan.ok());
  EXPECT_FALSE(scan->complete);
  EXPECT_EQ(scan->bytes_needed, 65536u);
  scan = scan_qcow2_header(overlay, overlay.size());
  ASSERT_TRUE(scan.ok()) << scan.status().to_string();
  ASSERT_TRUE(scan->complete);
  EXPECT_EQ(scan->header.backing_file, "base.qcow2");
  EXPECT_EQ(scan->header.backing_format, "qcow2");
  EXPECT_EQ(scan->header.version, 3u);
  EXPECT_FALSE(scan->header.feature_names.empty());
  EXPECT_TRUE(check_qcow2_supported(scan->header).ok());

  // An extension whose length runs past the header area.
  auto bad = overlay;
  const uint64_t ext = load_be32(bad.data() + 100);
  patch_be32(bad, ext + 4, 0x100000);
  EXPECT_EQ(scan_qcow2_header(bad, bad.size()).status().code(), StatusCode::kCorruption);
  // A backing file name that is too long.
  bad = overlay;
  patch_be32(bad, 16, 5000);
  EXPECT_EQ(scan_qcow2_header(bad, bad.size()).status().code(), StatusCode::kCorruption);
}

TEST(Qcow2SourceTest, MapDelegatesToBackingAndClipsAtItsEnd) {
  Qcow2Fixture& f = Qcow2Fixture::get();
  f.make_chain();
  Result<std::unique_ptr<BlockSource>> opened = open_file("chain2.qcow2");
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  const BlockSource& top = **opened;
  const uint64_t base_size = dynamic_cast<const Qcow2Source&>(top).backing()->size();
  ASSERT_LT(base_size, top.size());
  // Past the backing file's end, unallocated clusters are zero runs.
  Result<Extent> tail = top.map(base_size);
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ(tail->kind, Extent::Kind::kZero);
  // A run inside the backing file never crosses its end.
  Result<Extent> before = top.map(base_size - 512);
  ASSERT_TRUE(before.ok());
  EXPECT_LE(before->length, 512u);
  EXPECT_EQ(top.map(top.size()).status().code(), StatusCode::kInvalidArgument);
}

TEST(Qcow2SourceTest, L2EntryDecoding) {
  Qcow2Header h;
  h.version = 3;
  h.cluster_bits = 16;
  h.size = 1 << 30;
  using Kind = Qcow2Mapping::Kind;
  const uint64_t file = 10 << 20;
  EXPECT_EQ(decode_qcow2_l2_entry(h, 0, 0, 0, file)->kind, Kind::kUnallocated);
  EXPECT_EQ(decode_qcow2_l2_entry(h, 1, 0, 0, file)->kind, Kind::kZero);
  EXPECT_EQ(decode_qcow2_l2_entry(h, 0x30001, 0, 0, file)->kind, Kind::kZero);
  Result<Qcow2Mapping> m = decode_qcow2_l2_entry(h, (uint64_t{1} << 63) | 0x30000, 0, 0, file);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->kind, Kind::kData);
  EXPECT_EQ(m->host_offset, 0x30000u);
  EXPECT_FALSE(decode_qcow2_l2_entry(h, 0x30200, 0, 0, file).ok());
  EXPECT_FALSE(decode_qcow2_l2_entry(h, file, 0, 0, file).ok());
  // Compressed: 64 KiB clusters put the sector count at bit 54.
  m = decode_qcow2_l2_entry(h, (uint64_t{1} << 62) | (uint64_t{3} << 54) | 0x20100, 0, 0, file);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->kind, Kind::kCompressed);
  EXPECT_EQ(m->host_offset, 0x20100u);
  EXPECT_EQ(m->compressed_bytes, 4u * 512 - 256);
  m = decode_qcow2_l2_entry(h, (uint64_t{1} << 62) | (uint64_t{3} << 54) | (file - 100), 0, 0,
                            file);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->compressed_bytes, 100u);  // clipped at the end of the file

  h.incompatible_features = Qcow2Header::kIncompatibleExtendedL2;
  const uint64_t data = 0x40000;
  const uint64_t bitmap = (uint64_t{0b100} << 32) | 0b011;  // 0,1 allocated; 2 zero
  EXPECT_EQ(decode_qcow2_l2_entry(h, data, bitmap, 1, file)->host_offset, data + 2048);
  EXPECT_EQ(decode_qcow2_l2_entry(h, data, bitmap, 2, file)->kind, Kind::kZero);
  EXPECT_EQ(decode_qcow2_l2_entry(h, data, bitmap, 3, file)->kind, Kind::kUnallocated);
  EXPECT_EQ(decode_qcow2_l2_entry(h, 0, uint64_t{1} << 35, 3, file)->kind, Kind::kZero);
  EXPECT_FALSE(decode_qcow2_l2_entry(h, 0, 1, 3, file).ok());  // allocated in no cluster
  EXPECT_FALSE(decode_qcow2_l2_entry(h, data, (uint64_t{1} << 32) | 1, 3, file).ok());
}

TEST(Qcow2SourceTest, DecompressRejectsGarbage) {
  std::vector<std::byte> out(65536);
  const std::vector<std::byte> garbage = testing::pattern_bytes(1000, 3);
  EXPECT_EQ(decompress_qcow2_cluster(Qcow2CompressionType::kDeflate, garbage, out).code(),
            StatusCode::kCorruption);
  EXPECT_FALSE(decompress_qcow2_cluster(Qcow2CompressionType::kZstd, garbage, out).ok());
  EXPECT_FALSE(decompress_qcow2_cluster(Qcow2CompressionType::kDeflate, {}, out).ok());
}

}  // namespace
}  // namespace imgfs::formats
