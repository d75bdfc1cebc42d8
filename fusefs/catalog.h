// Catalog: the mounted tree. It lists the bucket once at mount time and turns it into virtual
// files: each bundle manifest "K.manifest.xml" (or "Kmanifest.xml") becomes a raw image file "K",
// the parts it names are hidden, every other object shows as itself, and ".imgfs/stats.json"
// reports live counters. Image chains are opened lazily, once, on first open().
#pragma once

#include <condition_variable>
#include <cstdint>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "formats/block_source.h"
#include "formats/io_counters.h"
#include "fusefs/image_opener.h"
#include "fusefs/logger.h"

namespace imgfs::fusefs {

enum class NodeKind { kDirectory, kImage, kObject, kStats };

// One file or folder of the mount. Fields above the mutex are fixed once the catalog is built.
struct CatalogNode {
  uint64_t inode = 0;
  uint64_t parent = 0;
  std::string name;
  std::string path;  // from the mount's root, without a leading '/'
  NodeKind kind = NodeKind::kDirectory;
  std::map<std::string, uint64_t> children;  // name -> inode, for folders
  uint64_t size = 0;
  remote::ObjectInfo object;                          // the manifest, or the plain object
  std::optional<formats::BundleManifest> manifest;    // for images whose manifest parsed
  Status manifest_status;                             // why the manifest did not parse
  IoCounters counters;

  std::mutex mutex;  // guards the lazily opened chain below
  std::condition_variable opened;
  bool opening = false;                          // GUARDED_BY(mutex)
  std::shared_ptr<const BlockSource> source;     // GUARDED_BY(mutex)
  const formats::GzipSource* gzip = nullptr;     // GUARDED_BY(mutex); inside `source`
  const cache::CachedSource* cached = nullptr;   // GUARDED_BY(mutex); `source` itself
  Status last_error;                             // GUARDED_BY(mutex)
};

class Catalog {
 public:
  static constexpr uint64_t kRootInode = 1;

  // Lists `store` under `prefix` (a folder prefix ending in '/', or ""), reads every manifest and
  // builds the tree. `opener`, `log` and `block_store` (may be null) outlive the catalog.
  static Result<std::unique_ptr<Catalog>> build(const ImageOpener& opener, const std::string& prefix,
                                                Logger& log, const cache::BlockStore* block_store);

  // Null when there is no such inode / child. Thread-safe (the tree never changes).
  CatalogNode* node(uint64_t inode) const;
  CatalogNode* child(uint64_t parent, const std::string& name) const;

  // The chain serving an image or object node, opened on first use (single-flight). A failure
  // is logged once with the image's path and cause, returned, and retried on the next call.
  Result<std::shared_ptr<const BlockSource>> open_source(CatalogNode& node);

  // The live counters as JSON: mount totals at the top, per image under "images".
  std::string stats_json() const;

  IoCounters& totals() { return totals_; }

  // When the catalog was built: the times every file and folder shows.
  time_t built_at() const { return built_at_; }

 private:
  Catalog(const ImageOpener& opener, Logger& log, const cache::BlockStore* block_store);
  CatalogNode& add_node(uint64_t parent, const std::string& name, NodeKind kind);
  CatalogNode& ensure_folder(const std::string& folder_path);

  const ImageOpener& opener_;
  Logger& log_;
  const cache::BlockStore* block_store_;
  IoCounters totals_;
  const time_t built_at_;
  std::vector<std::unique_ptr<CatalogNode>> nodes_;  // index = inode - 1
};

}  // namespace imgfs::fusefs
