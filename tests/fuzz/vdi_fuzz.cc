// libFuzzer target for the VDI layer: the pure parsers (probe, header, block map), then open_vdi
// over a MemorySource of the input and bounded reads and maps of the result. Must never crash.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "tests/fuzz/exercise_source.h"
#include "formats/memory_source.h"
#include "formats/vdi_source.h"

namespace {

using imgfs::BlockSource;
using imgfs::MemorySource;
using imgfs::Result;
namespace formats = imgfs::formats;

void exercise_parsers(std::span<const std::byte> bytes) {
  (void)formats::probe_vdi(bytes);
  Result<formats::VdiHeader> header = formats::parse_vdi_header(bytes, bytes.size());
  if (!header.ok()) return;
  // parse_vdi_header checked that the block map lies inside the input.
  (void)formats::parse_vdi_block_map(
      bytes.subspan(header->offset_bmap, uint64_t{header->blocks_in_image} * 4), *header,
      bytes.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  exercise_parsers(bytes);
  const std::vector<std::byte> copy(bytes.begin(), bytes.end());
  Result<std::unique_ptr<BlockSource>> source =
      formats::open_vdi(std::make_unique<MemorySource>(copy, "input"), {});
  if (source.ok()) imgfs::fuzzing::exercise_source(**source);
  return 0;
}
