// VhdSource: turns a VHD image file (Microsoft "Virtual Hard Disk Image Format Specification"
// 1.0; qemu calls the format vpc, block/vpc.c) into the raw virtual disk it describes, reading
// lazily: the footer, the dynamic header and the BAT at open, sector bitmaps and data when a read
// touches them.
//
// Disk types:
// - fixed (2): the guest bytes are the file minus its 512-byte footer. A fixed disk keeps the
//   footer ONLY at the end of the file, so its first sector is guest data and may be anything.
// - dynamic (3): the footer is copied at offset 0 and at the end. The copy at offset 0 is used
//   (as qemu and Windows do); the end copy must also be valid, which catches a file cut short even
//   when every block is still whole. The dynamic header ("cxsparse")
//   at footer.data_offset points to the BAT, one big-endian sector number per block
//   (0xFFFFFFFF: unallocated). An allocated block is a sector bitmap (rounded up to 512 bytes)
//   followed by block_size bytes of data. A sector whose bitmap bit (MSB first) is 0 reads as
//   zeros, as the spec says; qemu ignores the bitmap, which gives the same bytes for every image
//   qemu writes (it sets whole bitmaps) and for tools that zero-fill new blocks.
// - differencing (4): like dynamic, but unallocated blocks and sectors whose bit is 0 come from
//   the parent disk, found next to the image through options.open_sibling by the relative
//   locator ("W2ru", UTF-16LE) or else the parent's Unicode name (UTF-16BE). The parent must be
//   a VHD whose unique id is the header's parent_uuid; bytes past the parent's size read as zeros.
//
// The virtual size is the footer's current_size rounded down to a sector, as qemu shows it for
// every image qemu makes (without force_size qemu rounds the size up to a CHS geometry and stores
// that as current_size). The footer and dynamic-header checksums are verified.
//
// Bounds rules: the BAT covers the virtual size and lies inside the file; each allocated block's
// bitmap and the data bytes the guest can reach lie inside the file (checked at open); a fixed
// disk's current_size fits in the file before the footer.
//
// Probe: probe_vhd takes the first bytes of the file (where dynamic and differencing disks keep a
// footer copy) and the file's last 512 bytes (where a fixed disk keeps its only footer).
//
// Lock order: bitmap_mu_ is the only lock of a VhdSource; it is never held across a lower read or
// a parent read. The parent has its own locks, taken only after bitmap_mu_ is released.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/block_source.h"
#include "formats/status.h"

namespace imgfs::formats {

struct VhdOptions {
  // Opens a file next to the image by the relative name the image stores (the parent of a
  // differencing disk). Empty → a differencing disk gives NotSupported naming its parent.
  std::function<Result<std::unique_ptr<BlockSource>>(std::string_view name)> open_sibling;
  // Longest parent chain, counting this image as 1.
  int max_chain_depth = 16;
  // Byte bound of the sector-bitmap cache (keeps at least one bitmap).
  uint64_t bitmap_cache_bytes = 1 << 20;
};

enum class VhdDiskType : uint32_t { kFixed = 2, kDynamic = 3, kDifferencing = 4 };

// The 512-byte hard disk footer, decoded and checked (no I/O).
struct VhdFooter {
  uint32_t features = 0;
  uint32_t format_version = 0;
  uint64_t data_offset = 0;  // the dynamic header's offset; all ones for a fixed disk
  uint32_t timestamp = 0;
  std::string creator_app;  // 4 characters, e.g. "qemu", "qem2", "win "
  uint32_t creator_version = 0;
  uint32_t creator_host_os = 0;
  uint64_t original_size = 0;
  uint64_t current_size = 0;
  uint16_t cylinders = 0;
  uint8_t heads = 0;
  uint8_t sectors_per_track = 0;
  VhdDiskType disk_type = VhdDiskType::kFixed;
  uint32_t checksum = 0;
  std::array<std::byte, 16> unique_id{};
  uint8_t saved_state = 0;
};

// One of the eight parent locator entries of a differencing disk.
struct VhdParentLocator {
  uint32_t platform_code = 0;  // big-endian FourCC, e.g. 'W2ru'
  uint32_t data_space = 0;     // room reserved (bytes or sectors, by writer; not used)
  uint32_t data_length = 0;    // bytes of locator data
  uint64_t data_offset = 0;    // file offset of the locator data
};

// The 1024-byte dynamic disk header ("cxsparse"), decoded and checked (no I/O).
struct VhdDynamicHeader {
  uint64_t table_offset = 0;  // the BAT
  uint32_t header_version = 0;
  uint32_t max_table_entries = 0;
  uint32_t block_size = 0;  // bytes of data per block: a power of two >= 512
  uint32_t checksum = 0;
  std::array<std::byte, 16> parent_uuid{};
  uint32_t parent_timestamp = 0;
  std::string parent_unicode_name;  // UTF-8, converted from UTF-16BE; "" when empty
  std::array<VhdParentLocator, 8> parent_locators{};

