#include "cache/crc32c.h"

#include <array>
#include <cstring>

#include "formats/byte_order.h"

namespace imgfs::cache {

namespace {

constexpr uint32_t kPolynomial = 0x82F63B78;  // Castagnoli, bit-reflected.

using Tables = std::array<std::array<uint32_t, 256>, 8>;

// Slicing-by-8: tables[k][b] is the CRC of byte b followed by k zero bytes, so eight input
// bytes fold in with eight lookups and no per-bit loop.
constexpr Tables make_tables() {
  Tables tables{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t crc = b;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1) ? kPolynomial : 0);
    tables[0][b] = crc;
  }
  for (size_t k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) {
      tables[k][b] = (tables[k - 1][b] >> 8) ^ tables[0][tables[k - 1][b] & 0xff];
    }
  }
  return tables;
}

constexpr Tables kTables = make_tables();

uint32_t crc32c_tables(std::span<const std::byte> data, uint32_t crc) {
  uint32_t state = ~crc;
  const std::byte* p = data.data();
  size_t left = data.size();
  while (left >= 8) {
    const uint32_t low = load_le32(p) ^ state;
    const uint32_t high = load_le32(p + 4);
    state = kTables[7][low & 0xff] ^ kTables[6][(low >> 8) & 0xff] ^
            kTables[5][(low >> 16) & 0xff] ^ kTables[4][low >> 24] ^ kTables[3][high & 0xff] ^
            kTables[2][(high >> 8) & 0xff] ^ kTables[1][(high >> 16) & 0xff] ^
            kTables[0][high >> 24];
    p += 8;
    left -= 8;
  }
  while (left > 0) {
    state = (state >> 8) ^ kTables[0][(state ^ std::to_integer<uint32_t>(*p)) & 0xff];
    ++p;
    --left;
  }
  return ~state;
}

#if defined(__x86_64__)
// SSE4.2's crc32 instruction computes CRC-32C itself, several times faster than the tables;
// every cache hit checks a whole block with it.
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(std::span<const std::byte> data,
                                                         uint32_t crc) {
  uint64_t state = ~crc;
  const std::byte* p = data.data();
  size_t left = data.size();
  while (left >= 8) {
    uint64_t word;
    std::memcpy(&word, p, sizeof word);
    state = __builtin_ia32_crc32di(state, word);
    p += 8;
    left -= 8;
  }
  auto narrow = static_cast<uint32_t>(state);
  while (left > 0) {
    narrow = __builtin_ia32_crc32qi(narrow, std::to_integer<uint8_t>(*p));
    ++p;
    --left;
  }
  return ~narrow;
}
#endif

}  // namespace

uint32_t crc32c(std::span<const std::byte> data, uint32_t crc) {
#if defined(__x86_64__)
  static const bool has_sse42 = __builtin_cpu_supports("sse4.2");
  if (has_sse42) return crc32c_sse42(data, crc);
#endif
  return crc32c_tables(data, crc);
}

}  // namespace imgfs::cache
