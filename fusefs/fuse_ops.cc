#include "fusefs/fuse_ops.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <vector>

#include "formats/extent_seek.h"
#include "fusefs/errno_map.h"

namespace imgfs::fusefs {

namespace {

struct FileHandle {
  std::shared_ptr<CatalogEntry> entry;        // images and objects; null for stats.json
  std::string path;
  std::shared_ptr<const BlockSource> source;  // null when the chain failed to open
  std::string snapshot;                       // stats.json, taken at open
};

FuseContext& context(fuse_req_t req) { return *static_cast<FuseContext*>(fuse_req_userdata(req)); }

struct stat attributes_of(const CatalogNode& node, time_t when) {
  struct stat st {};
  st.st_atime = st.st_mtime = st.st_ctime = when;
  st.st_ino = node.inode;
  st.st_uid = getuid();
  st.st_gid = getgid();
  st.st_blksize = 4096;
  if (node.kind == NodeKind::kDirectory) {
    st.st_mode = S_IFDIR | 0555;
    st.st_nlink = 2;
  } else {
    st.st_mode = S_IFREG | 0444;
    st.st_nlink = 1;
    st.st_size = static_cast<off_t>(node.size);
    st.st_blocks = static_cast<blkcnt_t>((node.size + 511) / 512);
  }
  return st;
}

// Runs `body`; an escaping exception is logged and answered with EIO.
template <typename Body>
void guarded(fuse_req_t req, const char* op, Body&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    context(req).log.error(std::string(op) + ": unexpected exception: " + e.what());
    fuse_reply_err(req, EIO);
  } catch (...) {
    context(req).log.error(std::string(op) + ": unexpected exception");
    fuse_reply_err(req, EIO);
  }
}

// Large requests: libfuse derives max_pages from max_write (1 MiB = 256 pages), which lets
// direct_io readers send 1 MiB reads; the page cache's readahead is raised per mount (bdi).
constexpr unsigned kMaxRequestBytes = 1u << 20;

void op_init(void* userdata, fuse_conn_info* conn) {
  conn->max_write = kMaxRequestBytes;
  conn->max_readahead = kMaxRequestBytes;
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  guarded(req, "lookup", [&] {
    Catalog& catalog = context(req).catalog;
    auto tree = catalog.tree();
    const CatalogNode* node = tree->child(parent, name);
    if (node == nullptr) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    fuse_entry_param entry{};
    entry.ino = node->inode;
    entry.attr = attributes_of(*node, catalog.built_at());
    entry.attr_timeout = catalog.attr_timeout_seconds();
    entry.entry_timeout = catalog.attr_timeout_seconds();
    fuse_reply_entry(req, &entry);
  });
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  guarded(req, "getattr", [&] {
    Catalog& catalog = context(req).catalog;
    auto tree = catalog.tree();
    const CatalogNode* node = tree->node(ino);
    if (node == nullptr) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    struct stat st = attributes_of(*node, catalog.built_at());
    // stats.json changes all the time: never let the kernel keep its attributes.
    fuse_reply_attr(req, &st,
                    node->kind == NodeKind::kStats ? 0.0 : catalog.attr_timeout_seconds());
  });
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, fuse_file_info*) {
  guarded(req, "readdir", [&] {
    Catalog& catalog = context(req).catalog;
    auto tree = catalog.tree();
    const CatalogNode* folder = tree->node(ino);
    if (folder == nullptr || folder->kind != NodeKind::kDirectory) {
      fuse_reply_err(req, folder == nullptr ? ENOENT : ENOTDIR);
      return;
    }
    // Entry i of ".", "..", then the children in name order; `offset` is the next index.
    std::vector<char> buffer(size);
    size_t used = 0;
    off_t index = 0;
    auto add = [&](const char* name, const CatalogNode& node) -> bool {
      if (index++ < offset) return true;
      struct stat st = attributes_of(node, catalog.built_at());
      const size_t need = fuse_add_direntry(req, buffer.data() + used, size - used, name, &st, index);
      if (need > size - used) return false;
      used += need;
      return true;
    };
    const CatalogNode* up = tree->node(folder->parent);
    bool room = add(".", *folder) && add("..", up != nullptr ? *up : *folder);
    for (auto it = folder->children.begin(); room && it != folder->children.end(); ++it) {
      room = add(it->first.c_str(), *tree->node(it->second));
    }
    fuse_reply_buf(req, buffer.data(), used);
  });
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  guarded(req, "open", [&] {
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC) != 0) {
      fuse_reply_err(req, EROFS);
      return;
    }
    FuseContext& ctx = context(req);
    auto tree = ctx.catalog.tree();
    const CatalogNode* node = tree->node(ino);
    if (node == nullptr) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    if (node->kind == NodeKind::kDirectory) {
      fuse_reply_err(req, EISDIR);
      return;
    }
    auto handle = std::make_unique<FileHandle>();
    handle->path = node->path;
    if (node->kind == NodeKind::kStats) {
      handle->snapshot = ctx.catalog.stats_json(ctx.stats_extra ? ctx.stats_extra() : "");
      fi->direct_io = 1;
    } else {
      handle->entry = node->entry;
      // A chain that cannot open still opens as a file; its reads answer EIO (logged once).
      // direct_io sends those reads to us even when the size is unknown (0).
      auto source = ctx.catalog.open_source(*handle->entry, handle->path);
      if (source.ok()) {
        handle->source = std::move(source).value();
        fi->keep_cache = 1;  // images are immutable while mounted
        // A hypervisor that opens with O_DIRECT gets direct I/O: no double caching.
        if ((fi->flags & O_DIRECT) != 0) fi->direct_io = 1;
      } else {
        fi->direct_io = 1;
      }
    }
    fi->fh = reinterpret_cast<uint64_t>(handle.release());
    if (fuse_reply_open(req, fi) != 0) delete reinterpret_cast<FileHandle*>(fi->fh);
  });
}

