// IndexStore: saved gzip checkpoint indexes of bundles, one file per bundle version in a
// folder of the cache directory (0700; files 0600, written to a temp name and renamed, so a
// crash leaves a whole file or none). A remount or another process then resumes from the
// nearest checkpoint instead of inflating from the start. Files are untrusted when read back:
// formats/ parses and checks them, and ignores one that does not fit.
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/status.h"

namespace imgfs::fusefs {

class IndexStore {
 public:
  // Creates `dir` (mode 0700). Errors: IOError.
  static Result<std::unique_ptr<IndexStore>> open(std::string dir);

  // The saved bytes for `id` (any string naming one bundle version), or nullopt. Thread-safe.
  std::optional<std::vector<std::byte>> load(const std::string& id) const;

  // Saves `bytes` for `id`, replacing an older file. Thread-safe. Errors: IOError.
  Status save(const std::string& id, std::span<const std::byte> bytes) const;

 private:
  explicit IndexStore(std::string dir) : dir_(std::move(dir)) {}
  std::string path_for(const std::string& id) const;

  const std::string dir_;
};

}  // namespace imgfs::fusefs
