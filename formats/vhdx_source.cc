#include "formats/vhdx_source.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "formats/byte_order.h"
#include "formats/checked_math.h"

namespace imgfs::formats {

namespace {

constexpr uint64_t kMiB = 1024 * 1024;
// The file identifier, both headers and both region tables live in the first MiB.
constexpr uint64_t kHeaderSectionBytes = kMiB;
// One read at open covers the identifier, both headers and the first region table.
constexpr uint64_t kOpenPrefixBytes = kVhdxRegionTable2Offset;
constexpr uint64_t kHeaderDefinedBytes = 80;  // the fields of a header; the rest is reserved
constexpr uint64_t kRegionEntryBytes = 32;
constexpr uint64_t kMetadataEntryBytes = 32;
constexpr uint32_t kMaxTableEntries = 2047;
constexpr uint64_t kMaxMetadataItemBytes = kMiB;
constexpr uint64_t kMetadataItemsMinOffset = 64 * 1024;
constexpr uint32_t kMinBlockSize = kMiB;
constexpr uint32_t kMaxBlockSize = 256 * kMiB;
constexpr uint64_t kMaxVirtualDiskSize = uint64_t{64} << 40;  // 64 TiB (MS-VHDX 2.6.2.2)
constexpr uint64_t kSectorsPerChunk = uint64_t{1} << 23;
constexpr uint64_t kLogSectorBytes = 4096;
constexpr uint64_t kLogEntryHeaderBytes = 64;
constexpr uint64_t kLogDescriptorBytes = 32;

constexpr uint32_t kRegionRequired = 1;
constexpr uint32_t kMetadataRequired = 1u << 2;
constexpr uint32_t kParamLeaveBlocksAllocated = 1;
constexpr uint32_t kParamHasParent = 1u << 1;

constexpr uint64_t kBatStateMask = 7;
constexpr int kBatOffsetShift = 20;  // FileOffsetMB lives in bits 20..63
enum BatState : uint64_t {
  kNotPresent = 0,
  kUndefined = 1,
  kZero = 2,
  kUnmapped = 3,
  kUnmappedV095 = 5,
  kFullyPresent = 6,
  kPartiallyPresent = 7,
};

// A GUID in its on-disk form: Data1..Data3 little-endian, Data4 as written.
constexpr VhdxGuid make_guid(uint32_t data1, uint16_t data2, uint16_t data3,
                             std::array<uint8_t, 8> data4) {
  VhdxGuid g{};
  for (int i = 0; i < 4; ++i) g[i] = static_cast<std::byte>(data1 >> (8 * i));
  for (int i = 0; i < 2; ++i) g[4 + i] = static_cast<std::byte>(data2 >> (8 * i));
  for (int i = 0; i < 2; ++i) g[6 + i] = static_cast<std::byte>(data3 >> (8 * i));
  for (int i = 0; i < 8; ++i) g[8 + i] = static_cast<std::byte>(data4[i]);
  return g;
}

constexpr VhdxGuid kBatRegionGuid =
    make_guid(0x2DC27766, 0xF623, 0x4200, {0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08});
constexpr VhdxGuid kMetadataRegionGuid =
    make_guid(0x8B7CA206, 0x4790, 0x4B9A, {0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E});
constexpr VhdxGuid kFileParametersGuid =
    make_guid(0xCAA16737, 0xFA36, 0x4D43, {0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B});
constexpr VhdxGuid kVirtualDiskSizeGuid =
    make_guid(0x2FA54224, 0xCD1B, 0x4876, {0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8});
constexpr VhdxGuid kPage83DataGuid =
    make_guid(0xBECA12AB, 0xB2E6, 0x4523, {0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46});
constexpr VhdxGuid kLogicalSectorSizeGuid =
    make_guid(0x8141BF1D, 0xA96F, 0x4709, {0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F});
constexpr VhdxGuid kPhysicalSectorSizeGuid =
    make_guid(0xCDA348C7, 0x445D, 0x4471, {0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56});
constexpr VhdxGuid kParentLocatorGuid =
    make_guid(0xA8D35F2D, 0xB30B, 0x454D, {0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C});

// Reflected CRC-32C table (polynomial 0x82F63B78), built at compile time.
constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1) ? 0x82F63B78u : 0u);
    table[i] = crc;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

