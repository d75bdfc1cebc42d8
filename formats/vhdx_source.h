// VhdxSource: turns a VHDX image file (Microsoft MS-VHDX v1.0) into the raw virtual disk it
// describes: fixed and dynamic disks, read lazily.
//
// At open: the file identifier, both headers (the valid one with the higher sequence number wins),
// the region table (the copy at 256 KiB when the first is damaged), the metadata table and its
// items, and the whole BAT (one read, bounded by kVhdxMaxBatEntries). After that a read costs one
// lower read per run of payload blocks and nothing else; the source holds no mutable state.
//
// Payload block states (MS-VHDX 2.5.1.1): NOT_PRESENT, UNDEFINED, ZERO and UNMAPPED (3, and 5 as
// the v0.95 draft numbered it, which qemu also accepts) read as zeros; FULLY_PRESENT reads from
// FileOffsetMB. PARTIALLY_PRESENT only makes sense in a differencing disk, so it is Corruption
// here. Sector bitmap entries are skipped: they only matter for differencing disks.
//
// Refused with NotSupported: differencing disks (HasParent), a log that needs replay (a non-zero
// LogGuid with an entry header in the log that qemu would replay; the entry checksum is not
// checked, so a torn entry is refused too, which is the safe side), unknown required regions and
// metadata items.
//
// Bounds rules: every region, metadata item and FULLY_PRESENT block lies inside the file, as far
// as the bytes that are read from it (the last block of a disk may be cut at the end of the
// virtual disk); data blocks must not overlap the 1 MiB header section, the log, the BAT or the
// metadata table.
//
// Probe: probe_vhdx needs the first 8 bytes ("vhdxfile").
#pragma once

#include <array>
#include <cstddef>
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

inline constexpr uint64_t kVhdxHeaderBytes = 4 * 1024;          // checksummed part of a header
inline constexpr uint64_t kVhdxRegionTableBytes = 64 * 1024;    // checksummed region table
inline constexpr uint64_t kVhdxMetadataTableBytes = 64 * 1024;  // metadata table header + entries
inline constexpr uint64_t kVhdxHeader1Offset = 64 * 1024;
inline constexpr uint64_t kVhdxHeader2Offset = 128 * 1024;
inline constexpr uint64_t kVhdxRegionTable1Offset = 192 * 1024;
inline constexpr uint64_t kVhdxRegionTable2Offset = 256 * 1024;
// The BAT is read whole at open; larger tables (disks over 4 TiB with 1 MiB blocks) are refused.
inline constexpr uint64_t kVhdxMaxBatEntries = uint64_t{1} << 22;
// The log is read whole at open when LogGuid is set; larger logs are refused as needing replay.
inline constexpr uint64_t kVhdxMaxLogBytes = 64 << 20;

struct VhdxOptions {
  // Opens a file next to the image by the name the image stores. VHDX differencing disks are not
  // supported yet, so nothing calls it; it is here so every format takes the same options.
  std::function<Result<std::unique_ptr<BlockSource>>(std::string_view name)> open_sibling;
};

using VhdxGuid = std::array<std::byte, 16>;  // as stored on disk (MS GUID byte order)

struct VhdxHeader {
  uint64_t sequence_number = 0;
  VhdxGuid log_guid{};
  uint16_t log_version = 0;
  uint16_t version = 0;
  uint32_t log_length = 0;
  uint64_t log_offset = 0;

  bool has_log_guid() const;
};

struct VhdxRegion {
  uint64_t file_offset = 0;
  uint32_t length = 0;
};

struct VhdxRegionTable {
  VhdxRegion bat;
  VhdxRegion metadata;
};

// Where a metadata item lies, relative to the start of the metadata region (length 0: absent).
struct VhdxMetadataItem {
  uint32_t offset = 0;
  uint32_t length = 0;
};

struct VhdxMetadataTable {
  VhdxMetadataItem file_parameters;
  VhdxMetadataItem virtual_disk_size;
  VhdxMetadataItem logical_sector_size;
  VhdxMetadataItem physical_sector_size;
  VhdxMetadataItem page83_data;
  VhdxMetadataItem parent_locator;
  // Leading bytes of the metadata region that hold the table and every known item.
  uint64_t bytes_needed = 0;
};

struct VhdxDiskParameters {
  uint32_t block_size = 0;  // payload block bytes: a power of two, 1 MiB to 256 MiB
  bool leave_blocks_allocated = false;
  bool has_parent = false;
  uint64_t virtual_disk_size = 0;
  uint32_t logical_sector_size = 0;   // 512 or 4096
  uint32_t physical_sector_size = 0;  // 512 or 4096; 0 when the item is absent
  std::string parent_relative_path;   // has_parent only, when the parent locator names one
  uint64_t chunk_ratio = 0;           // payload blocks per sector bitmap block
  uint64_t payload_blocks = 0;
  uint64_t bat_entries = 0;  // payload and sector bitmap entries the BAT must hold
};

