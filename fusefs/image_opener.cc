#include "fusefs/image_opener.h"

#include "formats/concat_source.h"
#include "formats/index_signature.h"
#include "remote/object_source.h"
#include "remote/url_source.h"

namespace imgfs::fusefs {

namespace {
constexpr uint64_t kMaxManifestBytes = 32ull << 20;
}  // namespace

std::string key_folder(const std::string& key) {
  const size_t slash = key.rfind('/');
  return slash == std::string::npos ? "" : key.substr(0, slash + 1);
}

uint64_t image_size_of(const ParsedManifest& manifest) {
  if (const auto* bundle = std::get_if<formats::BundleManifest>(&manifest)) {
    return bundle->image.size;
  }
  if (const auto* download = std::get_if<formats::DownloadManifest>(&manifest)) {
    return download->bundle ? download->bundle->unbundled_size : 0;
  }
  return std::get<formats::ImportManifest>(manifest).file_size();
}

std::vector<std::string> part_keys_of(const std::string& manifest_key,
                                      const ParsedManifest& manifest) {
  std::vector<std::string> keys;
  if (const auto* bundle = std::get_if<formats::BundleManifest>(&manifest)) {
    const std::string folder = key_folder(manifest_key);
    for (const formats::BundlePart& part : bundle->parts) keys.push_back(folder + part.filename);
  } else if (const auto* import = std::get_if<formats::ImportManifest>(&manifest)) {
    // Import manifests name their parts by key in the bucket, not beside the manifest.
    for (const formats::ImportPart& part : import->parts) keys.push_back(part.key);
  }
  // Download manifests name their parts by URL only.
  return keys;
}

Result<ParsedManifest> ImageOpener::read_manifest(
    const remote::ObjectInfo& manifest_object) const {
  if (manifest_object.size > kMaxManifestBytes) {
    return Status::Corruption(manifest_object.key + ": manifest is larger than 32 MiB");
  }
  std::string text(manifest_object.size, '\0');
  Status s = store_.read_range(manifest_object, 0,
                               std::as_writable_bytes(std::span(text.data(), text.size())));
  if (!s.ok()) return s;
  if (formats::looks_like_download_manifest(text)) {
    auto manifest = formats::parse_download_manifest(text);
    if (!manifest.ok()) return manifest.status().with_context(manifest_object.key);
    return ParsedManifest(std::move(manifest).value());
  }
  if (formats::looks_like_import_manifest(text)) {
    auto manifest = formats::parse_import_manifest(text);
    if (!manifest.ok()) return manifest.status().with_context(manifest_object.key);
    return ParsedManifest(std::move(manifest).value());
  }
  auto manifest = formats::parse_bundle_manifest(text);
  if (!manifest.ok()) return manifest.status().with_context(manifest_object.key);
  return ParsedManifest(std::move(manifest).value());
}

Result<formats::OpenedBundle> ImageOpener::open_bundle_chain(
    const remote::ObjectInfo& manifest_object, const ParsedManifest& manifest,
    const formats::BundleStackOptions& options, IoCounters* counters,
    const ListedObjects* listed) const {
  if (const auto* bundle = std::get_if<formats::BundleManifest>(&manifest)) {
    const std::string folder = key_folder(manifest_object.key);
    formats::PartOpener open_part =
        [&](std::string_view filename) -> Result<std::unique_ptr<BlockSource>> {
      const std::string key = folder + std::string(filename);
      if (listed != nullptr) {
        if (auto it = listed->find(key); it != listed->end()) {
          return std::unique_ptr<BlockSource>(
              std::make_unique<remote::ObjectSource>(store_, it->second, counters));
        }
      }
      auto info = store_.head(key);
      if (!info.ok()) return info.status();
      return std::unique_ptr<BlockSource>(
          std::make_unique<remote::ObjectSource>(store_, std::move(info).value(), counters));
    };
    return formats::open_bundle_stack(*bundle, open_part, options);
  }
  formats::PartOpener open_part =
      [&](std::string_view url) -> Result<std::unique_ptr<BlockSource>> {
    return remote::open_url_source(store_, std::string(url), "download part", counters);
  };
  return formats::open_download_stack(std::get<formats::DownloadManifest>(manifest), open_part,
                                      options);
}

Result<ImagePeek> ImageOpener::peek_image(const remote::ObjectInfo& manifest_object,
                                          const ParsedManifest& manifest, IoCounters* counters,
                                          const ListedObjects* listed) const {
  const std::string& name = manifest_object.key;
  ImagePeek peek;
  std::shared_ptr<const BlockSource> image;
  if (const auto* import = std::get_if<formats::ImportManifest>(&manifest)) {
    // A raw import's layout is in its first bytes, which its first part holds.
    if (import->file_format != formats::ImportFileFormat::kRaw || import->parts.empty()) {
      return peek;
    }
    const std::string& first_key = import->parts.front().key;
    auto known = listed != nullptr ? listed->find(first_key) : ListedObjects::const_iterator();
    Result<remote::ObjectInfo> first = listed != nullptr && known != listed->end()
                                           ? Result<remote::ObjectInfo>(known->second)
                                           : store_.head(first_key);
    if (!first.ok()) return first.status().with_context(name);
    image = std::make_shared<remote::ObjectSource>(store_, std::move(first).value(), counters);
  } else {
    formats::BundleStackOptions options = bundle_options(manifest_object);
    options.verify_parts = false;
    options.load_index = nullptr;
    auto bundle = open_bundle_chain(manifest_object, manifest, options, counters, listed);
    if (!bundle.ok()) return bundle.status().with_context(name);
    image = std::move(bundle->image);
    auto format = formats::detect_disk_format_by_head(*image);
    if (!format.ok()) return format.status().with_context(name);
    peek.format = *format;
  }
  if (peek.format == formats::DiskFormat::kRaw) {
    auto layout = formats::detect_disk_layout(*image);
    if (!layout.ok()) return layout.status().with_context(name);
    peek.layout = *layout;
  }
  return peek;
}

Result<OpenedImage> ImageOpener::open_manifest(const remote::ObjectInfo& manifest_object,
                                               const ParsedManifest& manifest,
                                               IoCounters* counters,
                                               formats::DiskFormat member_format) const {
  if (const auto* import = std::get_if<formats::ImportManifest>(&manifest)) {
    return open_import(manifest_object, *import, counters);
  }
  const std::string& name = manifest_object.key;
  auto bundle =
      open_bundle_chain(manifest_object, manifest, bundle_options(manifest_object), counters);
  if (!bundle.ok()) return bundle.status().with_context(name);
  std::string cache_id =
      (std::holds_alternative<formats::BundleManifest>(manifest) ? "bundle:" : "download:") +
      name;
  std::unique_ptr<BlockSource> image = std::move(bundle->image);
  if (member_format != formats::DiskFormat::kRaw) {
    auto verified = formats::detect_disk_format_by_head(*image);
    if (!verified.ok()) return verified.status().with_context(name);
    if (*verified != member_format) {
      return Status::Corruption(name + ": the bundled image is " +
                                std::string(formats::disk_format_name(*verified)) +
                                ", not the " +
                                std::string(formats::disk_format_name(member_format)) +
                                " its unverified first bytes showed");
    }
    // A bundled disk is one file: it has no siblings (backing files, extents) to open.
    auto disk = formats::open_disk_format(member_format, std::move(image), {});
    if (!disk.ok()) return disk.status().with_context(name);
    image = std::move(disk).value();
    cache_id = std::string(formats::disk_format_name(member_format)) + ":" + cache_id;
  }
  OpenedImage opened;
  opened.gzip = bundle->gzip;
  add_cache(std::move(image), cache_id, manifest_object.etag, counters, opened);
  return opened;
}

Result<OpenedImage> ImageOpener::open_import(const remote::ObjectInfo& manifest_object,
                                             const formats::ImportManifest& manifest,
                                             IoCounters* counters) const {
  const std::string& name = manifest_object.key;
  formats::ImportManifest fitted = manifest;
  std::vector<std::unique_ptr<BlockSource>> parts;
  std::vector<uint64_t> sizes;
  for (const formats::ImportPart& part : fitted.parts) {
    const std::string label = name + ": part " + std::to_string(part.index) + " (" + part.key + ")";
    auto info = store_.head(part.key);
    if (info.ok()) {
      sizes.push_back(info->size);
      parts.push_back(format_input(std::move(info).value(), counters));
      continue;
    }
    if (info.status().code() != StatusCode::kNotFound || part.get_url.empty()) {
      return info.status().with_context(label);
    }
    auto by_url = remote::open_url_source(store_, part.get_url, part.key, counters);
    if (!by_url.ok()) return by_url.status().with_context(label);
    sizes.push_back((*by_url)->size());
    parts.push_back(std::move(by_url).value());
  }
  if (Status s = fitted.fit_to_object_sizes(sizes); !s.ok()) return s.with_context(name);
  auto file = formats::open_concat(std::move(parts));
  if (!file.ok()) return file.status().with_context(name);
  // The parts tile one disk file: a VMDK or VHD layer goes on top of them, with no siblings.
  const formats::DiskFormat format = manifest.file_format == formats::ImportFileFormat::kVmdk
                                         ? formats::DiskFormat::kVmdk
                                     : manifest.file_format == formats::ImportFileFormat::kVhd
                                         ? formats::DiskFormat::kVhd
                                         : formats::DiskFormat::kRaw;
  auto disk = formats::open_disk_format(format, std::move(file).value(), {});
  if (!disk.ok()) return disk.status().with_context(name);
  OpenedImage opened;
  add_cache(std::move(disk).value(), "import:" + name, manifest_object.etag, counters, opened,
            !store_.is_local());
  return opened;
}

Result<OpenedImage> ImageOpener::open_disk_view(const remote::ObjectInfo& object,
                                                formats::DiskFormat format,
                                                IoCounters* counters) const {
  const std::string folder = key_folder(object.key);
  formats::SiblingOpener open_sibling =
      [this, folder, counters](std::string_view name) -> Result<std::unique_ptr<BlockSource>> {
    auto info = store_.head(folder + std::string(name));
    if (!info.ok()) return info.status();
    return format_input(std::move(info).value(), counters);
  };
  auto disk = formats::open_disk_format(format, format_input(object, counters), open_sibling);
  if (!disk.ok()) return disk.status().with_context(object.key);
  OpenedImage opened;
  add_cache(std::move(disk).value(),
            "view:" + std::string(formats::disk_format_name(format)) + ":" + object.key,
            object.etag, counters, opened, !store_.is_local());
  return opened;
}

std::unique_ptr<BlockSource> ImageOpener::format_input(remote::ObjectInfo object,
                                                       IoCounters* counters) const {
  std::unique_ptr<BlockSource> source =
      std::make_unique<remote::ObjectSource>(store_, std::move(object), counters);
  if (config_.prefetch_budget == nullptr) return source;
  return std::make_unique<cache::PrefetchSource>(std::move(source), config_.prefetch,
                                                 *config_.prefetch_budget);
}

void ImageOpener::add_cache(std::unique_ptr<BlockSource> chain, const std::string& source_id,
                            const std::string& etag, IoCounters* counters,
                            OpenedImage& opened, bool use_cache) const {
  if (config_.block_store != nullptr && use_cache) {
    auto cached = std::make_unique<cache::CachedSource>(std::move(chain), *config_.block_store,
                                                        source_id, etag,
                                                        config_.cache_block_bytes, counters);
    opened.cached = cached.get();
    chain = std::move(cached);
  }
  if (config_.prefetch_budget != nullptr) {
    cache::PrefetchOptions prefetch = config_.prefetch;
    if (const formats::GzipSource* gzip = opened.gzip; gzip != nullptr) {
      // Until a bundle's first inflation has ended, that one inflation (which the background
      // indexer drives) is the read-ahead: fetches in parallel would only wait for it. With this,
      // bench row P2 (cold first read from s3rver) went from 0.93-1.02x to 1.21-1.39x.
      prefetch.read_ahead_now = [gzip] { return gzip->fully_indexed(); };
    }
    chain = std::make_unique<cache::PrefetchSource>(std::move(chain), prefetch,
                                                    *config_.prefetch_budget);
  }
  opened.source = std::move(chain);
}

std::string index_id(const remote::ObjectInfo& manifest_object) {
  return "gzip-index\n" + manifest_object.key + "\n" + manifest_object.etag;
}

bool is_index_sidecar_key(const std::string& key) {
  const std::string_view suffix = formats::kIndexSidecarSuffix;
  return key.size() > suffix.size() && key.ends_with(suffix) &&
         !formats::image_key_for_manifest(key.substr(0, key.size() - suffix.size())).empty();
}

formats::BundleStackOptions ImageOpener::bundle_options(
    const remote::ObjectInfo& manifest_object) const {
  formats::BundleStackOptions options;
  options.keys = config_.keys;
  options.verify_cert = config_.verify_cert;
  options.part_pool = config_.part_pool;
  options.span_pool = config_.span_pool;
  if (config_.index_store != nullptr || !config_.index_trusted.empty()) {
    options.load_index = [this, manifest_object]() -> std::optional<std::vector<std::byte>> {
      const std::string id = index_id(manifest_object);
      if (config_.index_store != nullptr) {
        if (auto saved = config_.index_store->load(id)) return saved;
      }
      return load_published_index(manifest_object);
    };
  }
  return options;
}

std::optional<std::vector<std::byte>> ImageOpener::load_published_index(
    const remote::ObjectInfo& manifest_object) const {
  if (config_.index_trusted.empty()) return std::nullopt;
  auto sidecar = store_.head(manifest_object.key + std::string(formats::kIndexSidecarSuffix));
  if (!sidecar.ok() || sidecar->size > formats::kMaxSidecarIndexBytes + (2u << 20)) {
    return std::nullopt;
  }
  std::vector<std::byte> bytes(sidecar->size);
  if (!store_.read_range(*sidecar, 0, bytes).ok()) return std::nullopt;
  auto index = formats::verify_index_sidecar(bytes, config_.index_trusted,
                                             index_id(manifest_object));
  if (!index.ok()) return std::nullopt;
  return std::move(index).value();
}

Status ImageOpener::publish_index(const remote::ObjectInfo& manifest_object,
                                  std::span<const std::byte> serialized_index) const {
  if (config_.index_signer == nullptr) return Status::InvalidArgument("no --publish-index key");
  auto sidecar = formats::sign_index_sidecar(serialized_index, *config_.index_signer,
                                             index_id(manifest_object));
  if (!sidecar.ok()) return sidecar.status();
  return store_.put(manifest_object.key + std::string(formats::kIndexSidecarSuffix), *sidecar);
}

Result<OpenedImage> ImageOpener::open_object(const remote::ObjectInfo& object,
                                             IoCounters* counters) const {
  OpenedImage opened;
  add_cache(std::make_unique<remote::ObjectSource>(store_, object, counters),
            "object:" + object.key, object.etag, counters, opened, !store_.is_local());
  return opened;
}

}  // namespace imgfs::fusefs
