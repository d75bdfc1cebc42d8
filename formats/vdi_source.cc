#include "formats/vdi_source.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "formats/byte_order.h"
#include "formats/checked_math.h"

namespace imgfs::formats {
namespace {

constexpr uint64_t kHeaderBytes = 512;
constexpr uint32_t kVersion11 = 0x00010001;
// header_size counts from offset 0x48; version 1.1 fields run to 0x1C8.
constexpr uint32_t kMinHeaderSize = 0x180;
constexpr uint64_t kSectorBytes = 512;
// VirtualBox and qemu always write 1 MiB blocks; far larger values are corrupt fields.
constexpr uint64_t kMaxBlockBytes = 256ull << 20;
// The block map is read whole at open: 64 MiB covers 16 TiB at 1 MiB blocks.
constexpr uint64_t kMaxBlockMapBytes = 64ull << 20;

bool is_zero(const std::array<std::byte, 16>& id) {
  return std::all_of(id.begin(), id.end(), [](std::byte b) { return b == std::byte{0}; });
}

std::string hex32(uint32_t v) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 7; i >= 0; --i) s += kDigits[(v >> (4 * i)) & 0xF];
  return s;
}

bool is_allocated(uint32_t entry) { return entry != kVdiUnallocated && entry != kVdiZeroBlock; }

}  // namespace

Result<VdiHeader> parse_vdi_header(std::span<const std::byte> bytes, uint64_t file_size) {
  if (bytes.size() < kHeaderBytes) {
    return Status::Corruption("VDI header: " + std::to_string(bytes.size()) + " bytes, need 512");
  }
  const std::byte* p = bytes.data();
  const uint32_t signature = load_le32(p + 0x40);
  if (signature != kVdiSignature) {
    return Status::Corruption("VDI header: signature " + hex32(signature) + ", expected " +
                              hex32(kVdiSignature));
  }
  VdiHeader h;
  h.version = load_le32(p + 0x44);
  if (h.version != kVersion11) {
    return Status::NotSupported("VDI header: version " + std::to_string(h.version >> 16) + "." +
                                std::to_string(h.version & 0xFFFF) + " (only 1.1 is read)");
  }
  h.header_size = load_le32(p + 0x48);
  if (h.header_size < kMinHeaderSize || h.header_size > kHeaderBytes - 0x48) {
    return Status::Corruption("VDI header: header_size " + std::to_string(h.header_size) +
                              " is outside 384..440");
  }
  h.image_type = load_le32(p + 0x4C);
  h.image_flags = load_le32(p + 0x50);
  h.offset_bmap = load_le32(p + 0x154);
  h.offset_data = load_le32(p + 0x158);
  h.sector_size = load_le32(p + 0x168);
  h.disk_size = load_le64(p + 0x170);
  h.block_size = load_le32(p + 0x178);
  h.block_extra = load_le32(p + 0x17C);
  h.blocks_in_image = load_le32(p + 0x180);
  h.blocks_allocated = load_le32(p + 0x184);
  std::memcpy(h.uuid_image.data(), p + 0x188, 16);
  std::memcpy(h.uuid_link.data(), p + 0x1A8, 16);
  std::memcpy(h.uuid_parent.data(), p + 0x1B8, 16);

  if (h.image_type != 1 && h.image_type != 2) {
    return Status::NotSupported("VDI header: image_type " + std::to_string(h.image_type) +
                                " (only 1 dynamic and 2 static are read; 3 undo and 4 "
                                "differencing need their parent)");
  }
  if (!is_zero(h.uuid_link) || !is_zero(h.uuid_parent)) {
    return Status::NotSupported(
        "VDI header: the image links to a parent (uuid_link or "
        "uuid_parent is set)");
  }
  if (h.sector_size != kSectorBytes) {
    return Status::NotSupported("VDI header: sector_size " + std::to_string(h.sector_size));
  }
  if (h.block_size < kSectorBytes || h.block_size > kMaxBlockBytes ||
      (h.block_size & (h.block_size - 1)) != 0) {
    return Status::Corruption("VDI header: block_size " + std::to_string(h.block_size) +
                              " is not a power of two from 512 to 256 MiB");
  }
  // 'VBoxManage convertfromraw' can write a size that is not a whole sector; qemu rounds it up.
  if (h.disk_size % kSectorBytes != 0) {
    const std::optional<uint64_t> rounded =
        checked_add(h.disk_size / kSectorBytes * kSectorBytes, kSectorBytes);
    if (!rounded) return Status::Corruption("VDI header: disk_size overflows");
    h.disk_size = *rounded;
  }
  const uint64_t capacity = uint64_t{h.blocks_in_image} * h.block_size;  // < 2^61: no overflow
  if (h.disk_size > capacity) {
    return Status::Corruption("VDI header: disk_size " + std::to_string(h.disk_size) +
                              " exceeds blocks_in_image " + std::to_string(h.blocks_in_image) +
                              " x block_size " + std::to_string(h.block_size));
  }
  const uint64_t map_bytes = uint64_t{h.blocks_in_image} * 4;
  if (map_bytes > kMaxBlockMapBytes) {
    return Status::NotSupported("VDI header: a block map of " + std::to_string(h.blocks_in_image) +
                                " entries is larger than 64 MiB");
  }
  if (uint64_t{h.offset_bmap} + map_bytes > file_size) {
    return Status::Corruption("VDI header: block map at offset_bmap " +
                              std::to_string(h.offset_bmap) + " (" + std::to_string(map_bytes) +
                              " bytes) is past the end of the file (" + std::to_string(file_size) +
                              " bytes)");
  }
  return h;
}

