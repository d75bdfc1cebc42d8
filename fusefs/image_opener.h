// ImageOpener: the composition of the engine for one store. It turns a manifest object into a
// cached raw-image chain (ObjectSource x N -> image_stack -> CachedSource), and a plain object
// into a cached object chain. Shared by the FUSE catalog and the CLI.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cache/block_store.h"
#include "cache/cached_source.h"
#include "formats/block_source.h"
#include "formats/bundle_keys.h"
#include "formats/bundle_manifest.h"
#include "formats/image_stack.h"
#include "formats/io_counters.h"
#include "formats/verified_part_source.h"
#include "remote/object_store.h"

namespace imgfs::fusefs {

struct ImageOpenerConfig {
  std::vector<const formats::PrivateKey*> keys;
  const formats::Certificate* verify_cert = nullptr;
  formats::VerifiedPartPool* part_pool = nullptr;  // required
  cache::BlockStore* block_store = nullptr;        // null: no on-disk cache
  uint32_t cache_block_bytes = 256u << 10;
};

// What an opened bundle chain offers: the top of the chain plus its gzip layer for progress.
struct OpenedImage {
  std::shared_ptr<const BlockSource> source;
  const formats::GzipSource* gzip = nullptr;     // inside `source`; null for plain objects
  const cache::CachedSource* cached = nullptr;   // `source` itself; null without a cache
};

class ImageOpener {
 public:
  // `store` and everything in `config` outlive the opener and every chain it opens.
  ImageOpener(const remote::ObjectStore& store, ImageOpenerConfig config)
      : store_(store), config_(std::move(config)) {}

  // Reads and parses a bundle manifest object (at most 32 MiB). Thread-safe.
  Result<formats::BundleManifest> read_manifest(const remote::ObjectInfo& manifest_object) const;

  // Opens the bundle described by `manifest`, whose parts sit beside the manifest object.
  // `counters` (may be null) receives fetch and cache counts. Thread-safe.
  Result<OpenedImage> open_bundle(const remote::ObjectInfo& manifest_object,
                                  const formats::BundleManifest& manifest,
                                  IoCounters* counters) const;

  // Opens a plain object as itself, through the cache. Thread-safe.
  Result<OpenedImage> open_object(const remote::ObjectInfo& object, IoCounters* counters) const;

  const remote::ObjectStore& store() const { return store_; }

 private:
  // Puts the cache on top of `chain` (when there is one) and fills opened.source/cached.
  void add_cache(std::unique_ptr<BlockSource> chain, const std::string& source_id,
                 const std::string& etag, IoCounters* counters, OpenedImage& opened) const;

  const remote::ObjectStore& store_;
  const ImageOpenerConfig config_;
};

// The folder part of a key, with its trailing '/', or "" at the top.
std::string key_folder(const std::string& key);

}  // namespace imgfs::fusefs
