// Overflow-checked arithmetic for anything computed from file bytes (nbdkit checked-overflow.h).
#pragma once

#include <cstdint>
#include <optional>

namespace imgfs {

// The sum, or nullopt when it overflows.
inline std::optional<uint64_t> checked_add(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// The product, or nullopt when it overflows.
inline std::optional<uint64_t> checked_mul(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

}  // namespace imgfs
