#include "formats/vhd_source.h"

#include <algorithm>
#include <cstring>
#include <list>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>

#include "formats/byte_order.h"
#include "formats/checked_math.h"

namespace imgfs::formats {
namespace {

constexpr uint64_t kSectorBytes = 512;
constexpr uint64_t kFooterBytes = 512;
constexpr uint64_t kDynamicHeaderBytes = 1024;
// Hyper-V and qemu use 512 KiB to 2 MiB; anything far larger is a corrupt field, not an image.
constexpr uint64_t kMaxBlockBytes = 256ull << 20;
// The BAT is read whole at open: 64 MiB covers a 32 TiB disk at 2 MiB blocks (VHD stops at 2 TiB).
constexpr uint64_t kMaxBatBytes = 64ull << 20;
// A parent locator holds one path; Windows paths stop far below this.
constexpr uint64_t kMaxLocatorBytes = 64 * 1024;

// Footer field offsets (spec "Hard Disk Footer Format").
constexpr size_t kFooterChecksumAt = 64;
// Dynamic header field offsets (spec "Dynamic Disk Header Format").
constexpr size_t kHeaderChecksumAt = 36;
constexpr size_t kParentNameAt = 64;
constexpr size_t kParentNameBytes = 512;
constexpr size_t kLocatorsAt = 576;
constexpr size_t kLocatorBytes = 24;

bool has_cookie(std::span<const std::byte> bytes, std::string_view cookie) {
  return bytes.size() >= cookie.size() &&
         std::memcmp(bytes.data(), cookie.data(), cookie.size()) == 0;
}

// One's complement of the byte sum, skipping the 4-byte checksum field itself.
uint32_t vhd_checksum(std::span<const std::byte> bytes, size_t checksum_at) {
  uint32_t sum = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (i >= checksum_at && i < checksum_at + 4) continue;
    sum += std::to_integer<uint32_t>(bytes[i]);
  }
  return ~sum;
}

std::string hex32(uint32_t v) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 7; i >= 0; --i) s += kDigits[(v >> (4 * i)) & 0xF];
  return s;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Bit of `sector` in a VHD sector bitmap: sector 0 is the most significant bit of byte 0.
bool sector_bit(std::span<const std::byte> bitmap, uint64_t sector) {
  return (std::to_integer<unsigned>(bitmap[sector / 8]) >> (7 - sector % 8)) & 1;
}

// First sector in [first, limit) whose bit differs from first's, or limit.
uint64_t sector_run_end(std::span<const std::byte> bitmap, uint64_t first, uint64_t limit) {
  const bool bit = sector_bit(bitmap, first);
  const std::byte same_byte = bit ? std::byte{0xFF} : std::byte{0};
  uint64_t s = first + 1;
  while (s < limit) {
    if (s % 8 == 0 && s + 8 <= limit && bitmap[s / 8] == same_byte) {
      s += 8;
      continue;
    }
    if (sector_bit(bitmap, s) != bit) return s;
    ++s;
  }
  return limit;
}

std::string id_key(const std::array<std::byte, 16>& id) {
  return std::string(reinterpret_cast<const char*>(id.data()), id.size());
}

}  // namespace

// Byte-bounded LRU of sector bitmaps keyed by block index, with single-flight fills through
// loading_. Every member is guarded by VhdSource::bitmap_mu_.
class VhdSource::BitmapCache {
 public:
  explicit BitmapCache(uint64_t limit_bytes) : limit_bytes_(limit_bytes) {}

  std::shared_ptr<const std::vector<std::byte>> find(uint64_t block) {
    auto it = entries_.find(block);
    if (it == entries_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second.position);
    return it->second.bitmap;
  }

  void insert(uint64_t block, std::shared_ptr<const std::vector<std::byte>> bitmap) {
    if (entries_.count(block) != 0) return;
    used_bytes_ += bitmap->size();
    order_.push_front(block);
    entries_.emplace(block, Entry{std::move(bitmap), order_.begin()});
    while (used_bytes_ > limit_bytes_ && entries_.size() > 1) {
      auto victim = entries_.find(order_.back());
      used_bytes_ -= victim->second.bitmap->size();
      entries_.erase(victim);
      order_.pop_back();
    }
  }

  std::set<uint64_t>& loading() { return loading_; }