uint32_t crc32c_update(uint32_t crc, std::span<const std::byte> bytes) {
  for (std::byte b : bytes) {
    crc = kCrc32cTable[(crc ^ std::to_integer<uint32_t>(b)) & 0xFF] ^ (crc >> 8);
  }
  return crc;
}

bool has_signature(std::span<const std::byte> bytes, std::string_view signature) {
  return bytes.size() >= signature.size() &&
         std::memcmp(bytes.data(), signature.data(), signature.size()) == 0;
}

VhdxGuid load_guid(const std::byte* p) {
  VhdxGuid g;
  std::memcpy(g.data(), p, g.size());
  return g;
}

bool is_zero_guid(const VhdxGuid& g) {
  return std::all_of(g.begin(), g.end(), [](std::byte b) { return b == std::byte{0}; });
}

bool is_power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

std::string hex64(uint64_t v) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text = "0x";
  bool started = false;
  for (int shift = 60; shift >= 0; shift -= 4) {
    const unsigned digit = (v >> shift) & 15;
    if (digit != 0 || started || shift == 0) {
      text += kDigits[digit];
      started = true;
    }
  }
  return text;
}

// True when [a, a + a_length) and [b, b + b_length) share a byte. Both ranges are known not to
// overflow.
bool overlaps(uint64_t a, uint64_t a_length, uint64_t b, uint64_t b_length) {
  return a_length != 0 && b_length != 0 && a < b + b_length && b < a + a_length;
}

// UTF-16LE to UTF-8; unpaired surrogates become U+FFFD (the result only names a file in a
// message).
std::string utf16le_to_utf8(std::span<const std::byte> bytes) {
  std::string text;
  auto put = [&text](uint32_t cp) {
    if (cp < 0x80) {
      text += static_cast<char>(cp);
    } else if (cp < 0x800) {
      text += static_cast<char>(0xC0 | (cp >> 6));
      text += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      text += static_cast<char>(0xE0 | (cp >> 12));
      text += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      text += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      text += static_cast<char>(0xF0 | (cp >> 18));
      text += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      text += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      text += static_cast<char>(0x80 | (cp & 0x3F));
    }
  };
  for (size_t i = 0; i + 1 < bytes.size(); i += 2) {
    const uint32_t unit = load_le16(bytes.data() + i);
    if (unit >= 0xD800 && unit < 0xDC00 && i + 3 < bytes.size()) {
      const uint32_t low = load_le16(bytes.data() + i + 2);
      if (low >= 0xDC00 && low < 0xE000) {
        put(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00));
        i += 2;
        continue;
      }
    }
    put(unit >= 0xD800 && unit < 0xE000 ? 0xFFFD : unit);
  }
  return text;
}

// The parent locator's "relative_path" value, or "" when it has none (MS-VHDX 2.6.2.6).
std::string parent_relative_path(std::span<const std::byte> item) {
  constexpr size_t kLocatorHeaderBytes = 20;
  constexpr size_t kLocatorEntryBytes = 12;
  if (item.size() < kLocatorHeaderBytes) return "";
  const uint16_t count = load_le16(item.data() + 18);
  for (size_t i = 0; i < count; ++i) {
    const size_t at = kLocatorHeaderBytes + i * kLocatorEntryBytes;
    if (at + kLocatorEntryBytes > item.size()) return "";
    const uint64_t key_offset = load_le32(item.data() + at);
    const uint64_t value_offset = load_le32(item.data() + at + 4);
    const uint64_t key_length = load_le16(item.data() + at + 8);
    const uint64_t value_length = load_le16(item.data() + at + 10);
    if (key_offset + key_length > item.size() || value_offset + value_length > item.size()) {
      continue;
    }
    if (utf16le_to_utf8(item.subspan(key_offset, key_length)) == "relative_path") {
      return utf16le_to_utf8(item.subspan(value_offset, value_length));
    }
  }
  return "";
}

// Checks that a metadata item lies inside the region and is long enough for its field.
Status check_item(const VhdxMetadataItem& item, const char* name, uint64_t min_length,
                  uint64_t region_prefix_bytes) {
  if (item.length < min_length) {
    return Status::Corruption(std::string("metadata item ") + name + " is " +
                              std::to_string(item.length) + " bytes, needs " +
                              std::to_string(min_length));
  }
  if (uint64_t{item.offset} + item.length > region_prefix_bytes) {
    return Status::Corruption(std::string("metadata item ") + name +
                              " lies past the bytes read of the metadata region");
  }
  return Status::OK();
}