void op_read(fuse_req_t req, fuse_ino_t, size_t size, off_t offset, fuse_file_info* fi) {
  guarded(req, "read", [&] {
    auto* handle = reinterpret_cast<FileHandle*>(fi->fh);
    if (offset < 0) {
      fuse_reply_err(req, EINVAL);
      return;
    }
    const uint64_t start = static_cast<uint64_t>(offset);
    if (!handle->entry) {
      const std::string& text = handle->snapshot;
      const size_t from = start < text.size() ? start : text.size();
      const size_t length = std::min(size, text.size() - from);
      fuse_reply_buf(req, text.data() + from, length);
      return;
    }
    FuseContext& ctx = context(req);
    std::shared_ptr<const BlockSource> chain = handle->source;
    if (!chain) {
      // Opening failed at open(): try again, the cause may have been transient.
      auto reopened = ctx.catalog.open_source(*handle->entry, handle->path);
      if (!reopened.ok()) {
        fuse_reply_err(req, errno_for_read(reopened.status()));
        return;
      }
      chain = std::move(reopened).value();
    }
    const BlockSource& source = *chain;
    const uint64_t end = std::min<uint64_t>(source.size(), start + size);
    if (start >= end) {
      fuse_reply_buf(req, nullptr, 0);
      return;
    }
    thread_local std::vector<std::byte> buffer;
    buffer.resize(end - start);
    Status s = source.read_at(start, std::span(buffer.data(), end - start));
    if (!s.ok()) {
      ctx.log.error_once(handle->path + ": read " + std::to_string(end - start) +
                         " bytes at " + std::to_string(start) + " via " + source.describe() +
                         ": " + s.to_string());
      fuse_reply_err(req, errno_for_read(s));
      return;
    }
    handle->entry->counters.add(IoCounters::kBytesServed, end - start);
    fuse_reply_buf(req, reinterpret_cast<const char*>(buffer.data()), end - start);
  });
}