 private:
  struct Entry {
    std::shared_ptr<const std::vector<std::byte>> bitmap;
    std::list<uint64_t>::iterator position;
  };
  const uint64_t limit_bytes_;
  uint64_t used_bytes_ = 0;
  std::list<uint64_t> order_;  // most recently used first
  std::unordered_map<uint64_t, Entry> entries_;
  std::set<uint64_t> loading_;  // blocks whose bitmap one reader is fetching
};

uint64_t VhdDynamicHeader::bitmap_bytes() const {
  const uint64_t bits = block_size / kSectorBytes;
  const uint64_t bytes = (bits + 7) / 8;
  return (bytes + kSectorBytes - 1) / kSectorBytes * kSectorBytes;
}

Result<VhdFooter> parse_vhd_footer(std::span<const std::byte> bytes) {
  if (bytes.size() < kFooterBytes) {
    return Status::Corruption("VHD footer: " + std::to_string(bytes.size()) + " bytes, need 512");
  }
  bytes = bytes.first(kFooterBytes);
  if (!has_cookie(bytes, "conectix")) return Status::Corruption("VHD footer: no 'conectix' cookie");
  const std::byte* p = bytes.data();
  VhdFooter f;
  f.checksum = load_be32(p + kFooterChecksumAt);
  const uint32_t computed = vhd_checksum(bytes, kFooterChecksumAt);
  if (computed != f.checksum) {
    return Status::Corruption("VHD footer: checksum " + hex32(f.checksum) + ", computed " +
                              hex32(computed));
  }
  f.features = load_be32(p + 8);
  f.format_version = load_be32(p + 12);
  if (f.format_version >> 16 != 1) {
    return Status::NotSupported("VHD footer: file format version " + hex32(f.format_version));
  }
  f.data_offset = load_be64(p + 16);
  f.timestamp = load_be32(p + 24);
  f.creator_app.assign(reinterpret_cast<const char*>(p + 28), 4);
  f.creator_version = load_be32(p + 32);
  f.creator_host_os = load_be32(p + 36);
  f.original_size = load_be64(p + 40);
  f.current_size = load_be64(p + 48);
  f.cylinders = load_be16(p + 56);
  f.heads = std::to_integer<uint8_t>(p[58]);
  f.sectors_per_track = std::to_integer<uint8_t>(p[59]);
  const uint32_t type = load_be32(p + 60);
  if (type != 2 && type != 3 && type != 4) {
    return Status::Corruption("VHD footer: disk type " + std::to_string(type) +
                              " (expected 2 fixed, 3 dynamic or 4 differencing)");
  }
  f.disk_type = static_cast<VhdDiskType>(type);
  std::memcpy(f.unique_id.data(), p + 68, 16);
  f.saved_state = std::to_integer<uint8_t>(p[84]);
  return f;
}

Result<VhdDynamicHeader> parse_vhd_dynamic_header(std::span<const std::byte> bytes,
                                                  uint64_t file_size) {
  if (bytes.size() < kDynamicHeaderBytes) {
    return Status::Corruption("VHD dynamic header: " + std::to_string(bytes.size()) +
                              " bytes, need 1024");
  }
  bytes = bytes.first(kDynamicHeaderBytes);
  if (!has_cookie(bytes, "cxsparse")) {
    return Status::Corruption("VHD dynamic header: no 'cxsparse' cookie");
  }
  const std::byte* p = bytes.data();
  VhdDynamicHeader h;
  h.checksum = load_be32(p + kHeaderChecksumAt);
  const uint32_t computed = vhd_checksum(bytes, kHeaderChecksumAt);
  if (computed != h.checksum) {
    return Status::Corruption("VHD dynamic header: checksum " + hex32(h.checksum) + ", computed " +
                              hex32(computed));
  }
  h.table_offset = load_be64(p + 16);
  h.header_version = load_be32(p + 24);
  if (h.header_version >> 16 != 1) {
    return Status::NotSupported("VHD dynamic header: header version " + hex32(h.header_version));
  }
  h.max_table_entries = load_be32(p + 28);
  h.block_size = load_be32(p + 32);
  if (h.block_size < kSectorBytes || h.block_size > kMaxBlockBytes ||
      (h.block_size & (h.block_size - 1)) != 0) {
    return Status::Corruption("VHD dynamic header: block_size " + std::to_string(h.block_size) +
                              " is not a power of two from 512 to 256 MiB");
  }
  if (h.table_offset > file_size) {
    return Status::Corruption("VHD dynamic header: table_offset " + std::to_string(h.table_offset) +
                              " is past the end of the file (" + std::to_string(file_size) +
                              " bytes)");
  }
  std::memcpy(h.parent_uuid.data(), p + 40, 16);
  h.parent_timestamp = load_be32(p + 56);
  Result<std::string> name =
      vhd_utf16_to_utf8(bytes.subspan(kParentNameAt, kParentNameBytes), /*big_endian=*/true);
  if (!name.ok()) return name.status().with_context("VHD dynamic header: parent_unicode_name");
  h.parent_unicode_name = std::move(*name);
  for (size_t i = 0; i < h.parent_locators.size(); ++i) {
    const std::byte* e = p + kLocatorsAt + i * kLocatorBytes;
    VhdParentLocator& loc = h.parent_locators[i];
    loc.platform_code = load_be32(e);
    loc.data_space = load_be32(e + 4);
    loc.data_length = load_be32(e + 8);
    loc.data_offset = load_be64(e + 16);
  }
  return h;
}

