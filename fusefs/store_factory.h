// store_factory: turns a mount SOURCE (a folder, file:///path or s3://BUCKET[/PREFIX]) and the
// S3 options into the ObjectStore the engine reads, and the key prefix the mount shows.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "fusefs/mount_options.h"
#include "remote/object_store.h"

namespace imgfs::fusefs {

struct OpenedStore {
  std::unique_ptr<remote::ObjectStore> store;
  std::string prefix;  // "" or a folder prefix ending in '/'
  // Extra top-level stats.json fields of the store (endpoint in use, failovers); may be empty.
  std::function<std::string()> stats;
  std::string credential_source;  // where the S3 keys came from, for the log; never a secret
};

// Errors: InvalidArgument (bad options, credentials file with loose mode), NotFound (no
// credentials for a signed S3 mount), IOError.
Result<OpenedStore> open_store(const MountOptions& options);

}  // namespace imgfs::fusefs
