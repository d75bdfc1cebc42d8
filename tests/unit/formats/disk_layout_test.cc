#include "formats/disk_layout.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "formats/byte_order.h"
#include "formats/memory_source.h"
#include "tests/support/file_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::CountingSource;
using testing::FaultySource;
using testing::pattern_bytes;
using testing::read_file;
using testing::run_in;

namespace fs = std::filesystem;

constexpr uint64_t kMiB = 1024 * 1024;

// Partitioning and mkfs tools live in sbin, which a test's PATH may lack.
std::string with_sbin(const std::string& command) {
  return "PATH=\"$PATH:/usr/sbin:/sbin\"; export PATH; " + command;
}

// A fresh temp folder per test.
class DiskLayoutTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("imgfs_disk_layout_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  bool have(const std::string& tool) { return run_in(dir_, with_sbin("command -v " + tool)); }

  // An all-zero file of `size` bytes, then `command` run on it; its layout.
  DiskLayout layout_after(uint64_t size, const std::string& command) {
    EXPECT_TRUE(run_in(dir_, "truncate -s " + std::to_string(size) + " img"));
    EXPECT_TRUE(run_in(dir_, with_sbin(command))) << command;
    MemorySource image(read_file(dir_ / "img"));
    Result<DiskLayout> layout = detect_disk_layout(image);
    EXPECT_TRUE(layout.ok()) << layout.status().to_string();
    return layout.ok() ? *layout : DiskLayout{};
  }

  fs::path dir_;
};

void expect_layout(const DiskLayout& layout, DiskLayoutKind kind, const std::string& name) {
  EXPECT_EQ(disk_layout_kind_name(layout.kind), disk_layout_kind_name(kind));
  EXPECT_EQ(layout.name, name);
}

std::vector<std::byte> zeros(uint64_t size) { return std::vector<std::byte>(size); }

void put(std::vector<std::byte>& bytes, uint64_t offset, std::string_view text) {
  std::memcpy(bytes.data() + offset, text.data(), text.size());
}

void put_u8(std::vector<std::byte>& bytes, uint64_t offset, uint8_t value) {
  bytes[offset] = std::byte{value};
}

void put_le16(std::vector<std::byte>& bytes, uint64_t offset, uint16_t value) {
  bytes[offset] = static_cast<std::byte>(value);
  bytes[offset + 1] = static_cast<std::byte>(value >> 8);
}

void put_boot_signature(std::vector<std::byte>& bytes) {
  put_u8(bytes, 510, 0x55);
  put_u8(bytes, 511, 0xAA);
}

// One MBR entry: boot indicator, type, start LBA and sector count.
void put_mbr_entry(std::vector<std::byte>& bytes, int index, uint8_t status, uint8_t type,
                   uint32_t start, uint32_t count) {
  const uint64_t entry = 446 + 16 * index;
  put_u8(bytes, entry, status);
  put_u8(bytes, entry + 4, type);
  store_le32(bytes.data() + entry + 8, start);
  store_le32(bytes.data() + entry + 12, count);
}

// A FAT boot sector as mkfs.fat writes it: jump, BPB, type string, 0x55AA.
std::vector<std::byte> fat_boot_sector(bool fat32) {
  std::vector<std::byte> bytes = zeros(64 * 1024);
  put_u8(bytes, 0, 0xEB);
  put_u8(bytes, 1, fat32 ? 0x58 : 0x3C);
  put_u8(bytes, 2, 0x90);
  put(bytes, 3, "mkfs.fat");
  put_le16(bytes, 11, 512);  // bytes per sector
  put_u8(bytes, 13, 4);      // sectors per cluster
  put_le16(bytes, 14, fat32 ? 32 : 4);
  put_u8(bytes, 16, 2);  // FATs
  put_u8(bytes, 21, 0xF8);
  if (fat32) {
    store_le32(bytes.data() + 32, 2 * 1024 * 1024);
    store_le32(bytes.data() + 36, 4000);
    put(bytes, 82, "FAT32   ");
  } else {
    put_le16(bytes, 17, 512);  // root entries
    put_le16(bytes, 19, 32768);
    put_le16(bytes, 22, 32);
    put(bytes, 54, "FAT16   ");
  }
  put_boot_signature(bytes);
  return bytes;
}

