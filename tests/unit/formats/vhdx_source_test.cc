#include "formats/vhdx_source.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "formats/byte_order.h"
#include "formats/memory_source.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using imgfs::testing::CountingSource;
using imgfs::testing::FaultySource;
using imgfs::testing::read_all;

constexpr uint64_t kMiB = 1024 * 1024;
// Not a multiple of any block size, so the last block is cut short.
constexpr uint64_t kBaseSize = 9 * kMiB + 7 * 512;
// Over 4 GiB: with 1 MiB blocks and 512-byte sectors a sector bitmap entry follows every 4096
// payload entries, so blocks 4096 and up sit after the first bitmap entry.
constexpr uint64_t kBigSize = 4 * 1024 * kMiB + 8 * kMiB + 3 * 512;

std::string quote(const std::string& path) { return "'" + path + "'"; }

void run(const std::string& command) {
  const int status = std::system((command + " >/dev/null 2>&1").c_str());
  ASSERT_EQ(status, 0) << command;
}

std::vector<std::byte> read_file(const std::string& path) {
  std::vector<std::byte> bytes(std::filesystem::file_size(path));
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  EXPECT_TRUE(in.good()) << path;
  return bytes;
}

// A sparse raw file of `size` bytes: seeded random data at odd offsets (some across 1 MiB block
// boundaries), an explicit run of written zeros, and holes everywhere else.
void write_raw(const std::string& path, uint64_t size,
               const std::vector<std::pair<uint64_t, uint64_t>>& data_runs,
               std::pair<uint64_t, uint64_t> zero_run, uint32_t seed) {
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
  std::mt19937_64 rng(seed);
  for (const auto& [offset, length] : data_runs) {
    std::vector<unsigned char> bytes(length);
    for (auto& b : bytes) b = static_cast<unsigned char>(rng() | 1);  // never zero
    ASSERT_EQ(::pwrite(fd, bytes.data(), length, static_cast<off_t>(offset)),
              static_cast<ssize_t>(length));
  }
  std::vector<unsigned char> zeros(zero_run.second, 0);
  ASSERT_EQ(::pwrite(fd, zeros.data(), zeros.size(), static_cast<off_t>(zero_run.first)),
            static_cast<ssize_t>(zeros.size()));
  ::close(fd);
}

// Fixtures are made once for the suite: qemu-img builds each image from the same raw file and
// converts it back to raw (the oracle).
class VhdxSourceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string pattern = ::testing::TempDir() + "vhdx_test_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = new std::string(pattern);
    const std::string base = *dir_ + "/base.raw";
    write_raw(
        base, kBaseSize,
        {{12345, 70000}, {kMiB - 100, 300}, {3 * kMiB + 17, 1500000}, {kBaseSize - 5000, 5000}},
        {6 * kMiB + 3, 500000}, 42);
    const std::string big = *dir_ + "/big.raw";
    write_raw(big, kBigSize,
              {{5, 2500},
               {4095 * kMiB + 4000, 2500},
               {4096 * kMiB - 777, 2500},
               {4097 * kMiB + 1, 3 * kMiB},
               {kBigSize - 3000, 3000}},
              {4101 * kMiB, 4096}, 7);
    images_ = new std::map<std::string, std::vector<std::byte>>;
    oracles_ = new std::map<std::string, std::vector<std::byte>>;
    const std::pair<const char*, const char*> variants[] = {
        {"dynamic", ""},
        {"fixed", "-o subformat=fixed"},
        {"block1m", "-o block_size=1M"},
        {"block1m_log2m", "-o block_size=1M,log_size=2M"},
        {"fixed_block1m", "-o subformat=fixed,block_size=1M"},
    };
    for (const auto& [name, options] : variants) {
      const std::string image = *dir_ + "/" + name + ".vhdx";
      const std::string oracle = *dir_ + "/" + name + ".out.raw";
      run("qemu-img convert -f raw -O vhdx " + std::string(options) + " " + quote(base) + " " +
          quote(image));
      run("qemu-img convert -f vhdx -O raw " + quote(image) + " " + quote(oracle));
      (*images_)[name] = read_file(image);
      (*oracles_)[name] = read_file(oracle);
    }
    run("qemu-img convert -f raw -O vhdx -o block_size=1M " + quote(big) + " " +
        quote(*dir_ + "/big.vhdx"));
    run("qemu-img convert -f vhdx -O raw " + quote(*dir_ + "/big.vhdx") + " " +
        quote(*dir_ + "/big.out.raw"));
    (*images_)["big"] = read_file(*dir_ + "/big.vhdx");
  }

  static void TearDownTestSuite() {
    std::error_code ignored;
    std::filesystem::remove_all(*dir_, ignored);
    delete dir_;
    delete images_;
    delete oracles_;
  }

  static std::unique_ptr<BlockSource> open_bytes(std::vector<std::byte> bytes) {
    Result<std::unique_ptr<BlockSource>> source =
        open_vhdx(std::make_unique<MemorySource>(std::move(bytes), "img"), VhdxOptions{});
    EXPECT_TRUE(source.ok()) << source.status().to_string();
    return source.ok() ? std::move(*source) : nullptr;
  }
  static Status open_status(std::vector<std::byte> bytes) {
    Result<std::unique_ptr<BlockSource>> source =
        open_vhdx(std::make_unique<MemorySource>(std::move(bytes), "img"), VhdxOptions{});
    return source.status();
  }

  static const std::vector<std::byte>& image(const std::string& name) { return images_->at(name); }
  static const std::vector<std::byte>& oracle(const std::string& name) {
    return oracles_->at(name);
  }

  static std::string* dir_;
  static std::map<std::string, std::vector<std::byte>>* images_;
  static std::map<std::string, std::vector<std::byte>>* oracles_;
};

