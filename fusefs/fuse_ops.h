// fuse_ops: the libfuse low-level operations table over a Catalog. Read-only: every operation
// that would change the tree or a file answers EROFS. Every callback catches everything, so an
// exception never unwinds into libfuse (it becomes EIO and a log line).
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <functional>
#include <string>

#include "fusefs/catalog.h"
#include "fusefs/logger.h"

namespace imgfs::fusefs {

// The session's user data: everything here outlives the session.
struct FuseContext {
  Catalog& catalog;
  Logger& log;
  // More top-level stats.json fields (e.g. the S3 endpoint in use); may be empty.
  std::function<std::string()> stats_extra;
};

// The operations; pass a FuseContext* as the session's userdata.
const fuse_lowlevel_ops& imgfs_fuse_operations();

}  // namespace imgfs::fusefs