TEST_F(DiskLayoutTest, Ext4FromMkfs) {
  if (!have("mkfs.ext4")) GTEST_SKIP() << "mkfs.ext4 is not installed";
  expect_layout(layout_after(8 * kMiB, "mkfs.ext4 -q -F img"), DiskLayoutKind::kPartition, "ext4");
}

TEST_F(DiskLayoutTest, Ext3AndExt2FromMke2fs) {
  if (!have("mke2fs")) GTEST_SKIP() << "mke2fs is not installed";
  expect_layout(layout_after(8 * kMiB, "mke2fs -q -F -t ext3 img"), DiskLayoutKind::kPartition,
                "ext3");
  expect_layout(layout_after(8 * kMiB, "mke2fs -q -F -t ext2 img"), DiskLayoutKind::kPartition,
                "ext2");
}

TEST_F(DiskLayoutTest, SwapFromMkswap) {
  if (!have("mkswap")) GTEST_SKIP() << "mkswap is not installed";
  expect_layout(layout_after(4 * kMiB, "mkswap img"), DiskLayoutKind::kPartition, "swap");
}

TEST_F(DiskLayoutTest, VfatFromMkfs) {
  if (!have("mkfs.vfat")) GTEST_SKIP() << "mkfs.vfat is not installed";
  expect_layout(layout_after(8 * kMiB, "mkfs.vfat img"), DiskLayoutKind::kPartition, "vfat");
}

TEST_F(DiskLayoutTest, MbrFromSfdisk) {
  if (!have("sfdisk")) GTEST_SKIP() << "sfdisk is not installed";
  expect_layout(layout_after(8 * kMiB, "echo 'start=2048, type=83' | sfdisk -q img"),
                DiskLayoutKind::kDisk, "mbr");
}

TEST_F(DiskLayoutTest, GptFromSfdisk) {
  if (!have("sfdisk")) GTEST_SKIP() << "sfdisk is not installed";
  expect_layout(layout_after(8 * kMiB, "echo 'start=2048, type=L' | sfdisk -q -X gpt img"),
                DiskLayoutKind::kDisk, "gpt");
}

// A whole disk whose first partition holds ext4 is a disk, whatever the gap after the MBR holds.
TEST_F(DiskLayoutTest, MbrDiskWithExt4PartitionIsADisk) {
  if (!have("sfdisk") || !have("mkfs.ext4")) GTEST_SKIP() << "sfdisk or mkfs.ext4 is missing";
  const std::string command =
      "echo 'start=2048, type=83' | sfdisk -q img && "
      "mkfs.ext4 -q -F -E offset=1048576 img 7M";
  expect_layout(layout_after(8 * kMiB, command), DiskLayoutKind::kDisk, "mbr");
}

// A FAT volume ends its boot sector in 0x55AA like an MBR; it must still read as a partition.
TEST(DiskLayout, FatBootSectorsAreNotMbrs) {
  expect_layout(classify_disk_layout(fat_boot_sector(false)), DiskLayoutKind::kPartition, "vfat");
  expect_layout(classify_disk_layout(fat_boot_sector(true)), DiskLayoutKind::kPartition, "vfat");
}

// Boot code that happens to look like a partition table does not turn a FAT volume into a disk.
TEST(DiskLayout, FatWithTableLikeBootCodeIsStillFat) {
  std::vector<std::byte> bytes = fat_boot_sector(true);
  put_mbr_entry(bytes, 0, 0x80, 0x0C, 63, 100000);
  expect_layout(classify_disk_layout(bytes), DiskLayoutKind::kPartition, "vfat");
}

// An MBR boot sector with a FAT-like jump but no valid BPB (GRUB's boot.img) stays an MBR.
TEST(DiskLayout, MbrWithJumpButNoBpbIsAnMbr) {
  std::vector<std::byte> bytes = zeros(64 * 1024);
  put_u8(bytes, 0, 0xEB);
  put_u8(bytes, 1, 0x63);
  put_u8(bytes, 2, 0x90);
  put_mbr_entry(bytes, 0, 0x80, 0x83, 2048, 20480);
  put_boot_signature(bytes);
  expect_layout(classify_disk_layout(bytes), DiskLayoutKind::kDisk, "mbr");
}

