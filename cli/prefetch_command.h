// imgfs prefetch: makes images in a running mount ready before they are needed. For a bundle
// whose mount indexes in the background, it starts (or joins) that pass and waits for it,
// showing its progress; otherwise it reads the file once from start to end, which builds the
// gzip index and fills the block cache. Works only through the mount, so it needs no keys or
// store options of its own.
#pragma once

#include <string>
#include <vector>

namespace imgfs::cli {

// imgfs prefetch FILE... [--quiet]: FILE is an image inside an imgfs mount. Returns 0 when
// every file is ready, 1 when one failed (its error is printed), 2 on bad arguments.
int run_prefetch_command(const std::vector<std::string>& args);

}  // namespace imgfs::cli