std::string* VhdxSourceTest::dir_ = nullptr;
std::map<std::string, std::vector<std::byte>>* VhdxSourceTest::images_ = nullptr;
std::map<std::string, std::vector<std::byte>>* VhdxSourceTest::oracles_ = nullptr;

// Where the structures of an image are, found with the layer's own pure parsers.
struct Layout {
  VhdxRegionTable regions;
  VhdxMetadataTable metadata;
  VhdxHeader header;
};

Layout layout_of(const std::vector<std::byte>& bytes) {
  const std::span<const std::byte> view(bytes);
  Layout layout;
  Result<VhdxHeader> header = select_vhdx_header(view.subspan(kVhdxHeader1Offset, 4096),
                                                 view.subspan(kVhdxHeader2Offset, 4096));
  EXPECT_TRUE(header.ok()) << header.status().to_string();
  layout.header = *header;
  Result<VhdxRegionTable> regions =
      parse_vhdx_region_table(view.subspan(kVhdxRegionTable1Offset, kVhdxRegionTableBytes));
  EXPECT_TRUE(regions.ok()) << regions.status().to_string();
  layout.regions = *regions;
  Result<VhdxMetadataTable> metadata = parse_vhdx_metadata_table(
      view.subspan(regions->metadata.file_offset, kVhdxMetadataTableBytes),
      regions->metadata.length);
  EXPECT_TRUE(metadata.ok()) << metadata.status().to_string();
  layout.metadata = *metadata;
  return layout;
}

void fix_checksum(std::vector<std::byte>& bytes, uint64_t offset, uint64_t length) {
  store_le32(bytes.data() + offset + 4,
             vhdx_checksum(std::span<const std::byte>(bytes).subspan(offset, length)));
}

void expect_same(const BlockSource& source, const std::vector<std::byte>& expected, uint64_t offset,
                 uint64_t length) {
  std::vector<std::byte> got(length);
  Status s = source.read_at(offset, got);
  ASSERT_TRUE(s.ok()) << s.to_string() << " at " << offset;
  ASSERT_EQ(std::memcmp(got.data(), expected.data() + offset, length), 0)
      << "mismatch in [" << offset << ", " << offset + length << ")";
}

TEST_F(VhdxSourceTest, EveryVariantMatchesQemuByteForByte) {
  for (const char* name : {"dynamic", "fixed", "block1m", "block1m_log2m", "fixed_block1m"}) {
    SCOPED_TRACE(name);
    std::unique_ptr<BlockSource> source = open_bytes(image(name));
    ASSERT_NE(source, nullptr);
    ASSERT_EQ(source->size(), kBaseSize);
    ASSERT_EQ(oracle(name).size(), kBaseSize);
    EXPECT_TRUE(read_all(*source) == oracle(name));
    EXPECT_EQ(source->describe(), "vhdx(img(" + std::to_string(image(name).size()) + " bytes))");
  }
}

TEST_F(VhdxSourceTest, ParametersAndBlockSize) {
  std::unique_ptr<BlockSource> source = open_bytes(image("block1m"));
  ASSERT_NE(source, nullptr);
  EXPECT_EQ(source->block_size(), kMiB);
  const auto& params = static_cast<const VhdxSource&>(*source).parameters();
  EXPECT_EQ(params.logical_sector_size, 512u);
  EXPECT_EQ(params.chunk_ratio, 4096u);
  EXPECT_EQ(params.payload_blocks, 10u);
  EXPECT_FALSE(params.leave_blocks_allocated);
  std::unique_ptr<BlockSource> fixed = open_bytes(image("fixed"));
  ASSERT_NE(fixed, nullptr);
  EXPECT_TRUE(static_cast<const VhdxSource&>(*fixed).parameters().leave_blocks_allocated);
}