Result<uint64_t> vhd_bat_entries_needed(const VhdDynamicHeader& header, uint64_t virtual_size) {
  const uint64_t needed =
      virtual_size / header.block_size + (virtual_size % header.block_size != 0 ? 1 : 0);
  if (needed > header.max_table_entries) {
    return Status::Corruption("VHD dynamic header: max_table_entries " +
                              std::to_string(header.max_table_entries) + " of " +
                              std::to_string(header.block_size) + "-byte blocks cannot cover " +
                              std::to_string(virtual_size) + " bytes (current_size)");
  }
  return needed;
}

Result<std::vector<uint32_t>> parse_vhd_bat(std::span<const std::byte> bytes,
                                            const VhdDynamicHeader& header, uint64_t virtual_size,
                                            uint64_t file_size) {
  Result<uint64_t> needed = vhd_bat_entries_needed(header, virtual_size);
  if (!needed.ok()) return needed.status();
  if (bytes.size() / 4 < *needed) {
    return Status::Corruption("VHD BAT: " + std::to_string(bytes.size()) + " bytes for " +
                              std::to_string(*needed) + " entries");
  }
  const uint64_t bitmap_bytes = header.bitmap_bytes();
  std::vector<uint32_t> bat(*needed);
  for (uint64_t i = 0; i < *needed; ++i) {
    const uint32_t entry = load_be32(bytes.data() + 4 * i);
    bat[i] = entry;
    if (entry == kVhdUnallocated) continue;
    // Only the data up to the end of the virtual disk must exist: the last block may be cut.
    const uint64_t block_start = i * header.block_size;  // < virtual_size: no overflow
    const uint64_t reach = std::min<uint64_t>(header.block_size, virtual_size - block_start);
    const uint64_t start = uint64_t{entry} * kSectorBytes;
    const std::optional<uint64_t> end = checked_add(start, bitmap_bytes + reach);
    if (!end || *end > file_size) {
      return Status::Corruption(
          "VHD BAT entry " + std::to_string(i) + ": block at sector " + std::to_string(entry) +
          " (bitmap and data to byte " + (end ? std::to_string(*end) : std::string("overflow")) +
          ") is past the end of the file (" + std::to_string(file_size) + " bytes)");
    }
  }
  return bat;
}

Result<std::string> vhd_utf16_to_utf8(std::span<const std::byte> bytes, bool big_endian) {
  if (bytes.size() % 2 != 0) {
    return Status::Corruption("UTF-16 text of odd length " + std::to_string(bytes.size()));
  }
  std::string out;
  for (size_t i = 0; i < bytes.size(); i += 2) {
    auto unit_at = [&](size_t at) -> uint32_t {
      return big_endian ? load_be16(bytes.data() + at) : load_le16(bytes.data() + at);
    };
    uint32_t cp = unit_at(i);
    if (cp == 0) break;
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (i + 3 >= bytes.size()) return Status::Corruption("UTF-16 text: unpaired surrogate");
      const uint32_t low = unit_at(i + 2);
      if (low < 0xDC00 || low > 0xDFFF)
        return Status::Corruption("UTF-16 text: unpaired surrogate");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
      i += 2;
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
      return Status::Corruption("UTF-16 text: unpaired surrogate");
    }
    append_utf8(out, cp);
  }
  return out;
}