// Checks that [offset, offset + length) of a `file_size`-byte file holds `what`.
Status check_in_file(uint64_t offset, uint64_t length, uint64_t file_size,
                     const std::string& what) {
  const std::optional<uint64_t> end = checked_add(offset, length);
  if (!end || *end > file_size) {
    return Status::Corruption(what + " at " + std::to_string(offset) + " (" +
                              std::to_string(length) + " bytes) lies past the end of the " +
                              std::to_string(file_size) + "-byte file");
  }
  return Status::OK();
}

}  // namespace

bool VhdxHeader::has_log_guid() const { return !is_zero_guid(log_guid); }

uint32_t vhdx_checksum(std::span<const std::byte> structure) {
  uint32_t crc = 0xFFFFFFFFu;
  if (structure.size() < 8) return crc32c_update(crc, structure) ^ 0xFFFFFFFFu;
  constexpr std::byte kZeros[4] = {};
  crc = crc32c_update(crc, structure.first(4));
  crc = crc32c_update(crc, kZeros);
  crc = crc32c_update(crc, structure.subspan(8));
  return crc ^ 0xFFFFFFFFu;
}

Result<VhdxHeader> parse_vhdx_header(std::span<const std::byte> header_bytes) {
  if (header_bytes.size() < kVhdxHeaderBytes) {
    return Status::Corruption("header is " + std::to_string(header_bytes.size()) +
                              " bytes, needs 4096");
  }
  header_bytes = header_bytes.first(kVhdxHeaderBytes);
  const std::byte* p = header_bytes.data();
  if (!has_signature(header_bytes, "head"))
    return Status::Corruption("header signature is not 'head'");
  const uint32_t stored = load_le32(p + 4);
  const uint32_t computed = vhdx_checksum(header_bytes);
  if (stored != computed) {
    return Status::Corruption("header checksum " + hex64(stored) + " does not match CRC-32C " +
                              hex64(computed));
  }
  VhdxHeader header;
  header.sequence_number = load_le64(p + 8);
  header.log_guid = load_guid(p + 48);
  header.log_version = load_le16(p + 64);
  header.version = load_le16(p + 66);
  header.log_length = load_le32(p + 68);
  header.log_offset = load_le64(p + 72);
  if (header.version != 1) {
    return Status::Corruption("header version " + std::to_string(header.version) + " is not 1");
  }
  return header;
}

Result<VhdxHeader> select_vhdx_header(std::span<const std::byte> header1_bytes,
                                      std::span<const std::byte> header2_bytes) {
  Result<VhdxHeader> h1 = parse_vhdx_header(header1_bytes);
  Result<VhdxHeader> h2 = parse_vhdx_header(header2_bytes);
  if (!h1.ok() && !h2.ok()) {
    return Status::Corruption("no valid header: header 1: " + h1.status().message() +
                              "; header 2: " + h2.status().message());
  }
  if (!h2.ok()) return h1;
  if (!h1.ok()) return h2;
  if (h1->sequence_number > h2->sequence_number) return h1;
  if (h2->sequence_number > h1->sequence_number) return h2;
  // Disk2VHD writes two identical headers with one sequence number; different ones are ambiguous.
  if (std::memcmp(header1_bytes.data(), header2_bytes.data(), kHeaderDefinedBytes) == 0) return h1;
  return Status::Corruption("both headers have sequence number " +
                            std::to_string(h1->sequence_number) + " but differ");
}

