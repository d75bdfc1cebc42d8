// Qcow2Source: turns a qcow2 image file (v2 or v3, qemu docs/interop/qcow2.txt) into the raw
// virtual disk it describes, reading lazily: the header and the L1 table at open, L2 tables and
// data clusters when a read touches them.
//
// Supported: any cluster size from 512 B to 2 MiB, zero clusters, unallocated clusters (zeros, or
// the backing file's bytes), compressed clusters (deflate; zstd when built with IMGFS_HAVE_ZSTD),
// extended L2 entries (32 subclusters per cluster), backing chains of qcow2 or raw files found by
// name next to the image. Refused with NotSupported: encryption, external data files, unknown
// incompatible features. The dirty bit is accepted (only refcounts may be stale, and reading
// never uses them); so is the corrupt bit, as qemu allows read-only opens of such images: every
// table entry is still checked, so damage that breaks a bound gives Corruption. Snapshots are not
// exposed; the active L1 table is what the guest sees.
//
// Bounds rules: an L2 table lies wholly inside the file; a data (sub)cluster starts inside the file
// and every byte a read takes from it is inside the file (qemu's extended-L2 images end a cluster
// early when only its first subclusters are written, so the cluster's end is not checked); a
// compressed cluster starts inside the file and its sector-rounded length is clipped at the end of
// the file, since qemu stops the file at the last compressed byte.
//
// Probe: probe_qcow2 needs the first 8 bytes (magic and version).
//
// Lock order: each of the two caches (L2 slices, decompressed clusters) has its own mutex, and no
// code path holds both. Neither is held across a lower read, a backing read or a decompression;
// the backing source's locks are therefore never taken under ours.
#pragma once

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

struct Qcow2Options {
  // Opens the file `name` next to the image: the backing file name as the image stores it,
  // relative to the image's folder (deeper in a chain, joined to the folder of the backing file
  // that names it; absolute names are passed as they are). Empty → an image with a backing file
  // gives NotSupported naming it.
  std::function<Result<std::unique_ptr<BlockSource>>(std::string_view name)> open_sibling;
  // Optional: turns an opened backing file in a format other than qcow2 and raw into its raw view.
  // `format` is the header's backing format name ("vmdk", ...), or "" when the image names none and
  // the file is not qcow2 (the callee probes). Empty → such a backing file is read as raw when the
  // image names no format, and gives NotSupported when it names one.
  std::function<Result<std::unique_ptr<BlockSource>>(std::unique_ptr<BlockSource> file,
                                                     std::string_view format)>
      open_backing_format;
  // Longest backing chain, counting this image as 1.
  int max_chain_depth = 16;
  // Byte bounds of the in-memory caches (each keeps at least one entry): L2 table slices, and
  // decompressed clusters of compressed images.
  uint64_t l2_cache_bytes = 8 << 20;
  uint64_t cluster_cache_bytes = 4 << 20;
};

struct Qcow2FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

enum class Qcow2CompressionType : uint8_t { kDeflate = 0, kZstd = 1 };

// The header and the header extensions, decoded and checked (no I/O).
struct Qcow2Header {
  static constexpr uint64_t kIncompatibleDirty = 1u << 0;
  static constexpr uint64_t kIncompatibleCorrupt = 1u << 1;
  static constexpr uint64_t kIncompatibleExternalData = 1u << 2;
  static constexpr uint64_t kIncompatibleCompressionType = 1u << 3;
  static constexpr uint64_t kIncompatibleExtendedL2 = 1u << 4;

  uint32_t version = 0;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;  // virtual disk size in bytes
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;  // entries
  uint64_t l1_table_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t header_length = 0;
  Qcow2CompressionType compression_type = Qcow2CompressionType::kDeflate;

  std::string backing_file;    // "" when there is none
  std::string backing_format;  // from the backing file format extension; "" when absent
  std::string external_data_file;
  bool has_encryption_extension = false;
  std::vector<Qcow2FeatureName> feature_names;

  uint64_t cluster_bytes() const { return uint64_t{1} << cluster_bits; }
  bool extended_l2() const { return (incompatible_features & kIncompatibleExtendedL2) != 0; }
  // Bytes per L2 entry: 8, or 16 with extended L2 (entry plus subcluster bitmap).
  uint64_t l2_entry_bytes() const { return extended_l2() ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_bytes() / l2_entry_bytes(); }
  // 32 with extended L2, else 1.
  uint32_t subclusters() const { return extended_l2() ? 32 : 1; }
  // L1 entries needed to cover size.
  uint64_t l1_entries_needed() const;
};

struct Qcow2HeaderScan {
  bool complete = false;  // false: call again with the first bytes_needed bytes of the file
  uint64_t bytes_needed = 0;
  Qcow2Header header;  // checked when complete
};

// Decodes the header, walks the header extensions to the end marker and reads the backing file
// name, from `bytes` (a prefix of the file; at least 112 bytes unless the file is shorter) of a
// file of `file_size` bytes. When the extensions or the name continue past `bytes`, returns
// complete == false and how many leading bytes are needed (never more than one cluster).
// Pure; thread-safe. Errors: Corruption (bad magic, a field out of range, an extension or the name
// running past the first cluster or the file, an L1 table too small for the size or past the
// file), NotSupported (version other than 2 and 3, an unknown compression type).
// Features that the reader refuses (encryption, external data, unknown incompatible bits) are
// decoded here and refused by open_qcow2, so tools can still describe such images.
Result<Qcow2HeaderScan> scan_qcow2_header(std::span<const std::byte> bytes, uint64_t file_size);

