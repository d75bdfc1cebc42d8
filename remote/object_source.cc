#include "remote/object_source.h"

namespace imgfs::remote {

Status ObjectSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  if (out.empty()) return Status::OK();
  if (counters_ != nullptr) counters_->add(IoCounters::kRequests, 1);
  Status s = store_.read_range(object_, offset, out);
  if (!s.ok()) return s.with_context(object_.key);
  if (counters_ != nullptr) counters_->add(IoCounters::kBytesFetched, out.size());
  return Status::OK();
}

std::string ObjectSource::describe() const { return "object(" + object_.key + ")"; }

}  // namespace imgfs::remote
