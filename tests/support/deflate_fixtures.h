// Deflate fixtures: compressed test streams made with zlib, in the shapes the inflate tests
// need (raw deflate or gzip, any level, memory level and strategy, and blocks ended by pigz-like
// flushes).
#pragma once

#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace imgfs::testing {

// `data` compressed by zlib with `window_bits` (-15: raw deflate, 31: one gzip member). With
// flush_every > 0, a block ends every flush_every input bytes, alternating Z_SYNC_FLUSH and
// Z_FULL_FLUSH as pigz does. Records a gtest failure if zlib refuses.
std::vector<std::byte> zlib_compress(std::span<const std::byte> data, int window_bits, int level,
                                     uint64_t flush_every = 0, int mem_level = 8,
                                     int strategy = Z_DEFAULT_STRATEGY);

}  // namespace imgfs::testing
