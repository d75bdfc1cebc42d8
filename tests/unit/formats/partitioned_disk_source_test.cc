#include "formats/partitioned_disk_source.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "formats/byte_order.h"
#include "formats/disk_layout.h"
#include "formats/memory_source.h"
#include "tests/support/file_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::expect_read;
using testing::FaultySource;
using testing::pattern_bytes;
using testing::read_all;
using testing::read_file;
using testing::run_in;

namespace fs = std::filesystem;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kTiB = kMiB * kMiB;
constexpr uint64_t kSector = 512;
constexpr uint64_t kMaxBytes = std::numeric_limits<uint64_t>::max();
constexpr uint64_t kGptBackupBytes = 33 * kSector;
// Odd on purpose: not a whole number of sectors, so the partition ends in padding.
constexpr uint64_t kOddImageBytes = 3 * kMiB + 777;

std::string with_sbin(const std::string& command) {
  return "PATH=\"$PATH:/usr/sbin:/sbin\"; export PATH; " + command;
}

// A source of any size whose bytes must never be read (for sizes no test can hold).
class HugeSource final : public BlockSource {
 public:
  explicit HugeSource(uint64_t size) : size_(size) {}
  uint64_t size() const override { return size_; }
  Status read_at(uint64_t, std::span<std::byte>) const override {
    return Status::IOError("huge: read");
  }
  std::string describe() const override { return "huge"; }

 private:
  const uint64_t size_;
};

// Pattern bytes whose map() says [zero_begin, zero_end) is a hole (and reads zeros there).
class HoleySource final : public BlockSource {
 public:
  HoleySource(uint64_t size, uint64_t zero_begin, uint64_t zero_end)
      : bytes_(pattern_bytes(size, 11)), zero_begin_(zero_begin), zero_end_(zero_end) {
    std::fill(bytes_.begin() + zero_begin, bytes_.begin() + zero_end, std::byte{0});
  }
  uint64_t size() const override { return bytes_.size(); }
  Status read_at(uint64_t offset, std::span<std::byte> out) const override {
    if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
    std::memcpy(out.data(), bytes_.data() + offset, out.size());
    return Status::OK();
  }
  std::string describe() const override { return "holey"; }
  uint32_t block_size() const override { return 4096; }
  Result<Extent> map(uint64_t offset) const override {
    if (offset < zero_begin_) return Extent{Extent::Kind::kData, zero_begin_ - offset};
    if (offset < zero_end_) return Extent{Extent::Kind::kZero, zero_end_ - offset};
    return Extent{Extent::Kind::kData, size() - offset};
  }
  const std::vector<std::byte>& bytes() const { return bytes_; }

 private:
  std::vector<std::byte> bytes_;
  const uint64_t zero_begin_;
  const uint64_t zero_end_;
};

std::unique_ptr<BlockSource> open_or_die(std::unique_ptr<BlockSource> image,
                                         const PartitionedDiskOptions& options) {
  Result<std::unique_ptr<BlockSource>> disk = open_partitioned_disk(std::move(image), options);
  EXPECT_TRUE(disk.ok()) << disk.status().to_string();
  return disk.ok() ? std::move(*disk) : nullptr;
}

const PartitionedDiskPlan& plan_of(const BlockSource& disk) {
  return dynamic_cast<const PartitionedDiskSource&>(disk).plan();
}

