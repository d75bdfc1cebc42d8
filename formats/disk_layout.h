// disk_layout: tells a whole disk (a partition table at the start) from a partition image (a bare
// filesystem at the start) by the first bytes of an image (the old design's "image layout:
// disk | partition"). Detection only: nothing here changes bytes.
//
// Order of the checks, and why:
// 1. GPT: a protective MBR (an entry of type 0xEE, 0x55AA at 510) and "EFI PART" at LBA 1
//    (512-byte sectors, or 4096-byte sectors). Two independent signatures, so it goes first.
// 2. FAT, exFAT and NTFS volume boot sectors. They end in 0x55AA like an MBR, so they must be
//    ruled out before the MBR test (libblkid's dos prober does the same). FAT needs a consistent
//    BIOS parameter block plus a jump instruction or a FAT type string; NTFS and exFAT need their
//    OEM id and a sane sector size.
// 3. MBR: 0x55AA at 510, every boot indicator 0x00 or 0x80, and at least one used entry (type not
//    0) that starts after sector 0 and has sectors. Checked before the superblock magics because
//    the gap after an MBR holds boot loader code (GRUB's core.img) that may hold any two bytes at
//    1080, while a filesystem's boot block rarely holds four valid partition entries.
// 4. Superblocks at fixed places, each with a sanity check beyond the magic where the format has
//    one: ext2/3/4 (0xEF53 at 1080), XFS ("XFSB" at 0), btrfs ("_BHRfS_M" at 65600), swap
//    ("SWAPSPACE2" or "SWAP-SPACE" 10 bytes before the end of a 4, 8, 16 or 64 KiB page),
//    squashfs ("hsqs"/"sqsh" at 0), ISO 9660 ("CD001" at 32769), LVM2 ("LABELONE" at 512) and
//    LUKS ("LUKS\xba\xbe" at 0).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "formats/block_source.h"
#include "formats/status.h"

namespace imgfs::formats {

enum class DiskLayoutKind {
  kDisk,       // a partition table: the image is a whole disk
  kPartition,  // a filesystem (or swap, LVM, LUKS) at offset 0: the image is one partition
  kUnknown,    // neither was recognised
};

struct DiskLayout {
  DiskLayoutKind kind = DiskLayoutKind::kUnknown;
  // What was found, as blkid names it: "mbr", "gpt", "ext2", "ext3", "ext4", "xfs", "btrfs",
  // "swap", "vfat", "exfat", "ntfs", "squashfs", "iso9660", "lvm2", "luks"; "" for kUnknown.
  std::string name;
};

// "disk", "partition" or "unknown".
std::string_view disk_layout_kind_name(DiskLayoutKind kind);

// Every check reads within this many first bytes (the btrfs magic ends at 65608).
inline constexpr uint64_t kDiskLayoutProbeBytes = 68 * 1024;

// The layout of an image whose first bytes are `first_bytes` (pass min(size, kDiskLayoutProbeBytes)
// bytes; a check that needs bytes past the end of the span does not match). Pure, thread-safe.
DiskLayout classify_disk_layout(std::span<const std::byte> first_bytes);

// Reads the first min(size, kDiskLayoutProbeBytes) bytes of `image` and classifies them.
// Thread-safe if `image` is. Errors: those of image.read_at (with context).
Result<DiskLayout> detect_disk_layout(const BlockSource& image);

}  // namespace imgfs::formats
