// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): turns bytes into the checksum stored in
// each cached block's header (RFC 3720 B.4), so a flipped bit on disk reads as a miss.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace imgfs::cache {

// The CRC-32C of `data` continued from `crc` (the result of an earlier call, or 0 to start),
// so crc32c(b, crc32c(a)) == crc32c(a + b). Pure and thread-safe.
uint32_t crc32c(std::span<const std::byte> data, uint32_t crc = 0);

}  // namespace imgfs::cache
