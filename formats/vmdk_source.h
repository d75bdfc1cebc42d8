// VmdkSource: turns a VMDK image (the file the user opened: a hosted sparse extent with an
// embedded descriptor, or a text descriptor naming extent files) into the raw virtual disk.
//
// Follows VMware's "Virtual Disk Format 5.0" and, where qemu differs, qemu block/vmdk.c (the
// oracle): monolithicSparse, streamOptimized (deflate grains in zlib format, grain markers, the
// grain directory in the footer when the header says GD_AT_END), monolithicFlat,
// twoGbMaxExtentSparse, twoGbMaxExtentFlat, vmfs/vmfsThin (VMFS extents read like FLAT), ZERO
// extents, and delta links (parentFileNameHint) through options.open_sibling.
//
// Metadata: each sparse extent's grain directory is read at open in one request; grain tables
// are read on first use and kept in a byte-bounded LRU, decompressed grains in another. Both
// fills are single-flight (the first reader fetches, the others wait).
//
// Lock order: each cache has one mutex, never held across a lower read, an inflate, or a call
// into the other cache or the parent.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/block_source.h"
#include "formats/status.h"

namespace imgfs::formats {

inline constexpr uint64_t kVmdkSectorBytes = 512;

// The decoded header of a hosted sparse extent ("KDMV", spec section "Hosted Sparse Extent
// Header"); sector counts as stored.
struct VmdkSparseHeader {
  uint32_t version = 0;
  uint32_t flags = 0;
  uint64_t capacity_sectors = 0;
  uint64_t grain_sectors = 0;
  uint64_t descriptor_offset_sectors = 0;
  uint64_t descriptor_size_sectors = 0;
  uint32_t gtes_per_gt = 0;
  uint64_t rgd_offset_sectors = 0;
  uint64_t gd_offset_sectors = 0;  // kVmdkGdAtEnd: the real header is the footer
  uint64_t overhead_sectors = 0;
  bool unclean_shutdown = false;
  uint16_t compress_algorithm = 0;  // 0 none, 1 deflate

  static constexpr uint64_t kGdAtEnd = ~uint64_t{0};
  static constexpr uint32_t kFlagZeroGrainGte = 1u << 2;
  static constexpr uint32_t kFlagMarkers = 1u << 17;

  bool gd_at_end() const { return gd_offset_sectors == kGdAtEnd; }
  // As qemu decides it: by compressAlgorithm, not by flag bit 16.
  bool compressed() const { return compress_algorithm == 1; }
  bool has_markers() const { return (flags & kFlagMarkers) != 0; }
  bool zero_grain_gte() const { return (flags & kFlagZeroGrainGte) != 0; }
  // Grain directory entries (each covers gtes_per_gt grains). Valid after a successful parse.
  uint64_t gd_entries() const;
};

// Decodes and checks the first 512 bytes of `bytes` as a sparse extent header: magic "KDMV",
// version 1-3, newline check bytes (when flag bit 0 says they are valid), grain size 1..2^21
// sectors, 1..512 entries per grain table, capacity * 512 without overflow, at most 2^25 grain
// directory entries, compressAlgorithm 0 or 1. Pure. Does not check offsets against a file size.
// Errors: Corruption naming the field, NotSupported (version > 3, an unknown compression).
Result<VmdkSparseHeader> parse_vmdk_sparse_header(std::span<const std::byte> bytes);

// Decodes the last 1536 bytes of a stream-optimized extent: footer marker, footer (a sparse
// header with the real grain directory offset) and end-of-stream marker. Pure.
// Errors: Corruption (short input, bad markers, a footer that is itself GD_AT_END, or any
// parse_vmdk_sparse_header error).
Result<VmdkSparseHeader> parse_vmdk_footer(std::span<const std::byte> last_bytes);

// One extent line of a descriptor: `ACCESS SECTORS TYPE ["NAME" [OFFSET]]`.
struct VmdkExtentLine {
  enum class Access { kReadWrite, kReadOnly, kNoAccess };
  enum class Type { kFlat, kSparse, kZero, kVmfs, kVmfsSparse, kSeSparse, kVmfsRaw };
  Access access = Access::kReadWrite;
  Type type = Type::kFlat;
  uint64_t sectors = 0;
  std::string file_name;        // empty for ZERO
  uint64_t offset_sectors = 0;  // FLAT (and VMFS) start in the extent file
};

// The parts of a descriptor imgfs uses.
struct VmdkDescriptor {
  std::string create_type;  // empty when the descriptor has none
  std::optional<uint32_t> cid;
  std::optional<uint32_t> parent_cid;  // absent or 0xffffffff: no parent
  std::string parent_file_name;        // parentFileNameHint, empty when absent
  std::vector<VmdkExtentLine> extents;
};

// Parses descriptor text (up to the first NUL; at most kVmdkMaxDescriptorBytes). Lines are
// `key = value` (values may be quoted), comments (#), blank, or extent lines. Unknown keys are
// ignored; a malformed extent line, a bad number, or an over-long value is an error. Names are
// not checked here (see check_vmdk_file_name). Pure.
// Errors: Corruption naming the line, NotSupported (an unknown extent type or access word).
inline constexpr uint64_t kVmdkMaxDescriptorBytes = 1 << 20;
inline constexpr size_t kVmdkMaxExtents = 8192;
Result<VmdkDescriptor> parse_vmdk_descriptor(std::string_view text);

// OK when `name` is a safe relative file name: 1..512 bytes, no control characters, not absolute,
// no empty, "." or ".." components. Errors: Corruption (".." or malformed), NotSupported
// (absolute paths, which imgfs never follows).
Status check_vmdk_file_name(std::string_view name);

// Decodes a grain directory of `entries` little-endian sector offsets and checks that each
// non-zero entry's grain table (gtes_per_gt * 4 bytes) lies within [1 sector, file_size). Pure.
// Errors: Corruption naming the entry (short input, an entry past the end).
Result<std::vector<uint32_t>> parse_vmdk_grain_directory(std::span<const std::byte> bytes,
                                                         uint64_t entries, uint32_t gtes_per_gt,
                                                         uint64_t file_size);

// Probe score 0..100 from the first bytes of a file (at least 4 KiB when the file has them):
// 100 for the sparse magic "KDMV", 100 for a text descriptor ("# Disk DescriptorFile", or a
// `version=N` line after comments and blank lines, as qemu vmdk_probe), 0 otherwise. "COWD"
// (ESX vmfsSparse) scores 50: it is VMDK, but imgfs only reports it as NotSupported.
int probe_vmdk(std::span<const std::byte> first_bytes);

// The files a VMDK keeps its data in beside itself: the names on the extent lines of a text
// descriptor (checked with check_vmdk_file_name); empty for a hosted sparse extent, whose data
// is inside it. Reads the file (a descriptor is at most kVmdkMaxDescriptorBytes). Thread-safe.
// Errors: IOError from `file`, Corruption / NotSupported from parsing.
Result<std::vector<std::string>> vmdk_extent_files(const BlockSource& file);

struct VmdkOptions {
  // Opens a file next to the image by the relative name the image stores (extent files,
  // parentFileNameHint); names are checked with check_vmdk_file_name first. May be empty: a
  // VMDK that needs another file then gives NotSupported naming it.
  std::function<Result<std::unique_ptr<BlockSource>>(std::string_view name)> open_sibling;
  int max_chain_depth = 16;                 // delta links followed, this image included
  uint64_t table_cache_bytes = 4ull << 20;  // grain tables kept (LRU)
  uint64_t grain_cache_bytes = 8ull << 20;  // decompressed grains kept (LRU)
};

class VmdkSource final : public BlockSource {
 public:
  struct ExtentState;
  class ByteCache;