// SEEK_DATA and SEEK_HOLE (the kernel answers the other whences itself), from the format's
// allocation map: sparse-aware copiers skip holes without reading them.
void op_lseek(fuse_req_t req, fuse_ino_t, off_t offset, int whence, fuse_file_info* fi) {
  guarded(req, "lseek", [&] {
    auto* handle = reinterpret_cast<FileHandle*>(fi->fh);
    if ((whence != SEEK_DATA && whence != SEEK_HOLE) || offset < 0) {
      fuse_reply_err(req, EINVAL);
      return;
    }
    if (!handle->entry) {
      // stats.json: all data.
      const uint64_t size = handle->snapshot.size();
      if (static_cast<uint64_t>(offset) >= size) {
        fuse_reply_err(req, ENXIO);
      } else {
        fuse_reply_lseek(req, whence == SEEK_DATA ? offset : static_cast<off_t>(size));
      }
      return;
    }
    if (!handle->source) {
      fuse_reply_err(req, EIO);  // the chain failed to open; its reads answer EIO too
      return;
    }
    auto found = formats::seek_extent(
        *handle->source, static_cast<uint64_t>(offset),
        whence == SEEK_DATA ? formats::SeekTarget::kData : formats::SeekTarget::kHole);
    if (!found.ok()) {
      if (found.status().code() == StatusCode::kNotFound) {
        fuse_reply_err(req, ENXIO);
        return;
      }
      context(req).log.error_once(handle->path + ": seek: " + found.status().to_string());
      fuse_reply_err(req, errno_for_read(found.status()));
      return;
    }
    fuse_reply_lseek(req, static_cast<off_t>(*found));
  });
}

void op_release(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  auto* handle = reinterpret_cast<FileHandle*>(fi->fh);
  const bool was_image = handle->entry && handle->entry->kind == NodeKind::kImage;
  delete handle;
  // A reader that went to the end has built a whole gzip index: keep it for the next mount.
  if (was_image) {
    try {
      context(req).catalog.save_indexes();
    } catch (const std::exception& e) {
      context(req).log.error(std::string("saving gzip indexes: ") + e.what());
    }
  }
  fuse_reply_err(req, 0);
}

void op_statfs(fuse_req_t req, fuse_ino_t) {
  struct statvfs st {};
  st.f_bsize = 4096;
  st.f_frsize = 4096;
  st.f_namemax = 1024;
  st.f_flag = ST_RDONLY;
  fuse_reply_statfs(req, &st);
}

void reply_erofs(fuse_req_t req) { fuse_reply_err(req, EROFS); }

}  // namespace

const fuse_lowlevel_ops& imgfs_fuse_operations() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops o{};
    o.init = op_init;
    o.lookup = op_lookup;
    o.getattr = op_getattr;
    o.readdir = op_readdir;
    o.open = op_open;
    o.read = op_read;
    o.release = op_release;
    o.lseek = op_lseek;
    o.statfs = op_statfs;
    o.setattr = [](fuse_req_t req, fuse_ino_t, struct stat*, int, fuse_file_info*) {
      reply_erofs(req);
    };
    o.mknod = [](fuse_req_t req, fuse_ino_t, const char*, mode_t, dev_t) { reply_erofs(req); };
    o.mkdir = [](fuse_req_t req, fuse_ino_t, const char*, mode_t) { reply_erofs(req); };
    o.unlink = [](fuse_req_t req, fuse_ino_t, const char*) { reply_erofs(req); };
    o.rmdir = [](fuse_req_t req, fuse_ino_t, const char*) { reply_erofs(req); };
    o.symlink = [](fuse_req_t req, const char*, fuse_ino_t, const char*) { reply_erofs(req); };
    o.rename = [](fuse_req_t req, fuse_ino_t, const char*, fuse_ino_t, const char*,
                  unsigned int) { reply_erofs(req); };
    o.link = [](fuse_req_t req, fuse_ino_t, fuse_ino_t, const char*) { reply_erofs(req); };
    o.write = [](fuse_req_t req, fuse_ino_t, const char*, size_t, off_t, fuse_file_info*) {
      reply_erofs(req);
    };
    o.create = [](fuse_req_t req, fuse_ino_t, const char*, mode_t, fuse_file_info*) {
      reply_erofs(req);
    };
    o.setxattr = [](fuse_req_t req, fuse_ino_t, const char*, const char*, size_t, int) {
      reply_erofs(req);
    };
    o.removexattr = [](fuse_req_t req, fuse_ino_t, const char*) { reply_erofs(req); };
    o.fallocate = [](fuse_req_t req, fuse_ino_t, int, off_t, off_t, fuse_file_info*) {
      reply_erofs(req);
    };
    return o;
  }();
  return ops;
}

}  // namespace imgfs::fusefs
