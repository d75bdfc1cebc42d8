#include "fusefs/mount_command.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "cache/block_store.h"
#include "cache/prefetch_source.h"
#include "formats/bundle_keys.h"
#include "formats/verified_part_source.h"
#include "fusefs/catalog.h"
#include "fusefs/fuse_ops.h"
#include "fusefs/image_opener.h"
#include "fusefs/logger.h"
#include "fusefs/mount_options.h"
#include "fusefs/store_factory.h"

namespace imgfs::fusefs {

namespace {

int fail(const std::string& message, int code = 1) {
  std::cerr << "imgfs mount: " << message << "\n";
  return code;
}

// Holds an exclusive lock on the cache directory for the life of the mount, so two mounts
// never evict each other's blocks. Returns the locked fd, or -1 with `error` set.
int lock_cache_dir(const std::string& dir, std::string& error) {
  const std::string path = dir + "/lock";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    error = "cannot open " + path + ": " + std::strerror(errno);
    return -1;
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    error = "cache directory " + dir + " is in use by another imgfs mount";
    ::close(fd);
    return -1;
  }
  return fd;
}

// The "major:minor" of the filesystem mounted last on `mountpoint`, from /proc/self/mountinfo.
// (A stat() of the mount point would wait for this very process to answer FUSE requests.)
std::string mounted_device(const std::string& mountpoint) {
  std::string escaped;
  for (char c : mountpoint) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\\') {
      char octal[8];
      std::snprintf(octal, sizeof octal, "\\%03o", static_cast<unsigned char>(c));
      escaped += octal;
    } else {
      escaped += c;
    }
  }
  std::ifstream mountinfo("/proc/self/mountinfo");
  std::string line;
  std::string device;
  while (std::getline(mountinfo, line)) {
    std::istringstream fields(line);
    std::string id, parent, dev, root, point;
    if (fields >> id >> parent >> dev >> root >> point && point == escaped) device = dev;
  }
  return device;
}

// Raises the mount's readahead (its bdi's read_ahead_kb): the kernel's default of 128 KiB
// caps page-cache reads of a FUSE file at 128 KiB requests, and `init` cannot raise it.
// Only root may write it; a failure is logged and the mount goes on.
void raise_readahead(const std::string& mountpoint, uint32_t kib, Logger& log) {
  const std::string device = mounted_device(mountpoint);
  if (device.empty()) return;
  const std::string path = "/sys/class/bdi/" + device + "/read_ahead_kb";
  FILE* file = std::fopen(path.c_str(), "w");
  if (file == nullptr || std::fprintf(file, "%u\n", kib) < 0 || std::fclose(file) != 0) {
    log.info("could not raise readahead (" + path + "): " + std::strerror(errno));
    return;
  }
  log.info("readahead of " + mountpoint + " set to " + std::to_string(kib) + " KiB");
}

std::string absolute_path(const std::string& path) {
  std::error_code ec;
  auto absolute = std::filesystem::absolute(path, ec);
  return ec ? path : absolute.lexically_normal().string();
}

}  // namespace

