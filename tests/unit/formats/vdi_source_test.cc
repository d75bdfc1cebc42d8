#include "formats/vdi_source.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
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
using testing::pattern_bytes;
using testing::read_file;
using testing::run_in;

namespace fs = std::filesystem;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kBlock = kMiB;  // qemu's VDI block size
constexpr uint64_t kRawSize = 9 * kMiB + 3584;

// A sparse raw disk: data runs, written zeros and holes at odd offsets. Blocks 4, 5 and 7
// ([4, 6) MiB and [7, 8) MiB) hold no data, so a dynamic VDI leaves them unallocated.
void write_raw(const fs::path& path) {
  const std::vector<std::byte> data = pattern_bytes(kRawSize, 3);
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  ASSERT_GE(fd, 0);
  auto put = [&](uint64_t begin, uint64_t end, bool zeros) {
    std::vector<std::byte> chunk(data.begin() + begin, data.begin() + end);
    if (zeros) std::fill(chunk.begin(), chunk.end(), std::byte{0});
    ASSERT_EQ(::pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(begin)),
              static_cast<ssize_t>(chunk.size()));
  };
  put(0, 100000, false);
  put(100000, 1572864 + 777, true);
  put(1572864 + 777, 2 * kMiB + 4097, false);
  put(3 * kMiB + 13, 3 * kMiB + 70000, false);
  put(6 * kMiB + 1536, 6 * kMiB + 2560, false);
  put(9 * kMiB - 5000, kRawSize - 1000, false);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(kRawSize)), 0);
  ::close(fd);
}

// One temp folder per test process with base.raw; images are made on first use.
class VdiFixture {
 public:
  static VdiFixture& get() {
    static VdiFixture fixture;
    return fixture;
  }

  // The image made from base.raw with qemu-img convert `options`, and qemu's raw view of it.
  std::pair<std::vector<std::byte>, std::vector<std::byte>> image_and_oracle(
      const std::string& name, const std::string& options) {
    if (!fs::exists(dir_ / name)) {
      EXPECT_TRUE(run_in(dir_, "qemu-img convert -f raw -O vdi " + options + " base.raw " + name));
      EXPECT_TRUE(run_in(dir_, "qemu-img convert -f vdi -O raw " + name + " " + name + ".raw"));
    }
    return {read_file(dir_ / name), read_file(dir_ / (name + ".raw"))};
  }