Result<VhdxRegionTable> parse_vhdx_region_table(std::span<const std::byte> table_bytes) {
  if (table_bytes.size() < kVhdxRegionTableBytes) {
    return Status::Corruption("region table is " + std::to_string(table_bytes.size()) +
                              " bytes, needs 65536");
  }
  table_bytes = table_bytes.first(kVhdxRegionTableBytes);
  const std::byte* p = table_bytes.data();
  if (!has_signature(table_bytes, "regi")) {
    return Status::Corruption("region table signature is not 'regi'");
  }
  const uint32_t stored = load_le32(p + 4);
  const uint32_t computed = vhdx_checksum(table_bytes);
  if (stored != computed) {
    return Status::Corruption("region table checksum " + hex64(stored) +
                              " does not match CRC-32C " + hex64(computed));
  }
  const uint32_t count = load_le32(p + 8);
  if (count > kMaxTableEntries) {
    return Status::Corruption("region table entry count " + std::to_string(count) +
                              " exceeds 2047");
  }
  std::optional<VhdxRegion> bat;
  std::optional<VhdxRegion> metadata;
  for (uint32_t i = 0; i < count; ++i) {
    const std::byte* e = p + 16 + i * kRegionEntryBytes;
    const VhdxGuid guid = load_guid(e);
    const VhdxRegion region{load_le64(e + 16), load_le32(e + 24)};
    const uint32_t flags = load_le32(e + 28);
    const bool is_bat = guid == kBatRegionGuid;
    const bool is_metadata = guid == kMetadataRegionGuid;
    if (!is_bat && !is_metadata) {
      if (flags & kRegionRequired) {
        return Status::NotSupported("region table entry " + std::to_string(i) +
                                    " is an unknown required region");
      }
      continue;
    }
    const char* name = is_bat ? "BAT region" : "metadata region";
    if (region.file_offset % kMiB != 0 || region.file_offset < kHeaderSectionBytes ||
        region.length == 0 || region.length % kMiB != 0) {
      return Status::Corruption(std::string(name) + " offset " +
                                std::to_string(region.file_offset) + " / length " +
                                std::to_string(region.length) +
                                " is not a non-empty MiB-aligned range after the header section");
    }
    std::optional<VhdxRegion>& slot = is_bat ? bat : metadata;
    if (slot) return Status::Corruption(std::string(name) + " appears twice in the region table");
    slot = region;
  }
  if (!bat) return Status::Corruption("region table has no BAT region");
  if (!metadata) return Status::Corruption("region table has no metadata region");
  if (!checked_add(bat->file_offset, bat->length) ||
      !checked_add(metadata->file_offset, metadata->length)) {
    return Status::Corruption("region table offset overflows");
  }
  if (overlaps(bat->file_offset, bat->length, metadata->file_offset, metadata->length)) {
    return Status::Corruption("BAT region and metadata region overlap");
  }
  return VhdxRegionTable{*bat, *metadata};
}

Result<VhdxMetadataTable> parse_vhdx_metadata_table(std::span<const std::byte> table_bytes,
                                                    uint64_t region_length) {
  if (table_bytes.size() < kVhdxMetadataTableBytes || region_length < kVhdxMetadataTableBytes) {
    return Status::Corruption("metadata table is shorter than 65536 bytes");
  }
  const std::byte* p = table_bytes.data();
  if (!has_signature(table_bytes, "metadata")) {
    return Status::Corruption("metadata table signature is not 'metadata'");
  }
  const uint16_t count = load_le16(p + 10);
  if (count > kMaxTableEntries) {
    return Status::Corruption("metadata table entry count " + std::to_string(count) +
                              " exceeds 2047");
  }
  struct Known {
    const VhdxGuid* guid;
    VhdxMetadataItem VhdxMetadataTable::*item;
    const char* name;
  };
  static constexpr Known kKnown[] = {
      {&kFileParametersGuid, &VhdxMetadataTable::file_parameters, "File Parameters"},
      {&kVirtualDiskSizeGuid, &VhdxMetadataTable::virtual_disk_size, "Virtual Disk Size"},
      {&kLogicalSectorSizeGuid, &VhdxMetadataTable::logical_sector_size, "Logical Sector Size"},
      {&kPhysicalSectorSizeGuid, &VhdxMetadataTable::physical_sector_size, "Physical Sector Size"},
      {&kPage83DataGuid, &VhdxMetadataTable::page83_data, "Page 83 Data"},
      {&kParentLocatorGuid, &VhdxMetadataTable::parent_locator, "Parent Locator"},
  };
  VhdxMetadataTable table;
  table.bytes_needed = kVhdxMetadataTableBytes;
  bool seen[std::size(kKnown)] = {};
  for (uint32_t i = 0; i < count; ++i) {
    const std::byte* e = p + kMetadataEntryBytes + i * kMetadataEntryBytes;
    const VhdxGuid guid = load_guid(e);
    const VhdxMetadataItem item{load_le32(e + 16), load_le32(e + 20)};
    const uint32_t flags = load_le32(e + 24);
    size_t k = 0;
    while (k < std::size(kKnown) && *kKnown[k].guid != guid) ++k;
    if (k == std::size(kKnown)) {
      if (flags & kMetadataRequired) {
        return Status::NotSupported("metadata table entry " + std::to_string(i) +
                                    " is an unknown required item");
      }
      continue;
    }
    const std::string name = kKnown[k].name;
    if (seen[k]) return Status::Corruption("metadata item " + name + " appears twice");
    seen[k] = true;
    if (item.length == 0) {
      if (item.offset != 0) {
        return Status::Corruption("metadata item " + name + " is empty at a non-zero offset");
      }
      continue;
    }
    if (item.offset < kMetadataItemsMinOffset || item.length > kMaxMetadataItemBytes ||
        uint64_t{item.offset} + item.length > region_length) {
      return Status::Corruption("metadata item " + name + " at " + std::to_string(item.offset) +
                                " (" + std::to_string(item.length) +
                                " bytes) lies outside the items area of the metadata region");
    }
    table.*(kKnown[k].item) = item;
    table.bytes_needed =
        std::max<uint64_t>(table.bytes_needed, uint64_t{item.offset} + item.length);
  }
  if (table.file_parameters.length == 0) {
    return Status::Corruption("metadata has no File Parameters item");
  }
  if (table.virtual_disk_size.length == 0) {
    return Status::Corruption("metadata has no Virtual Disk Size item");
  }
  if (table.logical_sector_size.length == 0) {
    return Status::Corruption("metadata has no Logical Sector Size item");
  }
  return table;
}

