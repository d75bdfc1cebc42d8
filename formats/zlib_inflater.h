// zlib engine of the Inflater interface (formats/inflater.h): raw deflate through zlib's
// inflate, with inflateSetDictionary for the window and inflatePrime for the leading bits.
#pragma once

#include <memory>

#include "formats/inflater.h"
#include "formats/status.h"

namespace imgfs::formats {

// A zlib raw-deflate inflater. Errors: Corruption when inflateInit2 fails (out of memory).
Result<std::unique_ptr<Inflater>> make_zlib_inflater();

}  // namespace imgfs::formats
