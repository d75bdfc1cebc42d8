// Test sources: pattern data, a counting decorator (proves laziness) and a faulty one
// (injects errors at chosen offsets), all over any BlockSource.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "formats/block_source.h"
#include "formats/memory_source.h"

namespace imgfs::testing {

// Deterministic bytes derived from each offset and a seed (nbdkit's `pattern` idea),
// so a misplaced copy shows up as a mismatch.
std::vector<std::byte> pattern_bytes(uint64_t length, uint32_t seed = 1);

std::unique_ptr<MemorySource> pattern_source(uint64_t length, uint32_t seed = 1);

// Counts the calls and bytes that pass through to `lower`.
class CountingSource final : public BlockSource {
 public:
  explicit CountingSource(std::unique_ptr<BlockSource> lower) : lower_(std::move(lower)) {}
  uint64_t size() const override { return lower_->size(); }
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;
  std::string describe() const override { return "counting(" + lower_->describe() + ")"; }
  uint32_t block_size() const override { return lower_->block_size(); }

  uint64_t reads() const { return reads_.load(); }
  uint64_t bytes_read() const { return bytes_.load(); }

 private:
  std::unique_ptr<BlockSource> lower_;
  mutable std::atomic<uint64_t> reads_{0};
  mutable std::atomic<uint64_t> bytes_{0};
};

// Fails every read that touches [fail_offset, fail_offset + fail_length) with `error`.
class FaultySource final : public BlockSource {
 public:
  FaultySource(std::unique_ptr<BlockSource> lower, uint64_t fail_offset, uint64_t fail_length,
               Status error = Status::IOError("injected fault"))
      : lower_(std::move(lower)),
        fail_offset_(fail_offset),
        fail_length_(fail_length),
        error_(std::move(error)) {}
  uint64_t size() const override { return lower_->size(); }
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;
  std::string describe() const override { return "faulty(" + lower_->describe() + ")"; }

 private:
  std::unique_ptr<BlockSource> lower_;
  const uint64_t fail_offset_;
  const uint64_t fail_length_;
  const Status error_;
};

// Reads [offset, offset + length) of `source` and expects it to equal the same range of
// `reference` (a gtest failure naming the range otherwise).
void expect_read(const BlockSource& source, const std::vector<std::byte>& reference,
                 uint64_t offset, uint64_t length);

// Reads all of `source` into memory (for comparisons against a reference).
std::vector<std::byte> read_all(const BlockSource& source);

}  // namespace imgfs::testing
