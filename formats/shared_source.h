// SharedSource: a source owned elsewhere through a shared_ptr, as a layer of its own, so two
// chains (or a chain and a helper thread) can use one source safely.
#pragma once

#include <memory>
#include <string>

#include "formats/block_source.h"

namespace imgfs {

class SharedSource final : public BlockSource {
 public:
  explicit SharedSource(std::shared_ptr<const BlockSource> source) : source_(std::move(source)) {}
  uint64_t size() const override { return source_->size(); }
  Status read_at(uint64_t offset, std::span<std::byte> out) const override {
    return source_->read_at(offset, out);
  }
  std::string describe() const override { return source_->describe(); }
  uint32_t block_size() const override { return source_->block_size(); }
  Result<Extent> map(uint64_t offset) const override { return source_->map(offset); }

 private:
  const std::shared_ptr<const BlockSource> source_;
};

}  // namespace imgfs
