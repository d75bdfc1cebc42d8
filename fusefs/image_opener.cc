#include "fusefs/image_opener.h"

#include "remote/object_source.h"

namespace imgfs::fusefs {

namespace {
constexpr uint64_t kMaxManifestBytes = 32ull << 20;
}  // namespace

std::string key_folder(const std::string& key) {
  const size_t slash = key.rfind('/');
  return slash == std::string::npos ? "" : key.substr(0, slash + 1);
}

Result<formats::BundleManifest> ImageOpener::read_manifest(
    const remote::ObjectInfo& manifest_object) const {
  if (manifest_object.size > kMaxManifestBytes) {
    return Status::Corruption(manifest_object.key + ": manifest is larger than 32 MiB");
  }
  std::string text(manifest_object.size, '\0');
  Status s = store_.read_range(manifest_object, 0,
                               std::as_writable_bytes(std::span(text.data(), text.size())));
  if (!s.ok()) return s;
  auto manifest = formats::parse_bundle_manifest(text);
  if (!manifest.ok()) return manifest.status().with_context(manifest_object.key);
  return manifest;
}

void ImageOpener::add_cache(std::unique_ptr<BlockSource> chain, const std::string& source_id,
                            const std::string& etag, IoCounters* counters,
                            OpenedImage& opened) const {
  if (config_.block_store == nullptr) {
    opened.source = std::move(chain);
    return;
  }
  auto cached = std::make_shared<cache::CachedSource>(
      std::move(chain), *config_.block_store, source_id, etag, config_.cache_block_bytes, counters);
  opened.cached = cached.get();
  opened.source = std::move(cached);
}

Result<OpenedImage> ImageOpener::open_bundle(const remote::ObjectInfo& manifest_object,
                                             const formats::BundleManifest& manifest,
                                             IoCounters* counters) const {
  const std::string folder = key_folder(manifest_object.key);
  formats::PartOpener open_part =
      [&](std::string_view filename) -> Result<std::unique_ptr<BlockSource>> {
    auto info = store_.head(folder + std::string(filename));
    if (!info.ok()) return info.status();
    return std::unique_ptr<BlockSource>(
        std::make_unique<remote::ObjectSource>(store_, std::move(info).value(), counters));
  };
  formats::BundleStackOptions options;
  options.keys = config_.keys;
  options.verify_cert = config_.verify_cert;
  options.part_pool = config_.part_pool;
  auto bundle = formats::open_bundle_stack(manifest, open_part, options);
  if (!bundle.ok()) return bundle.status().with_context(manifest_object.key);
  OpenedImage opened;
  opened.gzip = bundle->gzip;
  add_cache(std::move(bundle->image), "bundle:" + manifest_object.key, manifest_object.etag,
            counters, opened);
  return opened;
}

Result<OpenedImage> ImageOpener::open_object(const remote::ObjectInfo& object,
                                             IoCounters* counters) const {
  OpenedImage opened;
  add_cache(std::make_unique<remote::ObjectSource>(store_, object, counters),
            "object:" + object.key, object.etag, counters, opened);
  return opened;
}

}  // namespace imgfs::fusefs
