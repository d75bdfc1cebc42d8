#include "formats/concat_source.h"

#include <algorithm>
#include <utility>

#include "formats/checked_math.h"

namespace imgfs::formats {

Result<std::unique_ptr<BlockSource>> open_concat(std::vector<std::unique_ptr<BlockSource>> parts) {
  if (parts.empty()) return Status::InvalidArgument("concat: no parts");
  std::vector<uint64_t> starts;
  starts.reserve(parts.size() + 1);
  uint64_t total = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i] == nullptr) {
      return Status::InvalidArgument("concat: part " + std::to_string(i) + " is null");
    }
    starts.push_back(total);
    std::optional<uint64_t> next = checked_add(total, parts[i]->size());
    if (!next) return Status::InvalidArgument("concat: total size of the parts overflows");
    total = *next;
  }
  starts.push_back(total);
  return std::unique_ptr<BlockSource>(
      std::make_unique<ConcatSource>(std::move(parts), std::move(starts)));
}

ConcatSource::ConcatSource(std::vector<std::unique_ptr<BlockSource>> parts,
                           std::vector<uint64_t> starts)
    : parts_(std::move(parts)), starts_(std::move(starts)) {}

Status ConcatSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  if (out.empty()) return Status::OK();
  // The part holding `offset` is the last one starting at or before it; upper_bound skips
  // zero-length parts, whose start equals the next part's start.
  const auto after = std::upper_bound(starts_.begin(), starts_.end() - 1, offset);
  size_t index = static_cast<size_t>(after - starts_.begin()) - 1;
  uint64_t done = 0;
  while (done < out.size()) {
    const uint64_t position = offset + done;
    const uint64_t in_part = position - starts_[index];
    const uint64_t available = parts_[index]->size() - in_part;
    const uint64_t length = std::min<uint64_t>(available, out.size() - done);
    if (length > 0) {
      Status s = parts_[index]->read_at(in_part, out.subspan(done, length));
      if (!s.ok()) {
        return s.with_context("part " + std::to_string(index) + "/" +
                              std::to_string(parts_.size()));
      }
      done += length;
    }
    ++index;
  }
  return Status::OK();
}

std::string ConcatSource::describe() const {
  return "concat(" + std::to_string(parts_.size()) + " parts)";
}

}  // namespace imgfs::formats