TEST_F(VhdxSourceTest, ReadsAcrossBlockBoundariesAndEdges) {
  for (const char* name : {"block1m", "fixed_block1m", "dynamic"}) {
    SCOPED_TRACE(name);
    std::unique_ptr<BlockSource> source = open_bytes(image(name));
    ASSERT_NE(source, nullptr);
    const std::vector<std::byte>& expected = oracle(name);
    expect_same(*source, expected, 0, 1);
    expect_same(*source, expected, 0, 4096);
    expect_same(*source, expected, kBaseSize - 1, 1);
    expect_same(*source, expected, kBaseSize - 10000, 10000);
    for (uint64_t boundary = kMiB; boundary < kBaseSize; boundary += kMiB) {
      expect_same(*source, expected, boundary - 3001, 6002);
      expect_same(*source, expected, boundary - 1, 2);
      expect_same(*source, expected, boundary, 512);
    }
    expect_same(*source, expected, kMiB / 2, 3 * kMiB);  // spans several whole blocks
    std::vector<std::byte> empty;
    EXPECT_TRUE(source->read_at(kBaseSize, empty).ok());
  }
}

TEST_F(VhdxSourceTest, RandomReadsMatch) {
  std::unique_ptr<BlockSource> source = open_bytes(image("block1m"));
  ASSERT_NE(source, nullptr);
  std::mt19937_64 rng(99);
  for (int i = 0; i < 500; ++i) {
    const uint64_t offset = rng() % kBaseSize;
    const uint64_t length = 1 + rng() % std::min<uint64_t>(kBaseSize - offset, 300000);
    expect_same(*source, oracle("block1m"), offset, length);
  }
}