 private:
  VdiFixture() {
    dir_ = fs::path(::testing::TempDir()) / ("imgfs_vdi_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    write_raw(dir_ / "base.raw");
  }
  ~VdiFixture() {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  fs::path dir_;
};

std::pair<std::vector<std::byte>, std::vector<std::byte>> dynamic_image() {
  return VdiFixture::get().image_and_oracle("dynamic.vdi", "");
}
std::pair<std::vector<std::byte>, std::vector<std::byte>> static_image() {
  return VdiFixture::get().image_and_oracle("static.vdi", "-o static=on");
}

std::unique_ptr<BlockSource> open_ok(std::vector<std::byte> file) {
  Result<std::unique_ptr<BlockSource>> r =
      open_vdi(std::make_unique<MemorySource>(std::move(file), "file"), {});
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(*r) : nullptr;
}

Status open_status(std::vector<std::byte> file) {
  return open_vdi(std::make_unique<MemorySource>(std::move(file), "file"), {}).status();
}

void expect_range(const BlockSource& source, const std::vector<std::byte>& oracle, uint64_t offset,
                  uint64_t length) {
  std::vector<std::byte> out(length);
  Status s = source.read_at(offset, out);
  ASSERT_TRUE(s.ok()) << s.to_string() << " at " << offset << "+" << length;
  ASSERT_TRUE(std::equal(out.begin(), out.end(), oracle.begin() + offset))
      << "mismatch at " << offset << "+" << length;
}

void expect_matches(const BlockSource& source, const std::vector<std::byte>& oracle,
                    uint64_t block) {
  ASSERT_EQ(source.size(), oracle.size());
  expect_range(source, oracle, 0, 1);
  expect_range(source, oracle, 0, 4096);
  expect_range(source, oracle, oracle.size() - 1, 1);
  expect_range(source, oracle, oracle.size() - 7777, 7777);
  for (uint64_t b = block; b < oracle.size(); b += block) {
    expect_range(source, oracle, b - 1, 2);
    expect_range(source, oracle, b - std::min<uint64_t>(b, 3000), 5001);
    if (b + 2 * block < oracle.size()) expect_range(source, oracle, b - 10, 2 * block + 20);
  }
  std::mt19937_64 rng(11);
  for (int i = 0; i < 200; ++i) {
    const uint64_t length = 1 + rng() % std::min<uint64_t>(300000, oracle.size());
    const uint64_t offset = rng() % (oracle.size() - length + 1);
    expect_range(source, oracle, offset, length);
  }
  EXPECT_EQ(testing::read_all(source), oracle);
}

// Walks map() over the whole disk: runs tile it and every zero run reads as zeros. Returns the
// start of each zero run.
std::vector<uint64_t> zero_runs(const BlockSource& source, const std::vector<std::byte>& oracle) {
  std::vector<uint64_t> zeros;
  uint64_t offset = 0;
  Extent::Kind previous = Extent::Kind::kData;
  while (offset < source.size()) {
    Result<Extent> e = source.map(offset);
    EXPECT_TRUE(e.ok()) << e.status().to_string();
    if (!e.ok() || e->length == 0) break;
    EXPECT_LE(e->length, source.size() - offset);
    if (offset > 0) {
      EXPECT_NE(e->kind, previous) << "runs of one kind are merged";
    }
    previous = e->kind;
    if (e->kind == Extent::Kind::kZero) {
      EXPECT_TRUE(std::all_of(oracle.begin() + offset, oracle.begin() + offset + e->length,
                              [](std::byte b) { return b == std::byte{0}; }));
      zeros.push_back(offset);
    }
    offset += e->length;
  }
  EXPECT_EQ(offset, source.size());
  EXPECT_EQ(source.map(source.size()).status().code(), StatusCode::kInvalidArgument);
  return zeros;
}

uint32_t bmap_offset(const std::vector<std::byte>& file) { return load_le32(file.data() + 0x154); }

TEST(VdiSourceTest, DynamicMatchesQemu) {
  auto [file, oracle] = dynamic_image();
  std::unique_ptr<BlockSource> source = open_ok(file);
  ASSERT_NE(source, nullptr);
  expect_matches(*source, oracle, kBlock);
  EXPECT_EQ(source->size(), kRawSize);
  EXPECT_EQ(source->block_size(), kBlock);
  EXPECT_EQ(source->describe(), "vdi(file(" + std::to_string(file.size()) + " bytes))");
  const auto* vdi = dynamic_cast<const VdiSource*>(source.get());
  ASSERT_NE(vdi, nullptr);
  EXPECT_EQ(vdi->header().image_type, 1u);
}

TEST(VdiSourceTest, StaticMatchesQemu) {
  auto [file, oracle] = static_image();
  std::unique_ptr<BlockSource> source = open_ok(file);
  ASSERT_NE(source, nullptr);
  expect_matches(*source, oracle, kBlock);
  EXPECT_EQ(dynamic_cast<const VdiSource*>(source.get())->header().image_type, 2u);
}

TEST(VdiSourceTest, MapAgreesWithAllocation) {
  auto [file, oracle] = dynamic_image();
  std::unique_ptr<BlockSource> source = open_ok(file);
  ASSERT_NE(source, nullptr);
  EXPECT_EQ(zero_runs(*source, oracle), (std::vector<uint64_t>{4 * kMiB, 7 * kMiB}));
  Result<Extent> e = source->map(4 * kMiB + 123);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, Extent::Kind::kZero);
  EXPECT_EQ(e->length, 2 * kMiB - 123);

  auto [static_file, static_oracle] = static_image();
  std::unique_ptr<BlockSource> fixed = open_ok(static_file);
  ASSERT_NE(fixed, nullptr);
  EXPECT_TRUE(zero_runs(*fixed, static_oracle).empty());
}

TEST(VdiSourceTest, ConcurrentReaders) {
  // Named variables, not structured bindings: clang 14 cannot capture those in a lambda.
  const auto image = dynamic_image();
  const std::vector<std::byte>& file = image.first;
  const std::vector<std::byte>& oracle = image.second;
  std::unique_ptr<BlockSource> source = open_ok(file);
  ASSERT_NE(source, nullptr);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(50 + t);
      for (int i = 0; i < 150; ++i) {
        const uint64_t length = 1 + rng() % 200000;
        const uint64_t offset = rng() % (oracle.size() - length + 1);
        std::vector<std::byte> out(length);
        if (!source->read_at(offset, out).ok() ||
            !std::equal(out.begin(), out.end(), oracle.begin() + offset)) {
          ++failures;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(VdiSourceTest, ReadsAreLazyAndCoalesced) {
  auto [file, oracle] = static_image();
  auto counting = std::make_unique<CountingSource>(std::make_unique<MemorySource>(file));
  const CountingSource* counter = counting.get();
  Result<std::unique_ptr<BlockSource>> source = open_vdi(std::move(counting), {});
  ASSERT_TRUE(source.ok());
  EXPECT_EQ(counter->reads(), 2u);  // header, block map
  expect_range(**source, oracle, 5 * kMiB + 777, 4096);
  EXPECT_EQ(counter->reads(), 3u);
  EXPECT_EQ(counter->bytes_read(), 512u + 4 * 10 + 4096);
  // A static image stores blocks back to back: the whole disk is one lower read.
  EXPECT_EQ(testing::read_all(**source), oracle);
  EXPECT_EQ(counter->reads(), 4u);
}

TEST(VdiSourceTest, ZeroBlockEntriesReadAsZeros) {
  auto [file, oracle] = static_image();
  store_le32(file.data() + bmap_offset(file) + 4 * 3, kVdiZeroBlock);
  std::fill(oracle.begin() + 3 * kMiB, oracle.begin() + 4 * kMiB, std::byte{0});
  std::unique_ptr<BlockSource> source = open_ok(file);
  ASSERT_NE(source, nullptr);
  expect_matches(*source, oracle, kBlock);
  Result<Extent> e = source->map(3 * kMiB);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, Extent::Kind::kZero);
  EXPECT_EQ(e->length, kMiB);
}

// qemu only writes 1 MiB blocks without block_extra; VirtualBox's format allows both, so this
// image is built by hand: 4 KiB blocks, 512 bytes of per-block metadata, blocks stored out of
// order, one unallocated and one zero block.
TEST(VdiSourceTest, HandMadeImageWithBlockExtra) {
  constexpr uint32_t kSmallBlock = 4096, kExtra = 512, kBlocks = 5;
  const uint64_t disk_size = kBlocks * kSmallBlock - 1000;  // qemu rounds up to 512
  std::vector<std::byte> file(0x400);
  const std::string text = "<<< Oracle VM VirtualBox Disk Image >>>\n";
  std::memcpy(file.data(), text.data(), text.size());
  store_le32(file.data() + 0x40, kVdiSignature);
  store_le32(file.data() + 0x44, 0x00010001);
  store_le32(file.data() + 0x48, 0x190);
  store_le32(file.data() + 0x4C, 1);
  store_le32(file.data() + 0x154, 0x200);
  store_le32(file.data() + 0x158, 0x400);
  store_le32(file.data() + 0x168, 512);
  store_le64(file.data() + 0x170, disk_size);
  store_le32(file.data() + 0x178, kSmallBlock);
  store_le32(file.data() + 0x17C, kExtra);
  store_le32(file.data() + 0x180, kBlocks);
  store_le32(file.data() + 0x184, 3);
  const uint32_t map[kBlocks] = {1, kVdiUnallocated, 0, kVdiZeroBlock, 2};
  for (uint32_t i = 0; i < kBlocks; ++i) store_le32(file.data() + 0x200 + 4 * i, map[i]);
  const std::vector<std::byte> data = pattern_bytes(3 * kSmallBlock, 9);
  for (uint32_t index = 0; index < 3; ++index) {
    const std::vector<std::byte> extra(kExtra, std::byte{0xEE});  // must never show up
    file.insert(file.end(), extra.begin(), extra.end());
    file.insert(file.end(), data.begin() + index * kSmallBlock,
                data.begin() + (index + 1) * kSmallBlock);
  }
  const uint64_t rounded = (disk_size + 511) / 512 * 512;
  std::vector<std::byte> expected(rounded);
  for (uint32_t i = 0; i < kBlocks; ++i) {
    if (map[i] >= kVdiZeroBlock) continue;
    const uint64_t n = std::min<uint64_t>(kSmallBlock, rounded - i * kSmallBlock);
    std::copy_n(data.begin() + map[i] * kSmallBlock, n, expected.begin() + i * kSmallBlock);
  }
  std::unique_ptr<BlockSource> source = open_ok(file);
  ASSERT_NE(source, nullptr);
  EXPECT_EQ(source->size(), rounded);
  expect_matches(*source, expected, kSmallBlock);
  EXPECT_EQ(zero_runs(*source, expected), (std::vector<uint64_t>{kSmallBlock, 3 * kSmallBlock}));

  // The last block (stored last) need only reach the end of the disk: 3584 of its 4096 bytes.
  std::vector<std::byte> cut(file.begin(), file.end() - 512);
  EXPECT_TRUE(open_status(cut).ok()) << open_status(cut).to_string();
  std::vector<std::byte> too_short(file.begin(), file.end() - 1536);
  EXPECT_EQ(open_status(too_short).code(), StatusCode::kCorruption);
}

TEST(VdiSourceTest, ProbeNeedsTheSignature) {
  auto [file, oracle] = dynamic_image();
  EXPECT_EQ(probe_vdi(std::span<const std::byte>(file).first(4096)), 100);
  EXPECT_EQ(probe_vdi(std::span<const std::byte>(file).first(68)), 100);
  EXPECT_EQ(probe_vdi(std::span<const std::byte>(file).first(67)), 0);
  EXPECT_EQ(probe_vdi(pattern_bytes(4096)), 0);
}

TEST(VdiSourceTest, HeaderProblemsAreRefused) {
  const std::vector<std::byte> file = dynamic_image().first;
  auto with = [&](size_t at, uint32_t value) {
    std::vector<std::byte> bad = file;
    store_le32(bad.data() + at, value);
    return open_status(bad);
  };
  Status s = with(0x40, 0xBEDA1070);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("signature"), std::string::npos) << s.to_string();
  EXPECT_EQ(with(0x44, 0x00010000).code(), StatusCode::kNotSupported);  // version 1.0
  EXPECT_EQ(with(0x44, 0x00020001).code(), StatusCode::kNotSupported);
  EXPECT_EQ(with(0x4C, 4).code(), StatusCode::kNotSupported);  // differencing
  EXPECT_EQ(with(0x4C, 9).code(), StatusCode::kNotSupported);
  EXPECT_EQ(with(0x1B8, 1).code(), StatusCode::kNotSupported);  // uuid_parent
  EXPECT_EQ(with(0x168, 4096).code(), StatusCode::kNotSupported);
  EXPECT_EQ(with(0x178, 1000000).code(), StatusCode::kCorruption);  // not a power of two
  EXPECT_EQ(with(0x178, 256).code(), StatusCode::kCorruption);
  EXPECT_EQ(with(0x180, 5).code(), StatusCode::kCorruption);  // too few blocks for disk_size
  s = with(0x154, static_cast<uint32_t>(file.size() - 8));    // block map past the end
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("offset_bmap"), std::string::npos) << s.to_string();
  EXPECT_EQ(with(0x48, 16).code(), StatusCode::kCorruption);  // header_size
  {
    std::vector<std::byte> bad = file;
    store_le64(bad.data() + 0x170, 1ull << 62);  // disk_size
    EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  }
  EXPECT_EQ(with(0x180, 0x7FFFFFFF).code(), StatusCode::kNotSupported);  // 8 GiB block map
  EXPECT_EQ(open_status(std::vector<std::byte>(100)).code(), StatusCode::kCorruption);
  EXPECT_EQ(open_vdi(nullptr, {}).status().code(), StatusCode::kInvalidArgument);
}

TEST(VdiSourceTest, BlockMapProblemsAreCorruption) {
  const std::vector<std::byte> file = dynamic_image().first;
  const uint32_t bmap = bmap_offset(file);
  const uint32_t blocks_in_image = load_le32(file.data() + 0x180);
  const uint32_t allocated = load_le32(file.data() + 0x184);
  ASSERT_LT(allocated, blocks_in_image);
  auto with_entry = [&](uint32_t index, uint32_t value) {
    std::vector<std::byte> bad = file;
    store_le32(bad.data() + bmap + 4 * index, value);
    return open_status(bad);
  };
  // Entry 4 is unallocated; pointing it at a block index past the data in the file.
  Status s = with_entry(4, allocated);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("entry 4"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("past the end"), std::string::npos) << s.to_string();
  EXPECT_EQ(with_entry(4, blocks_in_image).code(), StatusCode::kCorruption);
  EXPECT_EQ(with_entry(4, 0x80000000).code(), StatusCode::kCorruption);
  s = with_entry(4, load_le32(file.data() + bmap));  // same data block as entry 0
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("earlier entry"), std::string::npos) << s.to_string();
}

