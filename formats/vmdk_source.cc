#include "formats/vmdk_source.h"

#include <zlib.h>

#include <algorithm>
#include <charconv>
#include <condition_variable>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <set>
#include <utility>

#include "formats/byte_order.h"
#include "formats/checked_math.h"
#include "formats/scope_exit.h"

namespace imgfs::formats {

namespace {

constexpr uint64_t kSector = kVmdkSectorBytes;
constexpr uint64_t kHeaderBytes = 512;
// Footer marker, footer header and end-of-stream marker: one sector each, at the end of a
// stream-optimized file (qemu reads them from EOF - 1536).
constexpr uint64_t kFooterBytes = 3 * kSector;
constexpr uint64_t kMaxGrainSectors = 0x200000;  // qemu refuses grains above 1 GiB
constexpr uint64_t kMaxGdEntries = 32ull << 20;  // qemu's L1 limit; bounds the directory
constexpr uint32_t kMaxGtesPerGt = 512;          // qemu's limit (the spec always uses 512)
// A compressed grain is inflated whole into memory, so its size is bounded.
constexpr uint64_t kMaxCompressedGrainBytes = 16ull << 20;
constexpr uint64_t kGrainMarkerBytes = 12;  // {uint64 lba, uint32 size}, then the data
constexpr uint32_t kMarkerEndOfStream = 0;
constexpr uint32_t kMarkerFooter = 3;
constexpr uint32_t kNoParentCid = 0xffffffff;
constexpr size_t kMaxNameBytes = 512;
constexpr size_t kMaxValueBytes = 1024;
// map() stops a run after scanning this many grain tables, so one call stays cheap.
constexpr uint64_t kMapMaxTables = 64;

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  return s;
}

bool is_space(char c) { return c == ' ' || c == '\t'; }

std::string_view next_token(std::string_view* rest) {
  while (!rest->empty() && is_space(rest->front())) rest->remove_prefix(1);
  size_t end = 0;
  while (end < rest->size() && !is_space((*rest)[end])) ++end;
  std::string_view token = rest->substr(0, end);
  rest->remove_prefix(end);
  return token;
}

std::optional<uint64_t> parse_decimal(std::string_view s) {
  uint64_t value = 0;
  if (s.empty()) return std::nullopt;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), value, 10);
  if (ec != std::errc() || ptr != s.data() + s.size()) return std::nullopt;
  return value;
}

std::optional<uint32_t> parse_hex32(std::string_view s) {
  uint32_t value = 0;
  if (s.empty()) return std::nullopt;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), value, 16);
  if (ec != std::errc() || ptr != s.data() + s.size()) return std::nullopt;
  return value;
}

std::string quoted(std::string_view s) { return "\"" + std::string(s) + "\""; }

Status parse_extent_line(std::string_view line, size_t line_no, VmdkExtentLine* extent) {
  const std::string where = "descriptor line " + std::to_string(line_no);
  std::string_view rest = line;
  const std::string_view access = next_token(&rest);
  if (access == "RW") {
    extent->access = VmdkExtentLine::Access::kReadWrite;
  } else if (access == "RDONLY") {
    extent->access = VmdkExtentLine::Access::kReadOnly;
  } else {
    extent->access = VmdkExtentLine::Access::kNoAccess;
  }
  const std::optional<uint64_t> sectors = parse_decimal(next_token(&rest));
  if (!sectors) return Status::Corruption(where + ": bad extent size in sectors");
  extent->sectors = *sectors;
  const std::string_view type = next_token(&rest);
  using Type = VmdkExtentLine::Type;
  if (type == "FLAT") {
    extent->type = Type::kFlat;
  } else if (type == "SPARSE") {
    extent->type = Type::kSparse;
  } else if (type == "ZERO") {
    extent->type = Type::kZero;
  } else if (type == "VMFS") {
    extent->type = Type::kVmfs;
  } else if (type == "VMFSSPARSE") {
    extent->type = Type::kVmfsSparse;
  } else if (type == "SESPARSE") {
    extent->type = Type::kSeSparse;
  } else if (type == "VMFSRAW" || type == "VMFSRDM" || type == "VMFSPASSTHROUGHRAW") {
    extent->type = Type::kVmfsRaw;
  } else if (type.empty()) {
    return Status::Corruption(where + ": extent line has no type");
  } else {
    return Status::NotSupported(where + ": extent type " + std::string(type.substr(0, 32)));
  }
  while (!rest.empty() && is_space(rest.front())) rest.remove_prefix(1);
  if (extent->type == Type::kZero) {
    if (!rest.empty()) return Status::Corruption(where + ": a ZERO extent names no file");
    return Status::OK();
  }
  if (rest.empty() || rest.front() != '"') {
    return Status::Corruption(where + ": extent file name is not quoted");
  }
  rest.remove_prefix(1);
  const size_t close = rest.find('"');
  if (close == std::string_view::npos) {
    return Status::Corruption(where + ": extent file name has no closing quote");
  }
  if (close > kMaxNameBytes) return Status::Corruption(where + ": extent file name too long");
  extent->file_name = std::string(rest.substr(0, close));
  rest.remove_prefix(close + 1);
  const std::string_view offset = next_token(&rest);
  if (!trim(rest).empty()) return Status::Corruption(where + ": trailing text after the extent");
  if (offset.empty()) {
    if (extent->type == Type::kFlat) {
      return Status::Corruption(where + ": FLAT extent has no offset");
    }
    return Status::OK();
  }
  if (extent->type != Type::kFlat && extent->type != Type::kVmfs) {
    return Status::Corruption(where + ": only FLAT and VMFS extents take an offset");
  }
  const std::optional<uint64_t> offset_sectors = parse_decimal(offset);
  if (!offset_sectors) return Status::Corruption(where + ": bad extent offset");
  extent->offset_sectors = *offset_sectors;
  return Status::OK();
}

