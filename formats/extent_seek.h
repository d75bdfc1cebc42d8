// Extent seeking: turns a source's allocation map (BlockSource::map) into the answers of
// lseek(SEEK_DATA) and lseek(SEEK_HOLE), so sparse-aware copiers skip holes without reading them.
#pragma once

#include <cstdint>

#include "formats/block_source.h"

namespace imgfs::formats {

enum class SeekTarget { kData, kHole };

// The first offset >= `offset` that starts data (kData) or lies in a hole (kHole). The end of
// the source counts as a hole, so kHole always finds one when offset < size().
// Errors: NotFound when offset >= size(), or when kData finds no data after offset (lseek's
// ENXIO); whatever source.map() returns; Corruption when map() reports an empty run or one
// past the end.
Result<uint64_t> seek_extent(const BlockSource& source, uint64_t offset, SeekTarget target);

}  // namespace imgfs::formats
