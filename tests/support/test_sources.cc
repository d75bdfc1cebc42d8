#include "tests/support/test_sources.h"

#include <gtest/gtest.h>

#include <cstring>

namespace imgfs::testing {

std::vector<std::byte> pattern_bytes(uint64_t length, uint32_t seed) {
  std::vector<std::byte> bytes(length);
  for (uint64_t i = 0; i < length; ++i) {
    uint64_t x = (i / 8) * 0x9E3779B97F4A7C15ull + seed;
    x ^= x >> 29;
    bytes[i] = static_cast<std::byte>(x >> (8 * (i % 8)));
  }
  return bytes;
}

std::unique_ptr<MemorySource> pattern_source(uint64_t length, uint32_t seed) {
  return std::make_unique<MemorySource>(pattern_bytes(length, seed), "pattern");
}

Status CountingSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  reads_.fetch_add(1);
  bytes_.fetch_add(out.size());
  return lower_->read_at(offset, out);
}

Status FaultySource::read_at(uint64_t offset, std::span<std::byte> out) const {
  const uint64_t end = offset + out.size();
  if (offset < fail_offset_ + fail_length_ && fail_offset_ < end) return error_;
  return lower_->read_at(offset, out);
}

void expect_read(const BlockSource& source, const std::vector<std::byte>& reference,
                 uint64_t offset, uint64_t length) {
  std::vector<std::byte> out(length);
  Status s = source.read_at(offset, out);
  ASSERT_TRUE(s.ok()) << s.to_string() << " at " << offset << "+" << length;
  ASSERT_TRUE(length == 0 || std::memcmp(out.data(), reference.data() + offset, length) == 0)
      << "at " << offset << "+" << length;
}

std::vector<std::byte> read_all(const BlockSource& source) {
  std::vector<std::byte> bytes(source.size());
  Status s = source.read_at(0, bytes);
  EXPECT_TRUE(s.ok()) << s.to_string();
  return bytes;
}

}  // namespace imgfs::testing