// Inflates one compressed grain (a zlib stream, as qemu and VMware write it) into exactly
// `need` bytes; the stream may hold up to `grain_bytes`.
Result<std::vector<std::byte>> inflate_grain(std::span<const std::byte> in, uint64_t need,
                                             uint64_t grain_bytes) {
  std::vector<std::byte> out(grain_bytes);
  z_stream strm{};
  if (inflateInit(&strm) != Z_OK) return Status::Corruption("inflateInit failed");
  strm.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  strm.avail_in = static_cast<uInt>(in.size());
  strm.next_out = reinterpret_cast<Bytef*>(out.data());
  strm.avail_out = static_cast<uInt>(out.size());
  const int ret = inflate(&strm, Z_FINISH);
  const uint64_t produced = out.size() - strm.avail_out;
  std::string message = strm.msg != nullptr ? strm.msg : "zlib error " + std::to_string(ret);
  inflateEnd(&strm);
  if (ret != Z_STREAM_END) {
    if (ret == Z_BUF_ERROR && strm.avail_out == 0) message = "inflates to more than a grain";
    if (ret == Z_BUF_ERROR && strm.avail_out != 0) message = "deflate data is truncated";
    return Status::Corruption("bad compressed grain: " + message);
  }
  if (produced < need) {
    return Status::Corruption("compressed grain inflates to " + std::to_string(produced) +
                              " bytes, expected " + std::to_string(need));
  }
  out.resize(need);
  return out;
}

}  // namespace

uint64_t VmdkSparseHeader::gd_entries() const {
  const uint64_t span = uint64_t{gtes_per_gt} * grain_sectors;
  if (span == 0) return 0;
  return capacity_sectors / span + (capacity_sectors % span != 0 ? 1 : 0);
}

Result<VmdkSparseHeader> parse_vmdk_sparse_header(std::span<const std::byte> bytes) {
  if (bytes.size() < kHeaderBytes) {
    return Status::Corruption("sparse header: " + std::to_string(bytes.size()) +
                              " bytes, need 512");
  }
  const std::byte* p = bytes.data();
  if (std::memcmp(p, "KDMV", 4) != 0) return Status::Corruption("sparse header: bad magic");
  VmdkSparseHeader h;
  h.version = load_le32(p + 4);
  h.flags = load_le32(p + 8);
  h.capacity_sectors = load_le64(p + 12);
  h.grain_sectors = load_le64(p + 20);
  h.descriptor_offset_sectors = load_le64(p + 28);
  h.descriptor_size_sectors = load_le64(p + 36);
  h.gtes_per_gt = load_le32(p + 44);
  h.rgd_offset_sectors = load_le64(p + 48);
  h.gd_offset_sectors = load_le64(p + 56);
  h.overhead_sectors = load_le64(p + 64);
  h.unclean_shutdown = std::to_integer<uint8_t>(p[72]) != 0;
  h.compress_algorithm = load_le16(p + 77);
  if (h.version == 0) return Status::Corruption("sparse header: version 0");
  if (h.version > 3) {
    return Status::NotSupported("sparse header: VMDK version " + std::to_string(h.version));
  }
  // Flag bit 0 says the check bytes are valid; damaged ones mean a text-mode transfer that
  // rewrote line ends everywhere, so no grain can be trusted.
  if ((h.flags & 1) != 0 &&
      (std::to_integer<char>(p[73]) != '\n' || std::to_integer<char>(p[74]) != ' ' ||
       std::to_integer<char>(p[75]) != '\r' || std::to_integer<char>(p[76]) != '\n')) {
    return Status::Corruption("sparse header: newline check bytes are damaged");
  }
  if (h.compress_algorithm > 1) {
    return Status::NotSupported("sparse header: compressAlgorithm " +
                                std::to_string(h.compress_algorithm));
  }
  if (h.grain_sectors == 0 || h.grain_sectors > kMaxGrainSectors) {
    return Status::Corruption("sparse header: grainSize " + std::to_string(h.grain_sectors) +
                              " sectors");
  }
  if (h.gtes_per_gt == 0 || h.gtes_per_gt > kMaxGtesPerGt) {
    return Status::Corruption("sparse header: numGTEsPerGT " + std::to_string(h.gtes_per_gt));
  }
  if (!checked_mul(h.capacity_sectors, kSector)) {
    return Status::Corruption("sparse header: capacity " + std::to_string(h.capacity_sectors) +
                              " sectors overflows");
  }
  if (h.gd_entries() > kMaxGdEntries) {
    return Status::Corruption("sparse header: capacity needs " + std::to_string(h.gd_entries()) +
                              " grain directory entries");
  }
  return h;
}

Result<VmdkSparseHeader> parse_vmdk_footer(std::span<const std::byte> last_bytes) {
  if (last_bytes.size() < kFooterBytes) {
    return Status::Corruption("footer: file too short for a stream-optimized footer");
  }
  const std::byte* p = last_bytes.data() + (last_bytes.size() - kFooterBytes);
  if (load_le32(p + 8) != 0 || load_le32(p + 12) != kMarkerFooter) {
    return Status::Corruption("footer: no footer marker at 1536 bytes before the end");
  }
  const std::byte* eos = p + 2 * kSector;
  if (load_le64(eos) != 0 || load_le32(eos + 8) != 0 || load_le32(eos + 12) != kMarkerEndOfStream) {
    return Status::Corruption("footer: no end-of-stream marker in the last sector");
  }
  Result<VmdkSparseHeader> header = parse_vmdk_sparse_header({p + kSector, kHeaderBytes});
  if (!header.ok()) return header.status().with_context("footer");
  if (header->gd_at_end()) return Status::Corruption("footer: gdOffset is GD_AT_END too");
  return header;
}