Result<VhdxDiskParameters> parse_vhdx_disk_parameters(const VhdxMetadataTable& table,
                                                      std::span<const std::byte> region_prefix) {
  const uint64_t have = region_prefix.size();
  const std::byte* p = region_prefix.data();
  if (Status s = check_item(table.file_parameters, "File Parameters", 8, have); !s.ok()) return s;
  if (Status s = check_item(table.virtual_disk_size, "Virtual Disk Size", 8, have); !s.ok()) {
    return s;
  }
  if (Status s = check_item(table.logical_sector_size, "Logical Sector Size", 4, have); !s.ok()) {
    return s;
  }
  VhdxDiskParameters params;
  params.block_size = load_le32(p + table.file_parameters.offset);
  const uint32_t flags = load_le32(p + table.file_parameters.offset + 4);
  params.leave_blocks_allocated = (flags & kParamLeaveBlocksAllocated) != 0;
  params.has_parent = (flags & kParamHasParent) != 0;
  params.virtual_disk_size = load_le64(p + table.virtual_disk_size.offset);
  params.logical_sector_size = load_le32(p + table.logical_sector_size.offset);
  if (table.physical_sector_size.length != 0) {
    if (Status s = check_item(table.physical_sector_size, "Physical Sector Size", 4, have);
        !s.ok()) {
      return s;
    }
    params.physical_sector_size = load_le32(p + table.physical_sector_size.offset);
    if (params.physical_sector_size != 512 && params.physical_sector_size != 4096) {
      return Status::Corruption("physical sector size " +
                                std::to_string(params.physical_sector_size) +
                                " is neither 512 nor 4096");
    }
  }
  if (table.page83_data.length != 0) {
    if (Status s = check_item(table.page83_data, "Page 83 Data", 16, have); !s.ok()) return s;
  }
  if (params.has_parent && table.parent_locator.length != 0) {
    if (Status s = check_item(table.parent_locator, "Parent Locator", 20, have); !s.ok()) {
      return s;
    }
    params.parent_relative_path = parent_relative_path(
        region_prefix.subspan(table.parent_locator.offset, table.parent_locator.length));
  }
  if (params.block_size < kMinBlockSize || params.block_size > kMaxBlockSize ||
      !is_power_of_two(params.block_size)) {
    return Status::Corruption("block size " + std::to_string(params.block_size) +
                              " is not a power of two from 1 MiB to 256 MiB");
  }
  if (params.logical_sector_size != 512 && params.logical_sector_size != 4096) {
    return Status::Corruption("logical sector size " + std::to_string(params.logical_sector_size) +
                              " is neither 512 nor 4096");
  }
  if (params.virtual_disk_size > kMaxVirtualDiskSize ||
      params.virtual_disk_size % params.logical_sector_size != 0) {
    return Status::Corruption("virtual disk size " + std::to_string(params.virtual_disk_size) +
                              " is not a multiple of the logical sector size up to 64 TiB");
  }
  // Both factors are bounded above (2^23 * 4096 = 2^35), and the ratio is a power of two >= 16.
  params.chunk_ratio = kSectorsPerChunk * params.logical_sector_size / params.block_size;
  params.payload_blocks = params.virtual_disk_size / params.block_size +
                          (params.virtual_disk_size % params.block_size != 0 ? 1 : 0);
  // Every chunk_ratio payload entries are followed by one sector bitmap entry; a dynamic or fixed
  // disk may omit the bitmap entry after the last chunk (MS-VHDX 2.5.1).
  params.bat_entries =
      params.payload_blocks == 0
          ? 0
          : params.payload_blocks + (params.payload_blocks - 1) / params.chunk_ratio;
  return params;
}