  ~VmdkSource() override;

  uint64_t size() const override { return size_; }

  // Reads through the extents: flat bytes, zeros, grains (decompressed for streamOptimized),
  // and the parent for unallocated grains of a delta link.
  // Thread-safe. Errors: InvalidArgument (range past size()), Corruption (a grain table entry
  // or marker that is out of range, bad deflate data; names the extent and field), IOError and
  // others from lower layers with this layer's context.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "vmdk(" + lower->describe() + ")".
  std::string describe() const override;

  // The largest grain of the sparse extents, or 512 (a sector) when every extent is flat/zero.
  uint32_t block_size() const override { return block_size_; }

  // Data or zero run at `offset`, from the grain tables (zero grains and unallocated grains
  // without a parent are zeros; unallocated grains with a parent count as data). A run ends at
  // an extent boundary at the latest. Thread-safe. Errors as read_at (grain table reads).
  Result<Extent> map(uint64_t offset) const override;

  // The descriptor's createType ("monolithicSparse" when a sparse file has no descriptor;
  // "streamOptimized" when its grains are compressed, as qemu reports it).
  const std::string& create_type() const { return create_type_; }
  size_t extent_count() const;
  // Depth of the delta chain under this image (0: no parent).
  int parent_depth() const;

 private:
  friend class VmdkOpener;

  VmdkSource(std::unique_ptr<BlockSource> lower, std::string create_type,
             const VmdkOptions& options);

  // Reads `out` from sparse extent `index` at extent-relative offset `rel`.
  Status read_sparse(size_t index, uint64_t rel, std::span<std::byte> out) const;
  // Fills `out` as the parent shows virtual offset `offset` (zeros past its end), or zeros.
  Status read_unallocated(uint64_t offset, std::span<std::byte> out) const;
  // The grain table entry for grain `grain` of sparse extent `index`.
  Result<uint32_t> grain_entry(size_t index, uint64_t grain) const;
  // The decompressed grain `grain` (entry `entry`) of sparse extent `index`.
  Result<std::shared_ptr<const std::vector<std::byte>>> compressed_grain(size_t index,
                                                                         uint64_t grain,
                                                                         uint32_t entry) const;
  size_t extent_index(uint64_t offset) const;

  const std::unique_ptr<BlockSource> lower_;
  std::string create_type_;                             // set while opening, then immutable
  std::vector<std::unique_ptr<BlockSource>> siblings_;  // extent files other than lower_
  std::unique_ptr<VmdkSource> parent_;
  std::optional<uint32_t> cid_;       // the descriptor's CID, checked against a child's parentCID
  std::vector<ExtentState> extents_;  // ascending, contiguous from 0
  uint64_t size_ = 0;
  uint32_t block_size_ = kVmdkSectorBytes;
  std::unique_ptr<ByteCache> tables_;  // key {extent, gd index}
  std::unique_ptr<ByteCache> grains_;  // key {extent, grain index}
};

// Opens the VMDK whose descriptor or sparse extent is `lower`: reads and checks the header (and
// footer), the descriptor, every extent's header and grain directory, and the parent chain.
// Errors: InvalidArgument (no lower), Corruption naming the image and field (bad magic, a
// descriptor error, a table entry past the end, a truncated footer, a name with ".."),
// NotSupported (VMFSSPARSE/SESPARSE/raw device extents, NOACCESS, absolute names, no
// open_sibling for a file it needs, a chain deeper than max_chain_depth), errors of the files.
Result<std::unique_ptr<BlockSource>> open_vmdk(std::unique_ptr<BlockSource> lower,
                                               const VmdkOptions& options);

}  // namespace imgfs::formats