Result<std::string> vhd_relative_parent_name(std::string_view utf8_path) {
  std::string path(utf8_path);
  std::replace(path.begin(), path.end(), '\\', '/');
  if (path.empty()) return Status::Corruption("VHD parent name is empty");
  if (path.find('\0') != std::string::npos) {
    return Status::Corruption("VHD parent name contains a NUL");
  }
  if (path[0] == '/' || (path.size() >= 2 && path[1] == ':')) {
    return Status::NotSupported("VHD parent '" + path +
                                "' is an absolute path; only parents next to the image are opened");
  }
  std::string normalized;
  size_t start = 0;
  while (start <= path.size()) {
    size_t slash = path.find('/', start);
    if (slash == std::string::npos) slash = path.size();
    const std::string_view part(path.data() + start, slash - start);
    start = slash + 1;
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      return Status::NotSupported("VHD parent '" + path +
                                  "' leaves the image's folder (a '..' component)");
    }
    if (!normalized.empty()) normalized += '/';
    normalized += part;
  }
  if (normalized.empty()) return Status::Corruption("VHD parent name '" + path + "' names no file");
  return normalized;
}

int probe_vhd(std::span<const std::byte> head, std::span<const std::byte> tail) {
  if (has_cookie(head, "conectix")) return 100;
  if (tail.size() >= kFooterBytes && parse_vhd_footer(tail.last(kFooterBytes)).ok()) return 100;
  return 0;
}

Result<std::unique_ptr<VhdSource>> open_vhd_chain(std::unique_ptr<BlockSource> lower,
                                                  const VhdOptions& options, int depth,
                                                  std::vector<std::string> chain_ids);

namespace {

Status read_exact(const BlockSource& lower, uint64_t offset, std::span<std::byte> out,
                  std::string_view what) {
  const std::optional<uint64_t> end = checked_add(offset, out.size());
  if (!end || *end > lower.size()) {
    return Status::Corruption(std::string(what) + " at " + std::to_string(offset) + " (" +
                              std::to_string(out.size()) + " bytes) is past the end of the file (" +
                              std::to_string(lower.size()) + " bytes)");
  }
  Status s = lower.read_at(offset, out);
  if (!s.ok()) return s.with_context(what);
  return Status::OK();
}

// Finds the footer: a fixed disk keeps it only in the last 512 bytes; a dynamic or differencing
// disk keeps the copy qemu and Windows read at offset 0 (and another at the end).
Result<VhdFooter> find_footer(const BlockSource& lower) {
  const uint64_t file_size = lower.size();
  if (file_size < kFooterBytes) {
    return Status::Corruption("file of " + std::to_string(file_size) +
                              " bytes is too small for a VHD footer");
  }
  std::vector<std::byte> head(kFooterBytes);
  std::vector<std::byte> tail(kFooterBytes);
  if (Status s = read_exact(lower, 0, head, "footer copy"); !s.ok()) return s;
  if (Status s = read_exact(lower, file_size - kFooterBytes, tail, "footer"); !s.ok()) return s;
  const bool head_cookie = has_cookie(head, "conectix");
  std::optional<Status> tail_error;
  if (!has_cookie(tail, "conectix")) {
    tail_error = Status::Corruption("no 'conectix' cookie in the last 512 bytes");
  } else {
    Result<VhdFooter> footer = parse_vhd_footer(tail);
    // A fixed disk's first sector is guest data, which may itself look like a footer.
    if (footer.ok() && footer->disk_type == VhdDiskType::kFixed) return footer;
    if (!footer.ok()) tail_error = footer.status();
  }
  if (!head_cookie) {
    if (tail_error) {
      return Status::Corruption("no VHD footer at offset 0 or at the end: " +
                                tail_error->message());
    }
    return Status::Corruption(
        "the footer at the end says dynamic or differencing, but offset 0 "
        "holds no footer copy");
  }
  Result<VhdFooter> footer = parse_vhd_footer(head);
  if (!footer.ok()) return footer.status().with_context("footer copy at offset 0");
  if (footer->disk_type == VhdDiskType::kFixed) {
    return Status::Corruption(
        "footer copy at offset 0 says disk type 2 (fixed), but the end of "
        "the file holds no fixed-disk footer");
  }
  // Readers use the copy at offset 0 (as qemu and Windows do); the end copy must still be there,
  // or the file was cut short.
  if (tail_error) {
    return Status::Corruption(
        "the footer at the end of the file is missing or damaged "
        "(truncated file?): " +
        tail_error->message());
  }
  return footer;
}

// The relative names under which the parent may lie next to the image, best first.
std::vector<std::string> parent_names(const BlockSource& lower, const VhdDynamicHeader& header,
                                      Status& error) {
  std::vector<std::string> names;
  for (const VhdParentLocator& loc : header.parent_locators) {
    if (loc.platform_code != kVhdPlatformW2ru || loc.data_length == 0) continue;
    if (loc.data_length > kMaxLocatorBytes) {
      error = Status::Corruption("parent locator data_length " + std::to_string(loc.data_length) +
                                 " is too large");
      return {};
    }
    std::vector<std::byte> data(loc.data_length);
    if (Status s = read_exact(lower, loc.data_offset, data, "parent locator"); !s.ok()) {
      error = s;
      return {};
    }
    Result<std::string> utf8 = vhd_utf16_to_utf8(data, /*big_endian=*/false);
    if (!utf8.ok()) {
      error = utf8.status().with_context("parent locator W2ru");
      return {};
    }
    Result<std::string> name = vhd_relative_parent_name(*utf8);
    if (name.ok()) {
      names.push_back(std::move(*name));
    } else {
      error = name.status();
    }
  }
  if (!header.parent_unicode_name.empty()) {
    // The name field holds the parent's file name; look for it beside the image.
    std::string base = header.parent_unicode_name;
    std::replace(base.begin(), base.end(), '\\', '/');
    base = base.substr(base.find_last_of('/') + 1);
    Result<std::string> name = vhd_relative_parent_name(base);
    if (name.ok()) {
      if (std::find(names.begin(), names.end(), *name) == names.end()) {
        names.push_back(std::move(*name));
      }
    } else if (error.ok()) {
      error = name.status();
    }
  }
  if (names.empty() && error.ok()) {
    error = Status::Corruption(
        "differencing disk names no parent (no W2ru locator, empty "
        "parent_unicode_name)");
  }
  return names;
}

}  // namespace

