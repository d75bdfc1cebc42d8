// PartitionedDiskSource: turns a partition image (a bare filesystem) into a whole disk whose only
// partition is that image, so an HVM guest or a partitioning tool can use it. Nothing is copied:
// the tables are a few small buffers made at open, the image bytes pass through to the lower
// source, and everything else reads as zeros.
//
// Disk layout (512-byte sectors):
//   [0, 1 MiB)                the partition table: an MBR (sector 0), or for GPT a protective
//                             MBR, the primary header (LBA 1) and 128 entries (LBA 2..33)
//   [1 MiB, 1 MiB + image)    the image: partition 1 starts at LBA 2048 and covers the image
//                             rounded up to whole sectors (the rounding reads as zeros)
//   then zeros                up to a multiple of 1 MiB
//   last 33 sectors (GPT)     the backup entries and the backup header (LBA = last sector),
//                             inside the padding when it has room, else in one more MiB
// MBR (UEFI spec 2.10 section 5.2.1) is used when every sector of the disk is addressable by its
// 32-bit LBAs (a disk of at most 2^32 - 1 sectors, just under 2 TiB), GPT (section 5.3) otherwise,
// unless the options force one. MBR: one primary partition of type 0x83 (Linux), CHS fields
// from a 255-head, 63-sector geometry, or 0xFE 0xFF 0xFF past its reach (as fdisk writes them).
// GPT: partition type "Linux filesystem data" (0FC63DAF-8483-4772-8E79-3D69D8477DE4), header and
// entry-array CRC32s, and a disk GUID, partition GUID and MBR disk signature derived from
// options.name (RFC 4122 name-based version 5 UUIDs), so one image always gives the same disk.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "formats/block_source.h"
#include "formats/status.h"

namespace imgfs::formats {

enum class PartitionTable { kAuto, kMbr, kGpt };

struct PartitionedDiskOptions {
  // Seeds the GUIDs and the MBR disk signature; usually the image's object key. May be empty.
  std::string name;
  // kAuto: MBR when the disk fits it, else GPT. kMbr on a disk too large for MBR is refused.
  PartitionTable table = PartitionTable::kAuto;
  // Marks the partition active (MBR boot indicator 0x80; GPT "legacy BIOS bootable", bit 2), for
  // BIOSes and boot code that look for it. The disk has no boot code of its own.
  bool bootable = false;
};

inline constexpr uint64_t kDiskSectorBytes = 512;
// Where the image starts on the disk: 1 MiB, LBA 2048, as partitioning tools align it.
inline constexpr uint64_t kPartitionOffsetBytes = 1 << 20;

// A GUID in RFC 4122 byte order (as its text form reads; GPT stores the first three fields
// little-endian, which the table builders take care of).
using Guid = std::array<std::byte, 16>;

// "0FC63DAF-8483-4772-8E79-3D69D8477DE4" style text (upper case, as sfdisk prints it).
std::string guid_string(const Guid& guid);

// Where everything goes on the synthesized disk, and its identity (no bytes of the image).
struct PartitionedDiskPlan {
  PartitionTable table = PartitionTable::kMbr;  // kMbr or kGpt, never kAuto
  uint64_t image_bytes = 0;                     // the partition image's size
  uint64_t partition_first_lba = 0;             // 2048
  uint64_t partition_sectors = 0;               // image_bytes rounded up to sectors
  uint64_t disk_bytes = 0;                      // a multiple of 1 MiB
  bool bootable = false;
  Guid disk_guid{};            // GPT header's disk GUID
  Guid partition_guid{};       // GPT entry's unique partition GUID
  uint32_t mbr_signature = 0;  // MBR disk signature at 440 (never 0)
};

// The plan for an image of `image_bytes`. Pure, thread-safe.
// Errors: InvalidArgument (an empty image; a disk whose size overflows 64 bits; kMbr forced on a
// disk MBR cannot address), NotSupported (OpenSSL could not hash the name).
Result<PartitionedDiskPlan> plan_partitioned_disk(uint64_t image_bytes,
                                                  const PartitionedDiskOptions& options);

// The table sectors at the start of the disk: 1 sector for MBR, 34 for GPT (protective MBR,
// header, entries). Pure, thread-safe; `plan` must come from plan_partitioned_disk.
std::vector<std::byte> build_primary_table(const PartitionedDiskPlan& plan);

// The GPT backup (32 sectors of entries, then the backup header) for the last 33 sectors of the
// disk; empty for MBR. Pure, thread-safe; `plan` must come from plan_partitioned_disk.
std::vector<std::byte> build_backup_table(const PartitionedDiskPlan& plan);

class PartitionedDiskSource final : public BlockSource {
 public:
  // Use open_partitioned_disk, which makes `plan` from `partition`'s size.
  PartitionedDiskSource(std::unique_ptr<BlockSource> partition, const PartitionedDiskPlan& plan);

  uint64_t size() const override { return plan_.disk_bytes; }

  // Thread-safe (no mutable state). Table bytes come from memory, image bytes from the lower
  // source, all else is zeros; a read may span all of them.
  // Errors: InvalidArgument (past size()), those of the lower source (with context).
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "mbr_disk(<lower>)" or "gpt_disk(<lower>)".
  std::string describe() const override;

  // The lower block size when 1 MiB is a multiple of it (the image stays aligned), else 512.
  uint32_t block_size() const override;

  // Inside the image: the lower source's run, clipped to the image. Tables: data. Elsewhere:
  // zeros up to the next table or the image. Errors: those of the lower map (with context).
  Result<Extent> map(uint64_t offset) const override;

  const PartitionedDiskPlan& plan() const { return plan_; }

 private:
  // A stretch of the disk that is not zeros: a table buffer, or the image (buffer empty).
  struct Region {
    uint64_t offset = 0;
    uint64_t length = 0;
    std::span<const std::byte> table;  // empty: the image, read from partition_
  };

  // The first region that ends after `offset`, or nullptr when only zeros follow.
  const Region* region_after(uint64_t offset) const;

  const std::unique_ptr<BlockSource> partition_;
  const PartitionedDiskPlan plan_;
  const std::vector<std::byte> primary_table_;
  const std::vector<std::byte> backup_table_;
  std::vector<Region> regions_;  // sorted by offset, disjoint; set in the constructor only
};

// A whole disk around `partition`, laid out as the file-top comment says.
// Errors: those of plan_partitioned_disk, InvalidArgument (a null partition).
Result<std::unique_ptr<BlockSource>> open_partitioned_disk(std::unique_ptr<BlockSource> partition,
                                                           const PartitionedDiskOptions& options);

}  // namespace imgfs::formats