TEST_F(VhdxSourceTest, ReadPastSizeIsInvalidArgument) {
  std::unique_ptr<BlockSource> source = open_bytes(image("block1m"));
  ASSERT_NE(source, nullptr);
  std::vector<std::byte> out(2);
  EXPECT_EQ(source->read_at(kBaseSize - 1, out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(source->read_at(UINT64_MAX, out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(source->map(kBaseSize).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(VhdxSourceTest, MapAgreesWithAllocation) {
  std::unique_ptr<BlockSource> source = open_bytes(image("block1m"));
  ASSERT_NE(source, nullptr);
  const std::vector<std::byte>& expected = oracle("block1m");
  uint64_t offset = 0;
  std::vector<std::pair<Extent::Kind, uint64_t>> runs;
  while (offset < kBaseSize) {
    Result<Extent> extent = source->map(offset);
    ASSERT_TRUE(extent.ok()) << extent.status().to_string();
    ASSERT_GT(extent->length, 0u);
    ASSERT_LE(extent->length, kBaseSize - offset);
    if (extent->kind == Extent::Kind::kZero) {
      EXPECT_TRUE(std::all_of(expected.begin() + offset, expected.begin() + offset + extent->length,
                              [](std::byte b) { return b == std::byte{0}; }))
          << "zero extent at " << offset << " holds data";
    }
    runs.emplace_back(extent->kind, extent->length);
    offset += extent->length;
  }
  // Blocks 0-1 hold data, 2 is a hole, 3-4 data, 5-7 holes or written zeros, 8 and 9 (the short
  // one) data.
  const std::vector<std::pair<Extent::Kind, uint64_t>> want = {
      {Extent::Kind::kData, 2 * kMiB},
      {Extent::Kind::kZero, kMiB},
      {Extent::Kind::kData, 2 * kMiB},
      {Extent::Kind::kZero, 3 * kMiB},
      {Extent::Kind::kData, kMiB + 7 * 512}};
  EXPECT_EQ(runs, want);
  // A map from the middle of a run reports the rest of it.
  Result<Extent> mid = source->map(2 * kMiB + 5);
  ASSERT_TRUE(mid.ok());
  EXPECT_EQ(mid->kind, Extent::Kind::kZero);
  EXPECT_EQ(mid->length, kMiB - 5);
}

TEST_F(VhdxSourceTest, EveryVariantMapsZerosOnlyWhereQemuReadsZeros) {
  for (const char* name : {"dynamic", "fixed", "block1m_log2m", "fixed_block1m"}) {
    SCOPED_TRACE(name);
    std::unique_ptr<BlockSource> source = open_bytes(image(name));
    ASSERT_NE(source, nullptr);
    const std::vector<std::byte>& expected = oracle(name);
    uint64_t offset = 0;
    while (offset < kBaseSize) {
      Result<Extent> extent = source->map(offset);
      ASSERT_TRUE(extent.ok()) << extent.status().to_string();
      ASSERT_GT(extent->length, 0u);
      ASSERT_LE(extent->length, kBaseSize - offset);
      if (extent->kind == Extent::Kind::kZero) {
        EXPECT_TRUE(std::all_of(expected.begin() + offset,
                                expected.begin() + offset + extent->length,
                                [](std::byte b) { return b == std::byte{0}; }));
      }
      offset += extent->length;
    }
    Result<Extent> first = source->map(0);
    ASSERT_TRUE(first.ok());
    EXPECT_EQ(first->kind, Extent::Kind::kData);
  }
}

TEST_F(VhdxSourceTest, BigDiskWithSectorBitmapEntriesMatchesQemu) {
  std::unique_ptr<BlockSource> source = open_bytes(image("big"));
  ASSERT_NE(source, nullptr);
  ASSERT_EQ(source->size(), kBigSize);
  const auto& params = static_cast<const VhdxSource&>(*source).parameters();
  EXPECT_EQ(params.payload_blocks, 4105u);
  EXPECT_EQ(params.bat_entries, 4106u);
  const int fd = ::open((*dir_ + "/big.out.raw").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  auto oracle_at = [fd](uint64_t offset, uint64_t length) {
    std::vector<std::byte> bytes(length);
    EXPECT_EQ(::pread(fd, bytes.data(), length, static_cast<off_t>(offset)),
              static_cast<ssize_t>(length));
    return bytes;
  };
  auto check = [&](uint64_t offset, uint64_t length) {
    std::vector<std::byte> got(length);
    Status s = source->read_at(offset, got);
    ASSERT_TRUE(s.ok()) << s.to_string();
    ASSERT_TRUE(got == oracle_at(offset, length)) << "mismatch at " << offset;
  };
  // Every data run the oracle has (qemu-img writes a sparse file) plus a margin around it.
  uint64_t data_bytes = 0;
  for (off_t pos = ::lseek(fd, 0, SEEK_DATA); pos >= 0; pos = ::lseek(fd, pos, SEEK_DATA)) {
    const off_t hole = ::lseek(fd, pos, SEEK_HOLE);
    ASSERT_GT(hole, pos);
    const uint64_t start = static_cast<uint64_t>(pos) > 4096 ? pos - 4096 : 0;
    const uint64_t end = std::min<uint64_t>(hole + 4096, kBigSize);
    check(start, end - start);
    data_bytes += hole - pos;
    pos = hole;
  }
  EXPECT_GT(data_bytes, 0u);
  EXPECT_LT(data_bytes, 64 * kMiB);
  // Around the first sector bitmap entry, the end, and random places.
  for (uint64_t block : {4094, 4095, 4096, 4097, 4098, 4100, 4101, 4102, 4104}) {
    check(block * kMiB - 2048, std::min<uint64_t>(4096, kBigSize - (block * kMiB - 2048)));
  }
  check(kBigSize - 4096, 4096);
  std::mt19937_64 rng(5);
  for (int i = 0; i < 200; ++i) {
    const uint64_t offset = rng() % (kBigSize - 70000);
    check(offset, 1 + rng() % 70000);
  }
  // Zero extents read as zeros in the oracle; the map covers the disk.
  uint64_t offset = 0;
  uint64_t zero_bytes = 0;
  int extents = 0;
  while (offset < kBigSize) {
    Result<Extent> extent = source->map(offset);
    ASSERT_TRUE(extent.ok());
    if (extent->kind == Extent::Kind::kZero) {
      zero_bytes += extent->length;
      const off_t next_data = ::lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
      if (next_data >= 0 && static_cast<uint64_t>(next_data) < offset + extent->length) {
        const std::vector<std::byte> bytes =
            oracle_at(next_data, std::min<uint64_t>(offset + extent->length - next_data, kMiB));
        EXPECT_TRUE(
            std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0}; }));
      }
    }
    offset += extent->length;
    ++extents;
  }
  ::close(fd);
  EXPECT_EQ(offset, kBigSize);
  EXPECT_GT(zero_bytes, 4000 * kMiB);
  EXPECT_LT(extents, 40);
}

TEST_F(VhdxSourceTest, ConcurrentReadersMatch) {
  std::unique_ptr<BlockSource> source = open_bytes(image("block1m"));
  ASSERT_NE(source, nullptr);
  const std::vector<std::byte>& expected = oracle("block1m");
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + t);
      for (int i = 0; i < 300; ++i) {
        const uint64_t offset = rng() % kBaseSize;
        const uint64_t length = 1 + rng() % std::min<uint64_t>(kBaseSize - offset, 300000);
        std::vector<std::byte> got(length);
        if (!source->read_at(offset, got).ok() ||
            !std::equal(got.begin(), got.end(), expected.begin() + offset)) {
          ++failures;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(VhdxSourceTest, ColdReadCostsOneDataFetch) {
  auto counting =
      std::make_unique<CountingSource>(std::make_unique<MemorySource>(image("block1m"), "img"));
  const CountingSource* counter = counting.get();
  Result<std::unique_ptr<BlockSource>> source = open_vhdx(std::move(counting), VhdxOptions{});
  ASSERT_TRUE(source.ok()) << source.status().to_string();
  // Identifier + headers + region table in one read, metadata table, BAT.
  EXPECT_LE(counter->reads(), 4u);
  const uint64_t reads = counter->reads();
  const uint64_t bytes = counter->bytes_read();
  std::vector<std::byte> out(4096);
  ASSERT_TRUE((*source)->read_at(3 * kMiB + 100000, out).ok());
  EXPECT_EQ(counter->reads(), reads + 1);
  EXPECT_EQ(counter->bytes_read(), bytes + 4096);
  ASSERT_TRUE((*source)->read_at(2 * kMiB + 100000, out).ok());  // a hole: no fetch
  EXPECT_EQ(counter->reads(), reads + 1);
}

TEST_F(VhdxSourceTest, AdjacentBlocksShareOneLowerRead) {
  auto counting = std::make_unique<CountingSource>(
      std::make_unique<MemorySource>(image("fixed_block1m"), "img"));
  const CountingSource* counter = counting.get();
  Result<std::unique_ptr<BlockSource>> source = open_vhdx(std::move(counting), VhdxOptions{});
  ASSERT_TRUE(source.ok());
  const uint64_t reads = counter->reads();
  // Blocks 0 and 1 are stored one after the other.
  std::vector<std::byte> out(kMiB);
  ASSERT_TRUE((*source)->read_at(kMiB / 2, out).ok());
  EXPECT_EQ(counter->reads(), reads + 1);
  EXPECT_TRUE(std::equal(out.begin(), out.end(), oracle("fixed_block1m").begin() + kMiB / 2));
}

TEST_F(VhdxSourceTest, LowerErrorsPropagate) {
  std::vector<std::byte> bytes = image("block1m");
  const uint64_t size = bytes.size();
  std::unique_ptr<BlockSource> faulty = std::make_unique<FaultySource>(
      std::make_unique<MemorySource>(std::move(bytes), "img"), 4 * kMiB, size);
  Result<std::unique_ptr<BlockSource>> source = open_vhdx(std::move(faulty), VhdxOptions{});
  ASSERT_TRUE(source.ok()) << source.status().to_string();
  // Find a data block stored in the faulty range by reading every data block.
  bool failed = false;
  for (uint64_t offset = 0; offset < kBaseSize; offset += kMiB) {
    std::vector<std::byte> out(512);
    Status s = (*source)->read_at(offset, out);
    if (!s.ok()) {
      EXPECT_EQ(s.code(), StatusCode::kIOError);
      EXPECT_NE(s.message().find("vhdx("), std::string::npos) << s.message();
      failed = true;
    }
  }
  EXPECT_TRUE(failed);
  // A failure while reading the headers fails the open.
  Result<std::unique_ptr<BlockSource>> broken = open_vhdx(
      std::make_unique<FaultySource>(std::make_unique<MemorySource>(image("block1m")), 70000, 1),
      VhdxOptions{});
  EXPECT_EQ(broken.status().code(), StatusCode::kIOError);
}

TEST_F(VhdxSourceTest, ProbeAndChecksum) {
  EXPECT_EQ(probe_vhdx(std::span<const std::byte>(image("dynamic")).first(4096)), 100);
  EXPECT_EQ(probe_vhdx(std::span<const std::byte>(image("dynamic")).first(8)), 100);
  EXPECT_EQ(probe_vhdx(std::span<const std::byte>(image("dynamic")).first(7)), 0);
  EXPECT_EQ(probe_vhdx(std::span<const std::byte>(oracle("dynamic")).first(4096)), 0);
  // qemu's stored header checksum is the CRC-32C this layer computes.
  const std::span<const std::byte> header =
      std::span<const std::byte>(image("dynamic")).subspan(kVhdxHeader1Offset, 4096);
  EXPECT_EQ(vhdx_checksum(header), load_le32(header.data() + 4));
}

TEST_F(VhdxSourceTest, OneDamagedHeaderOrRegionTableIsSurvived) {
  for (uint64_t offset :
       {kVhdxHeader1Offset + 100, kVhdxHeader2Offset + 100, kVhdxRegionTable1Offset + 100}) {
    std::vector<std::byte> bytes = image("block1m");
    bytes[offset] ^= std::byte{0x40};
    std::unique_ptr<BlockSource> source = open_bytes(std::move(bytes));
    ASSERT_NE(source, nullptr) << offset;
    EXPECT_TRUE(read_all(*source) == oracle("block1m"));
  }
}

TEST_F(VhdxSourceTest, BothHeadersBadIsCorruption) {
  std::vector<std::byte> bytes = image("block1m");
  bytes[kVhdxHeader1Offset + 4] ^= std::byte{1};  // the checksums themselves
  bytes[kVhdxHeader2Offset + 4] ^= std::byte{1};
  Status s = open_status(bytes);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("checksum"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("vhdx(img("), std::string::npos) << s.message();
}

TEST_F(VhdxSourceTest, HeaderVersionAndEqualSequenceNumbers) {
  std::vector<std::byte> bytes = image("block1m");
  for (uint64_t h : {kVhdxHeader1Offset, kVhdxHeader2Offset}) {
    bytes[h + 66] = std::byte{2};
    fix_checksum(bytes, h, 4096);
  }
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);

  bytes = image("block1m");
  const uint64_t seq = load_le64(bytes.data() + kVhdxHeader1Offset + 8);
  store_le64(bytes.data() + kVhdxHeader2Offset + 8, seq);
  bytes[kVhdxHeader2Offset + 20] ^= std::byte{1};  // a different FileWriteGuid
  fix_checksum(bytes, kVhdxHeader2Offset, 4096);
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);
}

TEST_F(VhdxSourceTest, BothRegionTablesBadIsCorruption) {
  std::vector<std::byte> bytes = image("block1m");
  bytes[kVhdxRegionTable1Offset + 40] ^= std::byte{1};
  bytes[kVhdxRegionTable2Offset + 40] ^= std::byte{1};
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);

  // A region table with a valid checksum whose BAT region is misaligned.
  bytes = image("block1m");
  for (uint64_t t : {kVhdxRegionTable1Offset, kVhdxRegionTable2Offset}) {
    for (uint32_t i = 0; i < 2; ++i) {
      std::byte* entry = bytes.data() + t + 16 + i * 32;
      store_le64(entry + 16, load_le64(entry + 16) + 4096);
    }
    fix_checksum(bytes, t, kVhdxRegionTableBytes);
  }
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);
}

TEST_F(VhdxSourceTest, UnknownRequiredRegionIsNotSupported) {
  std::vector<std::byte> bytes = image("block1m");
  for (uint64_t t : {kVhdxRegionTable1Offset, kVhdxRegionTable2Offset}) {
    store_le32(bytes.data() + t + 8, 3);
    std::byte* entry = bytes.data() + t + 16 + 2 * 32;
    std::memset(entry, 0x5a, 16);
    store_le64(entry + 16, 64 * kMiB);
    store_le32(entry + 24, kMiB);
    store_le32(entry + 28, 1);  // required
    fix_checksum(bytes, t, kVhdxRegionTableBytes);
  }
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kNotSupported);
}

TEST_F(VhdxSourceTest, BadFileIdentifierIsCorruption) {
  std::vector<std::byte> bytes = image("block1m");
  bytes[0] = std::byte{'V'};
  Status s = open_status(bytes);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("vhdxfile"), std::string::npos);
}

