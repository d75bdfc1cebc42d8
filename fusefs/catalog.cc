#include "fusefs/catalog.h"

#include <set>

#include "formats/gzip_source.h"
#include "formats/image_stack.h"

namespace imgfs::fusefs {

namespace {

constexpr char kStatsFolder[] = ".imgfs";
constexpr char kStatsFile[] = "stats.json";

void append_json_string(std::string& out, const std::string& text) {
  out += '"';
  for (unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
          out += escaped;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

void append_counters(std::string& out, const IoCounters& counters) {
  out += "\"bytes_fetched\":" + std::to_string(counters.get(IoCounters::kBytesFetched));
  out += ",\"requests\":" + std::to_string(counters.get(IoCounters::kRequests));
  out += ",\"cache_hits\":" + std::to_string(counters.get(IoCounters::kCacheHits));
  out += ",\"cache_misses\":" + std::to_string(counters.get(IoCounters::kCacheMisses));
  out += ",\"bytes_served\":" + std::to_string(counters.get(IoCounters::kBytesServed));
}

// Splits "a/b/c" into its non-empty components; false if any component is "." or "..".
bool split_path(const std::string& path, std::vector<std::string>& parts) {
  size_t start = 0;
  while (start <= path.size()) {
    size_t slash = path.find('/', start);
    if (slash == std::string::npos) slash = path.size();
    std::string part = path.substr(start, slash - start);
    if (part == "." || part == "..") return false;
    if (!part.empty()) parts.push_back(std::move(part));
    start = slash + 1;
  }
  return !parts.empty();
}

}  // namespace

Catalog::Catalog(const ImageOpener& opener, Logger& log, const cache::BlockStore* block_store)
    : opener_(opener), log_(log), block_store_(block_store), built_at_(std::time(nullptr)) {
  CatalogNode& root = add_node(0, "", NodeKind::kDirectory);
  root.parent = kRootInode;
}

CatalogNode& Catalog::add_node(uint64_t parent, const std::string& name, NodeKind kind) {
  auto node = std::make_unique<CatalogNode>();
  node->inode = nodes_.size() + 1;
  node->parent = parent;
  node->name = name;
  node->kind = kind;
  node->counters.parent = &totals_;
  if (parent != 0) {
    CatalogNode& up = *nodes_[parent - 1];
    node->path = up.path.empty() ? name : up.path + "/" + name;
    up.children[name] = node->inode;
  }
  nodes_.push_back(std::move(node));
  return *nodes_.back();
}

CatalogNode& Catalog::ensure_folder(const std::string& folder_path) {
  std::vector<std::string> parts;
  uint64_t inode = kRootInode;
  if (!split_path(folder_path, parts)) return *nodes_[0];
  for (const std::string& part : parts) {
    CatalogNode* existing = child(inode, part);
    if (existing == nullptr) existing = &add_node(inode, part, NodeKind::kDirectory);
    inode = existing->inode;
  }
  return *nodes_[inode - 1];
}

Result<std::unique_ptr<Catalog>> Catalog::build(const ImageOpener& opener,
                                                const std::string& prefix, Logger& log,
                                                const cache::BlockStore* block_store) {
  auto listing = opener.store().list(prefix);
  if (!listing.ok()) return listing.status().with_context("listing " + opener.store().describe());
  std::unique_ptr<Catalog> catalog(new Catalog(opener, log, block_store));

  // Manifests first: their parts are hidden, and they become images.
  struct ManifestEntry {
    const remote::ObjectInfo* object;
    std::string image_path;
    Result<formats::BundleManifest> manifest;
  };
  std::vector<ManifestEntry> manifests;
  std::set<std::string> hidden_keys;
  for (const remote::ObjectInfo& object : *listing) {
    const std::string relative = object.key.substr(prefix.size());
    std::string image_path = formats::image_key_for_manifest(relative);
    if (image_path.empty()) continue;
    auto manifest = opener.read_manifest(object);
    if (manifest.ok()) {
      const std::string folder = key_folder(object.key);
      for (const formats::BundlePart& part : manifest->parts) {
        hidden_keys.insert(folder + part.filename);
      }
    } else {
      log.error("image " + image_path + ": " + manifest.status().to_string());
    }
    hidden_keys.insert(object.key);
    manifests.push_back(ManifestEntry{&object, std::move(image_path), std::move(manifest)});
  }

  auto place = [&](const std::string& path, NodeKind kind) -> CatalogNode* {
    std::vector<std::string> parts;
    if (!split_path(path, parts) || (parts.size() >= 1 && parts[0] == kStatsFolder)) {
      log.error("skipping object with an unusable name: " + path);
      return nullptr;
    }
    const size_t last_slash = path.rfind('/');
    CatalogNode& folder =
        catalog->ensure_folder(last_slash == std::string::npos ? "" : path.substr(0, last_slash));
    if (folder.kind != NodeKind::kDirectory || folder.children.count(parts.back()) != 0) {
      log.error("skipping " + path + ": the name is already taken");
      return nullptr;
    }
    return &catalog->add_node(folder.inode, parts.back(), kind);
  };

  for (ManifestEntry& entry : manifests) {
    CatalogNode* node = place(entry.image_path, NodeKind::kImage);
    if (node == nullptr) continue;
    node->object = *entry.object;
    if (entry.manifest.ok()) {
      node->size = entry.manifest->image.size;
      node->manifest = std::move(entry.manifest).value();
    } else {
      node->manifest_status = entry.manifest.status();
    }
  }
  for (const remote::ObjectInfo& object : *listing) {
    if (hidden_keys.count(object.key) != 0) continue;
    CatalogNode* node = place(object.key.substr(prefix.size()), NodeKind::kObject);
    if (node == nullptr) continue;
    node->object = object;
    node->size = object.size;
  }
  CatalogNode& stats_folder = catalog->add_node(kRootInode, kStatsFolder, NodeKind::kDirectory);
  catalog->add_node(stats_folder.inode, kStatsFile, NodeKind::kStats);
  return catalog;
}

CatalogNode* Catalog::node(uint64_t inode) const {
  if (inode == 0 || inode > nodes_.size()) return nullptr;
  return nodes_[inode - 1].get();
}

CatalogNode* Catalog::child(uint64_t parent, const std::string& name) const {
  const CatalogNode* folder = node(parent);
  if (folder == nullptr) return nullptr;
  auto it = folder->children.find(name);
  return it == folder->children.end() ? nullptr : node(it->second);
}

Result<std::shared_ptr<const BlockSource>> Catalog::open_source(CatalogNode& node) {
  std::unique_lock lock(node.mutex);
  node.opened.wait(lock, [&] { return !node.opening; });
  if (node.source) return node.source;
  node.opening = true;
  lock.unlock();

  Result<OpenedImage> opened = Status::InvalidArgument(node.path + " is not a file");
  if (node.kind == NodeKind::kImage) {
    if (node.manifest) {
      opened = opener_.open_bundle(node.object, *node.manifest, &node.counters);
    } else {
      opened = node.manifest_status;
    }
  } else if (node.kind == NodeKind::kObject) {
    opened = opener_.open_object(node.object, &node.counters);
  }

  lock.lock();
  node.opening = false;
  node.opened.notify_all();
  if (!opened.ok()) {
    node.last_error = opened.status();
    log_.error_once("image " + node.path + ": cannot open: " + opened.status().to_string());
    return opened.status();
  }
  node.source = opened->source;
  node.gzip = opened->gzip;
  node.cached = opened->cached;
  node.last_error = Status::OK();
  return node.source;
}

std::string Catalog::stats_json() const {
  std::string out = "{";
  append_counters(out, totals_);
  out += ",\"cache_bytes\":" +
         std::to_string(block_store_ != nullptr ? block_store_->bytes_used() : 0);
  out += ",\"images\":{";
  bool first = true;
  for (const auto& node : nodes_) {
    if (node->kind != NodeKind::kImage && node->kind != NodeKind::kObject) continue;
    if (!first) out += ',';
    first = false;
    append_json_string(out, node->path);
    out += ":{";
    append_counters(out, node->counters);
    out += ",\"size\":" + std::to_string(node->size);
    std::lock_guard lock(node->mutex);
    out += ",\"kind\":";
    out += node->kind == NodeKind::kImage ? "\"bundle\"" : "\"object\"";
    out += ",\"state\":";
    out += node->source ? "\"open\"" : (node->last_error.ok() ? "\"closed\"" : "\"failed\"");
    if (!node->last_error.ok()) {
      out += ",\"error\":";
      append_json_string(out, node->last_error.to_string());
    }
    out += ",\"cache_bytes\":" +
           std::to_string(node->cached != nullptr ? node->cached->cached_bytes() : 0);
    if (node->gzip != nullptr) {
      out += ",\"inflated_bytes\":" + std::to_string(node->gzip->inflated_bytes());
      out += ",\"checkpoints\":" + std::to_string(node->gzip->checkpoint_count());
    }
    out += '}';
  }
  out += "}}\n";
  return out;
}

}  // namespace imgfs::fusefs
