// libFuzzer target for partition images: classify_disk_layout and detect_disk_layout over the
// input, then a synthesized MBR and GPT disk around it (the table builders and the region
// arithmetic), read and mapped in bounded places. Must never crash.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "formats/disk_layout.h"
#include "formats/memory_source.h"
#include "formats/partitioned_disk_source.h"
#include "tests/fuzz/exercise_source.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace formats = imgfs::formats;
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  (void)formats::classify_disk_layout(bytes);
  const std::vector<std::byte> copy(bytes.begin(), bytes.end());
  (void)formats::detect_disk_layout(imgfs::MemorySource(copy, "input"));
  for (formats::PartitionTable table :
       {formats::PartitionTable::kAuto, formats::PartitionTable::kGpt}) {
    imgfs::Result<std::unique_ptr<imgfs::BlockSource>> disk = formats::open_partitioned_disk(
        std::make_unique<imgfs::MemorySource>(copy, "input"), {.name = "fuzz", .table = table});
    if (disk.ok()) imgfs::fuzzing::exercise_source(**disk);
  }
  return 0;
}
