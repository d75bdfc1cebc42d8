// libFuzzer target for the VHDX layer: the pure parsers on the raw input, then open_vhdx and
// reads over a MemorySource. Must never crash, hang or read out of bounds.
//
// A real VHDX file is at least 1 MiB and its structures sit at fixed offsets far apart, so seeds
// (kept under 64 KiB) use a sparse encoding: an input that starts with "VXSP" is
//   "VXSP", u8 flags, u32 LE file size (clamped to 16 MiB), then records of
//   {u32 LE offset, u16 LE length, `length` bytes} written into a zero-filled file of that size
//   (records past the end are clipped).
// flags bit 0: recompute the CRC-32C of both headers and both region tables after placing the
// records, so mutations get past the checksums. Any other input is the file itself.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "formats/byte_order.h"
#include "formats/memory_source.h"
#include "formats/vhdx_source.h"

namespace {

using imgfs::formats::VhdxDiskParameters;
using imgfs::formats::VhdxGuid;
using imgfs::formats::VhdxMetadataTable;

constexpr uint64_t kMaxFileBytes = 16 << 20;
constexpr uint64_t kMaxReadBytes = 64 * 1024;

// The input padded with zeros to at least `length` bytes.
std::vector<std::byte> padded(std::span<const std::byte> input, size_t length) {
  std::vector<std::byte> bytes(input.begin(), input.end());
  if (bytes.size() < length) bytes.resize(length);
  return bytes;
}

void fix_checksum(std::vector<std::byte>& file, uint64_t offset, uint64_t length) {
  if (offset + length > file.size()) return;
  imgfs::store_le32(
      file.data() + offset + 4,
      imgfs::formats::vhdx_checksum(std::span<const std::byte>(file).subspan(offset, length)));
}

std::vector<std::byte> build_file(std::span<const std::byte> input) {
  if (input.size() < 9 || std::memcmp(input.data(), "VXSP", 4) != 0) {
    return std::vector<std::byte>(input.begin(), input.end());
  }
  const uint8_t flags = std::to_integer<uint8_t>(input[4]);
  const uint64_t size = std::min<uint64_t>(imgfs::load_le32(input.data() + 5), kMaxFileBytes);
  std::vector<std::byte> file(size);
  size_t at = 9;
  while (at + 6 <= input.size()) {
    const uint64_t offset = imgfs::load_le32(input.data() + at);
    const size_t length = imgfs::load_le16(input.data() + at + 4);
    at += 6;
    const size_t available = std::min(length, input.size() - at);
    if (offset < size) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(available, size - offset));
      std::memcpy(file.data() + offset, input.data() + at, n);
    }
    at += available;
  }
  if (flags & 1) {
    fix_checksum(file, imgfs::formats::kVhdxHeader1Offset, imgfs::formats::kVhdxHeaderBytes);
    fix_checksum(file, imgfs::formats::kVhdxHeader2Offset, imgfs::formats::kVhdxHeaderBytes);
    fix_checksum(file, imgfs::formats::kVhdxRegionTable1Offset,
                 imgfs::formats::kVhdxRegionTableBytes);
    fix_checksum(file, imgfs::formats::kVhdxRegionTable2Offset,
                 imgfs::formats::kVhdxRegionTableBytes);
  }
  return file;
}

void run_parsers(std::span<const std::byte> input) {
  namespace f = imgfs::formats;
  static_cast<void>(f::probe_vhdx(input));
  static_cast<void>(f::vhdx_checksum(input));
  const std::vector<std::byte> table = padded(input, f::kVhdxRegionTableBytes);
  const std::span<const std::byte> view(table);
  static_cast<void>(
      f::select_vhdx_header(view.first(f::kVhdxHeaderBytes), view.subspan(f::kVhdxHeaderBytes)));
  static_cast<void>(f::parse_vhdx_region_table(view));
  VhdxGuid guid{};
  std::memcpy(guid.data(), view.data(), guid.size());
  static_cast<void>(f::vhdx_log_needs_replay(input, guid));
  const uint64_t region_length = imgfs::load_le32(view.data() + 12);
  imgfs::Result<VhdxMetadataTable> metadata = f::parse_vhdx_metadata_table(view, region_length);
  if (!metadata.ok()) return;
  imgfs::Result<VhdxDiskParameters> params = f::parse_vhdx_disk_parameters(*metadata, input);
  if (!params.ok()) return;
  const f::VhdxReservedRange reserved[] = {{0, 1 << 20, "header section"}};
  static_cast<void>(f::parse_vhdx_bat(input, *params, input.size() * 4, reserved));
}

void read_through(const imgfs::BlockSource& source, std::span<const std::byte> input) {
  const uint64_t size = source.size();
  if (size == 0) return;
  std::vector<std::byte> out(kMaxReadBytes);
  uint64_t seed = 0x9E3779B97F4A7C15ull ^ input.size();
  for (std::byte b : input.first(std::min<size_t>(input.size(), 64))) {
    seed = (seed ^ std::to_integer<uint64_t>(b)) * 0x100000001B3ull;
  }
  const uint64_t offsets[] = {0, size / 2, size - std::min<uint64_t>(size, kMaxReadBytes),
                              seed % size, (seed >> 17) % size};
  for (uint64_t offset : offsets) {
    const uint64_t length = std::min<uint64_t>(kMaxReadBytes, size - offset);
    static_cast<void>(source.read_at(offset, std::span<std::byte>(out).first(length)));
  }
  uint64_t offset = 0;
  for (int i = 0; i < 64 && offset < size; ++i) {
    imgfs::Result<imgfs::Extent> extent = source.map(offset);
    if (!extent.ok() || extent->length == 0 || extent->length > size - offset) break;
    offset += extent->length;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> input(reinterpret_cast<const std::byte*>(data), size);
  run_parsers(input);
  std::vector<std::byte> file = build_file(input);
  imgfs::Result<std::unique_ptr<imgfs::BlockSource>> source =
      imgfs::formats::open_vhdx(std::make_unique<imgfs::MemorySource>(std::move(file), "fuzz"), {});
  if (source.ok()) read_through(**source, input);
  return 0;
}