TEST_F(VhdxSourceTest, TruncatedFilesFail) {
  const std::vector<std::byte>& full = image("block1m");
  for (uint64_t length : {uint64_t{0}, uint64_t{8}, uint64_t{100000}, kMiB, 2 * kMiB + 4096,
                          3 * kMiB + 4, static_cast<uint64_t>(full.size()) - kMiB,
                          static_cast<uint64_t>(full.size()) - kMiB + 100}) {
    std::vector<std::byte> bytes(full.begin(), full.begin() + length);
    Result<std::unique_ptr<BlockSource>> source =
        open_vhdx(std::make_unique<MemorySource>(std::move(bytes), "img"), VhdxOptions{});
    EXPECT_FALSE(source.ok()) << "truncated to " << length;
    if (!source.ok()) {
      EXPECT_EQ(source.status().code(), StatusCode::kCorruption) << length;
    }
  }
}

// Rewrites payload entry `block` of the image's BAT.
void set_bat_entry(std::vector<std::byte>& bytes, uint64_t block, uint64_t entry) {
  const Layout layout = layout_of(bytes);
  store_le64(bytes.data() + layout.regions.bat.file_offset + block * 8, entry);
}

TEST_F(VhdxSourceTest, BadBatEntriesAreCorruption) {
  const uint64_t file_mib = image("block1m").size() / kMiB;
  const std::pair<uint64_t, const char*> cases[] = {
      {((file_mib + 5) << 20) | 6, "past the end"},  // FULLY_PRESENT past EOF
      {(uint64_t{1} << 63) | 6, "past the end"},     // huge offset
      {(uint64_t{0} << 20) | 6, "header section"},   // into the header section
      {(uint64_t{2} << 20) | 6, "overlaps"},         // onto the BAT region (qemu puts it at 2 MiB)
      {4, "invalid state"},
      {7, "PARTIALLY_PRESENT"},
  };
  for (const auto& [entry, why] : cases) {
    std::vector<std::byte> bytes = image("block1m");
    set_bat_entry(bytes, 2, entry);
    Status s = open_status(bytes);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << why;
    EXPECT_NE(s.message().find(why), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("BAT entry 2"), std::string::npos) << s.message();
  }
}

