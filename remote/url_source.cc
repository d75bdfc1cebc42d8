#include "remote/url_source.h"

namespace imgfs::remote {

Result<std::unique_ptr<BlockSource>> open_url_source(const ObjectStore& store, std::string url,
                                                     std::string name, IoCounters* counters) {
  auto size = store.head_url_size(url);
  if (!size.ok()) return size.status().with_context(name + " (get-url)");
  return std::unique_ptr<BlockSource>(
      std::make_unique<UrlSource>(store, std::move(url), std::move(name), *size, counters));
}

Status UrlSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  if (out.empty()) return Status::OK();
  if (counters_ != nullptr) counters_->add(IoCounters::kRequests, 1);
  Status s = store_.read_url_range(url_, offset, out);
  if (!s.ok()) return s.with_context(name_ + " (get-url)");
  if (counters_ != nullptr) counters_->add(IoCounters::kBytesFetched, out.size());
  return Status::OK();
}

}  // namespace imgfs::remote
