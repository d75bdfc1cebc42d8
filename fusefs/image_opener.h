// ImageOpener: the composition of the engine for one store. It turns a manifest object into a
// cached raw-image chain (ObjectSource x N -> image_stack -> CachedSource), and a plain object
// into a cached object chain. Shared by the FUSE catalog and the CLI.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "cache/block_store.h"
#include "cache/cached_source.h"
#include "cache/prefetch_source.h"
#include "formats/block_source.h"
#include "formats/bundle_keys.h"
#include "formats/bundle_manifest.h"
#include "formats/disk_format.h"
#include "formats/disk_layout.h"
#include "formats/image_stack.h"
#include "formats/download_manifest.h"
#include "formats/import_manifest.h"
#include "formats/io_counters.h"
#include "formats/verified_part_source.h"
#include "fusefs/index_store.h"
#include "remote/object_store.h"

namespace imgfs::fusefs {

struct ImageOpenerConfig {
  std::vector<const formats::PrivateKey*> keys;
  const formats::Certificate* verify_cert = nullptr;
  formats::VerifiedPartPool* part_pool = nullptr;  // required
  formats::GzipSpanPool* span_pool = nullptr;      // null: each bundle keeps its own spans
  cache::BlockStore* block_store = nullptr;        // null: no on-disk cache
  const IndexStore* index_store = nullptr;         // null: gzip indexes are not kept
  // Signs the indexes publish_index uploads beside their manifests; null: none are uploaded.
  const formats::PrivateKey* index_signer = nullptr;
  // Indexes published beside a manifest are used when one of these signed them (and no local
  // index is kept); empty: published indexes are ignored.
  std::vector<const formats::Certificate*> index_trusted;
  uint32_t cache_block_bytes = 256u << 10;
  // Sequential readers of a chain get an adaptive read-ahead window on top of the cache, its
  // buffers charged to this budget; null: no read-ahead. `prefetch` must be options that
  // cache::open_prefetch accepts (the mount checks them at start).
  cache::MemoryBudget* prefetch_budget = nullptr;
  cache::PrefetchOptions prefetch;
};

// A manifest object, parsed: a bundle manifest (2007-10-10), an import manifest (2010-11-15) or
// a Eucalyptus 4 download manifest (2014-01-14).
using ParsedManifest =
    std::variant<formats::BundleManifest, formats::ImportManifest, formats::DownloadManifest>;

// The size of the raw image a manifest describes (the import's file size for imports).
uint64_t image_size_of(const ParsedManifest& manifest);

// The keys of the part objects a manifest names (hidden from the mount's listing).
std::vector<std::string> part_keys_of(const std::string& manifest_key,
                                      const ParsedManifest& manifest);

// What an opened bundle chain offers: the top of the chain plus its gzip layer for progress.
struct OpenedImage {
  std::shared_ptr<const BlockSource> source;
  const formats::GzipSource* gzip = nullptr;     // inside `source`; null for plain objects
  const cache::CachedSource* cached = nullptr;   // `source` itself; null without a cache
};

// Objects of a listing, by key.
using ListedObjects = std::unordered_map<std::string, remote::ObjectInfo>;

struct ImagePeek {
  formats::DiskFormat format = formats::DiskFormat::kRaw;
  formats::DiskLayout layout;  // of raw images only; kUnknown otherwise
};

class ImageOpener {
 public:
  // `store` and everything in `config` outlive the opener and every chain it opens.
  ImageOpener(const remote::ObjectStore& store, ImageOpenerConfig config)
      : store_(store), config_(std::move(config)) {}

  // Reads and parses a manifest object (at most 32 MiB), of any kind. Thread-safe.
  Result<ParsedManifest> read_manifest(const remote::ObjectInfo& manifest_object) const;

  // Opens the image a parsed manifest describes (a bundle, an import, or a download manifest's
  // bundle, whose parts are fetched by get-url). A bundle whose image is in a disk format
  // (`member_format`, from peek_member_format) gets that format's layer, so it reads raw; the
  // verified image must then start the same way, or the open fails with Corruption. Thread-safe.
  Result<OpenedImage> open_manifest(
      const remote::ObjectInfo& manifest_object, const ParsedManifest& manifest,
      IoCounters* counters, formats::DiskFormat member_format = formats::DiskFormat::kRaw) const;