Result<VmdkDescriptor> parse_vmdk_descriptor(std::string_view text) {
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos) text = text.substr(0, nul);
  if (text.size() > kVmdkMaxDescriptorBytes) {
    return Status::Corruption("descriptor: longer than " + std::to_string(kVmdkMaxDescriptorBytes) +
                              " bytes");
  }
  VmdkDescriptor d;
  std::set<std::string> seen;
  size_t line_no = 0;
  while (!text.empty()) {
    const size_t eol = text.find('\n');
    std::string_view line = trim(text.substr(0, eol));
    text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
    ++line_no;
    if (line.empty() || line.front() == '#') continue;
    std::string_view probe = line;
    const std::string_view word = next_token(&probe);
    if ((word == "RW" || word == "RDONLY" || word == "NOACCESS") && !probe.empty()) {
      VmdkExtentLine extent;
      if (Status s = parse_extent_line(line, line_no, &extent); !s.ok()) return s;
      // qemu skips zero-length extents; they add nothing to the disk.
      if (extent.sectors == 0) continue;
      if (d.extents.size() == kVmdkMaxExtents) {
        return Status::Corruption("descriptor: more than " + std::to_string(kVmdkMaxExtents) +
                                  " extents");
      }
      d.extents.push_back(std::move(extent));
      continue;
    }
    const size_t eq = line.find('=');
    if (eq == std::string_view::npos) continue;
    const std::string_view key = trim(line.substr(0, eq));
    std::string_view value = trim(line.substr(eq + 1));
    if (key != "CID" && key != "parentCID" && key != "createType" && key != "parentFileNameHint") {
      continue;
    }
    const std::string where =
        "descriptor line " + std::to_string(line_no) + " (" + std::string(key) + ")";
    if (!seen.insert(std::string(key)).second) return Status::Corruption(where + ": repeated");
    if (!value.empty() && value.front() == '"') {
      if (value.size() < 2 || value.back() != '"') {
        return Status::Corruption(where + ": unterminated quote");
      }
      value = value.substr(1, value.size() - 2);
    }
    if (value.size() > kMaxValueBytes) return Status::Corruption(where + ": value too long");
    if (key == "CID" || key == "parentCID") {
      const std::optional<uint32_t> cid = parse_hex32(value);
      if (!cid) return Status::Corruption(where + ": not a 32-bit hex number");
      (key == "CID" ? d.cid : d.parent_cid) = *cid;
    } else if (key == "createType") {
      d.create_type = std::string(value);
    } else {
      d.parent_file_name = std::string(value);
    }
  }
  return d;
}

Status check_vmdk_file_name(std::string_view name) {
  const std::string shown = quoted(name.substr(0, 64));
  if (name.empty() || name.size() > kMaxNameBytes) {
    return Status::Corruption("file name " + shown + ": empty or longer than 512 bytes");
  }
  for (char c : name) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return Status::Corruption("file name " + shown + ": control character");
    }
  }
  if (name.front() == '/' || name.front() == '\\' || (name.size() >= 2 && name[1] == ':')) {
    return Status::NotSupported("file name " + shown + ": absolute paths are not followed");
  }
  // Backslashes count as separators too, so a Windows-style "..\x" cannot escape.
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find_first_of("/\\", start);
    if (end == std::string_view::npos) end = name.size();
    const std::string_view component = name.substr(start, end - start);
    if (component.empty() || component == "." || component == "..") {
      return Status::Corruption("file name " + shown + ": empty, \".\" or \"..\" path component");
    }
    start = end + 1;
  }
  return Status::OK();
}

Result<std::vector<uint32_t>> parse_vmdk_grain_directory(std::span<const std::byte> bytes,
                                                         uint64_t entries, uint32_t gtes_per_gt,
                                                         uint64_t file_size) {
  if (entries > bytes.size() / 4) {
    return Status::Corruption("grain directory: " + std::to_string(bytes.size()) +
                              " bytes hold fewer than " + std::to_string(entries) + " entries");
  }
  const uint64_t table_bytes = uint64_t{gtes_per_gt} * 4;
  std::vector<uint32_t> gd(entries);
  for (uint64_t i = 0; i < entries; ++i) {
    gd[i] = load_le32(bytes.data() + 4 * i);
    if (gd[i] == 0) continue;
    // gd[i] < 2^32 sectors, so offset + table_bytes < 2^42: no overflow.
    const uint64_t offset = uint64_t{gd[i]} * kSector;
    if (offset + table_bytes > file_size) {
      return Status::Corruption("grain directory entry " + std::to_string(i) + ": sector " +
                                std::to_string(gd[i]) + " is past the end of the file (" +
                                std::to_string(file_size) + " bytes)");
    }
  }
  return gd;
}

int probe_vmdk(std::span<const std::byte> first_bytes) {
  if (first_bytes.size() < 4) return 0;
  if (std::memcmp(first_bytes.data(), "KDMV", 4) == 0) return 100;
  if (std::memcmp(first_bytes.data(), "COWD", 4) == 0) return 50;
  const std::string_view text(reinterpret_cast<const char*>(first_bytes.data()),
                              first_bytes.size());
  if (text.starts_with("# Disk DescriptorFile")) return 100;
  // As qemu vmdk_probe: comments and blank lines, then "version=1|2|3".
  size_t p = 0;
  while (p < text.size()) {
    if (text[p] == '#') {
      const size_t eol = text.find('\n', p);
      if (eol == std::string_view::npos) return 0;
      p = eol + 1;
      continue;
    }
    if (text[p] == ' ' || text[p] == '\r' || text[p] == '\n') {
      while (p < text.size() && text[p] == ' ') ++p;
      if (p < text.size() && text[p] == '\r') ++p;
      if (p == text.size() || text[p] != '\n') return 0;
      ++p;
      continue;
    }
    const std::string_view rest = text.substr(p);
    for (const char* v : {"version=1", "version=2", "version=3"}) {
      if (rest.starts_with(std::string(v) + "\n") || rest.starts_with(std::string(v) + "\r\n")) {
        return 100;
      }
    }
    return 0;
  }
  return 0;
}

Result<std::vector<std::string>> vmdk_extent_files(const BlockSource& file) {
  const uint64_t size = file.size();
  std::array<std::byte, 4> magic{};
  if (size >= magic.size()) {
    if (Status s = file.read_at(0, magic); !s.ok()) return s;
    if (std::memcmp(magic.data(), "KDMV", 4) == 0 || std::memcmp(magic.data(), "COWD", 4) == 0) {
      return std::vector<std::string>{};
    }
  }
  if (size > kVmdkMaxDescriptorBytes) {
    return Status::Corruption("not a sparse extent and too large for a descriptor");
  }
  std::vector<std::byte> text(size);
  if (Status s = file.read_at(0, text); !s.ok()) return s;
  Result<VmdkDescriptor> descriptor = parse_vmdk_descriptor(
      std::string_view(reinterpret_cast<const char*>(text.data()), text.size()));
  if (!descriptor.ok()) return descriptor.status();
  std::vector<std::string> names;
  for (const VmdkExtentLine& extent : descriptor->extents) {
    if (extent.file_name.empty()) continue;
    if (Status s = check_vmdk_file_name(extent.file_name); !s.ok()) return s;
    names.push_back(extent.file_name);
  }
  return names;
}