// The disk built by hand from its pieces: tables, image, zeros.
std::vector<std::byte> reference_disk(const std::vector<std::byte>& image,
                                      const PartitionedDiskPlan& plan) {
  std::vector<std::byte> disk(plan.disk_bytes);
  const std::vector<std::byte> primary = build_primary_table(plan);
  const std::vector<std::byte> backup = build_backup_table(plan);
  std::copy(primary.begin(), primary.end(), disk.begin());
  std::copy(image.begin(), image.end(), disk.begin() + kPartitionOffsetBytes);
  std::copy(backup.begin(), backup.end(), disk.end() - static_cast<ptrdiff_t>(backup.size()));
  return disk;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& path, const std::vector<std::byte>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// One temp folder per test process, with an ext4 partition image made by mkfs.ext4.
class ToolFixture {
 public:
  static ToolFixture& get() {
    static ToolFixture fixture;
    return fixture;
  }
  bool have(const std::string& tool) const { return run_in(dir_, with_sbin("command -v " + tool)); }
  // Runs `command` in the folder with sbin on PATH, its stdout into `output` (a file name).
  bool run(const std::string& command, const std::string& output = "") const {
    if (output.empty()) return run_in(dir_, with_sbin(command));
    const std::string line =
        "cd '" + dir_.string() + "' && " + with_sbin(command) + " >" + output + " 2>&1";
    return std::system(line.c_str()) == 0;
  }
  const fs::path& dir() const { return dir_; }

  // 6 MiB + 12 KiB of ext4 (made once).
  const std::vector<std::byte>& ext4_image() {
    if (ext4_.empty()) {
      EXPECT_TRUE(run("truncate -s 6303744 part.img && mkfs.ext4 -q -F -b 4096 part.img"));
      ext4_ = read_file(dir_ / "part.img");
    }
    return ext4_;
  }

 private:
  ToolFixture() {
    dir_ = fs::path(::testing::TempDir()) /
           ("imgfs_partitioned_disk_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  ~ToolFixture() { fs::remove_all(dir_); }

  fs::path dir_;
  std::vector<std::byte> ext4_;
};

// Writes the whole synthesized disk to `name` and checks it with sfdisk, blkid and e2fsck; returns
// sfdisk's dump of the table.
std::string check_with_tools(const BlockSource& disk, const std::vector<std::byte>& image,
                             const std::string& name) {
  ToolFixture& tools = ToolFixture::get();
  const std::vector<std::byte> bytes = read_all(disk);
  EXPECT_EQ(bytes.size(), disk.size());
  EXPECT_EQ(disk.size() % kMiB, 0u);
  EXPECT_TRUE(std::equal(image.begin(), image.end(), bytes.begin() + kPartitionOffsetBytes))
      << "the partition bytes at 1 MiB differ from the image";
  write_file(tools.dir() / name, bytes);
  EXPECT_TRUE(tools.run("sfdisk -d " + name, name + ".dump"))
      << read_text(tools.dir() / (name + ".dump"));
  EXPECT_TRUE(tools.run("sfdisk -V " + name, name + ".verify"))
      << read_text(tools.dir() / (name + ".verify"));
  EXPECT_NE(read_text(tools.dir() / (name + ".verify")).find("No errors detected"),
            std::string::npos)
      << read_text(tools.dir() / (name + ".verify"));
  EXPECT_TRUE(tools.run("fdisk -l " + name, name + ".fdisk"));
  const std::string fdisk = read_text(tools.dir() / (name + ".fdisk"));
  EXPECT_EQ(fdisk.find("corrupt"), std::string::npos) << fdisk;
  EXPECT_EQ(fdisk.find("mismatch"), std::string::npos) << fdisk;
  EXPECT_EQ(fdisk.find("does not start on physical sector boundary"), std::string::npos) << fdisk;
  if (tools.have("blkid")) {
    EXPECT_TRUE(tools.run("blkid -p -O 1048576 -o value -s TYPE " + name, name + ".blkid"));
    EXPECT_EQ(read_text(tools.dir() / (name + ".blkid")), "ext4\n");
  }
  if (tools.have("e2fsck")) {
    EXPECT_TRUE(tools.run("e2fsck -fn '" + name + "?offset=1048576'", name + ".fsck"))
        << read_text(tools.dir() / (name + ".fsck"));
  }
  if (tools.have("sgdisk") && plan_of(disk).table == PartitionTable::kGpt) {
    EXPECT_TRUE(tools.run("sgdisk -v " + name, name + ".sgdisk"))
        << read_text(tools.dir() / (name + ".sgdisk"));
    EXPECT_NE(read_text(tools.dir() / (name + ".sgdisk")).find("No problems found"),
              std::string::npos);
  }
  Result<DiskLayout> layout = detect_disk_layout(disk);
  EXPECT_TRUE(layout.ok() && layout->kind == DiskLayoutKind::kDisk);
  return read_text(tools.dir() / (name + ".dump"));
}

void expect_contains(const std::string& text, const std::string& part) {
  EXPECT_NE(text.find(part), std::string::npos) << "no \"" << part << "\" in:\n" << text;
}

std::string sfdisk_number(uint64_t n) {
  char padded[32];
  std::snprintf(padded, sizeof(padded), "%12llu", static_cast<unsigned long long>(n));
  return padded;
}

class PartitionedDiskToolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ToolFixture& tools = ToolFixture::get();
    for (const char* tool : {"sfdisk", "fdisk", "mkfs.ext4"}) {
      if (!tools.have(tool)) GTEST_SKIP() << tool << " is not installed";
    }
  }
};

TEST_F(PartitionedDiskToolTest, MbrDiskAroundExt4PassesSfdisk) {
  const std::vector<std::byte>& image = ToolFixture::get().ext4_image();
  std::unique_ptr<BlockSource> disk =
      open_or_die(std::make_unique<MemorySource>(image), {.name = "bucket/ext4.img"});
  ASSERT_NE(disk, nullptr);
  const PartitionedDiskPlan& plan = plan_of(*disk);
  EXPECT_EQ(plan.table, PartitionTable::kMbr);
  EXPECT_EQ(disk->size(), 8 * kMiB);
  EXPECT_EQ(disk->describe(), "mbr_disk(memory(6303744 bytes))");
  const std::string dump = check_with_tools(*disk, image, "mbr.img");
  expect_contains(dump, "label: dos");
  char signature[32];
  std::snprintf(signature, sizeof(signature), "label-id: 0x%08x", plan.mbr_signature);
  expect_contains(dump, signature);
  expect_contains(dump, "mbr.img1 : start=" + sfdisk_number(2048) +
                            ", size=" + sfdisk_number(image.size() / kSector) + ", type=83\n");
}

TEST_F(PartitionedDiskToolTest, GptDiskAroundExt4PassesSfdisk) {
  const std::vector<std::byte>& image = ToolFixture::get().ext4_image();
  std::unique_ptr<BlockSource> disk =
      open_or_die(std::make_unique<MemorySource>(image),
                  {.name = "bucket/ext4.img", .table = PartitionTable::kGpt});
  ASSERT_NE(disk, nullptr);
  const PartitionedDiskPlan& plan = plan_of(*disk);
  EXPECT_EQ(plan.table, PartitionTable::kGpt);
  EXPECT_EQ(disk->size(), 8 * kMiB);  // the backup fits in the padding
  EXPECT_EQ(disk->describe(), "gpt_disk(memory(6303744 bytes))");
  const std::string dump = check_with_tools(*disk, image, "gpt.img");
  expect_contains(dump, "label: gpt");
  expect_contains(dump, "label-id: " + guid_string(plan.disk_guid));
  expect_contains(dump, "first-lba: 34\n");
  expect_contains(dump, "last-lba: " + std::to_string(disk->size() / kSector - 34) + "\n");
  expect_contains(dump, "gpt.img1 : start=" + sfdisk_number(2048) +
                            ", size=" + sfdisk_number(image.size() / kSector) +
                            ", type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=" +
                            guid_string(plan.partition_guid) + ", name=\"Linux filesystem\"\n");
}

// The backup does not fit after the image: GPT takes one more MiB, MBR does not.
TEST_F(PartitionedDiskToolTest, GptBackupInAnExtraMebibyte) {
  ToolFixture& tools = ToolFixture::get();
  ASSERT_TRUE(tools.run("truncate -s 7M full.img && mkfs.ext4 -q -F -b 4096 full.img"));
  const std::vector<std::byte> image = read_file(tools.dir() / "full.img");
  std::unique_ptr<BlockSource> gpt = open_or_die(std::make_unique<MemorySource>(image),
                                                 {.name = "full", .table = PartitionTable::kGpt});
  std::unique_ptr<BlockSource> mbr =
      open_or_die(std::make_unique<MemorySource>(image), {.name = "full"});
  ASSERT_NE(gpt, nullptr);
  ASSERT_NE(mbr, nullptr);
  EXPECT_EQ(mbr->size(), 8 * kMiB);
  EXPECT_EQ(gpt->size(), 9 * kMiB);
  check_with_tools(*gpt, image, "full_gpt.img");
  check_with_tools(*mbr, image, "full_mbr.img");
}

TEST_F(PartitionedDiskToolTest, BootableFlagShowsInSfdisk) {
  const std::vector<std::byte>& image = ToolFixture::get().ext4_image();
  std::unique_ptr<BlockSource> mbr =
      open_or_die(std::make_unique<MemorySource>(image), {.name = "boot", .bootable = true});
  std::unique_ptr<BlockSource> gpt =
      open_or_die(std::make_unique<MemorySource>(image),
                  {.name = "boot", .table = PartitionTable::kGpt, .bootable = true});
  ASSERT_NE(mbr, nullptr);
  ASSERT_NE(gpt, nullptr);
  expect_contains(check_with_tools(*mbr, image, "boot_mbr.img"), "type=83, bootable\n");
  expect_contains(check_with_tools(*gpt, image, "boot_gpt.img"), "attrs=\"LegacyBIOSBootable\"");
}

class PartitionedDiskReadTest : public ::testing::TestWithParam<PartitionTable> {};

TEST_P(PartitionedDiskReadTest, ReadsMatchTheReference) {
  const std::vector<std::byte> image = pattern_bytes(kOddImageBytes, 5);
  std::unique_ptr<BlockSource> disk =
      open_or_die(std::make_unique<MemorySource>(image), {.name = "odd", .table = GetParam()});
  ASSERT_NE(disk, nullptr);
  const PartitionedDiskPlan& plan = plan_of(*disk);
  EXPECT_EQ(plan.partition_first_lba, 2048u);
  EXPECT_EQ(plan.partition_sectors, (kOddImageBytes + kSector - 1) / kSector);
  EXPECT_EQ(disk->size(), 5 * kMiB);
  const std::vector<std::byte> reference = reference_disk(image, plan);
  EXPECT_EQ(read_all(*disk), reference);

  const uint64_t image_end = kPartitionOffsetBytes + kOddImageBytes;
  const uint64_t backup_start = disk->size() - kGptBackupBytes;
  for (uint64_t boundary : {uint64_t{0}, kSector, 34 * kSector, kPartitionOffsetBytes, image_end,
                            kPartitionOffsetBytes + plan.partition_sectors * kSector, backup_start,
                            backup_start + 32 * kSector, disk->size()}) {
    for (uint64_t before : {0, 1, 7, 512, 5000}) {
      for (uint64_t after : {0, 1, 9, 512, 70000}) {
        const uint64_t begin = boundary >= before ? boundary - before : 0;
        const uint64_t end = std::min(boundary + after, disk->size());
        if (end > begin) expect_read(*disk, reference, begin, end - begin);
      }
    }
  }
  expect_read(*disk, reference, disk->size() - 1, 1);
  expect_read(*disk, reference, 0, disk->size());

  std::mt19937_64 random(42);
  for (int i = 0; i < 500; ++i) {
    const uint64_t offset = random() % disk->size();
    const uint64_t length = std::min<uint64_t>(1 + random() % 300000, disk->size() - offset);
    expect_read(*disk, reference, offset, length);
  }
}

TEST_P(PartitionedDiskReadTest, ConcurrentReaders) {
  const std::vector<std::byte> image = pattern_bytes(kOddImageBytes, 6);
  std::unique_ptr<BlockSource> disk =
      open_or_die(std::make_unique<MemorySource>(image), {.name = "threads", .table = GetParam()});
  ASSERT_NE(disk, nullptr);
  const std::vector<std::byte> reference = reference_disk(image, plan_of(*disk));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 random(100 + t);
      for (int i = 0; i < 300; ++i) {
        // Mostly around the image's start and end, where regions meet.
        const uint64_t centre =
            (i % 2 == 0) ? kPartitionOffsetBytes : kPartitionOffsetBytes + kOddImageBytes;
        const uint64_t offset = centre - 40000 + random() % 80000;
        const uint64_t length = 1 + random() % 65536;
        std::vector<std::byte> out(length);
        if (!disk->read_at(offset, out).ok() ||
            !std::equal(out.begin(), out.end(), reference.begin() + offset)) {
          ++mismatches;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// map(): table regions are data, the image forwards its own runs (clipped), the rest is zeros,
// and every zero run reads as zeros.
TEST_P(PartitionedDiskReadTest, MapFollowsRegionsAndTheImage) {
  auto holey = std::make_unique<HoleySource>(kOddImageBytes, 65536, 2 * kMiB + 3);
  const std::vector<std::byte> image = holey->bytes();
  std::unique_ptr<BlockSource> disk =
      open_or_die(std::move(holey), {.name = "map", .table = GetParam()});
  ASSERT_NE(disk, nullptr);
  EXPECT_EQ(disk->block_size(), 4096u);
  const PartitionedDiskPlan& plan = plan_of(*disk);
  const std::vector<std::byte> reference = reference_disk(image, plan);
  const uint64_t table_bytes = plan.table == PartitionTable::kMbr ? kSector : 34 * kSector;
  std::vector<std::pair<Extent::Kind, uint64_t>> runs;  // (kind, start)
  uint64_t offset = 0;
  while (offset < disk->size()) {
    Result<Extent> extent = disk->map(offset);
    ASSERT_TRUE(extent.ok()) << extent.status().to_string();
    ASSERT_GT(extent->length, 0u);
    ASSERT_LE(extent->length, disk->size() - offset);
    if (extent->kind == Extent::Kind::kZero) {
      EXPECT_TRUE(std::all_of(reference.begin() + offset,
                              reference.begin() + offset + extent->length,
                              [](std::byte b) { return b == std::byte{0}; }))
          << "zero run at " << offset;
    }
    runs.push_back({extent->kind, offset});
    offset += extent->length;
  }
  using K = Extent::Kind;
  std::vector<std::pair<K, uint64_t>> expected = {
      {K::kData, 0},
      {K::kZero, table_bytes},
      {K::kData, kPartitionOffsetBytes},
      {K::kZero, kPartitionOffsetBytes + 65536},
      {K::kData, kPartitionOffsetBytes + 2 * kMiB + 3},
      {K::kZero, kPartitionOffsetBytes + kOddImageBytes}};
  if (plan.table == PartitionTable::kGpt) {
    expected.push_back({K::kData, disk->size() - kGptBackupBytes});
  }
  EXPECT_EQ(runs, expected);
  // A map in the middle of a run starts there.
  Result<Extent> middle = disk->map(kPartitionOffsetBytes + 100000);
  ASSERT_TRUE(middle.ok());
  EXPECT_EQ(middle->kind, K::kZero);
  EXPECT_EQ(middle->length, 2 * kMiB + 3 - 100000);
  EXPECT_FALSE(disk->map(disk->size()).ok());
}

INSTANTIATE_TEST_SUITE_P(Tables, PartitionedDiskReadTest,
                         ::testing::Values(PartitionTable::kMbr, PartitionTable::kGpt),
                         [](const ::testing::TestParamInfo<PartitionTable>& info) {
                           return info.param == PartitionTable::kMbr ? "Mbr" : "Gpt";
                         });

TEST(PartitionedDisk, PlanSizesAtTheEdges) {
  struct Case {
    uint64_t image_bytes;
    PartitionTable table;
    PartitionTable chosen;
    uint64_t disk_bytes;
  };
  const Case cases[] = {
      {1, PartitionTable::kAuto, PartitionTable::kMbr, 2 * kMiB},
      {kMiB, PartitionTable::kAuto, PartitionTable::kMbr, 2 * kMiB},
      {kMiB + 1, PartitionTable::kAuto, PartitionTable::kMbr, 3 * kMiB},
      {kMiB - kGptBackupBytes, PartitionTable::kGpt, PartitionTable::kGpt, 2 * kMiB},
      {kMiB - kGptBackupBytes + 1, PartitionTable::kGpt, PartitionTable::kGpt, 3 * kMiB},
      {kMiB, PartitionTable::kGpt, PartitionTable::kGpt, 3 * kMiB},
      // The largest MBR disk is 2^21 - 1 MiB (its sector count must fit 32 bits).
      {2 * kTiB - 2 * kMiB, PartitionTable::kAuto, PartitionTable::kMbr, 2 * kTiB - kMiB},
      {2 * kTiB - 2 * kMiB + 1, PartitionTable::kAuto, PartitionTable::kGpt, 2 * kTiB},
      {3 * kTiB, PartitionTable::kAuto, PartitionTable::kGpt, 3 * kTiB + 2 * kMiB},
      // The largest image whose disk size still fits 64 bits.
      {kMaxBytes - 3 * kMiB + 1, PartitionTable::kAuto, PartitionTable::kGpt, kMaxBytes - kMiB + 1},
  };
  for (const Case& c : cases) {
    Result<PartitionedDiskPlan> plan =
        plan_partitioned_disk(c.image_bytes, {.name = "edge", .table = c.table});
    ASSERT_TRUE(plan.ok()) << c.image_bytes << ": " << plan.status().to_string();
    EXPECT_EQ(plan->table, c.chosen) << c.image_bytes;
    EXPECT_EQ(plan->disk_bytes, c.disk_bytes) << c.image_bytes;
    EXPECT_EQ(plan->partition_sectors, (c.image_bytes + kSector - 1) / kSector);
  }
}

TEST(PartitionedDisk, BadOptionsAndSizesAreRefused) {
  Result<std::unique_ptr<BlockSource>> null_image = open_partitioned_disk(nullptr, {});
  ASSERT_FALSE(null_image.ok());
  EXPECT_EQ(null_image.status().code(), StatusCode::kInvalidArgument);

  Result<std::unique_ptr<BlockSource>> empty =
      open_partitioned_disk(std::make_unique<MemorySource>(std::vector<std::byte>{}), {});
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(empty.status().message().find("empty"), std::string::npos);

  const uint64_t max = kMaxBytes;
  for (uint64_t size : {max, max - 511, max - kMiB, max - 2 * kMiB + 1}) {
    Result<std::unique_ptr<BlockSource>> overflow =
        open_partitioned_disk(std::make_unique<HugeSource>(size), {});
    ASSERT_FALSE(overflow.ok()) << size;
    EXPECT_EQ(overflow.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(overflow.status().message().find("overflows"), std::string::npos)
        << overflow.status().to_string();
  }

  Result<std::unique_ptr<BlockSource>> mbr_too_big = open_partitioned_disk(
      std::make_unique<HugeSource>(3 * kTiB), {.name = "huge", .table = PartitionTable::kMbr});
  ASSERT_FALSE(mbr_too_big.ok());
  EXPECT_EQ(mbr_too_big.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(mbr_too_big.status().message().find("MBR"), std::string::npos);
}

// A disk past MBR's reach gets GPT; its tables read without touching the image, and every
// header field and CRC is as the UEFI spec says.
TEST(PartitionedDisk, HugeImageGetsACheckedGpt) {
  Result<std::unique_ptr<BlockSource>> opened =
      open_partitioned_disk(std::make_unique<HugeSource>(3 * kTiB + 5), {.name = "huge"});
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  const BlockSource& disk = **opened;
  const uint64_t last_lba = disk.size() / kSector - 1;

  std::vector<std::byte> primary(34 * kSector);
  ASSERT_TRUE(disk.read_at(0, primary).ok());
  EXPECT_EQ(std::to_integer<int>(primary[446 + 4]), 0xEE);
  EXPECT_EQ(load_le32(primary.data() + 446 + 8), 1u);
  EXPECT_EQ(load_le32(primary.data() + 446 + 12), 0xFFFFFFFFu);
  std::vector<std::byte> backup(33 * kSector);
  ASSERT_TRUE(disk.read_at(disk.size() - backup.size(), backup).ok());

  auto check_header = [&](const std::byte* header, const std::byte* entries, uint64_t my_lba,
                          uint64_t alternate_lba, uint64_t entries_lba) {
    EXPECT_EQ(std::memcmp(header, "EFI PART", 8), 0);
    EXPECT_EQ(load_le64(header + 24), my_lba);
    EXPECT_EQ(load_le64(header + 32), alternate_lba);
    EXPECT_EQ(load_le64(header + 40), 34u);
    EXPECT_EQ(load_le64(header + 48), last_lba - 33);
    EXPECT_EQ(load_le64(header + 72), entries_lba);
    std::vector<std::byte> copy(header, header + 92);
    store_le32(copy.data() + 16, 0);
    EXPECT_EQ(load_le32(header + 16), crc32(0, reinterpret_cast<const Bytef*>(copy.data()), 92));
    EXPECT_EQ(load_le32(header + 88), crc32(0, reinterpret_cast<const Bytef*>(entries), 16384));
    EXPECT_EQ(load_le64(entries + 32), 2048u);
    EXPECT_EQ(load_le64(entries + 40), 2048u + (3 * kTiB + 5 + kSector - 1) / kSector - 1);
  };
  check_header(primary.data() + kSector, primary.data() + 2 * kSector, 1, last_lba, 2);
  check_header(backup.data() + 32 * kSector, backup.data(), last_lba, 1, last_lba - 32);

  // The padding after the image reads as zeros; the image itself reaches the lower source.
  std::vector<std::byte> padding(4096);
  ASSERT_TRUE(disk.read_at(kPartitionOffsetBytes + 3 * kTiB + 5, padding).ok());
  EXPECT_TRUE(
      std::all_of(padding.begin(), padding.end(), [](std::byte b) { return b == std::byte{0}; }));
  Status lower = disk.read_at(kPartitionOffsetBytes + kTiB, padding);
  EXPECT_EQ(lower.code(), StatusCode::kIOError);
  EXPECT_NE(lower.message().find("gpt_disk(huge)"), std::string::npos) << lower.to_string();
}

TEST(PartitionedDisk, ErrorsAndRangeChecks) {
  std::unique_ptr<BlockSource> disk = open_or_die(
      std::make_unique<FaultySource>(testing::pattern_source(kOddImageBytes), kMiB, 10), {});
  ASSERT_NE(disk, nullptr);
  std::vector<std::byte> out(4096);
  EXPECT_TRUE(disk->read_at(0, out).ok());
  EXPECT_TRUE(disk->read_at(kPartitionOffsetBytes + kMiB - 4096, out).ok());
  EXPECT_EQ(disk->read_at(kPartitionOffsetBytes + kMiB - 10, out).code(), StatusCode::kIOError);
  EXPECT_EQ(disk->read_at(disk->size() - 4095, out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(disk->read_at(std::numeric_limits<uint64_t>::max() - 10, out).code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(disk->read_at(disk->size(), std::span<std::byte>()).ok());
}

TEST(PartitionedDisk, IdentityComesFromTheName) {
  Result<PartitionedDiskPlan> a = plan_partitioned_disk(kMiB, {.name = "bucket/a.img"});
  Result<PartitionedDiskPlan> a_again =
      plan_partitioned_disk(5 * kMiB, {.name = "bucket/a.img", .table = PartitionTable::kGpt});
  Result<PartitionedDiskPlan> b = plan_partitioned_disk(kMiB, {.name = "bucket/b.img"});
  ASSERT_TRUE(a.ok() && a_again.ok() && b.ok());
  EXPECT_EQ(a->disk_guid, a_again->disk_guid);
  EXPECT_EQ(a->partition_guid, a_again->partition_guid);
  EXPECT_EQ(a->mbr_signature, a_again->mbr_signature);
  EXPECT_NE(a->disk_guid, b->disk_guid);
  EXPECT_NE(a->partition_guid, b->partition_guid);
  EXPECT_NE(a->disk_guid, a->partition_guid);
  EXPECT_NE(a->mbr_signature, 0u);
  // RFC 4122 version 5, variant 10xx.
  EXPECT_EQ(std::to_integer<int>(a->disk_guid[6]) >> 4, 5);
  EXPECT_EQ(std::to_integer<int>(a->disk_guid[8]) >> 6, 2);
  EXPECT_EQ(guid_string(a->disk_guid).size(), 36u);
  EXPECT_EQ(guid_string(a->disk_guid)[14], '5');
}

}  // namespace
}  // namespace imgfs::formats
