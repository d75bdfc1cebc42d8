// MemorySource: a leaf BlockSource over bytes held in memory (tests, small metadata).
#pragma once

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "formats/block_source.h"

namespace imgfs {

class MemorySource final : public BlockSource {
 public:
  explicit MemorySource(std::vector<std::byte> bytes, std::string name = "memory")
      : bytes_(std::move(bytes)), name_(std::move(name)) {}

  uint64_t size() const override { return bytes_.size(); }
  Status read_at(uint64_t offset, std::span<std::byte> out) const override {
    if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
    if (!out.empty()) std::memcpy(out.data(), bytes_.data() + offset, out.size());
    return Status::OK();
  }
  std::string describe() const override {
    return name_ + "(" + std::to_string(bytes_.size()) + " bytes)";
  }

 private:
  const std::vector<std::byte> bytes_;
  const std::string name_;
};

}  // namespace imgfs
