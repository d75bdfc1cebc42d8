#include "formats/inflater.h"

#include <zlib.h>

#ifdef IMGFS_HAVE_ISAL
#include <isa-l/crc.h>
#endif

#include <algorithm>
#include <climits>

#include "formats/isal_inflater.h"
#include "formats/zlib_inflater.h"

namespace imgfs::formats {

bool inflate_engine_available(InflateEngine engine) {
#ifdef IMGFS_HAVE_ISAL
  return engine == InflateEngine::kZlib || engine == InflateEngine::kIsal;
#else
  return engine == InflateEngine::kZlib;
#endif
}

InflateEngine fastest_inflate_engine() {
  return inflate_engine_available(InflateEngine::kIsal) ? InflateEngine::kIsal
                                                        : InflateEngine::kZlib;
}

Result<std::unique_ptr<Inflater>> make_inflater(InflateEngine engine) {
  switch (engine) {
    case InflateEngine::kZlib:
      return make_zlib_inflater();
    case InflateEngine::kIsal:
      return make_isal_inflater();
  }
  return Status::InvalidArgument("unknown inflate engine");
}

uint32_t crc32_update(uint32_t crc, std::span<const std::byte> bytes) {
#ifdef IMGFS_HAVE_ISAL
  return crc32_gzip_refl(crc, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
#else
  // zlib's crc32 takes a uInt length.
  while (!bytes.empty()) {
    const size_t n = std::min<size_t>(bytes.size(), UINT_MAX);
    crc = static_cast<uint32_t>(
        crc32(crc, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(n)));
    bytes = bytes.subspan(n);
  }
  return crc;
#endif
}

}  // namespace imgfs::formats
