// mount_command: `imgfs mount SOURCE MOUNTPOINT [options]`, the FUSE composition root. It builds
// the shared services (store, keys, caches, logger), the catalog, mounts, and serves until
// unmounted. Without --foreground it returns to the shell once the mount is ready.
#pragma once

#include <string>
#include <vector>

namespace imgfs::fusefs {

// Returns the process exit code: 0 after a clean unmount (or, in the launching process, once
// the mount is ready), 1 on a failure to set up, 2 on bad arguments.
int run_mount_command(const std::vector<std::string>& args);

}  // namespace imgfs::fusefs
