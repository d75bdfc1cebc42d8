#include "fusefs/catalog.h"

#include <set>

#include "formats/gzip_index.h"
#include "formats/gzip_source.h"
#include "formats/image_stack.h"
#include "formats/partitioned_disk_source.h"
#include "formats/shared_source.h"
#include "formats/vmdk_source.h"
#include "remote/object_source.h"

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

// K.disk's table: its GUIDs and MBR signature follow from the image's key.
formats::PartitionedDiskOptions disk_options(const CatalogEntry& image) {
  formats::PartitionedDiskOptions options;
  options.name = image.object.key;
  return options;
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

std::string entry_id(const remote::ObjectInfo& object) { return object.key + "\n" + object.etag; }

// Objects smaller than this are never disk images (a VMDK descriptor is the smallest: a
// version line, a createType line and one extent line).
constexpr uint64_t kMinimumProbeBytes = 64;
constexpr char kRawViewSuffix[] = ".raw";
constexpr char kDiskViewSuffix[] = ".disk";

// Names an entry for reuse across listings: the object version, and which view of it.
std::string view_id(const CatalogEntry& entry) {
  if (entry.disk_of) return entry_id(entry.object) + kDiskViewSuffix;
  if (entry.view_format != formats::DiskFormat::kRaw) return entry_id(entry.object) + kRawViewSuffix;
  return entry_id(entry.object);
}


}  // namespace

const CatalogNode* CatalogTree::node(uint64_t inode) const {
  auto it = nodes.find(inode);
  return it == nodes.end() ? nullptr : &it->second;
}

const CatalogNode* CatalogTree::child(uint64_t parent, const std::string& name) const {
  const CatalogNode* folder = node(parent);
  if (folder == nullptr) return nullptr;
  auto it = folder->children.find(name);
  return it == folder->children.end() ? nullptr : node(it->second);
}

Catalog::Catalog(const ImageOpener& opener, std::string prefix, Logger& log,
                 const cache::BlockStore* block_store, uint32_t list_ttl_seconds,
                 bool background_index)
    : opener_(opener),
      prefix_(std::move(prefix)),
      log_(log),
      block_store_(block_store),
      list_ttl_seconds_(list_ttl_seconds),
      built_at_(std::time(nullptr)) {
  inode_by_path_["/"] = kRootInode;
  if (background_index) {
    indexer_ = std::make_unique<BackgroundIndexer>(log_, [this] { save_indexes(); });
  }
}

Result<std::unique_ptr<Catalog>> Catalog::build(const ImageOpener& opener, std::string prefix,
                                                Logger& log,
                                                const cache::BlockStore* block_store,
                                                uint32_t list_ttl_seconds,
                                                bool background_index) {
  std::unique_ptr<Catalog> catalog(new Catalog(opener, std::move(prefix), log, block_store,
                                               list_ttl_seconds, background_index));
  auto tree = catalog->list_and_build();
  if (!tree.ok()) return tree.status();
  catalog->tree_ = std::move(tree).value();
  catalog->listed_at_ = std::time(nullptr);
  return catalog;
}

uint64_t Catalog::inode_for(const std::string& path) {
  auto [it, added] = inode_by_path_.try_emplace(path, inode_by_path_.size() + 1);
  return it->second;
}

