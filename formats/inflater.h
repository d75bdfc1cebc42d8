// Inflater: turns raw deflate data into bytes, from the start of a deflate stream or from a
// checkpoint inside one (a bit position plus the 32 KiB of output before it, FORMATS.md (c)).
// One interface over interchangeable engines, so gzip_source re-inflates spans with the fastest
// engine built in and tests can check the engines against each other on the same bytes:
// zlib (always built in, formats/zlib_inflater.h) and ISA-L (optional, several times faster,
// formats/isal_inflater.h). Engines hold no globals; one Inflater is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "formats/status.h"

namespace imgfs::formats {

enum class InflateEngine { kZlib, kIsal };

// What one Inflater::inflate call did.
struct InflateProgress {
  size_t consumed = 0;  // bytes taken from `in` (an engine may hold a few of them undecoded)
  size_t produced = 0;  // bytes written to the front of `out`
  // The final deflate block ended and all of its output has been delivered.
  bool stream_end = false;
};

class Inflater {
 public:
  virtual ~Inflater() = default;

  // Starts a raw deflate stream at a point. `window` is the output just before the point (at
  // most 32 KiB; empty at the start of a stream). The first `bit_count` (0..7) input bits are
  // the low bits of `bit_value`; the first byte passed to inflate() follows them.
  // Errors: InvalidArgument (window over 32 KiB, bit_count over 7), Corruption (engine refused).
  virtual Status reset(std::span<const std::byte> window, int bit_count, uint8_t bit_value) = 0;

  // Inflates from `in` into `out` until one of them is used up or the stream ends. Call again
  // with the input it did not consume. Returns no progress only when it needs more input, more
  // room, or the stream has ended.
  // Errors: Corruption (invalid deflate data, a distance before the window).
  virtual Result<InflateProgress> inflate(std::span<const std::byte> in,
                                          std::span<std::byte> out) = 0;

  // After an inflate() call: when the stream stands at a deflate block boundary that is not the
  // stream's end, with every output byte before it delivered, how many of the input bits taken
  // so far lie after the boundary (they start the next block). Otherwise nullopt.
  virtual std::optional<uint32_t> block_boundary() const = 0;

  // True when inflate() returns at every block end, so block_boundary() sees each one (zlib).
  // ISA-L cannot stop there: it reports a boundary only when a call's input ran out at one, which
  // a caller makes likely by passing small input steps while it looks for one.
  virtual bool stops_at_block_ends() const = 0;

  // While a stored block is being copied by an engine that does not stop at block ends, the
  // input bytes left in it, so that a caller looking for a boundary can pass exactly that many;
  // 0 otherwise.
  virtual size_t stored_block_input_left() const = 0;

  // After stream_end: how many input bytes taken (by this call or earlier ones) lie past the end
  // of the deflate stream, where a gzip trailer starts.
  virtual size_t overread_bytes() const = 0;

  // "zlib" or "isal", for messages and benchmarks.
  virtual const char* name() const = 0;
};

// True when `engine` is built into this binary (zlib always is).
bool inflate_engine_available(InflateEngine engine);

// The fastest engine built in: ISA-L when present, else zlib.
InflateEngine fastest_inflate_engine();

// A new inflater of `engine`, ready for reset().
// Errors: NotSupported (engine not built in), Corruption (engine initialisation failed).
Result<std::unique_ptr<Inflater>> make_inflater(InflateEngine engine);

// Updates a gzip CRC32 (the same value as zlib's crc32()) with `bytes`, using ISA-L's faster
// CRC when it is built in. Thread-safe.
uint32_t crc32_update(uint32_t crc, std::span<const std::byte> bytes);

}  // namespace imgfs::formats