// One extent, with everything checked at open.
struct VmdkSource::ExtentState {
  enum class Kind { kFlat, kSparse, kZero };
  Kind kind = Kind::kZero;
  uint64_t start = 0;                 // virtual byte offset
  uint64_t length = 0;                // bytes
  const BlockSource* file = nullptr;  // lower_ or one of siblings_; null for ZERO
  std::string name;                   // for errors
  uint64_t file_size = 0;
  uint64_t file_offset = 0;  // FLAT: where the extent starts in its file
  // SPARSE:
  uint64_t grain_bytes = 0;
  uint64_t grain_sectors = 0;
  uint32_t gtes_per_gt = 0;
  bool compressed = false;
  bool markers = false;
  bool zero_grain = false;
  std::vector<uint32_t> gd;
};

// A byte-bounded LRU of immutable byte vectors with single-flight fills.
class VmdkSource::ByteCache {
 public:
  using Key = std::pair<size_t, uint64_t>;
  using Bytes = std::shared_ptr<const std::vector<std::byte>>;

  explicit ByteCache(uint64_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}

  // The cached bytes for `key`, or the result of fill(), which runs without the lock in one
  // caller while the others wait for it. A failed fill is not cached.
  Result<Bytes> get(const Key& key, const std::function<Result<Bytes>()>& fill) {
    {
      std::unique_lock lock(mu_);
      for (;;) {
        if (auto it = entries_.find(key); it != entries_.end()) {
          lru_.splice(lru_.begin(), lru_, it->second.position);
          return it->second.bytes;
        }
        if (!filling_.contains(key)) break;
        cv_.wait(lock);
      }
      filling_.insert(key);
    }
    ScopeExit done([&] {
      std::lock_guard lock(mu_);
      filling_.erase(key);
      cv_.notify_all();
    });
    Result<Bytes> filled = fill();
    if (filled.ok()) {
      std::lock_guard lock(mu_);
      insert_locked(key, *filled);
    }
    return filled;
  }

 private:
  struct Entry {
    Bytes bytes;
    std::list<Key>::iterator position;
  };

  void insert_locked(const Key& key, const Bytes& bytes) {
    const uint64_t size = bytes->size();
    if (size > capacity_bytes_) return;
    while (used_bytes_ + size > capacity_bytes_ && !lru_.empty()) {
      auto it = entries_.find(lru_.back());
      used_bytes_ -= it->second.bytes->size();
      entries_.erase(it);
      lru_.pop_back();
    }
    lru_.push_front(key);
    entries_[key] = Entry{bytes, lru_.begin()};
    used_bytes_ += size;
  }

  const uint64_t capacity_bytes_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<Key, Entry> entries_;  // GUARDED_BY(mu_)
  std::list<Key> lru_;            // GUARDED_BY(mu_); front = newest
  std::set<Key> filling_;         // GUARDED_BY(mu_)
  uint64_t used_bytes_ = 0;       // GUARDED_BY(mu_)
};

// Builds a VmdkSource: the steps of open_vmdk, with the delta-chain state.
class VmdkOpener {
 public:
  VmdkOpener(const VmdkOptions& options, std::string dir_prefix, int depth_left,
             std::set<std::string>* chain)
      : options_(options),
        dir_prefix_(std::move(dir_prefix)),
        depth_left_(depth_left),
        chain_(chain) {}

  Result<std::unique_ptr<VmdkSource>> open(std::unique_ptr<BlockSource> lower);

 private:
  using ExtentState = VmdkSource::ExtentState;

  Status open_sparse_top(VmdkSource* source, std::span<const std::byte> first,
                         VmdkDescriptor* descriptor);
  Status open_descriptor_top(VmdkSource* source, VmdkDescriptor* descriptor);
  Status add_extent(VmdkSource* source, const VmdkExtentLine& line, size_t index);
  // Checks a sparse extent file and reads its grain directory. `first` is its first sector.
  Result<VmdkSparseHeader> load_sparse(const BlockSource& file, std::span<const std::byte> first,
                                       ExtentState* extent);
  Status open_parent(VmdkSource* source, const VmdkDescriptor& descriptor);
  Result<std::unique_ptr<BlockSource>> open_file(std::string_view name, std::string_view role);

  const VmdkOptions& options_;
  const std::string dir_prefix_;
  const int depth_left_;
  std::set<std::string>* chain_;
  std::string name_;  // "vmdk(<lower>)", for errors
};

Result<std::unique_ptr<BlockSource>> open_vmdk(std::unique_ptr<BlockSource> lower,
                                               const VmdkOptions& options) {
  if (lower == nullptr) return Status::InvalidArgument("open_vmdk: no lower source");
  if (options.max_chain_depth < 1) {
    return Status::InvalidArgument("open_vmdk: max_chain_depth must be at least 1");
  }
  std::set<std::string> chain;
  VmdkOpener opener(options, "", options.max_chain_depth, &chain);
  Result<std::unique_ptr<VmdkSource>> source = opener.open(std::move(lower));
  if (!source.ok()) return source.status();
  return std::unique_ptr<BlockSource>(std::move(*source));
}

