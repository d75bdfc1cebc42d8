// ISA-L engine of the Inflater interface (formats/inflater.h): raw deflate through
// isal_inflate (crc_flag ISAL_DEFLATE), with isal_inflate_set_dict for the window and the
// public read_in / read_in_length fields for the leading bits. Built only with libisal
// (IMGFS_HAVE_ISAL); without it the factory says NotSupported.
#pragma once

#include <memory>

#include "formats/inflater.h"
#include "formats/status.h"

namespace imgfs::formats {

// An ISA-L raw-deflate inflater.
// Errors: NotSupported when this binary was built without ISA-L.
Result<std::unique_ptr<Inflater>> make_isal_inflater();

}  // namespace imgfs::formats