bool vhdx_log_needs_replay(std::span<const std::byte> log_bytes, const VhdxGuid& log_guid) {
  const uint64_t log_length = log_bytes.size();
  for (uint64_t at = 0; at + kLogEntryHeaderBytes <= log_length; at += kLogSectorBytes) {
    const std::byte* e = log_bytes.data() + at;
    if (std::memcmp(e, "loge", 4) != 0) continue;
    const uint64_t entry_length = load_le32(e + 8);
    const uint64_t sequence_number = load_le64(e + 16);
    const uint64_t descriptor_count = load_le32(e + 24);
    if (entry_length == 0 || entry_length % kLogSectorBytes != 0 || entry_length > log_length ||
        sequence_number == 0 || load_guid(e + 32) != log_guid ||
        descriptor_count * kLogDescriptorBytes > entry_length) {
      continue;
    }
    return true;
  }
  return false;
}

Result<std::vector<uint64_t>> parse_vhdx_bat(std::span<const std::byte> bat_bytes,
                                             const VhdxDiskParameters& params, uint64_t file_size,
                                             std::span<const VhdxReservedRange> reserved) {
  if (params.has_parent) {
    return Status::NotSupported("VHDX differencing disks (HasParent) are not supported");
  }
  if (params.bat_entries > kVhdxMaxBatEntries) {
    return Status::NotSupported("BAT of " + std::to_string(params.bat_entries) +
                                " entries is larger than the " +
                                std::to_string(kVhdxMaxBatEntries) + " read at open");
  }
  if (bat_bytes.size() / 8 < params.bat_entries) {
    return Status::Corruption("BAT holds " + std::to_string(bat_bytes.size() / 8) +
                              " entries, needs " + std::to_string(params.bat_entries));
  }
  std::vector<uint64_t> offsets(params.payload_blocks, 0);
  for (uint64_t block = 0; block < params.payload_blocks; ++block) {
    const uint64_t index = block + block / params.chunk_ratio;
    const uint64_t entry = load_le64(bat_bytes.data() + index * 8);
    const uint64_t state = entry & kBatStateMask;
    const std::string where = "BAT entry " + std::to_string(index) + " (block " +
                              std::to_string(block) + ", " + hex64(entry) + ")";
    switch (state) {
      case kNotPresent:
      case kUndefined:
      case kZero:
      case kUnmapped:
      case kUnmappedV095:
        break;
      case kFullyPresent: {
        const uint64_t offset = (entry >> kBatOffsetShift) * kMiB;  // < 2^64: the field is 44 bits
        // Only the part of the last block that holds virtual disk bytes must be in the file.
        const uint64_t block_start = block * params.block_size;
        const uint64_t used =
            std::min<uint64_t>(params.block_size, params.virtual_disk_size - block_start);
        if (offset < kHeaderSectionBytes) {
          return Status::Corruption(where + " points into the header section");
        }
        if (Status s = check_in_file(offset, used, file_size, where + " data"); !s.ok()) return s;
        for (const VhdxReservedRange& range : reserved) {
          if (overlaps(offset, used, range.offset, range.length)) {
            return Status::Corruption(where + " data overlaps the " + range.what);
          }
        }
        offsets[block] = offset;
        break;
      }
      case kPartiallyPresent:
        return Status::Corruption(where + " is PARTIALLY_PRESENT in a disk without a parent");
      default:
        return Status::Corruption(where + " has invalid state " + std::to_string(state));
    }
  }
  return offsets;
}

int probe_vhdx(std::span<const std::byte> first_bytes) {
  return has_signature(first_bytes, "vhdxfile") ? 100 : 0;
}