TEST_F(VhdxSourceTest, ZeroStatesReadAsZeros) {
  for (uint64_t state : {0, 1, 2, 3, 5}) {
    std::vector<std::byte> bytes = image("block1m");
    set_bat_entry(bytes, 0, (uint64_t{3} << 20) | state);  // offset ignored for these states
    std::unique_ptr<BlockSource> source = open_bytes(std::move(bytes));
    ASSERT_NE(source, nullptr);
    std::vector<std::byte> expected = oracle("block1m");
    std::fill(expected.begin(), expected.begin() + kMiB, std::byte{0});
    EXPECT_TRUE(read_all(*source) == expected) << state;
  }
}

// Sets the LogGuid of both headers (fixing their checksums).
void set_log_guid(std::vector<std::byte>& bytes, const VhdxGuid& guid) {
  for (uint64_t h : {kVhdxHeader1Offset, kVhdxHeader2Offset}) {
    std::memcpy(bytes.data() + h + 48, guid.data(), guid.size());
    fix_checksum(bytes, h, 4096);
  }
}

TEST_F(VhdxSourceTest, LogThatNeedsReplayIsNotSupported) {
  VhdxGuid guid;
  for (size_t i = 0; i < guid.size(); ++i) guid[i] = static_cast<std::byte>(0x11 * (i + 1));
  std::vector<std::byte> bytes = image("block1m");
  const Layout layout = layout_of(bytes);
  ASSERT_GT(layout.header.log_length, 0u);
  set_log_guid(bytes, guid);
  // An active log entry at the start of the log: header, no descriptors, one 4 KiB sector,
  // FlushedFileOffset and LastFileOffset at the end of the file.
  std::byte* entry = bytes.data() + layout.header.log_offset;
  std::memcpy(entry, "loge", 4);
  store_le32(entry + 8, 4096);
  store_le64(entry + 16, 7);
  std::memcpy(entry + 32, guid.data(), guid.size());
  store_le64(entry + 48, bytes.size());
  store_le64(entry + 56, bytes.size());
  fix_checksum(bytes, layout.header.log_offset, 4096);
  // qemu agrees that this log needs replay: it refuses to open the file read-only.
  const std::string forged = *dir_ + "/log_needs_replay.vhdx";
  {
    std::ofstream out(forged, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
  }
  EXPECT_NE(std::system(("qemu-img info -f vhdx " + quote(forged) + " >/dev/null 2>&1").c_str()),
            0);
  Status s = open_status(bytes);
  EXPECT_EQ(s.code(), StatusCode::kNotSupported);
  EXPECT_NE(s.message().find("VHDX log needs replay; open it once with Hyper-V or "
                             "qemu-img check -r all"),
            std::string::npos)
      << s.message();
  EXPECT_TRUE(vhdx_log_needs_replay(
      std::span<const std::byte>(bytes).subspan(layout.header.log_offset, layout.header.log_length),
      guid));

  // An entry of another log (a different GUID) is stale: the image opens.
  std::vector<std::byte> stale = bytes;
  VhdxGuid other = guid;
  other[0] = std::byte{0x99};
  set_log_guid(stale, other);
  std::unique_ptr<BlockSource> source = open_bytes(std::move(stale));
  ASSERT_NE(source, nullptr);
  EXPECT_TRUE(read_all(*source) == oracle("block1m"));
}

TEST_F(VhdxSourceTest, LogGuidWithEmptyLogOpens) {
  VhdxGuid guid;
  guid.fill(std::byte{0x42});
  std::vector<std::byte> bytes = image("block1m");
  set_log_guid(bytes, guid);
  std::unique_ptr<BlockSource> source = open_bytes(std::move(bytes));
  ASSERT_NE(source, nullptr);
  EXPECT_TRUE(read_all(*source) == oracle("block1m"));
}

TEST_F(VhdxSourceTest, LogGuidWithLogOutsideTheFileIsCorruption) {
  VhdxGuid guid;
  guid.fill(std::byte{0x42});
  std::vector<std::byte> bytes = image("block1m");
  for (uint64_t h : {kVhdxHeader1Offset, kVhdxHeader2Offset}) {
    std::memcpy(bytes.data() + h + 48, guid.data(), guid.size());
    store_le64(bytes.data() + h + 72, 1024 * kMiB);
    fix_checksum(bytes, h, 4096);
  }
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);
}