Result<std::unique_ptr<VhdSource>> open_vhd_chain(std::unique_ptr<BlockSource> lower,
                                                  const VhdOptions& options, int depth,
                                                  std::vector<std::string> chain_ids) {
  const std::string context = "vhd(" + lower->describe() + ")";
  const uint64_t file_size = lower->size();
  Result<VhdFooter> footer = find_footer(*lower);
  if (!footer.ok()) return footer.status().with_context(context);
  // qemu shows current_size / 512 sectors.
  const uint64_t virtual_size = footer->current_size / kSectorBytes * kSectorBytes;

  if (footer->disk_type == VhdDiskType::kFixed) {
    if (virtual_size > file_size - kFooterBytes) {
      return Status::Corruption(context + ": fixed disk current_size " +
                                std::to_string(footer->current_size) + " exceeds the " +
                                std::to_string(file_size - kFooterBytes) +
                                " data bytes before the footer");
    }
    return std::unique_ptr<VhdSource>(
        new VhdSource(std::move(lower), options, std::move(*footer), {}, {}, nullptr));
  }

  std::vector<std::byte> header_bytes(kDynamicHeaderBytes);
  if (Status s = read_exact(*lower, footer->data_offset, header_bytes,
                            "dynamic header (footer data_offset)");
      !s.ok()) {
    return s.with_context(context);
  }
  Result<VhdDynamicHeader> header = parse_vhd_dynamic_header(header_bytes, file_size);
  if (!header.ok()) return header.status().with_context(context);
  Result<uint64_t> entries = vhd_bat_entries_needed(*header, virtual_size);
  if (!entries.ok()) return entries.status().with_context(context);
  if (*entries * 4 > kMaxBatBytes) {
    return Status::NotSupported(context + ": a BAT of " + std::to_string(*entries) +
                                " entries is larger than 64 MiB");
  }
  std::vector<std::byte> bat_bytes(*entries * 4);
  if (Status s = read_exact(*lower, header->table_offset, bat_bytes, "BAT (table_offset)");
      !s.ok()) {
    return s.with_context(context);
  }
  Result<std::vector<uint32_t>> bat = parse_vhd_bat(bat_bytes, *header, virtual_size, file_size);
  if (!bat.ok()) return bat.status().with_context(context);

  std::unique_ptr<BlockSource> parent;
  if (footer->disk_type == VhdDiskType::kDifferencing) {
    const std::string id = id_key(footer->unique_id);
    if (std::find(chain_ids.begin(), chain_ids.end(), id) != chain_ids.end()) {
      return Status::Corruption(context +
                                ": the parent chain has a cycle (a disk's unique id "
                                "appears twice)");
    }
    chain_ids.push_back(id);
    Status name_error;
    const std::vector<std::string> names = parent_names(*lower, *header, name_error);
    if (names.empty()) return name_error.with_context(context);
    if (!options.open_sibling) {
      return Status::NotSupported(context + ": differencing disk needs its parent '" + names[0] +
                                  "', and no way to open files next to the image was given");
    }
    if (depth >= options.max_chain_depth) {
      return Status::NotSupported(context + ": parent chain deeper than " +
                                  std::to_string(options.max_chain_depth));
    }
    Status open_error;
    for (const std::string& name : names) {
      Result<std::unique_ptr<BlockSource>> file = options.open_sibling(name);
      if (!file.ok()) {
        open_error = file.status().with_context("parent '" + name + "'");
        if (file.status().code() == StatusCode::kNotFound) continue;
        return open_error.with_context(context);
      }
      if (!*file) return Status::InvalidArgument(context + ": open_sibling returned no source");
      Result<std::unique_ptr<VhdSource>> opened =
          open_vhd_chain(std::move(*file), options, depth + 1, chain_ids);
      if (!opened.ok()) return opened.status().with_context(context + ": parent '" + name + "'");
      if ((*opened)->footer().unique_id != header->parent_uuid) {
        return Status::Corruption(context + ": parent '" + name +
                                  "' has a unique id other than the header's parent_uuid");
      }
      parent = std::move(*opened);
      break;
    }
    if (!parent) return open_error.with_context(context);
  }
  return std::unique_ptr<VhdSource>(new VhdSource(std::move(lower), options, std::move(*footer),
                                                  std::move(*header), std::move(*bat),
                                                  std::move(parent)));
}

