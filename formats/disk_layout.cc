#include "formats/disk_layout.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "formats/byte_order.h"

namespace imgfs::formats {
namespace {

using Bytes = std::span<const std::byte>;

constexpr uint64_t kMbrSignatureOffset = 510;
constexpr uint64_t kMbrEntriesOffset = 446;
constexpr uint64_t kMbrEntrySize = 16;
constexpr int kMbrEntryCount = 4;
constexpr uint8_t kGptProtectiveType = 0xEE;

// True when `bytes` holds `magic` at `offset` (false when the span is too short).
bool has_magic(Bytes bytes, uint64_t offset, std::string_view magic) {
  if (offset > bytes.size() || magic.size() > bytes.size() - offset) return false;
  return std::memcmp(bytes.data() + offset, magic.data(), magic.size()) == 0;
}

bool has_room(Bytes bytes, uint64_t offset, uint64_t length) {
  return offset <= bytes.size() && length <= bytes.size() - offset;
}

uint8_t byte_at(Bytes bytes, uint64_t offset) { return std::to_integer<uint8_t>(bytes[offset]); }

bool is_power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

bool has_boot_signature(Bytes bytes) {
  return has_room(bytes, kMbrSignatureOffset, 2) && byte_at(bytes, 510) == 0x55 &&
         byte_at(bytes, 511) == 0xAA;
}

bool has_protective_entry(Bytes bytes) {
  for (int i = 0; i < kMbrEntryCount; ++i) {
    if (byte_at(bytes, kMbrEntriesOffset + i * kMbrEntrySize + 4) == kGptProtectiveType) {
      return true;
    }
  }
  return false;
}

bool is_gpt(Bytes bytes) {
  if (!has_boot_signature(bytes) || !has_protective_entry(bytes)) return false;
  return has_magic(bytes, 512, "EFI PART") || has_magic(bytes, 4096, "EFI PART");
}

// A FAT12/16/32 boot sector: a BIOS parameter block whose fields are all in range (as libblkid's
// vfat prober checks them), plus a jump instruction or a FAT type string.
bool is_fat(Bytes bytes) {
  if (!has_boot_signature(bytes)) return false;
  const std::byte* p = bytes.data();
  const uint16_t bytes_per_sector = load_le16(p + 11);
  const uint8_t sectors_per_cluster = byte_at(bytes, 13);
  const uint16_t reserved_sectors = load_le16(p + 14);
  const uint8_t fat_count = byte_at(bytes, 16);
  const uint16_t total_sectors_16 = load_le16(p + 19);
  const uint8_t media = byte_at(bytes, 21);
  const uint16_t fat_sectors_16 = load_le16(p + 22);
  const uint32_t total_sectors_32 = load_le32(p + 32);
  const uint32_t fat_sectors_32 = load_le32(p + 36);
  if (bytes_per_sector < 512 || bytes_per_sector > 4096 || !is_power_of_two(bytes_per_sector)) {
    return false;
  }
  if (!is_power_of_two(sectors_per_cluster)) return false;
  if (reserved_sectors == 0 || fat_count == 0 || fat_count > 4) return false;
  if (media != 0xF0 && media < 0xF8) return false;
  if (total_sectors_16 == 0 && total_sectors_32 == 0) return false;
  if (fat_sectors_16 == 0 && fat_sectors_32 == 0) return false;
  const uint8_t jump = byte_at(bytes, 0);
  const bool has_jump = (jump == 0xEB && byte_at(bytes, 2) == 0x90) || jump == 0xE9;
  const bool has_type_string = has_magic(bytes, 54, "FAT12   ") ||
                               has_magic(bytes, 54, "FAT16   ") ||
                               has_magic(bytes, 54, "FAT     ") || has_magic(bytes, 54, "MSDOS") ||
                               has_magic(bytes, 82, "FAT32   ") || has_magic(bytes, 82, "MSWIN");
  return has_jump || has_type_string;
}

bool is_ntfs(Bytes bytes) {
  if (!has_boot_signature(bytes) || !has_magic(bytes, 3, "NTFS    ")) return false;
  const uint16_t bytes_per_sector = load_le16(bytes.data() + 11);
  return bytes_per_sector >= 256 && bytes_per_sector <= 4096 && is_power_of_two(bytes_per_sector) &&
         byte_at(bytes, 13) != 0;
}

bool is_exfat(Bytes bytes) {
  if (!has_boot_signature(bytes) || !has_magic(bytes, 3, "EXFAT   ")) return false;
  // BytesPerSectorShift 9..12 (512 to 4096 bytes per sector), as the exFAT spec allows.
  const uint8_t sector_shift = byte_at(bytes, 108);
  return sector_shift >= 9 && sector_shift <= 12;
}

// An MBR partition table: valid boot indicators everywhere and at least one used entry that
// starts after sector 0 (sector 0 is the table itself) and has sectors.
bool is_mbr(Bytes bytes) {
  if (!has_boot_signature(bytes)) return false;
  int used = 0;
  for (int i = 0; i < kMbrEntryCount; ++i) {
    const uint64_t entry = kMbrEntriesOffset + i * kMbrEntrySize;
    const uint8_t status = byte_at(bytes, entry);
    if (status != 0x00 && status != 0x80) return false;
    const uint8_t type = byte_at(bytes, entry + 4);
    if (type == 0) continue;
    const uint32_t start_lba = load_le32(bytes.data() + entry + 8);
    const uint32_t sector_count = load_le32(bytes.data() + entry + 12);
    if (start_lba == 0 || sector_count == 0) return false;
    ++used;
  }
  return used > 0;
}

// ext2/3/4: the magic plus fields no mke2fs leaves out of range, named as blkid names them.
std::string ext_name(Bytes bytes) {
  constexpr uint64_t kSuper = 1024;
  if (!has_room(bytes, kSuper, 1024) || load_le16(bytes.data() + kSuper + 56) != 0xEF53) return "";
  const std::byte* s = bytes.data() + kSuper;
  const uint32_t inodes_count = load_le32(s + 0);
  const uint32_t log_block_size = load_le32(s + 24);
  const uint32_t blocks_per_group = load_le32(s + 32);
  const uint32_t inodes_per_group = load_le32(s + 40);
  const uint32_t rev_level = load_le32(s + 76);
  if (inodes_count == 0 || log_block_size > 6 || blocks_per_group == 0 || inodes_per_group == 0 ||
      rev_level > 1) {
    return "";
  }
  const uint32_t feature_compat = load_le32(s + 92);
  const uint32_t feature_incompat = load_le32(s + 96);
  const uint32_t feature_ro_compat = load_le32(s + 100);
  // Features ext3 knows: incompat FILETYPE, RECOVER, META_BG; ro_compat SPARSE_SUPER,
  // LARGE_FILE, BTREE_DIR. Anything else (extents, 64bit, flex_bg, checksums...) is ext4.
  constexpr uint32_t kExt3Incompat = 0x0002 | 0x0004 | 0x0010;
  constexpr uint32_t kExt3RoCompat = 0x0001 | 0x0002 | 0x0004;
  constexpr uint32_t kHasJournal = 0x0004;
  if ((feature_incompat & ~kExt3Incompat) != 0 || (feature_ro_compat & ~kExt3RoCompat) != 0) {
    return "ext4";
  }
  return (feature_compat & kHasJournal) != 0 ? "ext3" : "ext2";
}

bool is_xfs(Bytes bytes) {
  if (!has_magic(bytes, 0, "XFSB") || !has_room(bytes, 0, 8)) return false;
  const uint32_t block_size = load_be32(bytes.data() + 4);
  return block_size >= 512 && block_size <= 65536 && is_power_of_two(block_size);
}

bool is_swap(Bytes bytes) {
  for (uint64_t page : {4096u, 8192u, 16384u, 65536u}) {
    if (has_magic(bytes, page - 10, "SWAPSPACE2") || has_magic(bytes, page - 10, "SWAP-SPACE")) {
      return true;
    }
  }
  return false;
}

bool is_iso9660(Bytes bytes) {
  // A volume descriptor at 32768: its type byte, then "CD001", then version 1.
  return has_magic(bytes, 32769, "CD001") && byte_at(bytes, 32774) == 1;
}

// The partition-image checks, in the order of the file-top comment; "" when none matches.
std::string filesystem_name(Bytes bytes) {
  if (std::string ext = ext_name(bytes); !ext.empty()) return ext;
  if (is_xfs(bytes)) return "xfs";
  if (has_magic(bytes, 65600, "_BHRfS_M")) return "btrfs";
  if (is_swap(bytes)) return "swap";
  if (has_magic(bytes, 0, "hsqs") || has_magic(bytes, 0, "sqsh")) return "squashfs";
  if (is_iso9660(bytes)) return "iso9660";
  if (has_magic(bytes, 512, "LABELONE") && has_magic(bytes, 536, "LVM2 001")) return "lvm2";
  if (has_magic(bytes, 0, "LUKS\xba\xbe")) return "luks";
  return "";
}

}  // namespace

std::string_view disk_layout_kind_name(DiskLayoutKind kind) {
  switch (kind) {
    case DiskLayoutKind::kDisk:
      return "disk";
    case DiskLayoutKind::kPartition:
      return "partition";
    case DiskLayoutKind::kUnknown:
      break;
  }
  return "unknown";
}

DiskLayout classify_disk_layout(std::span<const std::byte> first_bytes) {
  if (is_gpt(first_bytes)) return {DiskLayoutKind::kDisk, "gpt"};
  if (is_fat(first_bytes)) return {DiskLayoutKind::kPartition, "vfat"};
  if (is_exfat(first_bytes)) return {DiskLayoutKind::kPartition, "exfat"};
  if (is_ntfs(first_bytes)) return {DiskLayoutKind::kPartition, "ntfs"};
  if (is_mbr(first_bytes)) return {DiskLayoutKind::kDisk, "mbr"};
  if (std::string name = filesystem_name(first_bytes); !name.empty()) {
    return {DiskLayoutKind::kPartition, std::move(name)};
  }
  return {DiskLayoutKind::kUnknown, ""};
}

Result<DiskLayout> detect_disk_layout(const BlockSource& image) {
  std::vector<std::byte> first(std::min(image.size(), kDiskLayoutProbeBytes));
  if (Status s = image.read_at(0, first); !s.ok()) {
    return s.with_context("detecting the disk layout of " + image.describe());
  }
  return classify_disk_layout(first);
}

}  // namespace imgfs::formats
