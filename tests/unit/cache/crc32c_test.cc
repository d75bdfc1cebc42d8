#include "cache/crc32c.h"

#include <gtest/gtest.h>

#include <string_view>
#include <vector>

#include "tests/support/test_sources.h"

namespace imgfs::cache {
namespace {

std::span<const std::byte> bytes_of(std::string_view text) {
  return std::as_bytes(std::span<const char>(text.data(), text.size()));
}

// Bit-at-a-time reference, to check the sliced tables at every length and alignment.
uint32_t reference_crc32c(std::span<const std::byte> data) {
  uint32_t crc = ~0u;
  for (std::byte b : data) {
    crc ^= std::to_integer<uint32_t>(b);
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1) ? 0x82F63B78u : 0);
  }
  return ~crc;
}

TEST(Crc32cTest, KnownVectors) {
  EXPECT_EQ(crc32c(bytes_of("123456789")), 0xE3069283u);
  EXPECT_EQ(crc32c(bytes_of("")), 0u);
  // RFC 3720 B.4: 32 bytes of zeros, and of 0xff.
  std::vector<std::byte> zeros(32, std::byte{0});
  EXPECT_EQ(crc32c(zeros), 0x8A9136AAu);
  std::vector<std::byte> ones(32, std::byte{0xff});
  EXPECT_EQ(crc32c(ones), 0x62A8AB43u);
}

TEST(Crc32cTest, MatchesBitwiseReferenceAtEveryLengthAndOffset) {
  const std::vector<std::byte> data = imgfs::testing::pattern_bytes(300, 5);
  for (size_t start = 0; start < 9; ++start) {
    for (size_t length = 0; start + length <= data.size(); length += 7) {
      std::span<const std::byte> part(data.data() + start, length);
      ASSERT_EQ(crc32c(part), reference_crc32c(part)) << start << "+" << length;
    }
  }
}

TEST(Crc32cTest, Continues) {
  const std::vector<std::byte> data = imgfs::testing::pattern_bytes(1000, 6);
  const std::span<const std::byte> all(data);
  for (size_t split : {0, 1, 7, 8, 500, 999, 1000}) {
    EXPECT_EQ(crc32c(all.subspan(split), crc32c(all.first(split))), crc32c(all)) << split;
  }
}

}  // namespace
}  // namespace imgfs::cache