TEST(VdiSourceTest, TruncatedFilesAreRefused) {
  for (auto [file, oracle] : {dynamic_image(), static_image()}) {
    // The last block is stored last and the disk ends 3584 bytes into it: cut into those.
    for (uint64_t keep : {uint64_t{0}, uint64_t{300}, uint64_t{0x300}, file.size() - kMiB + 3583,
                          file.size() - kMiB}) {
      std::vector<std::byte> cut(file.begin(), file.begin() + static_cast<ptrdiff_t>(keep));
      EXPECT_FALSE(open_status(cut).ok()) << "kept " << keep;
    }
  }
}

TEST(VdiSourceTest, ReadErrorsPropagate) {
  auto [file, oracle] = static_image();
  const uint64_t data = load_le32(file.data() + 0x158);
  auto faulty = std::make_unique<testing::FaultySource>(std::make_unique<MemorySource>(file),
                                                        data + 2 * kMiB + 10, 1);
  Result<std::unique_ptr<BlockSource>> source = open_vdi(std::move(faulty), {});
  ASSERT_TRUE(source.ok());
  std::vector<std::byte> out(4096);
  EXPECT_TRUE((*source)->read_at(kMiB, out).ok());
  Status s = (*source)->read_at(2 * kMiB, out);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("vdi("), std::string::npos) << s.to_string();
  EXPECT_EQ((*source)->read_at(kRawSize - 100, out).code(), StatusCode::kInvalidArgument);
}

TEST(VdiSourceTest, PureParsersRejectShortInput) {
  EXPECT_FALSE(parse_vdi_header(pattern_bytes(511), 1 << 20).ok());
  VdiHeader header;
  header.blocks_in_image = 4;
  header.block_size = 4096;
  EXPECT_FALSE(parse_vdi_block_map(pattern_bytes(15), header, 1 << 20).ok());
}

}  // namespace
}  // namespace imgfs::formats
