// disk_format: recognises a disk image format from its bytes (probe scores, as qemu's
// .bdrv_probe) and stacks the matching layer, so any image reads as a raw disk.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "formats/block_source.h"

namespace imgfs::formats {

enum class DiskFormat { kRaw, kQcow2, kVmdk, kVhd, kVhdx, kVdi };

std::string_view disk_format_name(DiskFormat format);

// Opens a file next to the image by the relative name the image stores (backing files,
// parents, extents); may be empty when the image has no siblings to offer.
using SiblingOpener =
    std::function<Result<std::unique_ptr<BlockSource>>(std::string_view name)>;

// The format whose probe scores highest on the first 4 KiB and the last 512 bytes of `source`
// (a fixed VHD keeps its only footer at the end); kRaw when none claims it. Thread-safe.
// Errors: IOError from `source`.
Result<DiskFormat> detect_disk_format(const BlockSource& source);

// The same from the first 4 KiB only, for sources whose end is costly to reach (a tar member
// in a gzip stream): a fixed VHD, known only by its footer at the end, stays raw. Thread-safe.
// Errors: IOError from `source`.
Result<DiskFormat> detect_disk_format_by_head(const BlockSource& source);

// Stacks the layer for `format` over `image` (kRaw returns `image` itself).
// Errors: those of the format's open_xxx.
Result<std::unique_ptr<BlockSource>> open_disk_format(DiskFormat format,
                                                      std::unique_ptr<BlockSource> image,
                                                      const SiblingOpener& open_sibling);

}  // namespace imgfs::formats
