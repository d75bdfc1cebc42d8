// Explicit little- and big-endian loads and stores for on-disk fields (never cast structs).
#pragma once

#include <cstddef>
#include <cstdint>

namespace imgfs {

inline uint16_t load_le16(const std::byte* p) {
  return static_cast<uint16_t>(std::to_integer<uint16_t>(p[0]) |
                               (std::to_integer<uint16_t>(p[1]) << 8));
}
inline uint32_t load_le32(const std::byte* p) {
  return static_cast<uint32_t>(load_le16(p)) | (static_cast<uint32_t>(load_le16(p + 2)) << 16);
}
inline uint64_t load_le64(const std::byte* p) {
  return static_cast<uint64_t>(load_le32(p)) | (static_cast<uint64_t>(load_le32(p + 4)) << 32);
}
inline uint16_t load_be16(const std::byte* p) {
  return static_cast<uint16_t>((std::to_integer<uint16_t>(p[0]) << 8) |
                               std::to_integer<uint16_t>(p[1]));
}
inline uint32_t load_be32(const std::byte* p) {
  return (static_cast<uint32_t>(load_be16(p)) << 16) | static_cast<uint32_t>(load_be16(p + 2));
}
inline uint64_t load_be64(const std::byte* p) {
  return (static_cast<uint64_t>(load_be32(p)) << 32) | static_cast<uint64_t>(load_be32(p + 4));
}

inline void store_le32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline void store_le64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline void store_be32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * (3 - i)));
}
inline void store_be64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * (7 - i)));
}

}  // namespace imgfs
