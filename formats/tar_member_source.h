// TarMemberSource: turns a tar stream into the bytes of its first regular-file member, the way
// euca-unbundle copies out the first member (FORMATS.md a.2). It reads ustar, GNU and pre-POSIX
// (v7) headers, GNU long names ('L', and 'K' skipped), pax 'x' path and size (and 'g' skipped),
// GNU base-256 sizes and old-GNU sparse members ('S', holes read as zeros). pax GNU.sparse.*
// members (sparse formats 0.x and 1.0) are NotSupported. The header walk and every check happen
// at open; a read is an offset translation like nbdkit filters/offset.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/block_source.h"

namespace imgfs::formats {

inline constexpr uint64_t kTarBlockSize = 512;

enum class TarFormat { kV7, kUstar, kGnu };

// One old-GNU sparse map entry: `length` stored bytes belong at `offset` of the expanded file.
struct TarSparseEntry {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// The fields of one 512-byte header that imgfs uses, decoded and checked.
struct TarHeader {
  TarFormat format = TarFormat::kV7;
  // For ustar, prefix + "/" + name when the prefix is set; otherwise the name field.
  std::string name;
  char typeflag = '0';
  // Bytes of data stored after this header (for 'S', the stored bytes, not the expanded size).
  uint64_t size = 0;
  // 'S' only: the entries in the header (up to 4, ending at the first empty one), whether an
  // extension block follows, and the expanded size of the file.
  std::vector<TarSparseEntry> sparse_entries;
  bool sparse_extended = false;
  uint64_t sparse_real_size = 0;
};

// The entries of one old-GNU sparse extension block (up to 21) and its isextended flag.
struct TarSparseExtension {
  std::vector<TarSparseEntry> entries;
  bool extended = false;
};

// The pax extended-header keys imgfs honors.
struct PaxRecords {
  std::optional<std::string> path;
  std::optional<uint64_t> size;
  // Set when any GNU.sparse.* key is present (GNU sparse formats 0.x and 1.0).
  bool gnu_sparse = false;
};

// True when all 512 bytes are zero (an end-of-archive block).
bool is_zero_tar_block(std::span<const std::byte, kTarBlockSize> block);

// Decodes one header block. Pure; thread-safe.
// Errors: Corruption (checksum mismatch, either unsigned or signed sum; a malformed numeric field;
// a base-256 value that is negative or overflows 64 bits; an 'S' header without GNU magic or with
// a malformed sparse map).
Result<TarHeader> parse_tar_header(std::span<const std::byte, kTarBlockSize> block);

// Decodes one old-GNU sparse extension block. Pure; thread-safe. Errors: Corruption.
Result<TarSparseExtension> parse_tar_sparse_extension(
    std::span<const std::byte, kTarBlockSize> block);

// Decodes the data of a pax 'x' header: records "LEN key=value\n". Trailing NUL padding is
// allowed. Pure; thread-safe. Errors: Corruption (a malformed record, or a bad size value).
Result<PaxRecords> parse_pax_records(std::span<const std::byte> data);

class TarMemberSource final : public BlockSource {
 public:
  // A stored run of a sparse member: `length` bytes at `offset` of the member, stored at
  // `stored_offset` bytes after data_offset().
  struct Segment {
    uint64_t offset = 0;
    uint64_t length = 0;
    uint64_t stored_offset = 0;
  };

  // Use open_tar_member(), which checks everything. `segments` is empty for a plain member;
  // for a sparse one it lists the data runs in order, non-adjacent and within `size`.
  TarMemberSource(std::unique_ptr<BlockSource> lower, std::string member_name, uint64_t data_offset,
                  uint64_t size, bool sparse, std::vector<Segment> segments);

  uint64_t size() const override { return size_; }

  // Member bytes: lower bytes at data_offset() + offset, or, for a sparse member, piecewise,
  // with holes filled with zeros. Thread-safe (no mutable state).
  // Errors: InvalidArgument (range past size()); any error of lower, with the member as context.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "tar(" + lower->describe() + ")".
  std::string describe() const override;

  // Data or zero runs; a plain member is one data run. Errors: InvalidArgument (offset >= size()).
  Result<Extent> map(uint64_t offset) const override;

  const std::string& member_name() const { return member_name_; }
  // Offset of the member data in the tar stream (for a sparse member, of the first stored byte).
  uint64_t data_offset() const { return data_offset_; }

 private:
  const std::unique_ptr<BlockSource> lower_;
  const std::string member_name_;
  const uint64_t data_offset_;
  const uint64_t size_;
  const bool sparse_;
  const std::vector<Segment> segments_;
};

// Finds the first regular-file member ('0', '\0', '7' or old-GNU sparse 'S') in the tar stream in
// `lower`, skipping directories and other entries before it, and checks that its data (and
// sparse map) fit in lower->size(). Reads only headers and metadata blocks.
// Errors: InvalidArgument (null lower); NotFound ("tar stream has no regular file member", when an
// end-of-archive block or the end of the stream comes first); Corruption (bad checksum, malformed
// field or pax record, "truncated tar member", a truncated header); NotSupported (pax GNU.sparse.*
// members; a long name or pax header over 1 MiB); any error of lower.
Result<std::unique_ptr<TarMemberSource>> open_tar_member(std::unique_ptr<BlockSource> lower);

}  // namespace imgfs::formats