Result<std::shared_ptr<const CatalogTree>> Catalog::list_and_build() {
  auto listing = opener_.store().list(prefix_);
  if (!listing.ok()) return listing.status().with_context("listing " + opener_.store().describe());
  std::unordered_map<std::string, std::shared_ptr<CatalogEntry>> known;
  {
    std::lock_guard lock(mutex_);
    known = entries_;
  }
  ListedObjects listed;
  for (const remote::ObjectInfo& object : *listing) listed.emplace(object.key, object);
  auto entry_for = [&](const remote::ObjectInfo& object, NodeKind kind,
                       const std::string& path) -> std::shared_ptr<CatalogEntry> {
    if (auto it = known.find(entry_id(object)); it != known.end() && it->second->kind == kind) {
      return it->second;
    }
    auto entry = std::make_shared<CatalogEntry>();
    entry->kind = kind;
    entry->object = object;
    entry->counters.parent = &totals_;
    entry->size = object.size;
    if (kind == NodeKind::kImage) {
      auto manifest = opener_.read_manifest(object);
      if (manifest.ok()) {
        entry->size = image_size_of(*manifest);
        entry->manifest = std::move(manifest).value();
        const auto* import = std::get_if<formats::ImportManifest>(&*entry->manifest);
        // A peek failure (a wrong key, a missing part) shows again when the image is opened.
        auto peek = opener_.peek_image(object, *entry->manifest, &entry->counters, &listed);
        if (peek.ok()) {
          entry->member_format = peek->format;
          entry->layout = peek->layout;
        }
        if (entry->member_format != formats::DiskFormat::kRaw ||
            (import != nullptr && import->file_format != formats::ImportFileFormat::kRaw)) {
          // A disk format's size is inside the format: open the image now to learn it.
          auto opened = opener_.open_manifest(object, *entry->manifest, &entry->counters,
                                              entry->member_format);
          if (opened.ok()) {
            entry->size = opened->source->size();
            entry->source = opened->source;
            entry->gzip = opened->gzip;
            entry->cached = opened->cached;
          } else {
            entry->last_error = opened.status();
            log_.error("image " + path + ": " + opened.status().to_string());
          }
        }
      } else {
        entry->size = 0;
        entry->manifest_status = manifest.status();
        log_.error("image " + path + ": " + manifest.status().to_string());
      }
    }
    return entry;
  };

  // Manifests first: the parts they name are hidden, and they become images.
  struct Placed {
    std::string path;
    std::shared_ptr<CatalogEntry> entry;
  };
  std::vector<Placed> placed;
  std::set<std::string> hidden_keys;
  for (const remote::ObjectInfo& object : *listing) {
    const std::string relative = object.key.substr(prefix_.size());
    std::string image_path = formats::image_key_for_manifest(relative);
    if (image_path.empty()) {
      // Indexes published beside manifests are imgfs's own metadata.
      if (is_index_sidecar_key(object.key)) hidden_keys.insert(object.key);
      continue;
    }
    auto entry = entry_for(object, NodeKind::kImage, image_path);
    if (entry->manifest) {
      for (std::string& key : part_keys_of(object.key, *entry->manifest)) {
        hidden_keys.insert(std::move(key));
      }
    }
    hidden_keys.insert(object.key);
    if (auto disk = disk_view_for(entry, known)) {
      placed.push_back(Placed{image_path + kDiskViewSuffix, std::move(disk)});
    }
    placed.push_back(Placed{std::move(image_path), std::move(entry)});
  }
  // Plain objects, and the raw views of those in a disk format, except of the extent files a
  // VMDK descriptor names: the descriptor's view is that disk, shown once.
  std::vector<Placed> views;
  std::set<std::string> extent_keys;
  for (const remote::ObjectInfo& object : *listing) {
    if (hidden_keys.count(object.key) != 0) continue;
    const std::string path = object.key.substr(prefix_.size());
    placed.push_back(Placed{path, entry_for(object, NodeKind::kObject, path)});
    if (auto view = raw_view_for(object, path, known)) {
      extent_keys.insert(view->extent_keys.begin(), view->extent_keys.end());
      views.push_back(Placed{path + kRawViewSuffix, std::move(view)});
    }
  }
  for (Placed& view : views) {
    if (extent_keys.count(view.entry->object.key) == 0) placed.push_back(std::move(view));
  }

  std::lock_guard lock(mutex_);
  auto tree = std::make_shared<CatalogTree>();
  auto add_node = [&](uint64_t parent, const std::string& name, NodeKind kind) -> CatalogNode& {
    CatalogNode* up = parent == 0 ? nullptr : &tree->nodes.at(parent);
    const std::string path = up == nullptr ? "" : (up->path.empty() ? name : up->path + "/" + name);
    // A folder and a file of the same path get different inodes.
    const uint64_t inode =
        parent == 0 ? kRootInode : inode_for(kind == NodeKind::kDirectory ? path + "/" : path);
    CatalogNode& node = tree->nodes[inode];
    node.inode = inode;
    node.parent = parent == 0 ? kRootInode : parent;
    node.name = name;
    node.path = path;
    node.kind = kind;
    if (up != nullptr) up->children[name] = inode;
    return node;
  };
  add_node(0, "", NodeKind::kDirectory);
  std::unordered_map<std::string, std::shared_ptr<CatalogEntry>> in_use;
  for (Placed& item : placed) {
    std::vector<std::string> parts;
    if (!split_path(item.path, parts) || parts[0] == kStatsFolder) {
      log_.error_once("skipping an object with an unusable name: " + item.path);
      continue;
    }
    uint64_t folder = kRootInode;
    bool blocked = false;
    for (size_t i = 0; i + 1 < parts.size() && !blocked; ++i) {
      const CatalogNode* existing = tree->child(folder, parts[i]);
      if (existing == nullptr) {
        folder = add_node(folder, parts[i], NodeKind::kDirectory).inode;
      } else if (existing->kind == NodeKind::kDirectory) {
        folder = existing->inode;
      } else {
        blocked = true;
      }
    }
    if (blocked || tree->child(folder, parts.back()) != nullptr) {
      log_.error_once("skipping " + item.path + ": the name is already taken");
      continue;
    }
    CatalogNode& node = add_node(folder, parts.back(), item.entry->kind);
    node.size = item.entry->size;
    node.entry = item.entry;
    in_use[view_id(*item.entry)] = item.entry;
  }
  const uint64_t stats_folder = add_node(kRootInode, kStatsFolder, NodeKind::kDirectory).inode;
  add_node(stats_folder, kStatsFile, NodeKind::kStats);
  entries_ = std::move(in_use);
  return std::shared_ptr<const CatalogTree>(std::move(tree));
}