Result<std::unique_ptr<BlockSource>> open_vhdx(std::unique_ptr<BlockSource> lower,
                                               const VhdxOptions& /*options*/) {
  if (lower == nullptr) return Status::InvalidArgument("open_vhdx: no lower source");
  const std::string name = "vhdx(" + lower->describe() + ")";
  const uint64_t file_size = lower->size();
  if (file_size < kHeaderSectionBytes) {
    return Status::Corruption(name + ": " + std::to_string(file_size) +
                              " bytes is too short for the 1 MiB VHDX header section");
  }

  std::vector<std::byte> prefix(kOpenPrefixBytes);
  if (Status s = lower->read_at(0, prefix); !s.ok()) return s.with_context(name);
  if (probe_vhdx(prefix) == 0) {
    return Status::Corruption(name + ": file type identifier is not 'vhdxfile'");
  }
  const std::span<const std::byte> prefix_view(prefix);
  Result<VhdxHeader> header =
      select_vhdx_header(prefix_view.subspan(kVhdxHeader1Offset, kVhdxHeaderBytes),
                         prefix_view.subspan(kVhdxHeader2Offset, kVhdxHeaderBytes));
  if (!header.ok()) return header.status().with_context(name);

  // Data blocks must not overlap the log. An unused log (no LogGuid) is never read, so its
  // fields are only checked when the log is in use.
  std::vector<VhdxReservedRange> reserved;
  const bool log_in_file =
      check_in_file(header->log_offset, header->log_length, file_size, "log").ok();
  if (log_in_file && header->log_length != 0) {
    reserved.push_back({header->log_offset, header->log_length, "log"});
  }
  if (header->has_log_guid()) {
    if (!log_in_file || header->log_offset % kMiB != 0 ||
        header->log_offset < kHeaderSectionBytes || header->log_length == 0 ||
        header->log_length % kMiB != 0) {
      return Status::Corruption(name + ": log offset " + std::to_string(header->log_offset) +
                                " / length " + std::to_string(header->log_length) +
                                " is not a non-empty MiB-aligned range inside the file after the "
                                "header section");
    }
    const std::string replay =
        name + ": VHDX log needs replay; open it once with Hyper-V or qemu-img check -r all";
    if (header->log_version != 0) {
      return Status::NotSupported(replay + " (log version " + std::to_string(header->log_version) +
                                  ")");
    }
    if (header->log_length > kVhdxMaxLogBytes) return Status::NotSupported(replay);
    std::vector<std::byte> log(header->log_length);
    if (Status s = lower->read_at(header->log_offset, log); !s.ok()) {
      return s.with_context(name + ": reading the log");
    }
    if (vhdx_log_needs_replay(log, header->log_guid)) return Status::NotSupported(replay);
  }

  Result<VhdxRegionTable> regions =
      parse_vhdx_region_table(prefix_view.subspan(kVhdxRegionTable1Offset, kVhdxRegionTableBytes));
  if (!regions.ok() && regions.status().code() == StatusCode::kCorruption) {
    // The second copy is only needed when the first is damaged.
    std::vector<std::byte> copy(kVhdxRegionTableBytes);
    if (Status s = lower->read_at(kVhdxRegionTable2Offset, copy); !s.ok()) {
      return s.with_context(name);
    }
    Result<VhdxRegionTable> second = parse_vhdx_region_table(copy);
    if (second.ok() || second.status().code() != StatusCode::kCorruption) {
      regions = std::move(second);
    } else {
      return Status::Corruption(name + ": region table 1: " + regions.status().message() +
                                "; region table 2: " + second.status().message());
    }
  }
  if (!regions.ok()) return regions.status().with_context(name);

  const VhdxRegion& metadata_region = regions->metadata;
  if (Status s = check_in_file(metadata_region.file_offset, kVhdxMetadataTableBytes, file_size,
                               "metadata table");
      !s.ok()) {
    return s.with_context(name);
  }
  std::vector<std::byte> metadata(kVhdxMetadataTableBytes);
  if (Status s = lower->read_at(metadata_region.file_offset, metadata); !s.ok()) {
    return s.with_context(name + ": reading the metadata table");
  }
  Result<VhdxMetadataTable> table = parse_vhdx_metadata_table(metadata, metadata_region.length);
  if (!table.ok()) return table.status().with_context(name);
  if (table->bytes_needed > metadata.size()) {
    if (Status s = check_in_file(metadata_region.file_offset, table->bytes_needed, file_size,
                                 "metadata items");
        !s.ok()) {
      return s.with_context(name);
    }
    const uint64_t have = metadata.size();
    metadata.resize(table->bytes_needed);
    if (Status s = lower->read_at(metadata_region.file_offset + have,
                                  std::span<std::byte>(metadata).subspan(have));
        !s.ok()) {
      return s.with_context(name + ": reading metadata items");
    }
  }
  Result<VhdxDiskParameters> params = parse_vhdx_disk_parameters(*table, metadata);
  if (!params.ok()) return params.status().with_context(name);
  if (params->has_parent) {
    std::string message = name + ": VHDX differencing disks (HasParent) are not supported";
    if (!params->parent_relative_path.empty()) {
      message += "; parent: " + params->parent_relative_path;
    }
    return Status::NotSupported(message);
  }
  if (params->bat_entries > kVhdxMaxBatEntries) {
    return Status::NotSupported(name + ": BAT of " + std::to_string(params->bat_entries) +
                                " entries is larger than the " +
                                std::to_string(kVhdxMaxBatEntries) + " imgfs reads at open");
  }

  const VhdxRegion& bat_region = regions->bat;
  const uint64_t bat_bytes = params->bat_entries * 8;  // bounded by kVhdxMaxBatEntries
  if (bat_bytes > bat_region.length) {
    return Status::Corruption(name + ": BAT region of " + std::to_string(bat_region.length) +
                              " bytes cannot hold " + std::to_string(params->bat_entries) +
                              " entries");
  }
  if (Status s = check_in_file(bat_region.file_offset, bat_bytes, file_size, "BAT"); !s.ok()) {
    return s.with_context(name);
  }
  std::vector<std::byte> bat(bat_bytes);
  if (Status s = lower->read_at(bat_region.file_offset, bat); !s.ok()) {
    return s.with_context(name + ": reading the BAT");
  }
  reserved.push_back({bat_region.file_offset, bat_region.length, "BAT region"});
  reserved.push_back({metadata_region.file_offset, metadata_region.length, "metadata region"});
  Result<std::vector<uint64_t>> offsets = parse_vhdx_bat(bat, *params, file_size, reserved);
  if (!offsets.ok()) return offsets.status().with_context(name);

  return std::unique_ptr<BlockSource>(
      new VhdxSource(std::move(lower), std::move(*params), std::move(*offsets)));
}