// CRC-32C (Castagnoli) of `structure` with its checksum field (bytes 4..7, where every VHDX
// header, region table and log entry keeps it) taken as zero. Pure; thread-safe.
uint32_t vhdx_checksum(std::span<const std::byte> structure);

// Decodes one header from its 4 KiB. Pure. Errors: Corruption (bad signature or checksum,
// version other than 1, misaligned log fields).
Result<VhdxHeader> parse_vhdx_header(std::span<const std::byte> header_bytes);

// The current header of the two (the valid one with the higher sequence number; equal numbers
// only when both headers are identical). Pure. Errors: Corruption naming why neither is usable.
Result<VhdxHeader> select_vhdx_header(std::span<const std::byte> header1_bytes,
                                      std::span<const std::byte> header2_bytes);

// Decodes a region table from its 64 KiB. Pure. Errors: Corruption (signature, checksum, count,
// misaligned or duplicate or missing BAT/metadata regions), NotSupported (an unknown required
// region).
Result<VhdxRegionTable> parse_vhdx_region_table(std::span<const std::byte> table_bytes);

// Decodes the metadata table (the first 64 KiB of a metadata region of `region_length` bytes).
// Pure. Errors: Corruption (signature, count, duplicates, items outside the region, a missing
// required item), NotSupported (an unknown required item).
Result<VhdxMetadataTable> parse_vhdx_metadata_table(std::span<const std::byte> table_bytes,
                                                    uint64_t region_length);

// Decodes the known items from `region_prefix` (at least table.bytes_needed leading bytes of the
// metadata region) and derives the BAT geometry. Pure. Errors: Corruption naming the field.
Result<VhdxDiskParameters> parse_vhdx_disk_parameters(const VhdxMetadataTable& table,
                                                      std::span<const std::byte> region_prefix);

// True when the log region `log_bytes` holds an entry that belongs to `log_guid` and would be
// replayed (signature, length, sequence number and descriptor count valid). Pure.
bool vhdx_log_needs_replay(std::span<const std::byte> log_bytes, const VhdxGuid& log_guid);

// A byte range of the file that payload blocks must not overlap.
struct VhdxReservedRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  const char* what = "";
};

// Decodes the BAT (`bat_bytes`: at least params.bat_entries * 8 bytes) into one file offset per
// payload block, 0 for a block that reads as zeros. Each FULLY_PRESENT block is checked against a
// file of `file_size` bytes and against `reserved`. Pure.
// Errors: Corruption naming the entry, NotSupported (differencing parameters).
Result<std::vector<uint64_t>> parse_vhdx_bat(std::span<const std::byte> bat_bytes,
                                             const VhdxDiskParameters& params, uint64_t file_size,
                                             std::span<const VhdxReservedRange> reserved);

// Score 0..100 that `first_bytes` (at least the first 8 bytes of a file) start a VHDX image.
int probe_vhdx(std::span<const std::byte> first_bytes);

class VhdxSource final : public BlockSource {
 public:
  uint64_t size() const override { return params_.virtual_disk_size; }

  // Reads virtual disk bytes: zeros for blocks that are not present, one lower read per run of
  // FULLY_PRESENT blocks that are adjacent in the file. Thread-safe (no mutable state).
  // Errors: InvalidArgument (range past size()), IOError or Corruption from lower.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  std::string describe() const override { return "vhdx(" + lower_->describe() + ")"; }

  uint32_t block_size() const override { return params_.block_size; }

  // Data or zero run at `offset`: consecutive payload blocks of the same kind, at most
  // kMapMaxBlocks of them per call. Thread-safe. Errors: InvalidArgument (offset >= size()).
  Result<Extent> map(uint64_t offset) const override;

  static constexpr uint64_t kMapMaxBlocks = 4096;

  const VhdxDiskParameters& parameters() const { return params_; }

 private:
  friend Result<std::unique_ptr<BlockSource>> open_vhdx(std::unique_ptr<BlockSource> lower,
                                                        const VhdxOptions& options);

  VhdxSource(std::unique_ptr<BlockSource> lower, VhdxDiskParameters params,
             std::vector<uint64_t> block_offsets);

  const std::unique_ptr<BlockSource> lower_;
  const VhdxDiskParameters params_;
  // File offset of each payload block's data, 0 when the block reads as zeros.
  const std::vector<uint64_t> block_offsets_;
};

// Opens a VHDX image over `lower` (the image file's bytes): reads and checks the headers, region
// table, metadata and BAT. Errors: Corruption (any bad structure or field, naming the image and
// the field), NotSupported (differencing disks, a log that needs replay, unknown required items,
// a BAT or log too large to read at open), IOError from lower.
Result<std::unique_ptr<BlockSource>> open_vhdx(std::unique_ptr<BlockSource> lower,
                                               const VhdxOptions& options);

}  // namespace imgfs::formats