// Points at a metadata item's bytes in the image.
std::byte* item_bytes(std::vector<std::byte>& bytes, const VhdxMetadataItem& item) {
  const Layout layout = layout_of(bytes);
  return bytes.data() + layout.regions.metadata.file_offset + item.offset;
}

TEST_F(VhdxSourceTest, DifferencingDiskIsNotSupported) {
  std::vector<std::byte> bytes = image("block1m");
  const Layout layout = layout_of(bytes);
  std::byte* params = item_bytes(bytes, layout.metadata.file_parameters);
  store_le32(params + 4, load_le32(params + 4) | 2);  // HasParent
  Status s = open_status(bytes);
  EXPECT_EQ(s.code(), StatusCode::kNotSupported);
  EXPECT_NE(s.message().find("differencing"), std::string::npos) << s.message();
}

TEST_F(VhdxSourceTest, LogicalSectorSize4096ReadsTheSame) {
  // With 10 blocks no sector bitmap entry is involved, so only the geometry changes. The size
  // must become a multiple of 4096: cut it to 9 MiB.
  std::vector<std::byte> bytes = image("block1m");
  const Layout layout = layout_of(bytes);
  store_le32(item_bytes(bytes, layout.metadata.logical_sector_size), 4096);
  store_le64(item_bytes(bytes, layout.metadata.virtual_disk_size), 9 * kMiB);
  std::unique_ptr<BlockSource> source = open_bytes(std::move(bytes));
  ASSERT_NE(source, nullptr);
  EXPECT_EQ(static_cast<const VhdxSource&>(*source).parameters().chunk_ratio, 32768u);
  ASSERT_EQ(source->size(), 9 * kMiB);
  EXPECT_TRUE(std::equal(oracle("block1m").begin(), oracle("block1m").begin() + 9 * kMiB,
                         read_all(*source).begin()));
}