std::shared_ptr<CatalogEntry> Catalog::disk_view_for(
    const std::shared_ptr<CatalogEntry>& image,
    const std::unordered_map<std::string, std::shared_ptr<CatalogEntry>>& known) {
  if (image->layout.kind != formats::DiskLayoutKind::kPartition) return nullptr;
  if (auto it = known.find(entry_id(image->object) + kDiskViewSuffix);
      it != known.end() && it->second->disk_of == image) {
    return it->second;
  }
  auto plan = formats::plan_partitioned_disk(image->size, disk_options(*image));
  if (!plan.ok()) return nullptr;
  auto entry = std::make_shared<CatalogEntry>();
  entry->kind = NodeKind::kImage;
  entry->object = image->object;
  entry->disk_of = image;
  entry->layout = image->layout;
  entry->size = plan->disk_bytes;
  entry->counters.parent = &totals_;
  return entry;
}

std::shared_ptr<CatalogEntry> Catalog::raw_view_for(
    const remote::ObjectInfo& object, const std::string& path,
    const std::unordered_map<std::string, std::shared_ptr<CatalogEntry>>& known) {
  const std::string id = entry_id(object) + kRawViewSuffix;
  if (auto it = known.find(id); it != known.end()) return it->second;
  if (object.size < kMinimumProbeBytes) return nullptr;
  remote::ObjectSource file(opener_.store(), object, nullptr);
  auto format = formats::detect_disk_format(file);
  if (!format.ok()) {
    log_.error_once("cannot probe " + path + ": " + format.status().to_string());
    return nullptr;
  }
  if (*format == formats::DiskFormat::kRaw) return nullptr;
  // The view is opened now: its size is the virtual disk's, which only the format knows.
  auto entry = std::make_shared<CatalogEntry>();
  entry->kind = NodeKind::kImage;
  entry->object = object;
  entry->view_format = *format;
  if (*format == formats::DiskFormat::kVmdk) {
    auto names = formats::vmdk_extent_files(file);
    if (names.ok()) {
      for (const std::string& name : *names) {
        entry->extent_keys.push_back(key_folder(object.key) + name);
      }
    }
  }
  entry->counters.parent = &totals_;
  auto opened = opener_.open_disk_view(object, *format, &entry->counters);
  if (opened.ok()) {
    entry->size = opened->source->size();
    entry->source = opened->source;
    entry->cached = opened->cached;
  } else {
    entry->manifest_status = opened.status();
    entry->last_error = opened.status();
    log_.error("image " + path + kRawViewSuffix + ": " + opened.status().to_string());
  }
  return entry;
}