Result<std::unique_ptr<BlockSource>> open_vhd(std::unique_ptr<BlockSource> lower,
                                              const VhdOptions& options) {
  if (!lower) return Status::InvalidArgument("open_vhd: no lower source");
  if (options.max_chain_depth < 1) {
    return Status::InvalidArgument("open_vhd: max_chain_depth must be at least 1");
  }
  Result<std::unique_ptr<VhdSource>> source = open_vhd_chain(std::move(lower), options, 1, {});
  if (!source.ok()) return source.status();
  return std::unique_ptr<BlockSource>(std::move(*source));
}

VhdSource::VhdSource(std::unique_ptr<BlockSource> lower, const VhdOptions& options,
                     VhdFooter footer, VhdDynamicHeader header, std::vector<uint32_t> bat,
                     std::unique_ptr<BlockSource> parent)
    : lower_(std::move(lower)),
      footer_(std::move(footer)),
      header_(std::move(header)),
      bat_(std::move(bat)),
      parent_(std::move(parent)),
      virtual_size_(footer_.current_size / kSectorBytes * kSectorBytes),
      bitmaps_(std::make_unique<BitmapCache>(options.bitmap_cache_bytes)) {}

VhdSource::~VhdSource() = default;

Status VhdSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  if (footer_.disk_type == VhdDiskType::kFixed) {
    Status s = lower_->read_at(offset, out);
    return s.ok() ? s : s.with_context(describe());
  }
  size_t done = 0;
  while (done < out.size()) {
    const uint64_t at = offset + done;
    const uint64_t within = at % header_.block_size;
    const size_t n =
        static_cast<size_t>(std::min<uint64_t>(out.size() - done, header_.block_size - within));
    if (Status s = read_in_block(at, out.subspan(done, n)); !s.ok()) return s;
    done += n;
  }
  return Status::OK();
}

uint32_t VhdSource::block_size() const {
  return footer_.disk_type == VhdDiskType::kFixed ? uint32_t{kSectorBytes} : header_.block_size;
}

uint64_t VhdSource::block_data_offset(uint64_t block) const {
  // Checked at open: the block's bitmap and reachable data lie inside the file.
  return uint64_t{bat_[block]} * kSectorBytes + header_.bitmap_bytes();
}