Result<std::vector<uint32_t>> parse_vdi_block_map(std::span<const std::byte> bytes,
                                                  const VdiHeader& header, uint64_t file_size) {
  if (bytes.size() / 4 < header.blocks_in_image) {
    return Status::Corruption("VDI block map: " + std::to_string(bytes.size()) + " bytes for " +
                              std::to_string(header.blocks_in_image) + " entries");
  }
  const uint64_t stride = uint64_t{header.block_size} + header.block_extra;
  std::vector<uint32_t> map(header.blocks_in_image);
  std::vector<bool> used(header.blocks_in_image);
  for (uint64_t i = 0; i < header.blocks_in_image; ++i) {
    const uint32_t entry = load_le32(bytes.data() + 4 * i);
    map[i] = entry;
    if (!is_allocated(entry)) continue;
    if (entry >= header.blocks_in_image) {
      return Status::Corruption("VDI block map entry " + std::to_string(i) + ": block index " +
                                std::to_string(entry) + " is not below blocks_in_image " +
                                std::to_string(header.blocks_in_image));
    }
    if (used[entry]) {
      return Status::Corruption("VDI block map entry " + std::to_string(i) + ": block index " +
                                std::to_string(entry) + " is used by an earlier entry");
    }
    used[entry] = true;
    // Only data up to the end of the virtual disk must exist.
    const uint64_t block_start = i * header.block_size;  // < 2^61: no overflow
    const uint64_t reach =
        block_start >= header.disk_size
            ? 0
            : std::min<uint64_t>(header.block_size, header.disk_size - block_start);
    std::optional<uint64_t> end = checked_mul(entry, stride);
    if (end) end = checked_add(*end, header.offset_data);
    if (end) end = checked_add(*end, header.block_extra);
    if (end) end = checked_add(*end, reach);
    if (!end || *end > file_size) {
      return Status::Corruption(
          "VDI block map entry " + std::to_string(i) + ": block index " + std::to_string(entry) +
          " (data to byte " + (end ? std::to_string(*end) : std::string("overflow")) +
          ") is past the end of the file (" + std::to_string(file_size) + " bytes)");
    }
  }
  return map;
}