std::shared_ptr<const CatalogTree> Catalog::tree() {
  std::unique_lock lock(mutex_);
  if (list_ttl_seconds_ == 0 || listing_ ||
      std::time(nullptr) - listed_at_ < static_cast<time_t>(list_ttl_seconds_)) {
    return tree_;
  }
  listing_ = true;
  lock.unlock();
  auto next = list_and_build();
  lock.lock();
  listing_ = false;
  listed_at_ = std::time(nullptr);
  if (next.ok()) {
    tree_ = std::move(next).value();
  } else {
    log_.error("keeping the previous listing: " + next.status().to_string());
  }
  return tree_;
}

Result<std::shared_ptr<const BlockSource>> Catalog::open_source(CatalogEntry& entry,
                                                                const std::string& path) {
  std::unique_lock lock(entry.mutex);
  entry.opened.wait(lock, [&] { return !entry.opening; });
  if (entry.source) {
    std::shared_ptr<const BlockSource> source = entry.source;
    const formats::GzipSource* gzip = entry.gzip;
    lock.unlock();
    if (indexer_ && gzip != nullptr) indexer_->request(source, gzip, path);
    return source;
  }
  entry.opening = true;
  lock.unlock();

  Result<OpenedImage> opened = Status::InvalidArgument(path + " is not a file");
  if (entry.disk_of) {
    // The partition is the image's own chain (and cache); only the table is made here.
    auto image = open_source(*entry.disk_of, path);
    if (image.ok()) {
      auto disk = formats::open_partitioned_disk(std::make_unique<SharedSource>(*image),
                                                 disk_options(*entry.disk_of));
      if (disk.ok()) {
        opened = OpenedImage{std::shared_ptr<const BlockSource>(std::move(disk).value())};
      } else {
        opened = disk.status();
      }
    } else {
      opened = image.status();
    }
  } else if (entry.kind == NodeKind::kImage && entry.view_format != formats::DiskFormat::kRaw) {
    opened = opener_.open_disk_view(entry.object, entry.view_format, &entry.counters);
  } else if (entry.kind == NodeKind::kImage) {
    if (entry.manifest) {
      opened = opener_.open_manifest(entry.object, *entry.manifest, &entry.counters,
                                     entry.member_format);
    } else {
      opened = entry.manifest_status;
    }
  } else if (entry.kind == NodeKind::kObject) {
    opened = opener_.open_object(entry.object, &entry.counters);
  }

  lock.lock();
  entry.opening = false;
  entry.opened.notify_all();
  if (!opened.ok()) {
    entry.last_error = opened.status();
    log_.error_once("image " + path + ": cannot open: " + opened.status().to_string());
    return opened.status();
  }
  entry.source = opened->source;
  entry.gzip = opened->gzip;
  entry.cached = opened->cached;
  entry.last_error = Status::OK();
  lock.unlock();
  if (indexer_ && opened->gzip != nullptr) indexer_->request(opened->source, opened->gzip, path);
  return opened->source;
}

void Catalog::save_indexes() {
  const IndexStore* store = opener_.index_store();
  if (store == nullptr) return;
  std::vector<std::shared_ptr<CatalogEntry>> entries;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [id, entry] : entries_) entries.push_back(entry);
  }
  for (const auto& entry : entries) {
    std::vector<std::byte> bytes;
    {
      std::lock_guard lock(entry->mutex);
      const formats::GzipSource* gzip = entry->gzip;
      if (entry->index_saved || gzip == nullptr || !gzip->fully_indexed() ||
          gzip->used_initial_index()) {
        continue;
      }
      entry->index_saved = true;
      bytes = formats::serialize_gzip_index(gzip->snapshot_index());
    }
    if (Status s = store->save(index_id(entry->object), bytes); !s.ok()) {
      log_.error("gzip index of " + entry->object.key + ": " + s.to_string());
    }
    if (opener_.publishes_indexes()) {
      if (Status s = opener_.publish_index(entry->object, bytes); s.ok()) {
        log_.info("published the gzip index of " + entry->object.key);
      } else {
        log_.error("publishing the gzip index of " + entry->object.key + ": " + s.to_string());
      }
    }
  }
}