Result<std::shared_ptr<const std::vector<std::byte>>> VhdSource::bitmap(uint64_t block) const {
  std::unique_lock lock(bitmap_mu_);
  for (;;) {
    if (auto hit = bitmaps_->find(block)) return hit;
    if (bitmaps_->loading().count(block) == 0) break;
    bitmap_cv_.wait(lock);
  }
  bitmaps_->loading().insert(block);
  lock.unlock();

  auto bytes = std::make_shared<std::vector<std::byte>>(header_.bitmap_bytes());
  Status s = lower_->read_at(uint64_t{bat_[block]} * kSectorBytes, *bytes);

  lock.lock();
  bitmaps_->loading().erase(block);
  if (s.ok()) bitmaps_->insert(block, bytes);
  lock.unlock();
  bitmap_cv_.notify_all();
  if (!s.ok()) {
    return s.with_context(describe() + ": sector bitmap of block " + std::to_string(block));
  }
  return std::shared_ptr<const std::vector<std::byte>>(std::move(bytes));
}

Status VhdSource::read_absent(uint64_t offset, std::span<std::byte> out) const {
  size_t from_parent = 0;
  if (parent_ && offset < parent_->size()) {
    from_parent = static_cast<size_t>(std::min<uint64_t>(out.size(), parent_->size() - offset));
    Status s = parent_->read_at(offset, out.first(from_parent));
    if (!s.ok()) return s.with_context(describe() + ": parent");
  }
  std::fill(out.begin() + from_parent, out.end(), std::byte{0});
  return Status::OK();
}

Status VhdSource::read_in_block(uint64_t offset, std::span<std::byte> out) const {
  const uint64_t block = offset / header_.block_size;
  if (bat_[block] == kVhdUnallocated) return read_absent(offset, out);
  Result<std::shared_ptr<const std::vector<std::byte>>> bits = bitmap(block);
  if (!bits.ok()) return bits.status();
  const uint64_t within = offset % header_.block_size;
  const uint64_t end = within + out.size();
  const uint64_t end_sector = (end + kSectorBytes - 1) / kSectorBytes;
  uint64_t pos = within;
  while (pos < end) {
    const uint64_t sector = pos / kSectorBytes;
    const uint64_t run_end =
        std::min(end, sector_run_end(**bits, sector, end_sector) * kSectorBytes);
    std::span<std::byte> part = out.subspan(pos - within, run_end - pos);
    if (sector_bit(**bits, sector)) {
      Status s = lower_->read_at(block_data_offset(block) + pos, part);
      if (!s.ok()) return s.with_context(describe() + ": block " + std::to_string(block));
    } else if (Status s = read_absent(offset - within + pos, part); !s.ok()) {
      return s;
    }
    pos = run_end;
  }
  return Status::OK();
}

Result<Extent> VhdSource::map_absent(uint64_t offset, uint64_t length) const {
  if (!parent_ || offset >= parent_->size()) return Extent{Extent::Kind::kZero, length};
  Result<Extent> below = parent_->map(offset);
  if (!below.ok()) return below.status().with_context(describe() + ": parent");
  const uint64_t clipped = std::min({length, below->length, parent_->size() - offset});
  return Extent{below->kind, clipped};
}

Result<Extent> VhdSource::map(uint64_t offset) const {
  if (offset >= size()) {
    return Status::InvalidArgument(describe() + ": map at " + std::to_string(offset) +
                                   " is past size " + std::to_string(size()));
  }
  if (footer_.disk_type == VhdDiskType::kFixed) {
    return Extent{Extent::Kind::kData, size() - offset};
  }
  uint64_t block = offset / header_.block_size;
  const uint64_t block_start = block * header_.block_size;
  if (bat_[block] == kVhdUnallocated) {
    while (block + 1 < bat_.size() && bat_[block + 1] == kVhdUnallocated) ++block;
    const uint64_t end = std::min(size(), (block + 1) * header_.block_size);
    return map_absent(offset, end - offset);
  }
  Result<std::shared_ptr<const std::vector<std::byte>>> bits = bitmap(block);
  if (!bits.ok()) return bits.status();
  const uint64_t block_end = std::min(size(), block_start + header_.block_size);
  const uint64_t sector = (offset - block_start) / kSectorBytes;
  const uint64_t limit = (block_end - block_start + kSectorBytes - 1) / kSectorBytes;
  const uint64_t run_end =
      std::min(block_end, block_start + sector_run_end(**bits, sector, limit) * kSectorBytes);
  if (sector_bit(**bits, sector)) return Extent{Extent::Kind::kData, run_end - offset};
  return map_absent(offset, run_end - offset);
}

}  // namespace imgfs::formats
