// libFuzzer target for the VHD layer: the pure parsers (probe, footer at both ends, dynamic
// header, BAT, parent-name decoding), then open_vhd over a MemorySource of the input and bounded
// reads and maps of the result. A parent the image names opens as the input again, so the
// differencing paths (unique-id check, cycles, depth limit) are reached too. Must never crash.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "tests/fuzz/exercise_source.h"
#include "formats/memory_source.h"
#include "formats/vhd_source.h"

namespace {

using imgfs::BlockSource;
using imgfs::MemorySource;
using imgfs::Result;
namespace formats = imgfs::formats;

void exercise_parsers(std::span<const std::byte> bytes) {
  const std::span<const std::byte> tail = bytes.last(std::min<size_t>(bytes.size(), 512));
  (void)formats::probe_vhd(bytes.first(std::min<size_t>(bytes.size(), 4096)), tail);
  (void)formats::parse_vhd_footer(tail);
  Result<formats::VhdFooter> footer = formats::parse_vhd_footer(bytes);
  if (!footer.ok() || footer->data_offset >= bytes.size()) return;
  Result<formats::VhdDynamicHeader> header =
      formats::parse_vhd_dynamic_header(bytes.subspan(footer->data_offset), bytes.size());
  if (!header.ok()) return;
  (void)formats::vhd_relative_parent_name(header->parent_unicode_name);
  for (const formats::VhdParentLocator& loc : header->parent_locators) {
    if (loc.data_offset < bytes.size() && loc.data_length <= bytes.size() - loc.data_offset) {
      Result<std::string> name = formats::vhd_utf16_to_utf8(
          bytes.subspan(loc.data_offset, loc.data_length), /*big_endian=*/false);
      if (name.ok()) (void)formats::vhd_relative_parent_name(*name);
    }
  }
  const uint64_t virtual_size = footer->current_size / 512 * 512;
  Result<uint64_t> entries = formats::vhd_bat_entries_needed(*header, virtual_size);
  if (entries.ok() && header->table_offset <= bytes.size() &&
      *entries <= (bytes.size() - header->table_offset) / 4) {
    (void)formats::parse_vhd_bat(bytes.subspan(header->table_offset), *header, virtual_size,
                                 bytes.size());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  exercise_parsers(bytes);

  const std::vector<std::byte> copy(bytes.begin(), bytes.end());
  formats::VhdOptions options;
  options.max_chain_depth = 3;
  options.bitmap_cache_bytes = 1024;
  options.open_sibling = [&copy](std::string_view) -> Result<std::unique_ptr<BlockSource>> {
    return std::unique_ptr<BlockSource>(std::make_unique<MemorySource>(copy, "parent"));
  };
  Result<std::unique_ptr<BlockSource>> source =
      formats::open_vhd(std::make_unique<MemorySource>(copy, "input"), options);
  if (source.ok()) imgfs::fuzzing::exercise_source(**source);
  return 0;
}