  // Bytes of the sector bitmap in front of each block's data: one bit per sector, rounded up to a
  // whole sector.
  uint64_t bitmap_bytes() const;
};

inline constexpr uint32_t kVhdPlatformW2ru = 0x57327275;  // "W2ru": relative Windows path
inline constexpr uint32_t kVhdPlatformW2ku = 0x57326b75;  // "W2ku": absolute Windows path
inline constexpr uint32_t kVhdUnallocated = 0xFFFFFFFF;

// Decodes and checks a footer from `bytes` (at least 512 bytes; only the first 512 are used).
// Pure; thread-safe. Errors: Corruption (no "conectix" cookie, checksum mismatch, an unknown disk
// type), NotSupported (a format version whose major number is not 1).
Result<VhdFooter> parse_vhd_footer(std::span<const std::byte> bytes);

// Decodes and checks a dynamic header from `bytes` (at least 1024 bytes) of a file of `file_size`
// bytes. Pure. Errors: Corruption (no "cxsparse" cookie, checksum mismatch, a block size that is
// not a power of two >= 512 or above 256 MiB, a BAT past the end of the file), NotSupported
// (a header version whose major number is not 1).
Result<VhdDynamicHeader> parse_vhd_dynamic_header(std::span<const std::byte> bytes,
                                                  uint64_t file_size);

// Entries of the BAT the virtual disk of `virtual_size` bytes needs.
// Errors: Corruption (the BAT has fewer entries than that: "Page table too small" in qemu).
Result<uint64_t> vhd_bat_entries_needed(const VhdDynamicHeader& header, uint64_t virtual_size);

// Decodes the first vhd_bat_entries_needed() entries of a BAT from `bytes` (big-endian u32 sector
// numbers). Each allocated entry is checked: its bitmap and the data bytes that a disk of
// `virtual_size` bytes can reach lie inside a file of `file_size` bytes. Pure.
// Errors: Corruption naming the entry.
Result<std::vector<uint32_t>> parse_vhd_bat(std::span<const std::byte> bytes,
                                            const VhdDynamicHeader& header, uint64_t virtual_size,
                                            uint64_t file_size);

// Turns a parent locator's data (a "W2ru" or "W2ku" path in UTF-16LE) or the header's parent
// name into a relative name for open_sibling: a leading ".\" is stripped and '\' becomes '/'.
// Pure. Errors: Corruption (odd length, bad UTF-16, an empty or NUL-containing name),
// NotSupported (an absolute path, a drive letter, or a ".." component: the parent would lie
// outside the image's folder).
Result<std::string> vhd_relative_parent_name(std::string_view utf8_path);

// Decodes UTF-16 (`big_endian` or little-endian) to UTF-8, stopping at the first NUL.
// Pure. Errors: Corruption (odd length, an unpaired surrogate).
Result<std::string> vhd_utf16_to_utf8(std::span<const std::byte> bytes, bool big_endian);

// Score 0..100 that a file is a VHD: `head` holds the file's first bytes (the footer copy of a
// dynamic or differencing disk; at least 8 bytes to score), `tail` the file's last 512 bytes
// (the only footer of a fixed disk; may be empty). A cookie at the head scores 100, as in qemu's
// vpc_probe; a footer at the tail scores 100 only when its checksum is right, since the end of a
// raw disk is arbitrary data.
int probe_vhd(std::span<const std::byte> head, std::span<const std::byte> tail);

class VhdSource final : public BlockSource {
 public:
  ~VhdSource() override;

