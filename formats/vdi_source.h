// VdiSource: turns a VirtualBox VDI image file (header version 1.1, as VirtualBox and qemu
// block/vdi.c write it) into the raw virtual disk it describes: the header and the block map at
// open, block data when a read touches it.
//
// Layout: a 512-byte header (a text line such as "<<< Oracle VM VirtualBox Disk Image >>>", the
// signature 0xBEDA107F at offset 64, little-endian fields), then the block map at offset_bmap (one
// little-endian u32 per block: 0xFFFFFFFF unallocated, 0xFFFFFFFE a zero block, else the index of
// the block in the data area), then the data area at offset_data, where block index i lies at
// offset_data + i * (block_size + block_extra) + block_extra. Dynamic (type 1) and static
// (type 2) images differ only in which blocks are allocated. Unallocated and zero blocks read as
// zeros. Like qemu, a disk_size that is not a multiple of 512 is rounded up to one.
//
// Refused with NotSupported: header version 1.0 (qemu refuses it too), undo and differencing
// images (types 3 and 4, or a parent or link UUID), sector sizes other than 512.
//
// Bounds rules, checked at open: the block map lies inside the file; every allocated entry is an
// index below blocks_in_image, used by one entry only, and the block's data bytes that the guest
// can reach lie inside the file.
//
// Probe: probe_vdi needs the first 68 bytes (the signature at offset 64).
//
// Thread safety: a VdiSource is immutable once opened and holds no lock.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/block_source.h"
#include "formats/status.h"

namespace imgfs::formats {

struct VdiOptions {
  // Opens a file next to the image by relative name. VDI images name no other file that this
  // reader follows (differencing images are refused), so it is unused; kept so every format
  // factory takes the same options shape.
  std::function<Result<std::unique_ptr<BlockSource>>(std::string_view name)> open_sibling;
};

// The header, decoded and checked (no I/O).
struct VdiHeader {
  uint32_t version = 0;      // 0x00010001 for 1.1
  uint32_t header_size = 0;  // bytes after the signature and version fields
  uint32_t image_type = 0;   // 1 dynamic, 2 static
  uint32_t image_flags = 0;
  uint32_t offset_bmap = 0;  // file offset of the block map
  uint32_t offset_data = 0;  // file offset of the data area
  uint32_t sector_size = 0;
  uint64_t disk_size = 0;  // virtual size in bytes, rounded up to a multiple of 512
  uint32_t block_size = 0;
  uint32_t block_extra = 0;  // bytes of per-block metadata in front of each block's data
  uint32_t blocks_in_image = 0;
  uint32_t blocks_allocated = 0;
  std::array<std::byte, 16> uuid_image{};
  std::array<std::byte, 16> uuid_link{};
  std::array<std::byte, 16> uuid_parent{};
};

inline constexpr uint32_t kVdiSignature = 0xBEDA107F;
inline constexpr uint32_t kVdiUnallocated = 0xFFFFFFFF;
inline constexpr uint32_t kVdiZeroBlock = 0xFFFFFFFE;

// Decodes and checks the header from `bytes` (at least the first 512 bytes of the file) of a file
// of `file_size` bytes. Pure; thread-safe. Errors: Corruption (bad signature; a block size that is
// not a power of two from 512 B to 256 MiB; disk_size larger than the blocks can hold; a block
// map past the end of the file), NotSupported (version other than 1.1, image types other than 1
// and 2, a parent or link UUID, a sector size other than 512, a block map above 64 MiB).
Result<VdiHeader> parse_vdi_header(std::span<const std::byte> bytes, uint64_t file_size);

// Decodes the block map from `bytes` (blocks_in_image little-endian u32s) and checks every
// allocated entry against the header and a file of `file_size` bytes (see the file comment).
// Pure. Errors: Corruption naming the entry.
Result<std::vector<uint32_t>> parse_vdi_block_map(std::span<const std::byte> bytes,
                                                  const VdiHeader& header, uint64_t file_size);

// Score 0..100 that `first_bytes` (at least the first 68 bytes of a file) start a VDI image:
// 100 for the signature at offset 64, as in qemu's vdi_probe.
int probe_vdi(std::span<const std::byte> first_bytes);

class VdiSource final : public BlockSource {
 public:
  // Use open_vdi(), which checks the header and the block map.
  VdiSource(std::unique_ptr<BlockSource> lower, VdiHeader header, std::vector<uint32_t> block_map);

  uint64_t size() const override { return header_.disk_size; }

  // Reads guest bytes: zeros for unallocated and zero blocks, block data otherwise (blocks that
  // lie back to back in the file are read with one lower read). Thread-safe (no mutable state).
  // Errors: InvalidArgument (range past size()), errors of lower with describe() in front.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "vdi(" + lower->describe() + ")".
  std::string describe() const override { return "vdi(" + lower_->describe() + ")"; }

  uint32_t block_size() const override { return header_.block_size; }

  // The run of allocated (data) or unallocated and zero (zero) blocks starting at `offset`.
  // Thread-safe. Errors: InvalidArgument (offset at or past size()).
  Result<Extent> map(uint64_t offset) const override;

  const VdiHeader& header() const { return header_; }

 private:
  // File offset of the data of allocated block map entry `entry`.
  uint64_t data_offset(uint32_t entry) const;

  const std::unique_ptr<BlockSource> lower_;
  const VdiHeader header_;
  const std::vector<uint32_t> block_map_;
};

// Opens a VDI image over `lower` (the image file's bytes): reads and checks the header and the
// block map. Errors: InvalidArgument (no lower), Corruption and NotSupported as the parsers
// above, IOError from lower; each with the image's describe() in front.
Result<std::unique_ptr<BlockSource>> open_vdi(std::unique_ptr<BlockSource> lower,
                                              const VdiOptions& options);

}  // namespace imgfs::formats