int run_mount_command(const std::vector<std::string>& args) {
  auto parsed = parse_mount_options(args);
  if (!parsed.ok()) return fail(parsed.status().message(), 2);
  MountOptions options = std::move(parsed).value();

  Logger log;
  if (options.log_file && !log.open_file(absolute_path(*options.log_file))) {
    return fail("cannot open log file " + *options.log_file + ": " + std::strerror(errno));
  }

  std::vector<formats::PrivateKey> keys;
  for (const std::string& path : options.key_paths) {
    auto key = formats::PrivateKey::load_file(path);
    if (!key.ok()) return fail(key.status().message());
    keys.push_back(std::move(key).value());
  }
  std::optional<formats::Certificate> verify_cert;
  if (options.verify_cert) {
    auto cert = formats::Certificate::load_file(*options.verify_cert);
    if (!cert.ok()) return fail(cert.status().message());
    verify_cert = std::move(cert).value();
  }

  std::optional<formats::PrivateKey> index_signer;
  if (options.publish_index_key) {
    auto key = formats::PrivateKey::load_file(*options.publish_index_key);
    if (!key.ok()) return fail(key.status().message());
    index_signer = std::move(key).value();
  }
  std::vector<formats::Certificate> index_certs;
  for (const std::string& path : options.index_cert_paths) {
    auto cert = formats::Certificate::load_file(path);
    if (!cert.ok()) return fail(cert.status().message());
    index_certs.push_back(std::move(cert).value());
  }
  cache::PrefetchOptions prefetch;
  prefetch.max_window = options.prefetch_window_bytes;
  // Four fetches in flight hide a remote store's latency; spans decode on both cores anyway.
  prefetch.threads = 4;
  // No read-ahead until the mount has forked (see MemoryBudget::set_limit).
  cache::MemoryBudget prefetch_budget(0);

  auto store = open_store(options);
  if (!store.ok()) return fail(store.status().to_string());
  if (options.insecure) log.error("--insecure: TLS certificates of the store are not verified");

  std::error_code ec;
  const std::string cache_dir = absolute_path(options.cache_dir);
  std::filesystem::create_directories(cache_dir, ec);
  if (ec) return fail("cannot create cache directory " + cache_dir + ": " + ec.message());
  ::chmod(cache_dir.c_str(), 0700);
  std::string lock_error;
  const int lock_fd = lock_cache_dir(cache_dir, lock_error);
  if (lock_fd < 0) return fail(lock_error);
  auto block_store = cache::BlockStore::open(cache_dir, options.cache_size_bytes, nullptr);
  if (!block_store.ok()) return fail(block_store.status().to_string());

  auto index_store = IndexStore::open(cache_dir + "/index");
  if (!index_store.ok()) return fail(index_store.status().to_string());
  // One --memory-limit, in three shares: verified parts, inflated spans, read-ahead.
  formats::VerifiedPartPool part_pool(options.part_memory_bytes);
  formats::GzipSpanPool span_pool(options.span_memory_bytes);
  const uint64_t read_ahead_bytes =
      options.memory_limit_bytes - options.part_memory_bytes - options.span_memory_bytes;
  ImageOpenerConfig config;
  for (const formats::PrivateKey& key : keys) config.keys.push_back(&key);
  config.verify_cert = verify_cert ? &*verify_cert : nullptr;
  config.part_pool = &part_pool;
  config.span_pool = &span_pool;
  config.block_store = block_store->get();
  config.index_store = index_store->get();
  config.cache_block_bytes = options.cache_block_bytes;
  config.index_signer = index_signer ? &*index_signer : nullptr;
  for (const formats::Certificate& cert : index_certs) config.index_trusted.push_back(&cert);
  if (options.prefetch) {
    config.prefetch_budget = &prefetch_budget;
    config.prefetch = prefetch;
  }
  ImageOpener opener(*store->store, config);

  auto catalog = Catalog::build(opener, store->prefix, log, block_store->get(),
                                options.list_ttl_seconds, options.background_index);
  if (!catalog.ok()) return fail(catalog.status().to_string());

  auto memory_stats = [&]() {
    return "\"memory\":{\"limit\":" + std::to_string(options.memory_limit_bytes) +
           ",\"parts\":" + std::to_string(part_pool.resident_bytes()) +
           ",\"spans\":" + std::to_string(span_pool.resident_bytes()) +
           ",\"read_ahead\":" + std::to_string(prefetch_budget.in_use()) + "}";
  };
  FuseContext context{**catalog, log, [&, store_stats = store->stats]() {
                        const std::string store_part = store_stats ? store_stats() : "";
                        return (store_part.empty() ? "" : store_part + ",") + memory_stats();
                      }};
  std::vector<std::string> fuse_argv = {"imgfs", "-o",
                                        "ro,default_permissions,fsname=imgfs,subtype=imgfs"};
  if (options.allow_other) fuse_argv.insert(fuse_argv.end(), {"-o", "allow_other"});
  if (options.debug) fuse_argv.push_back("-d");
  std::vector<char*> argv;
  for (std::string& arg : fuse_argv) argv.push_back(arg.data());
  fuse_args fargs = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  const fuse_lowlevel_ops& ops = imgfs_fuse_operations();
  fuse_session* session = fuse_session_new(&fargs, &ops, sizeof ops, &context);
  if (session == nullptr) return fail("cannot create the FUSE session");
  if (fuse_set_signal_handlers(session) != 0) {
    fuse_session_destroy(session);
    return fail("cannot set signal handlers");
  }
  if (fuse_session_mount(session, options.mountpoint.c_str()) != 0) {
    fuse_remove_signal_handlers(session);
    fuse_session_destroy(session);
    return fail("cannot mount on " + options.mountpoint);
  }
  raise_readahead(absolute_path(options.mountpoint), options.readahead_kib, log);
  log.info("mounted " + store->store->describe() + " on " + options.mountpoint +
           (store->credential_source.empty() ? "" : " (keys from " + store->credential_source + ")"));
  // The launching process exits 0 here, once the mount is ready; the child serves.
  fuse_daemonize(options.foreground ? 1 : 0);
  if (!options.foreground) log.use_syslog();
  prefetch_budget.set_limit(read_ahead_bytes);

  fuse_loop_config* loop_config = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(loop_config, 0);
  fuse_loop_cfg_set_max_threads(loop_config, 16);
  const int loop_result = fuse_session_loop_mt(session, loop_config);
  fuse_loop_cfg_destroy(loop_config);
  (*catalog)->save_indexes();
  fuse_session_unmount(session);
  fuse_remove_signal_handlers(session);
  fuse_session_destroy(session);
  ::close(lock_fd);
  log.info("unmounted " + options.mountpoint);
  return loop_result == 0 ? 0 : 1;
}

}  // namespace imgfs::fusefs