  // What the first bytes of a manifest's image show: the disk format of a bundled image (an
  // import's format is in its manifest), and the layout of a raw image (a partition table, or
  // a bare filesystem). A bundle's bytes are read without verifying its parts (a few small
  // range reads instead of whole parts): only a hint, which open_manifest checks on verified
  // bytes. Thread-safe.
  // `listed` (may be null) holds objects by key from a listing just taken: parts found there
  // need no HEAD request each.
  Result<ImagePeek> peek_image(const remote::ObjectInfo& manifest_object,
                               const ParsedManifest& manifest, IoCounters* counters,
                               const ListedObjects* listed = nullptr) const;

  // Opens an imported disk: its parts by key in the bucket, or by their pre-signed get-url
  // when the key is not there, concatenated by byte range. Formats other than RAW are
  // NotSupported until their layers exist. Thread-safe.
  Result<OpenedImage> open_import(const remote::ObjectInfo& manifest_object,
                                  const formats::ImportManifest& manifest,
                                  IoCounters* counters) const;


  // Opens the raw view of a plain object in a disk image format (qcow2, VMDK, VHD, VHDX, VDI),
  // its siblings (backing files, extents, parents) found beside it. Thread-safe.
  Result<OpenedImage> open_disk_view(const remote::ObjectInfo& object, formats::DiskFormat format,
                                     IoCounters* counters) const;

  // Opens a plain object as itself, through the cache. Thread-safe.
  Result<OpenedImage> open_object(const remote::ObjectInfo& object, IoCounters* counters) const;

  // Signs a complete gzip index (serialize_gzip_index) with config.index_signer and uploads it
  // beside its manifest as K.manifest.xml.imgfs-index, bound to this manifest version.
  // Thread-safe. Errors: InvalidArgument (no signer), and those of signing and store.put.
  Status publish_index(const remote::ObjectInfo& manifest_object,
                       std::span<const std::byte> serialized_index) const;

  bool publishes_indexes() const { return config_.index_signer != nullptr; }
  const remote::ObjectStore& store() const { return store_; }
  const IndexStore* index_store() const { return config_.index_store; }

 private:
  // The index published beside a manifest when a trusted key signed it for this manifest
  // version; nullopt when there is none or it does not check out (it is then rebuilt).
  std::optional<std::vector<std::byte>> load_published_index(
      const remote::ObjectInfo& manifest_object) const;

  // Options for a bundle chain; its gzip index is the one kept in the cache directory (by
  // index_id()), else a trusted published one.
  formats::BundleStackOptions bundle_options(const remote::ObjectInfo& manifest_object) const;

  // Opens the bundle chain of a bundle or download manifest, its parts verified or not.
  Result<formats::OpenedBundle> open_bundle_chain(const remote::ObjectInfo& manifest_object,
                                                  const ParsedManifest& manifest,
                                                  const formats::BundleStackOptions& options,
                                                  IoCounters* counters,
                                                  const ListedObjects* listed = nullptr) const;

  // An object read by a disk format layer: a format reads clusters one by one, so sequential
  // runs of them are read ahead in large requests below it (when read-ahead is configured).
  std::unique_ptr<BlockSource> format_input(remote::ObjectInfo object,
                                            IoCounters* counters) const;

  // Puts the cache (when configured and `use_cache`), then read-ahead, on top of `chain` and
  // fills opened.source/cached. Bundles always use the cache (inflating costs far more than
  // reading a block file); plain objects and disk views of a local folder bucket do not.
  void add_cache(std::unique_ptr<BlockSource> chain, const std::string& source_id,
                 const std::string& etag, IoCounters* counters, OpenedImage& opened,
                 bool use_cache = true) const;

  const remote::ObjectStore& store_;
  const ImageOpenerConfig config_;
};

// Names the saved gzip index of one manifest version (its key and ETag pin every part); also
// what a published index is bound to.
std::string index_id(const remote::ObjectInfo& manifest_object);

// True for the key of an index published beside a manifest (hidden from the mount's listing).
bool is_index_sidecar_key(const std::string& key);

// The folder part of a key, with its trailing '/', or "" at the top.
std::string key_folder(const std::string& key);

}  // namespace imgfs::fusefs
