// libFuzzer target for the VMDK layer: the pure parsers (sparse header, footer, descriptor,
// grain directory, file names, probe), then open_vmdk over a MemorySource of the input and
// bounded reads and maps of the result. Any sibling file the image names opens as the input
// again, so descriptor -> sparse extent and delta-link paths are reached too. Must never crash.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tests/fuzz/exercise_source.h"
#include "formats/memory_source.h"
#include "formats/vmdk_source.h"

namespace {

using imgfs::BlockSource;
using imgfs::MemorySource;
using imgfs::Result;

void exercise_parsers(std::span<const std::byte> bytes) {
  (void)imgfs::formats::probe_vmdk(bytes);
  Result<imgfs::formats::VmdkSparseHeader> header = imgfs::formats::parse_vmdk_sparse_header(bytes);
  if (header.ok() && bytes.size() > 512) {
    (void)imgfs::formats::parse_vmdk_grain_directory(bytes.subspan(512), header->gd_entries(),
                                                     header->gtes_per_gt, bytes.size());
  }
  (void)imgfs::formats::parse_vmdk_footer(bytes);
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  Result<imgfs::formats::VmdkDescriptor> descriptor = imgfs::formats::parse_vmdk_descriptor(text);
  if (descriptor.ok()) {
    for (const imgfs::formats::VmdkExtentLine& extent : descriptor->extents) {
      (void)imgfs::formats::check_vmdk_file_name(extent.file_name);
    }
    (void)imgfs::formats::check_vmdk_file_name(descriptor->parent_file_name);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  exercise_parsers(bytes);

  const std::vector<std::byte> copy(bytes.begin(), bytes.end());
  imgfs::formats::VmdkOptions options;
  options.max_chain_depth = 3;
  options.table_cache_bytes = 8 * 1024;
  options.grain_cache_bytes = 256 * 1024;
  options.open_sibling = [&copy](std::string_view) -> Result<std::unique_ptr<BlockSource>> {
    return std::unique_ptr<BlockSource>(std::make_unique<MemorySource>(copy, "sibling"));
  };
  Result<std::unique_ptr<BlockSource>> opened =
      imgfs::formats::open_vmdk(std::make_unique<MemorySource>(copy, "fuzz"), options);
  if (opened.ok()) imgfs::fuzzing::exercise_source(**opened);
  return 0;
}
