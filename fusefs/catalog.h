// Catalog: the mounted tree. It lists the bucket and turns it into virtual files: each
// manifest "K.manifest.xml" (or "Kmanifest.xml"), bundle or import, becomes a raw image file
// "K", the parts it names are hidden, every other object shows as itself, and
// ".imgfs/stats.json" reports live counters. The listing is kept for a TTL, then taken again;
// each tree is an immutable snapshot, inode numbers stay with their paths, and an object whose
// ETag did not change keeps its parsed manifest, its opened chain and its counters.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "formats/block_source.h"
#include "formats/io_counters.h"
#include "fusefs/background_indexer.h"
#include "fusefs/image_opener.h"
#include "fusefs/logger.h"

namespace imgfs::fusefs {

enum class NodeKind { kDirectory, kImage, kObject, kStats };

// One image or plain object version (key + ETag) and its lazily opened chain. Shared by every
// tree snapshot that shows it and by open file handles.
struct CatalogEntry {
  NodeKind kind = NodeKind::kObject;  // kImage or kObject
  remote::ObjectInfo object;          // the manifest, or the plain object
  std::optional<ParsedManifest> manifest;  // images whose manifest parsed
  formats::DiskFormat view_format = formats::DiskFormat::kRaw;  // raw views "K.raw" of object K
  formats::DiskFormat member_format = formats::DiskFormat::kRaw;  // a disk image in a bundle
  std::vector<std::string> extent_keys;  // files a VMDK view's descriptor keeps its data in
  formats::DiskLayout layout;            // of a raw image, from its first bytes
  // "K.disk", the whole disk synthesized around the partition image K: K's entry.
  std::shared_ptr<CatalogEntry> disk_of;
  Status manifest_status;                  // why it did not
  uint64_t size = 0;
  IoCounters counters;

  std::mutex mutex;  // guards the chain below; a leaf lock
  std::condition_variable opened;
  bool opening = false;                          // GUARDED_BY(mutex)
  std::shared_ptr<const BlockSource> source;     // GUARDED_BY(mutex)
  const formats::GzipSource* gzip = nullptr;     // GUARDED_BY(mutex); inside `source`
  const cache::CachedSource* cached = nullptr;   // GUARDED_BY(mutex); `source` itself
  Status last_error;                             // GUARDED_BY(mutex)
  bool index_saved = false;                      // GUARDED_BY(mutex)
};

// One file or folder of a tree snapshot. Immutable once the snapshot is built.
struct CatalogNode {
  uint64_t inode = 0;
  uint64_t parent = 0;
  std::string name;
  std::string path;  // from the mount's root, without a leading '/'
  NodeKind kind = NodeKind::kDirectory;
  std::map<std::string, uint64_t> children;  // name -> inode, for folders
  uint64_t size = 0;
  std::shared_ptr<CatalogEntry> entry;  // images and objects
};

// An immutable snapshot of the tree.
struct CatalogTree {
  std::unordered_map<uint64_t, CatalogNode> nodes;

  // Null when there is no such inode / child.
  const CatalogNode* node(uint64_t inode) const;
  const CatalogNode* child(uint64_t parent, const std::string& name) const;
};

class Catalog {
 public:
  static constexpr uint64_t kRootInode = 1;

  // Lists `store` under `prefix` (a folder prefix ending in '/', or ""), reads every manifest
  // and builds the first tree; fails when that first listing fails. `opener`, `log` and
  // `block_store` (may be null) outlive the catalog. `list_ttl_seconds` = 0 lists once only.
  // With `background_index`, every opened bundle is inflated to its end by a background pass
  // (see BackgroundIndexer), whose index is then saved (and published, if configured).
  static Result<std::unique_ptr<Catalog>> build(const ImageOpener& opener, std::string prefix,
                                                Logger& log,
                                                const cache::BlockStore* block_store,
                                                uint32_t list_ttl_seconds,
                                                bool background_index);

  // The current tree; when it is older than the TTL, the calling thread lists again first
  // (one at a time; others keep the current tree). A failed listing keeps the old tree and is
  // logged. Thread-safe.
  std::shared_ptr<const CatalogTree> tree();

  // The chain serving an entry, opened on first use (single-flight). A failure is logged once
  // with the image's path and cause, returned, and retried on the next call. Thread-safe.
  Result<std::shared_ptr<const BlockSource>> open_source(CatalogEntry& entry,
                                                         const std::string& path);

  // Saves the gzip index of every bundle that has been inflated to its end and verified, and
  // was not started from a saved index (one file each; see IndexStore), and publishes it beside
  // its manifest when the opener signs indexes. Called when a file is released, when a
  // background pass ends and at unmount. Thread-safe. Failures are logged.
  void save_indexes();

  // The live counters as JSON: mount totals at the top, per image under "images". `extra`
  // (may be empty) is spliced in at the top level, e.g. the store's endpoint and failovers.
  std::string stats_json(const std::string& extra) const;

  // When the catalog was built: the times every file and folder shows.
  time_t built_at() const { return built_at_; }

  // How long the kernel may keep names and attributes: the listing TTL (an hour when the
  // listing is taken once only).
  double attr_timeout_seconds() const {
    return list_ttl_seconds_ == 0 ? 3600.0 : static_cast<double>(list_ttl_seconds_);
  }

 private:
  Catalog(const ImageOpener& opener, std::string prefix, Logger& log,
          const cache::BlockStore* block_store, uint32_t list_ttl_seconds,
          bool background_index);

  // Lists the store and builds a new tree, reusing entries whose key and ETag are unchanged.
  // Runs without mutex_ held except to read and update the maps.
  Result<std::shared_ptr<const CatalogTree>> list_and_build();
  uint64_t inode_for(const std::string& path);  // REQUIRES(mutex_)
  // The whole disk "K.disk" around image K when K is a partition image, else null; reused
  // from `known` while K's entry is.
  std::shared_ptr<CatalogEntry> disk_view_for(
      const std::shared_ptr<CatalogEntry>& image,
      const std::unordered_map<std::string, std::shared_ptr<CatalogEntry>>& known);
  // The raw view "K.raw" of object K when K is a disk image in a known format, else null;
  // reused from `known` while K's ETag is unchanged.
  std::shared_ptr<CatalogEntry> raw_view_for(
      const remote::ObjectInfo& object, const std::string& path,
      const std::unordered_map<std::string, std::shared_ptr<CatalogEntry>>& known);

  const ImageOpener& opener_;
  const std::string prefix_;
  Logger& log_;
  const cache::BlockStore* block_store_;
  const uint32_t list_ttl_seconds_;
  const time_t built_at_;
  IoCounters totals_;

  // Lock order: mutex_ before any CatalogEntry::mutex.
  mutable std::mutex mutex_;
  std::shared_ptr<const CatalogTree> tree_;  // GUARDED_BY(mutex_)
  time_t listed_at_ = 0;                     // GUARDED_BY(mutex_)
  bool listing_ = false;                     // GUARDED_BY(mutex_)
  std::unordered_map<std::string, uint64_t> inode_by_path_;  // GUARDED_BY(mutex_)
  // key + "\n" + etag -> entry, for reuse across listings.
  std::unordered_map<std::string, std::shared_ptr<CatalogEntry>> entries_;  // GUARDED_BY(mutex_)

  // Last: destroyed first, so its pass (which calls save_indexes) ends while all else lives.
  std::unique_ptr<BackgroundIndexer> indexer_;  // null without background indexing
};

}  // namespace imgfs::fusefs