Result<std::unique_ptr<VmdkSource>> VmdkOpener::open(std::unique_ptr<BlockSource> lower) {
  name_ = "vmdk(" + lower->describe() + ")";
  const uint64_t lower_size = lower->size();
  if (lower_size < 4) return Status::Corruption(name_ + ": file too small to be a VMDK");
  std::vector<std::byte> first(std::min(lower_size, kHeaderBytes));
  if (Status s = lower->read_at(0, first); !s.ok()) return s.with_context(name_);

  const bool sparse = std::memcmp(first.data(), "KDMV", 4) == 0;
  if (std::memcmp(first.data(), "COWD", 4) == 0) {
    return Status::NotSupported(name_ + ": COWD (VMDK3, ESX vmfsSparse) extents");
  }
  // The source starts with the create type it will report; a sparse file's may change below.
  auto source = std::unique_ptr<VmdkSource>(new VmdkSource(std::move(lower), "", options_));
  VmdkDescriptor descriptor;
  Status s = sparse ? open_sparse_top(source.get(), first, &descriptor)
                    : open_descriptor_top(source.get(), &descriptor);
  if (!s.ok()) return s;

  uint64_t total = 0;
  uint32_t block = 0;
  for (ExtentState& e : source->extents_) {
    e.start = total;
    const std::optional<uint64_t> end = checked_add(total, e.length);
    if (!end) return Status::Corruption(name_ + ": the extents' total size overflows");
    total = *end;
    if (e.kind == ExtentState::Kind::kSparse) {
      block = std::max<uint32_t>(block, static_cast<uint32_t>(e.grain_bytes));
    }
  }
  source->size_ = total;
  source->block_size_ = block != 0 ? block : kSector;
  source->cid_ = descriptor.cid;
  if (Status ps = open_parent(source.get(), descriptor); !ps.ok()) return ps;
  return source;
}

Status VmdkOpener::open_sparse_top(VmdkSource* source, std::span<const std::byte> first,
                                   VmdkDescriptor* descriptor) {
  const BlockSource& file = *source->lower_;
  ExtentState extent;
  extent.name = file.describe();
  Result<VmdkSparseHeader> header = load_sparse(file, first, &extent);
  if (!header.ok()) return header.status().with_context(name_);
  extent.length = header->capacity_sectors * kSector;  // checked by the header parse

  // The embedded descriptor supplies the create type and the delta link.
  if (header->descriptor_offset_sectors != 0 && header->descriptor_size_sectors != 0) {
    const std::optional<uint64_t> offset = checked_mul(header->descriptor_offset_sectors, kSector);
    const std::optional<uint64_t> length = checked_mul(header->descriptor_size_sectors, kSector);
    if (!offset || !length || *offset > extent.file_size || *length > extent.file_size - *offset) {
      return Status::Corruption(name_ + ": descriptorOffset/descriptorSize lie past the end");
    }
    std::vector<std::byte> text(std::min(*length, kVmdkMaxDescriptorBytes));
    if (Status s = file.read_at(*offset, text); !s.ok()) return s.with_context(name_);
    Result<VmdkDescriptor> parsed = parse_vmdk_descriptor(
        std::string_view(reinterpret_cast<const char*>(text.data()), text.size()));
    if (!parsed.ok()) return parsed.status().with_context(name_ + ": embedded descriptor");
    *descriptor = std::move(*parsed);
  }
  if (header->capacity_sectors == 0 && !descriptor->extents.empty()) {
    return Status::NotSupported(name_ + ": sparse header of capacity 0 with an extent list");
  }
  std::string create_type = descriptor->create_type;
  if (header->compressed()) {
    create_type = "streamOptimized";
  } else if (create_type.empty()) {
    create_type = "monolithicSparse";
  }
  source->create_type_ = std::move(create_type);
  extent.file = &file;
  source->extents_.push_back(std::move(extent));
  return Status::OK();
}

Status VmdkOpener::open_descriptor_top(VmdkSource* source, VmdkDescriptor* descriptor) {
  const BlockSource& file = *source->lower_;
  const uint64_t size = file.size();
  if (size > kVmdkMaxDescriptorBytes) {
    return Status::Corruption(name_ + ": not a sparse extent and too large for a descriptor");
  }
  std::vector<std::byte> text(size);
  if (Status s = file.read_at(0, text); !s.ok()) return s.with_context(name_);
  Result<VmdkDescriptor> parsed = parse_vmdk_descriptor(
      std::string_view(reinterpret_cast<const char*>(text.data()), text.size()));
  if (!parsed.ok()) return parsed.status().with_context(name_);
  *descriptor = std::move(*parsed);
  const std::string& type = descriptor->create_type;
  if (type.empty()) {
    return Status::Corruption(name_ + ": no createType (not a VMDK descriptor)");
  }
  static constexpr std::string_view kReadable[] = {
      "monolithicSparse",   "monolithicFlat",   "twoGbMaxExtentSparse",
      "twoGbMaxExtentFlat", "streamOptimized",  "vmfs",
      "vmfsThin",           "vmfsPreallocated", "vmfsEagerZeroedThick",
      "vmfsSparse",         "seSparse",         "custom"};
  if (std::find(std::begin(kReadable), std::end(kReadable), type) == std::end(kReadable)) {
    return Status::NotSupported(name_ + ": createType " + quoted(type.substr(0, 64)));
  }
  if (descriptor->extents.empty()) {
    return Status::Corruption(name_ + ": descriptor names no extents");
  }
  source->create_type_ = type;
  for (size_t i = 0; i < descriptor->extents.size(); ++i) {
    if (Status s = add_extent(source, descriptor->extents[i], i); !s.ok()) return s;
  }
  return Status::OK();
}

Result<std::unique_ptr<BlockSource>> VmdkOpener::open_file(std::string_view name,
                                                           std::string_view role) {
  if (Status s = check_vmdk_file_name(name); !s.ok()) {
    return s.with_context(name_ + ": " + std::string(role));
  }
  const std::string path = dir_prefix_ + std::string(name);
  if (!options_.open_sibling) {
    return Status::NotSupported(name_ + ": needs " + std::string(role) + " " + quoted(path) +
                                " but cannot open files next to the image");
  }
  Result<std::unique_ptr<BlockSource>> file = options_.open_sibling(path);
  if (!file.ok()) {
    return file.status().with_context(name_ + ": " + std::string(role) + " " + quoted(path));
  }
  if (*file == nullptr) {
    return Status::IOError(name_ + ": " + std::string(role) + " " + quoted(path) + " not opened");
  }
  return file;
}