  uint64_t size() const override { return virtual_size_; }

  // Reads guest bytes: file bytes for a fixed disk; zeros, block data (one lower read per run of
  // used sectors) or parent bytes for a dynamic or differencing disk. Thread-safe; concurrent
  // readers of a block share one bitmap fetch.
  // Errors: InvalidArgument (range past size()), IOError and others from lower or the parent,
  // with this image's describe() in front.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "vhd(" + lower->describe() + ")".
  std::string describe() const override { return "vhd(" + lower_->describe() + ")"; }

  // The dynamic block size, or 512 for a fixed disk.
  uint32_t block_size() const override;

  // Data or zero run at `offset`: a fixed disk is one data run; unallocated blocks of a dynamic
  // disk give a zero run across all following unallocated blocks; an allocated block gives the
  // run of sectors with the same bitmap bit, up to the block's end. A differencing disk takes the
  // parent's map where the parent supplies the bytes. Thread-safe. Errors: as read_at.
  Result<Extent> map(uint64_t offset) const override;

  const VhdFooter& footer() const { return footer_; }
  // The dynamic header; meaningful only for dynamic and differencing disks.
  const VhdDynamicHeader& dynamic_header() const { return header_; }
  // The parent disk of a differencing disk, or nullptr.
  const BlockSource* parent() const { return parent_.get(); }

 private:
  class BitmapCache;
  friend Result<std::unique_ptr<VhdSource>> open_vhd_chain(std::unique_ptr<BlockSource> lower,
                                                           const VhdOptions& options, int depth,
                                                           std::vector<std::string> chain_ids);

  VhdSource(std::unique_ptr<BlockSource> lower, const VhdOptions& options, VhdFooter footer,
            VhdDynamicHeader header, std::vector<uint32_t> bat,
            std::unique_ptr<BlockSource> parent);

  // The sector bitmap of allocated block `block`, fetched once and cached.
  Result<std::shared_ptr<const std::vector<std::byte>>> bitmap(uint64_t block) const;
  // Reads [offset, offset + out.size()) lying inside one block of a dynamic/differencing disk.
  Status read_in_block(uint64_t offset, std::span<std::byte> out) const;
  // Bytes for sectors the image does not hold: zeros, or the parent's bytes.
  Status read_absent(uint64_t offset, std::span<std::byte> out) const;
  // Map of a run of `length` bytes at `offset` the image does not hold.
  Result<Extent> map_absent(uint64_t offset, uint64_t length) const;
  // File offset of the first data byte of allocated block `block`.
  uint64_t block_data_offset(uint64_t block) const;

  const std::unique_ptr<BlockSource> lower_;
  const VhdFooter footer_;
  const VhdDynamicHeader header_;
  const std::vector<uint32_t> bat_;  // sector numbers, kVhdUnallocated when not allocated
  const std::unique_ptr<BlockSource> parent_;
  const uint64_t virtual_size_;

  mutable std::mutex bitmap_mu_;
  const std::unique_ptr<BitmapCache> bitmaps_;  // guarded by bitmap_mu_
  mutable std::condition_variable bitmap_cv_;
};

// Opens a VHD over `lower` (the image file's bytes): finds and checks the footer (at offset 0
// for dynamic and differencing disks, at the end for fixed disks), reads and checks the dynamic
// header and the BAT, and opens the parent chain through options.open_sibling.
// Errors: InvalidArgument (no lower, bad options), Corruption (bad footer, header or BAT entry; a
// parent whose unique id differs from parent_uuid; a cycle), NotSupported (a differencing disk
// without open_sibling, a parent outside the image's folder, a chain deeper than
// max_chain_depth), IOError and NotFound from lower or open_sibling; each with the image's
// describe() in front.
Result<std::unique_ptr<BlockSource>> open_vhd(std::unique_ptr<BlockSource> lower,
                                              const VhdOptions& options);

}  // namespace imgfs::formats
