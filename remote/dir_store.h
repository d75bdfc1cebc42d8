// DirStore: a local directory used as the bucket. It turns the regular files under `root`
// into objects whose keys are their '/'-separated paths relative to root, for tests and for
// images kept on local disk.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "remote/object_store.h"

namespace imgfs::remote {

class DirStore final : public ObjectStore {
 public:
  // `root` is an existing directory, given as a path or as "file:///abs/path".
  // Errors: InvalidArgument (empty or malformed root, or not a directory), NotFound (missing),
  // IOError (cannot stat).
  static Result<std::unique_ptr<DirStore>> open(std::string root);

  // Walks root recursively. Lists regular files (and symlinks to regular files), never
  // descends into symlinked directories, and skips entries it cannot read.
  // Thread-safe. Errors: IOError if root itself cannot be read.
  Result<std::vector<ObjectInfo>> list(std::string_view prefix) const override;

  // Thread-safe. Errors: InvalidArgument for a key that is empty, starts with '/', contains NUL,
  // an empty component, "." or ".." (keys never reach outside root); NotFound when missing or
  // not a regular file; IOError otherwise.
  Result<ObjectInfo> head(std::string_view key) const override;

  // Opens the file, checks its etag against object.etag, and preads until `out` is full.
  // Thread-safe. Errors: as head, plus IOError for a changed object or a short read, and
  // InvalidArgument for a range past object.size.
  Status read_range(const ObjectInfo& object, uint64_t offset,
                    std::span<std::byte> out) const override;

  // Writes a temp file beside the object (".NAME.imgfs-put.PID.N", mode 0644), fsyncs it and
  // renames it over root/key, so readers and a crash see the old file or the new one. Missing
  // parent folders are created (0755), as S3 keys need none; no symlink is followed on the way,
  // so a put never writes outside root. Thread-safe.
  // Errors: InvalidArgument (key as in head), IOError (a parent is not a folder, I/O).
  Status put(const std::string& key, std::span<const std::byte> bytes) const override;

  // "dir:" followed by the root path.
  std::string describe() const override;

  bool is_local() const override { return true; }

 private:
  explicit DirStore(std::string root) : root_(std::move(root)) {}

  // Absolute root path without a trailing '/' (except for "/" itself).
  const std::string root_;
  // Numbers put's temp files, unique within this process.
  mutable std::atomic<uint64_t> next_temp_{0};
};

}  // namespace imgfs::remote