Status VmdkOpener::add_extent(VmdkSource* source, const VmdkExtentLine& line, size_t index) {
  using Type = VmdkExtentLine::Type;
  const std::string where = name_ + ": extent " + std::to_string(index);
  if (line.access == VmdkExtentLine::Access::kNoAccess) {
    return Status::NotSupported(where + ": NOACCESS extent");
  }
  if (line.type == Type::kVmfsSparse || line.type == Type::kSeSparse ||
      line.type == Type::kVmfsRaw) {
    return Status::NotSupported(where + ": VMFSSPARSE, SESPARSE and raw device extents");
  }
  ExtentState extent;
  const std::optional<uint64_t> length = checked_mul(line.sectors, kSector);
  if (!length) return Status::Corruption(where + ": size in sectors overflows");
  extent.length = *length;
  if (line.type == Type::kZero) {
    extent.kind = ExtentState::Kind::kZero;
    extent.name = "ZERO";
    source->extents_.push_back(std::move(extent));
    return Status::OK();
  }
  Result<std::unique_ptr<BlockSource>> file = open_file(line.file_name, "extent file");
  if (!file.ok()) return file.status();
  extent.file = file->get();
  extent.name = line.file_name;
  extent.file_size = extent.file->size();
  if (line.type == Type::kFlat || line.type == Type::kVmfs) {
    extent.kind = ExtentState::Kind::kFlat;
    const std::optional<uint64_t> offset = checked_mul(line.offset_sectors, kSector);
    const std::optional<uint64_t> end = offset ? checked_add(*offset, extent.length) : std::nullopt;
    if (!end || *end > extent.file_size) {
      return Status::Corruption(where + " (" + line.file_name + "): offset + size past the end " +
                                "of the file (" + std::to_string(extent.file_size) + " bytes)");
    }
    extent.file_offset = *offset;
  } else {
    std::vector<std::byte> first(std::min(extent.file_size, kHeaderBytes));
    if (Status s = extent.file->read_at(0, first); !s.ok()) {
      return s.with_context(where + " (" + line.file_name + ")");
    }
    Result<VmdkSparseHeader> header = load_sparse(*extent.file, first, &extent);
    if (!header.ok()) return header.status().with_context(where + " (" + line.file_name + ")");
    if (header->capacity_sectors < line.sectors) {
      return Status::Corruption(where + " (" + line.file_name + "): capacity " +
                                std::to_string(header->capacity_sectors) +
                                " sectors is less than the descriptor's " +
                                std::to_string(line.sectors));
    }
  }
  source->siblings_.push_back(std::move(*file));
  source->extents_.push_back(std::move(extent));
  return Status::OK();
}

Result<VmdkSparseHeader> VmdkOpener::load_sparse(const BlockSource& file,
                                                 std::span<const std::byte> first,
                                                 ExtentState* extent) {
  const uint64_t file_size = file.size();
  Result<VmdkSparseHeader> header = parse_vmdk_sparse_header(first);
  if (!header.ok()) return header.status();
  if (header->gd_at_end()) {
    // Stream-optimized: the footer holds the real header (qemu vmdk_open_vmdk4).
    if (file_size < kHeaderBytes + kFooterBytes) {
      return Status::Corruption("GD_AT_END but the file is too short for a footer");
    }
    std::vector<std::byte> tail(kFooterBytes);
    if (Status s = file.read_at(file_size - kFooterBytes, tail); !s.ok()) return s;
    header = parse_vmdk_footer(tail);
    if (!header.ok()) return header.status();
  }
  const VmdkSparseHeader& h = *header;
  if (h.overhead_sectors > file_size / kSector) {
    return Status::Corruption("truncated: overHead is " + std::to_string(h.overhead_sectors) +
                              " sectors but the file has " + std::to_string(file_size) + " bytes");
  }
  const uint64_t entries = h.gd_entries();
  const uint64_t gd_bytes = entries * 4;  // at most 2^27
  const std::optional<uint64_t> gd_offset = checked_mul(h.gd_offset_sectors, kSector);
  if (entries != 0 && (!gd_offset || *gd_offset == 0 || *gd_offset > file_size ||
                       gd_bytes > file_size - *gd_offset)) {
    return Status::Corruption("gdOffset " + std::to_string(h.gd_offset_sectors) +
                              ": grain directory lies past the end of the file");
  }
  std::vector<std::byte> gd_raw(gd_bytes);
  if (entries != 0) {
    if (Status s = file.read_at(*gd_offset, gd_raw); !s.ok()) return s;
  }
  Result<std::vector<uint32_t>> gd =
      parse_vmdk_grain_directory(gd_raw, entries, h.gtes_per_gt, file_size);
  if (!gd.ok()) return gd.status();

  extent->kind = ExtentState::Kind::kSparse;
  extent->file_size = file_size;
  extent->grain_sectors = h.grain_sectors;
  extent->grain_bytes = h.grain_sectors * kSector;
  extent->gtes_per_gt = h.gtes_per_gt;
  extent->compressed = h.compressed();
  extent->markers = h.has_markers();
  extent->zero_grain = h.zero_grain_gte();
  extent->gd = std::move(*gd);
  if (extent->compressed && extent->grain_bytes > kMaxCompressedGrainBytes) {
    return Status::NotSupported("compressed grains of " + std::to_string(extent->grain_bytes) +
                                " bytes (at most 16 MiB)");
  }
  return header;
}

Status VmdkOpener::open_parent(VmdkSource* source, const VmdkDescriptor& descriptor) {
  if (descriptor.parent_file_name.empty()) return Status::OK();
  const std::string& hint = descriptor.parent_file_name;
  if (depth_left_ <= 1) {
    return Status::NotSupported(name_ + ": delta chain deeper than max_chain_depth " +
                                std::to_string(options_.max_chain_depth));
  }
  const std::string path = dir_prefix_ + hint;
  if (!chain_->insert(path).second) {
    return Status::Corruption(name_ + ": delta chain loops back to " + quoted(path));
  }
  Result<std::unique_ptr<BlockSource>> file = open_file(hint, "parent (parentFileNameHint)");
  if (!file.ok()) return file.status();
  const size_t slash = path.find_last_of("/\\");
  VmdkOpener parent_opener(options_, slash == std::string::npos ? "" : path.substr(0, slash + 1),
                           depth_left_ - 1, chain_);
  Result<std::unique_ptr<VmdkSource>> parent = parent_opener.open(std::move(*file));
  if (!parent.ok()) return parent.status().with_context(name_ + ": parent " + quoted(path));
  if (descriptor.parent_cid && *descriptor.parent_cid != kNoParentCid && (*parent)->cid_ &&
      *(*parent)->cid_ != *descriptor.parent_cid) {
    return Status::Corruption(name_ + ": parentCID does not match the CID of parent " +
                              quoted(path) + " (it changed after this delta was made)");
  }
  source->parent_ = std::move(*parent);
  return Status::OK();
}

