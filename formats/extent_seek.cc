#include "formats/extent_seek.h"

#include <string>

namespace imgfs::formats {

Result<uint64_t> seek_extent(const BlockSource& source, uint64_t offset, SeekTarget target) {
  const uint64_t size = source.size();
  if (offset >= size) {
    return Status::NotFound(source.describe() + ": seek to " + std::to_string(offset) +
                            " is at or past the end");
  }
  const Extent::Kind wanted = target == SeekTarget::kData ? Extent::Kind::kData
                                                          : Extent::Kind::kZero;
  uint64_t position = offset;
  while (position < size) {
    auto extent = source.map(position);
    if (!extent.ok()) return extent.status();
    if (extent->length == 0 || extent->length > size - position) {
      return Status::Corruption(source.describe() + ": allocation map gives a run of " +
                                std::to_string(extent->length) + " bytes at " +
                                std::to_string(position));
    }
    if (extent->kind == wanted) return position;
    position += extent->length;
  }
  if (target == SeekTarget::kHole) return size;
  return Status::NotFound(source.describe() + ": no data after " + std::to_string(offset));
}

}  // namespace imgfs::formats