std::string Catalog::stats_json(const std::string& extra) const {
  std::shared_ptr<const CatalogTree> tree;
  {
    std::lock_guard lock(mutex_);
    tree = tree_;
  }
  std::string out = "{";
  append_counters(out, totals_);
  out += ",\"cache_bytes\":" +
         std::to_string(block_store_ != nullptr ? block_store_->bytes_used() : 0);
  if (!extra.empty()) out += "," + extra;
  out += ",\"images\":{";
  std::map<std::string, const CatalogNode*> by_path;
  for (const auto& [inode, node] : tree->nodes) {
    if (node.entry) by_path[node.path] = &node;
  }
  bool first = true;
  for (const auto& [path, node] : by_path) {
    CatalogEntry& entry = *node->entry;
    if (!first) out += ',';
    first = false;
    append_json_string(out, path);
    out += ":{";
    append_counters(out, entry.counters);
    out += ",\"size\":" + std::to_string(entry.size);
    out += ",\"kind\":";
    if (entry.kind == NodeKind::kObject) {
      out += "\"object\"";
    } else if (entry.view_format != formats::DiskFormat::kRaw) {
      out += "\"";
      out += formats::disk_format_name(entry.view_format);
      out += "\"";
    } else if (entry.manifest && std::holds_alternative<formats::ImportManifest>(*entry.manifest)) {
      out += "\"import\"";
    } else if (entry.manifest &&
               std::holds_alternative<formats::DownloadManifest>(*entry.manifest)) {
      out += "\"download\"";
    } else if (entry.disk_of) {
      out += "\"disk\"";
    } else {
      out += "\"bundle\"";
    }
    if (entry.layout.kind != formats::DiskLayoutKind::kUnknown) {
      out += ",\"layout\":\"";
      out += formats::disk_layout_kind_name(entry.layout.kind);
      out += "\",\"content\":";
      append_json_string(out, entry.layout.name);
    }
    if (entry.member_format != formats::DiskFormat::kRaw) {
      out += ",\"bundled_format\":\"";
      out += formats::disk_format_name(entry.member_format);
      out += "\"";
    }
    std::lock_guard lock(entry.mutex);
    out += ",\"state\":";
    out += entry.source ? "\"open\"" : (entry.last_error.ok() ? "\"closed\"" : "\"failed\"");
    if (!entry.last_error.ok()) {
      out += ",\"error\":";
      append_json_string(out, entry.last_error.to_string());
    }
    out += ",\"cache_bytes\":" +
           std::to_string(entry.cached != nullptr ? entry.cached->cached_bytes() : 0);
    if (entry.gzip != nullptr) {
      const uint64_t inflated = entry.gzip->inflated_bytes();
      const uint64_t total = entry.gzip->size();
      out += ",\"inflated_bytes\":" + std::to_string(inflated);
      out += ",\"checkpoints\":" + std::to_string(entry.gzip->checkpoint_count());
      out += ",\"indexed_percent\":" +
             std::to_string(entry.gzip->fully_indexed() || total == 0 ? 100
                                                                       : inflated * 100 / total);
      out += ",\"index_from_saved\":";
      out += entry.gzip->used_initial_index() ? "true" : "false";
      if (indexer_) {
        out += ",\"background_index\":\"";
        out += BackgroundIndexer::state_name(indexer_->state(entry.gzip));
        out += "\"";
      }
    }
    out += '}';
  }
  out += "}}\n";
  return out;
}

}  // namespace imgfs::fusefs