TEST_F(VhdxSourceTest, BadMetadataValuesAreCorruption) {
  struct Case {
    const char* what;
    VhdxMetadataItem VhdxMetadataTable::*item;
    uint64_t value;
    bool wide;
  };
  const Case cases[] = {
      {"logical sector size", &VhdxMetadataTable::logical_sector_size, 1000, false},
      {"physical sector size", &VhdxMetadataTable::physical_sector_size, 520, false},
      {"block size", &VhdxMetadataTable::file_parameters, 3 * kMiB, false},
      {"block size", &VhdxMetadataTable::file_parameters, 512 * kMiB, false},
      {"virtual disk size", &VhdxMetadataTable::virtual_disk_size, kBaseSize + 1, true},
      {"virtual disk size", &VhdxMetadataTable::virtual_disk_size, uint64_t{1} << 50, true},
      {"BAT region", &VhdxMetadataTable::virtual_disk_size, uint64_t{1} << 40, true},
  };
  for (const Case& c : cases) {
    std::vector<std::byte> bytes = image("block1m");
    const Layout layout = layout_of(bytes);
    std::byte* p = item_bytes(bytes, layout.metadata.*(c.item));
    if (c.wide) {
      store_le64(p, c.value);
    } else {
      store_le32(p, static_cast<uint32_t>(c.value));
    }
    Status s = open_status(bytes);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << c.what << " " << c.value;
    EXPECT_NE(s.message().find(c.what), std::string::npos) << s.message();
  }
}

TEST_F(VhdxSourceTest, MetadataTableProblems) {
  const std::vector<std::byte>& original = image("block1m");
  const uint64_t table = layout_of(original).regions.metadata.file_offset;
  // Bad signature.
  std::vector<std::byte> bytes = original;
  bytes[table] = std::byte{'M'};
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);
  // An item outside the region.
  bytes = original;
  store_le32(bytes.data() + table + 32 + 16, 0xFFFFF000u);
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);
  // An unknown required item (the first entry's GUID changed, IsRequired set).
  bytes = original;
  std::memset(bytes.data() + table + 32, 0x77, 16);
  store_le32(bytes.data() + table + 32 + 24, 4);
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kNotSupported);
  // A known item listed twice.
  bytes = original;
  const uint16_t count = load_le16(bytes.data() + table + 10);
  std::memcpy(bytes.data() + table + 32 + count * 32, bytes.data() + table + 32, 32);
  bytes[table + 10] = static_cast<std::byte>(count + 1);
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);
  // A required item missing: entry count cut to 0.
  bytes = original;
  bytes[table + 10] = std::byte{0};
  bytes[table + 11] = std::byte{0};
  EXPECT_EQ(open_status(bytes).code(), StatusCode::kCorruption);
}

TEST_F(VhdxSourceTest, PureParsersRejectShortInput) {
  std::vector<std::byte> small(100);
  EXPECT_FALSE(parse_vhdx_header(small).ok());
  EXPECT_FALSE(parse_vhdx_region_table(small).ok());
  EXPECT_FALSE(parse_vhdx_metadata_table(small, kMiB).ok());
  EXPECT_FALSE(select_vhdx_header(small, small).ok());
  EXPECT_FALSE(vhdx_log_needs_replay(small, VhdxGuid{}));
  VhdxDiskParameters params;
  params.block_size = kMiB;
  params.chunk_ratio = 4096;
  params.payload_blocks = 3;
  params.bat_entries = 3;
  params.virtual_disk_size = 3 * kMiB;
  EXPECT_EQ(parse_vhdx_bat(std::span<const std::byte>(small).first(16), params, 100 * kMiB, {})
                .status()
                .code(),
            StatusCode::kCorruption);
  Result<std::vector<uint64_t>> zeros =
      parse_vhdx_bat(std::vector<std::byte>(24), params, 100 * kMiB, {});
  ASSERT_TRUE(zeros.ok());
  EXPECT_EQ(*zeros, std::vector<uint64_t>(3, 0));
}

}  // namespace
}  // namespace imgfs::formats
