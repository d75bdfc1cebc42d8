// libFuzzer target for the qcow2 layer: the pure parsers (probe, header scan, L1 table, L2 entry
// decoding, cluster decompression), then open_qcow2 over a MemorySource of the input and bounded
// reads and maps of the result. A backing file the image names opens as the input again, so the
// backing-chain paths (depth limit, cycles, map delegation) are reached too. Must never crash.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "tests/fuzz/exercise_source.h"
#include "formats/byte_order.h"
#include "formats/memory_source.h"
#include "formats/qcow2_source.h"

namespace {

using imgfs::BlockSource;
using imgfs::MemorySource;
using imgfs::Result;
namespace formats = imgfs::formats;

void exercise_parsers(std::span<const std::byte> bytes) {
  (void)formats::probe_qcow2(bytes);
  Result<formats::Qcow2HeaderScan> scan = formats::scan_qcow2_header(bytes, bytes.size());
  if (!scan.ok() || !scan->complete) return;
  const formats::Qcow2Header& header = scan->header;
  (void)formats::check_qcow2_supported(header);
  const uint64_t l1_bytes = header.l1_entries_needed() * 8;
  if (l1_bytes > 0 && header.l1_table_offset + l1_bytes <= bytes.size()) {
    (void)formats::parse_qcow2_l1_table(bytes.subspan(header.l1_table_offset, l1_bytes), header,
                                        bytes.size());
  }
  // Decode the first few L2 entries of the input's second cluster, whatever it holds.
  const uint64_t cluster = header.cluster_bytes();
  for (uint64_t at = cluster; at + 16 <= std::min<uint64_t>(bytes.size(), cluster + 256);
       at += 16) {
    const uint64_t entry = imgfs::load_be64(bytes.data() + at);
    const uint64_t bitmap = imgfs::load_be64(bytes.data() + at + 8);
    for (uint32_t subcluster : {0u, 5u, 31u}) {
      if (subcluster >= header.subclusters()) break;
      Result<formats::Qcow2Mapping> mapping =
          formats::decode_qcow2_l2_entry(header, entry, bitmap, subcluster, bytes.size());
      if (mapping.ok() && mapping->kind == formats::Qcow2Mapping::Kind::kCompressed) {
        std::vector<std::byte> out(cluster);
        (void)formats::decompress_qcow2_cluster(
            header.compression_type, bytes.subspan(mapping->host_offset, mapping->compressed_bytes),
            out);
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  exercise_parsers(bytes);

  const std::vector<std::byte> copy(bytes.begin(), bytes.end());
  formats::Qcow2Options options;
  options.max_chain_depth = 3;
  options.l2_cache_bytes = 8 * 1024;
  options.cluster_cache_bytes = 256 * 1024;
  options.open_sibling = [&copy](std::string_view) -> Result<std::unique_ptr<BlockSource>> {
    return std::unique_ptr<BlockSource>(std::make_unique<MemorySource>(copy, "sibling"));
  };
  Result<std::unique_ptr<BlockSource>> opened =
      formats::open_qcow2(std::make_unique<MemorySource>(copy, "fuzz"), options);
  if (opened.ok()) imgfs::fuzzing::exercise_source(**opened);
  return 0;
}