VhdxSource::VhdxSource(std::unique_ptr<BlockSource> lower, VhdxDiskParameters params,
                       std::vector<uint64_t> block_offsets)
    : lower_(std::move(lower)),
      params_(std::move(params)),
      block_offsets_(std::move(block_offsets)) {}

Status VhdxSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  const uint64_t block_size = params_.block_size;
  size_t done = 0;
  while (done < out.size()) {
    const uint64_t pos = offset + done;
    uint64_t block = pos / block_size;
    const uint64_t within = pos % block_size;
    const uint64_t file_offset = block_offsets_[block];
    // Extend the run over following blocks that continue it: zero after zero, or data that sits
    // right after the previous block in the file, so one lower read serves it.
    uint64_t run = block_size - within;
    while (done + run < out.size() && block + 1 < block_offsets_.size()) {
      const uint64_t next = block_offsets_[block + 1];
      const bool continues =
          file_offset == 0 ? next == 0 : next == block_offsets_[block] + block_size;
      if (!continues) break;
      ++block;
      run += block_size;
    }
    const size_t n = static_cast<size_t>(std::min<uint64_t>(run, out.size() - done));
    std::span<std::byte> dst = out.subspan(done, n);
    if (file_offset == 0) {
      std::memset(dst.data(), 0, dst.size());
    } else if (Status s = lower_->read_at(file_offset + within, dst); !s.ok()) {
      return s.with_context(describe() + ": block at virtual offset " + std::to_string(pos));
    }
    done += n;
  }
  return Status::OK();
}

Result<Extent> VhdxSource::map(uint64_t offset) const {
  if (offset >= size()) {
    return Status::InvalidArgument(describe() + ": map at " + std::to_string(offset) +
                                   " is past size " + std::to_string(size()));
  }
  const uint64_t block_size = params_.block_size;
  uint64_t block = offset / block_size;
  const bool data = block_offsets_[block] != 0;
  const uint64_t last = std::min<uint64_t>(block_offsets_.size(), block + kMapMaxBlocks);
  while (block + 1 < last && (block_offsets_[block + 1] != 0) == data) ++block;
  const uint64_t end = std::min<uint64_t>((block + 1) * block_size, size());
  return Extent{data ? Extent::Kind::kData : Extent::Kind::kZero, end - offset};
}

}  // namespace imgfs::formats