// NotSupported when the reader cannot serve this image (encryption, an external data file,
// unknown incompatible feature bits, zstd without IMGFS_HAVE_ZSTD), naming the feature. Pure.
Status check_qcow2_supported(const Qcow2Header& header);

// Decodes the first header.l1_entries_needed() L1 entries from `bytes` (big-endian u64s) into
// L2 table offsets (0: no table). Each offset is cluster-aligned and its table lies inside a
// file of `file_size` bytes. Pure. Errors: Corruption naming the entry.
Result<std::vector<uint64_t>> parse_qcow2_l1_table(std::span<const std::byte> bytes,
                                                   const Qcow2Header& header, uint64_t file_size);

// Where one guest subcluster's bytes come from.
struct Qcow2Mapping {
  enum class Kind { kUnallocated, kZero, kData, kCompressed };
  Kind kind = Kind::kUnallocated;
  // kData: host offset of the subcluster. kCompressed: host offset of the compressed cluster.
  uint64_t host_offset = 0;
  // kCompressed: bytes to read at host_offset (clipped at the end of the file).
  uint64_t compressed_bytes = 0;
};

// Classifies subcluster `subcluster` (0 without extended L2) of an L2 entry and its subcluster
// bitmap (0 without extended L2), checking offsets against a file of `file_size` bytes. Pure.
// Errors: Corruption (unaligned or out-of-file offsets, an invalid subcluster bitmap).
Result<Qcow2Mapping> decode_qcow2_l2_entry(const Qcow2Header& header, uint64_t entry,
                                           uint64_t bitmap, uint32_t subcluster,
                                           uint64_t file_size);

// Decompresses one compressed cluster: `out` (one cluster) must be filled exactly, as qemu
// requires. Pure. Errors: Corruption (bad data), NotSupported (zstd without IMGFS_HAVE_ZSTD).
Status decompress_qcow2_cluster(Qcow2CompressionType type, std::span<const std::byte> compressed,
                                std::span<std::byte> out);

// Score 0..100 that `first_bytes` (at least the first 8 bytes of a file) start a qcow2 image.
int probe_qcow2(std::span<const std::byte> first_bytes);

class Qcow2Source final : public BlockSource {
 public:
  ~Qcow2Source() override;

  uint64_t size() const override { return header_.size; }

  // Reads guest bytes: data clusters from lower (adjacent host clusters in one read), zeros, the
  // backing file's bytes, or decompressed clusters. Thread-safe; concurrent readers share one L2
  // slice fetch and one decompression per cluster.
  // Errors: InvalidArgument (range past size()), Corruption (bad table entries or compressed data,
  // naming the image and the field), IOError from lower or the backing file, NotSupported.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  std::string describe() const override { return "qcow2(" + lower_->describe() + ")"; }

  uint32_t block_size() const override;

  // Data or zero run at `offset`, from the L2 entries of one L2 slice (at most that slice's reach).
  // Unallocated clusters are zero without a backing file, and take the backing file's map with one.
  // Thread-safe. Errors: as read_at.
  Result<Extent> map(uint64_t offset) const override;

  const Qcow2Header& header() const { return header_; }
  // The backing source (qcow2 or raw), or nullptr.
  const BlockSource* backing() const { return backing_.get(); }

 private:
  class BytesCache;
  struct SliceRef;
  friend class Qcow2Opener;

  Qcow2Source(std::unique_ptr<BlockSource> lower, const Qcow2Options& options, Qcow2Header header,
              std::vector<uint64_t> l2_offsets, std::unique_ptr<BlockSource> backing);

  // The mapping of the subcluster holding guest `offset` (< size()). `slice` remembers the last
  // L2 slice used, so a loop over neighbouring clusters locks the cache once per slice.
  Result<Qcow2Mapping> lookup(uint64_t offset, SliceRef& slice) const;
  // Guest bytes [offset, offset + out.size()) from the backing file, zeros past its end.
  Status read_backing(uint64_t offset, std::span<std::byte> out) const;
  // Copies bytes of the compressed cluster `mapping` from within_cluster into out.
  Status read_compressed(const Qcow2Mapping& mapping, uint64_t within_cluster,
                         std::span<std::byte> out) const;

  const std::unique_ptr<BlockSource> lower_;
  const Qcow2Header header_;
  const std::vector<uint64_t> l2_offsets_;  // per L1 entry: host offset of the L2 table, or 0
  const std::unique_ptr<BlockSource> backing_;
  const uint64_t lower_size_;
  const uint64_t subcluster_bytes_;
  const uint64_t l2_slice_bytes_;

  const std::unique_ptr<BytesCache> l2_cache_;       // key: host offset of the L2 slice
  const std::unique_ptr<BytesCache> cluster_cache_;  // key: host offset of the compressed data
};

// Opens a qcow2 image over `lower` (the image file's bytes): checks the header and extensions,
// reads and checks the L1 table, and opens the backing chain through options.open_sibling.
// Errors: InvalidArgument (no lower, bad options), Corruption (bad header or L1 entry; a backing
// chain with a cycle), NotSupported (see check_qcow2_supported; a backing file without
// open_sibling; a chain deeper than max_chain_depth), IOError and NotFound from lower or
// open_sibling, each with the image's describe() in front.
Result<std::unique_ptr<BlockSource>> open_qcow2(std::unique_ptr<BlockSource> lower,
                                                const Qcow2Options& options);

}  // namespace imgfs::formats