TEST(DiskLayout, NtfsAndExfatBootSectors) {
  std::vector<std::byte> ntfs = zeros(4096);
  put_u8(ntfs, 0, 0xEB);
  put_u8(ntfs, 1, 0x52);
  put_u8(ntfs, 2, 0x90);
  put(ntfs, 3, "NTFS    ");
  put_le16(ntfs, 11, 512);
  put_u8(ntfs, 13, 8);
  put_boot_signature(ntfs);
  put_mbr_entry(ntfs, 0, 0x00, 0x07, 2048, 4096);  // boot code bytes that look like an entry
  expect_layout(classify_disk_layout(ntfs), DiskLayoutKind::kPartition, "ntfs");

  std::vector<std::byte> exfat = zeros(4096);
  put_u8(exfat, 0, 0xEB);
  put_u8(exfat, 1, 0x76);
  put_u8(exfat, 2, 0x90);
  put(exfat, 3, "EXFAT   ");
  put_u8(exfat, 108, 9);
  put_boot_signature(exfat);
  expect_layout(classify_disk_layout(exfat), DiskLayoutKind::kPartition, "exfat");

  put_le16(ntfs, 11, 3);  // not a sector size: no longer NTFS, and its "entry" makes it an MBR
  expect_layout(classify_disk_layout(ntfs), DiskLayoutKind::kDisk, "mbr");
}

TEST(DiskLayout, GptWithFourKibSectors) {
  std::vector<std::byte> bytes = zeros(16 * 1024);
  put_mbr_entry(bytes, 0, 0x00, 0xEE, 1, 0xFFFFFFFF);
  put_boot_signature(bytes);
  put(bytes, 4096, "EFI PART");
  expect_layout(classify_disk_layout(bytes), DiskLayoutKind::kDisk, "gpt");
}

// "EFI PART" without a protective entry is not trusted as GPT; the MBR rules decide.
TEST(DiskLayout, GptSignatureWithoutProtectiveMbr) {
  std::vector<std::byte> bytes = zeros(4096);
  put(bytes, 512, "EFI PART");
  expect_layout(classify_disk_layout(bytes), DiskLayoutKind::kUnknown, "");
  put_boot_signature(bytes);
  put_mbr_entry(bytes, 1, 0x00, 0x83, 2048, 1000);
  expect_layout(classify_disk_layout(bytes), DiskLayoutKind::kDisk, "mbr");
}

TEST(DiskLayout, BadMbrsAreUnknown) {
  std::vector<std::byte> empty_table = zeros(4096);
  put_boot_signature(empty_table);
  expect_layout(classify_disk_layout(empty_table), DiskLayoutKind::kUnknown, "");

  std::vector<std::byte> bad_status = empty_table;
  put_mbr_entry(bad_status, 0, 0x00, 0x83, 2048, 1000);
  put_u8(bad_status, 446 + 16 * 2, 0x12);
  expect_layout(classify_disk_layout(bad_status), DiskLayoutKind::kUnknown, "");

  std::vector<std::byte> starts_at_zero = empty_table;
  put_mbr_entry(starts_at_zero, 0, 0x00, 0x83, 0, 1000);
  expect_layout(classify_disk_layout(starts_at_zero), DiskLayoutKind::kUnknown, "");

  std::vector<std::byte> no_signature = zeros(4096);
  put_mbr_entry(no_signature, 0, 0x00, 0x83, 2048, 1000);
  expect_layout(classify_disk_layout(no_signature), DiskLayoutKind::kUnknown, "");
}

