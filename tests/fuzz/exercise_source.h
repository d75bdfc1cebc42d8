// What every fuzz target does with a chain it managed to open: read at the start, the middle
// and the end, and walk the allocation map a little way as SEEK_DATA/SEEK_HOLE would. Errors
// are expected on fuzzed input; a crash or a sanitizer report is the finding.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "formats/block_source.h"

namespace imgfs::fuzzing {

inline void exercise_source(const BlockSource& source) {
  const uint64_t size = source.size();
  if (size == 0) return;
  std::vector<std::byte> buffer(64 * 1024);
  const uint64_t offsets[] = {0, size / 3, size / 2, size - 1, size > 70000 ? size - 70000 : 0};
  for (uint64_t offset : offsets) {
    const uint64_t length = std::min<uint64_t>(buffer.size(), size - offset);
    (void)source.read_at(offset, std::span(buffer).first(length));
    (void)source.map(offset);
  }
  uint64_t pos = 0;
  for (int i = 0; i < 16 && pos < size; ++i) {
    Result<Extent> run = source.map(pos);
    if (!run.ok() || run->length == 0) break;
    pos += run->length;
  }
}

}  // namespace imgfs::fuzzing