VmdkSource::VmdkSource(std::unique_ptr<BlockSource> lower, std::string create_type,
                       const VmdkOptions& options)
    : lower_(std::move(lower)),
      create_type_(std::move(create_type)),
      tables_(std::make_unique<ByteCache>(options.table_cache_bytes)),
      grains_(std::make_unique<ByteCache>(options.grain_cache_bytes)) {}

VmdkSource::~VmdkSource() = default;

std::string VmdkSource::describe() const { return "vmdk(" + lower_->describe() + ")"; }

size_t VmdkSource::extent_count() const { return extents_.size(); }

int VmdkSource::parent_depth() const { return parent_ ? 1 + parent_->parent_depth() : 0; }

size_t VmdkSource::extent_index(uint64_t offset) const {
  auto it = std::upper_bound(extents_.begin(), extents_.end(), offset,
                             [](uint64_t o, const ExtentState& e) { return o < e.start; });
  return static_cast<size_t>(it - extents_.begin()) - 1;
}

Status VmdkSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  uint64_t done = 0;
  while (done < out.size()) {
    const uint64_t pos = offset + done;
    const size_t index = extent_index(pos);
    const ExtentState& e = extents_[index];
    const uint64_t rel = pos - e.start;
    const uint64_t n = std::min<uint64_t>(out.size() - done, e.length - rel);
    std::span<std::byte> dst = out.subspan(done, n);
    switch (e.kind) {
      case ExtentState::Kind::kZero:
        std::memset(dst.data(), 0, dst.size());
        break;
      case ExtentState::Kind::kFlat:
        if (Status s = e.file->read_at(e.file_offset + rel, dst); !s.ok()) {
          return s.with_context(describe() + ": extent " + std::to_string(index) + " (" + e.name +
                                ")");
        }
        break;
      case ExtentState::Kind::kSparse:
        if (Status s = read_sparse(index, rel, dst); !s.ok()) return s;
        break;
    }
    done += n;
  }
  return Status::OK();
}

namespace {

enum class GrainKind { kUnallocated, kZero, kCompressed, kData };

GrainKind classify(const VmdkSource::ExtentState& e, uint32_t entry) {
  if (entry == 0) return GrainKind::kUnallocated;
  if (entry == 1 && e.zero_grain) return GrainKind::kZero;
  return e.compressed ? GrainKind::kCompressed : GrainKind::kData;
}

}  // namespace

Status VmdkSource::read_sparse(size_t index, uint64_t rel, std::span<std::byte> out) const {
  const ExtentState& e = extents_[index];
  const auto context = [&](uint64_t grain) {
    return describe() + ": extent " + std::to_string(index) + " (" + e.name + "), grain " +
           std::to_string(grain);
  };
  uint64_t done = 0;
  while (done < out.size()) {
    const uint64_t pos = rel + done;
    const uint64_t grain = pos / e.grain_bytes;
    const uint64_t within = pos % e.grain_bytes;
    Result<uint32_t> entry = grain_entry(index, grain);
    if (!entry.ok()) return entry.status();
    const GrainKind kind = classify(e, *entry);
    uint64_t n = std::min<uint64_t>(out.size() - done, e.grain_bytes - within);
    if (kind == GrainKind::kCompressed) {
      Result<std::shared_ptr<const std::vector<std::byte>>> bytes =
          compressed_grain(index, grain, *entry);
      if (!bytes.ok()) return bytes.status();
      // The grain holds min(grain, rest of extent) bytes and the read stays in the extent.
      std::memcpy(out.data() + done, (*bytes)->data() + within, n);
      done += n;
      continue;
    }
    // Grow the run over following grains of the same kind (contiguous in the file for data),
    // so a long read costs one lower read.
    for (uint64_t next = grain + 1; done + n < out.size(); ++next) {
      Result<uint32_t> next_entry = grain_entry(index, next);
      if (!next_entry.ok()) return next_entry.status();
      const GrainKind next_kind = classify(e, *next_entry);
      if (next_kind != kind) break;
      if (kind == GrainKind::kData &&
          uint64_t{*next_entry} != uint64_t{*entry} + (next - grain) * e.grain_sectors) {
        break;
      }
      n += std::min<uint64_t>(out.size() - done - n, e.grain_bytes);
    }
    std::span<std::byte> dst = out.subspan(done, n);
    if (kind == GrainKind::kZero) {
      std::memset(dst.data(), 0, dst.size());
    } else if (kind == GrainKind::kUnallocated) {
      if (Status s = read_unallocated(e.start + pos, dst); !s.ok()) return s;
    } else {
      const uint64_t file_offset = uint64_t{*entry} * kSector + within;  // < 2^42
      if (file_offset > e.file_size || n > e.file_size - file_offset) {
        return Status::Corruption(context(grain) + ": grain table entry (sector " +
                                  std::to_string(*entry) + ") points past the end of the file (" +
                                  std::to_string(e.file_size) + " bytes)");
      }
      if (Status s = e.file->read_at(file_offset, dst); !s.ok()) {
        return s.with_context(context(grain));
      }
    }
    done += n;
  }
  return Status::OK();
}

Status VmdkSource::read_unallocated(uint64_t offset, std::span<std::byte> out) const {
  uint64_t from_parent = 0;
  if (parent_ != nullptr && offset < parent_->size()) {
    from_parent = std::min<uint64_t>(out.size(), parent_->size() - offset);
    if (Status s = parent_->read_at(offset, out.first(from_parent)); !s.ok()) {
      return s.with_context(describe() + ": parent");
    }
  }
  std::memset(out.data() + from_parent, 0, out.size() - from_parent);
  return Status::OK();
}