TEST(DiskLayout, SuperblockMagics) {
  std::vector<std::byte> xfs = zeros(8192);
  put(xfs, 0, "XFSB");
  store_be32(xfs.data() + 4, 4096);
  expect_layout(classify_disk_layout(xfs), DiskLayoutKind::kPartition, "xfs");
  store_be32(xfs.data() + 4, 3000);  // not a block size
  expect_layout(classify_disk_layout(xfs), DiskLayoutKind::kUnknown, "");

  std::vector<std::byte> btrfs = zeros(kDiskLayoutProbeBytes);
  put(btrfs, 65600, "_BHRfS_M");
  expect_layout(classify_disk_layout(btrfs), DiskLayoutKind::kPartition, "btrfs");
  // Cut before the magic ends: not found.
  expect_layout(classify_disk_layout(std::span(btrfs).first(65607)), DiskLayoutKind::kUnknown, "");

  std::vector<std::byte> swap64k = zeros(kDiskLayoutProbeBytes);
  put(swap64k, 65536 - 10, "SWAPSPACE2");
  expect_layout(classify_disk_layout(swap64k), DiskLayoutKind::kPartition, "swap");

  std::vector<std::byte> squashfs = zeros(4096);
  put(squashfs, 0, "hsqs");
  expect_layout(classify_disk_layout(squashfs), DiskLayoutKind::kPartition, "squashfs");

  std::vector<std::byte> iso = zeros(40 * 1024);
  put_u8(iso, 32768, 1);
  put(iso, 32769, "CD001");
  put_u8(iso, 32774, 1);
  expect_layout(classify_disk_layout(iso), DiskLayoutKind::kPartition, "iso9660");

  std::vector<std::byte> lvm = zeros(4096);
  put(lvm, 512, "LABELONE");
  put(lvm, 536, "LVM2 001");
  expect_layout(classify_disk_layout(lvm), DiskLayoutKind::kPartition, "lvm2");

  std::vector<std::byte> luks = zeros(4096);
  put(luks, 0, "LUKS\xba\xbe");
  expect_layout(classify_disk_layout(luks), DiskLayoutKind::kPartition, "luks");
}

// The ext magic alone is two bytes; out-of-range superblock fields reject it.
TEST(DiskLayout, ExtMagicWithGarbageFieldsIsUnknown) {
  std::vector<std::byte> bytes = zeros(4096);
  put_le16(bytes, 1080, 0xEF53);
  expect_layout(classify_disk_layout(bytes), DiskLayoutKind::kUnknown, "");  // counts are zero
  store_le32(bytes.data() + 1024, 1024);                                     // inodes
  store_le32(bytes.data() + 1024 + 32, 8192);                                // blocks per group
  store_le32(bytes.data() + 1024 + 40, 1024);                                // inodes per group
  expect_layout(classify_disk_layout(bytes), DiskLayoutKind::kPartition, "ext2");
  store_le32(bytes.data() + 1024 + 24, 40);  // a block size of 2^50
  expect_layout(classify_disk_layout(bytes), DiskLayoutKind::kUnknown, "");
}

TEST(DiskLayout, ZerosPatternAndShortImagesAreUnknown) {
  expect_layout(classify_disk_layout(zeros(kDiskLayoutProbeBytes)), DiskLayoutKind::kUnknown, "");
  expect_layout(classify_disk_layout(pattern_bytes(kDiskLayoutProbeBytes, 7)),
                DiskLayoutKind::kUnknown, "");
  expect_layout(classify_disk_layout(zeros(100)), DiskLayoutKind::kUnknown, "");
  expect_layout(classify_disk_layout({}), DiskLayoutKind::kUnknown, "");

  MemorySource empty({});
  Result<DiskLayout> layout = detect_disk_layout(empty);
  ASSERT_TRUE(layout.ok()) << layout.status().to_string();
  expect_layout(*layout, DiskLayoutKind::kUnknown, "");
}

TEST(DiskLayout, DetectReadsOnlyTheFirstBytes) {
  std::vector<std::byte> big = fat_boot_sector(false);
  big.resize(16 * kMiB);
  CountingSource source(std::make_unique<MemorySource>(std::move(big)));
  Result<DiskLayout> layout = detect_disk_layout(source);
  ASSERT_TRUE(layout.ok()) << layout.status().to_string();
  expect_layout(*layout, DiskLayoutKind::kPartition, "vfat");
  EXPECT_EQ(source.reads(), 1u);
  EXPECT_EQ(source.bytes_read(), kDiskLayoutProbeBytes);
}

TEST(DiskLayout, ReadErrorsPropagate) {
  FaultySource source(std::make_unique<MemorySource>(zeros(kMiB)), 4096, 1);
  Result<DiskLayout> layout = detect_disk_layout(source);
  ASSERT_FALSE(layout.ok());
  EXPECT_EQ(layout.status().code(), StatusCode::kIOError);
  EXPECT_NE(layout.status().message().find("disk layout"), std::string::npos);
}

}  // namespace
}  // namespace imgfs::formats