int probe_vdi(std::span<const std::byte> first_bytes) {
  if (first_bytes.size() < 0x44) return 0;
  return load_le32(first_bytes.data() + 0x40) == kVdiSignature ? 100 : 0;
}

Result<std::unique_ptr<BlockSource>> open_vdi(std::unique_ptr<BlockSource> lower,
                                              const VdiOptions& options) {
  if (!lower) return Status::InvalidArgument("open_vdi: no lower source");
  const std::string context = "vdi(" + lower->describe() + ")";
  const uint64_t file_size = lower->size();
  if (file_size < kHeaderBytes) {
    return Status::Corruption(context + ": file of " + std::to_string(file_size) +
                              " bytes is too small for a VDI header");
  }
  std::vector<std::byte> header_bytes(kHeaderBytes);
  if (Status s = lower->read_at(0, header_bytes); !s.ok()) return s.with_context(context);
  Result<VdiHeader> header = parse_vdi_header(header_bytes, file_size);
  if (!header.ok()) return header.status().with_context(context);
  std::vector<std::byte> map_bytes(uint64_t{header->blocks_in_image} * 4);
  if (Status s = lower->read_at(header->offset_bmap, map_bytes); !s.ok()) {
    return s.with_context(context + ": block map");
  }
  Result<std::vector<uint32_t>> map = parse_vdi_block_map(map_bytes, *header, file_size);
  if (!map.ok()) return map.status().with_context(context);
  return std::unique_ptr<BlockSource>(
      new VdiSource(std::move(lower), std::move(*header), std::move(*map)));
}

VdiSource::VdiSource(std::unique_ptr<BlockSource> lower, VdiHeader header,
                     std::vector<uint32_t> block_map)
    : lower_(std::move(lower)), header_(std::move(header)), block_map_(std::move(block_map)) {}

uint64_t VdiSource::data_offset(uint32_t entry) const {
  // Checked at open by parse_vdi_block_map.
  return header_.offset_data +
         uint64_t{entry} * (uint64_t{header_.block_size} + header_.block_extra) +
         header_.block_extra;
}

Status VdiSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  size_t done = 0;
  while (done < out.size()) {
    // One run: a span of zero blocks, or of allocated blocks that lie back to back in the file.
    uint64_t at = offset + done;
    uint64_t block = at / header_.block_size;
    const uint64_t within = at % header_.block_size;
    const uint32_t first = block_map_[block];
    const bool allocated = is_allocated(first);
    uint64_t run = std::min<uint64_t>(out.size() - done, header_.block_size - within);
    while (done + run < out.size()) {
      const uint32_t next = block_map_[block + 1];
      if (allocated
              ? !(is_allocated(next) && header_.block_extra == 0 && next == block_map_[block] + 1)
              : is_allocated(next)) {
        break;
      }
      ++block;
      run += std::min<uint64_t>(out.size() - done - run, header_.block_size);
    }
    std::span<std::byte> part = out.subspan(done, static_cast<size_t>(run));
    if (allocated) {
      Status s = lower_->read_at(data_offset(first) + within, part);
      if (!s.ok()) {
        return s.with_context(describe() + ": block " + std::to_string(at / header_.block_size));
      }
    } else {
      std::fill(part.begin(), part.end(), std::byte{0});
    }
    done += run;
  }
  return Status::OK();
}

Result<Extent> VdiSource::map(uint64_t offset) const {
  if (offset >= size()) {
    return Status::InvalidArgument(describe() + ": map at " + std::to_string(offset) +
                                   " is past size " + std::to_string(size()));
  }
  uint64_t block = offset / header_.block_size;
  const bool allocated = is_allocated(block_map_[block]);
  const uint64_t last_block = (size() - 1) / header_.block_size;
  while (block < last_block && is_allocated(block_map_[block + 1]) == allocated) ++block;
  const uint64_t end = std::min(size(), (block + 1) * header_.block_size);
  return Extent{allocated ? Extent::Kind::kData : Extent::Kind::kZero, end - offset};
}

}  // namespace imgfs::formats