Result<uint32_t> VmdkSource::grain_entry(size_t index, uint64_t grain) const {
  const ExtentState& e = extents_[index];
  const uint64_t gd_index = grain / e.gtes_per_gt;
  if (gd_index >= e.gd.size()) {
    return Status::Corruption(describe() + ": extent " + std::to_string(index) + " (" + e.name +
                              "): grain " + std::to_string(grain) + " is past the capacity");
  }
  const uint32_t table_sector = e.gd[gd_index];
  if (table_sector == 0) return uint32_t{0};
  Result<ByteCache::Bytes> table =
      tables_->get({index, gd_index}, [&]() -> Result<ByteCache::Bytes> {
        // The grain directory parse checked that the table lies within the file.
        auto bytes = std::make_shared<std::vector<std::byte>>(uint64_t{e.gtes_per_gt} * 4);
        if (Status s = e.file->read_at(uint64_t{table_sector} * kSector, *bytes); !s.ok()) {
          return s.with_context(describe() + ": extent " + std::to_string(index) + " (" + e.name +
                                "): grain table " + std::to_string(gd_index));
        }
        return ByteCache::Bytes(std::move(bytes));
      });
  if (!table.ok()) return table.status();
  return load_le32((*table)->data() + 4 * (grain % e.gtes_per_gt));
}

Result<std::shared_ptr<const std::vector<std::byte>>> VmdkSource::compressed_grain(
    size_t index, uint64_t grain, uint32_t entry) const {
  const ExtentState& e = extents_[index];
  return grains_->get({index, grain}, [&]() -> Result<ByteCache::Bytes> {
    const std::string where = describe() + ": extent " + std::to_string(index) + " (" + e.name +
                              "), grain " + std::to_string(grain);
    const uint64_t grain_start = grain * e.grain_bytes;  // < e.length
    const uint64_t need = std::min(e.grain_bytes, e.length - grain_start);
    const uint64_t file_offset = uint64_t{entry} * kSector;
    if (file_offset >= e.file_size) {
      return Status::Corruption(where + ": grain table entry (sector " + std::to_string(entry) +
                                ") points past the end of the file");
    }
    const uint64_t available = e.file_size - file_offset;
    std::vector<std::byte> buffer;
    std::span<const std::byte> data;
    if (e.markers) {
      // One fetch covers the marker and any grain that compresses to at most a grain.
      buffer.resize(std::min(available, kGrainMarkerBytes + e.grain_bytes + kSector));
      if (buffer.size() < kGrainMarkerBytes) {
        return Status::Corruption(where + ": grain marker is cut off by the end of the file");
      }
      if (Status s = e.file->read_at(file_offset, buffer); !s.ok()) return s.with_context(where);
      const uint64_t lba = load_le64(buffer.data());
      const uint64_t size = load_le32(buffer.data() + 8);
      if (lba != grain * e.grain_sectors) {
        return Status::Corruption(where + ": grain marker lba " + std::to_string(lba) +
                                  " is not the grain's sector " +
                                  std::to_string(grain * e.grain_sectors));
      }
      if (size == 0 || size > 2 * e.grain_bytes || size > available - kGrainMarkerBytes) {
        return Status::Corruption(where + ": grain marker size " + std::to_string(size) +
                                  " is out of range");
      }
      const uint64_t have = buffer.size();
      if (kGrainMarkerBytes + size > have) {
        buffer.resize(kGrainMarkerBytes + size);
        if (Status s = e.file->read_at(file_offset + have, std::span(buffer).subspan(have));
            !s.ok()) {
          return s.with_context(where);
        }
      }
      data = std::span<const std::byte>(buffer).subspan(kGrainMarkerBytes, size);
    } else {
      // Without a marker the compressed length is unknown; qemu reads two grains' worth.
      buffer.resize(std::min(available, 2 * e.grain_bytes));
      if (Status s = e.file->read_at(file_offset, buffer); !s.ok()) return s.with_context(where);
      data = buffer;
    }
    Result<std::vector<std::byte>> inflated = inflate_grain(data, need, e.grain_bytes);
    if (!inflated.ok()) return inflated.status().with_context(where);
    return ByteCache::Bytes(std::make_shared<const std::vector<std::byte>>(std::move(*inflated)));
  });
}

Result<Extent> VmdkSource::map(uint64_t offset) const {
  if (offset >= size_) {
    return Status::InvalidArgument(describe() + ": map at " + std::to_string(offset) +
                                   " is past size " + std::to_string(size_));
  }
  const size_t index = extent_index(offset);
  const ExtentState& e = extents_[index];
  const uint64_t rel = offset - e.start;
  const uint64_t rest = e.length - rel;
  switch (e.kind) {
    case ExtentState::Kind::kZero:
      return Extent{Extent::Kind::kZero, rest};
    case ExtentState::Kind::kFlat:
      return Extent{Extent::Kind::kData, rest};
    case ExtentState::Kind::kSparse:
      break;
  }
  const auto kind_of = [&](uint32_t entry) {
    const GrainKind kind = classify(e, entry);
    const bool zero =
        kind == GrainKind::kZero || (kind == GrainKind::kUnallocated && parent_ == nullptr);
    return zero ? Extent::Kind::kZero : Extent::Kind::kData;
  };
  uint64_t grain = rel / e.grain_bytes;
  Result<uint32_t> first = grain_entry(index, grain);
  if (!first.ok()) return first.status();
  const Extent::Kind kind = kind_of(*first);
  uint64_t length = std::min(rest, e.grain_bytes - rel % e.grain_bytes);
  uint64_t tables = 1;
  for (++grain; length < rest; ++grain) {
    if (grain % e.gtes_per_gt == 0) {
      const uint64_t gd_index = grain / e.gtes_per_gt;
      if (gd_index < e.gd.size() && e.gd[gd_index] == 0) {
        // A whole unallocated grain table: one step, no I/O.
        if (kind_of(0) != kind) break;
        length += std::min(rest - length, e.grain_bytes * e.gtes_per_gt);
        grain += e.gtes_per_gt - 1;
        continue;
      }
      if (++tables > kMapMaxTables) break;
    }
    Result<uint32_t> entry = grain_entry(index, grain);
    if (!entry.ok()) return entry.status();
    if (kind_of(*entry) != kind) break;
    length += std::min(rest - length, e.grain_bytes);
  }
  return Extent{kind, length};
}

}  // namespace imgfs::formats
