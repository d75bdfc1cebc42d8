#include "remote/dir_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <optional>
#include <system_error>

#include "formats/byte_order.h"
#include "formats/checked_math.h"

namespace imgfs::remote {

namespace {

constexpr std::string_view kFileScheme = "file://";

// Deeper directories are skipped so a pathological tree cannot exhaust file descriptors
// (the walk holds one per level).
constexpr int kMaxListDepth = 64;

std::string errno_text(int error) {
  return std::error_code(error, std::generic_category()).message();
}

// FNV-1a 64: enough to make a short etag; a collision only matters if two versions of one
// file share dev, inode, size and nanosecond mtime hashes.
uint64_t fnv1a64(std::span<const std::byte> bytes) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (std::byte b : bytes) {
    hash ^= std::to_integer<uint64_t>(b);
    hash *= 0x100000001b3ull;
  }
  return hash;
}

// The etag changes whenever the file is replaced (dev, inode), resized or rewritten (mtime).
std::string etag_of(const struct stat& st) {
  std::array<std::byte, 40> fields;
  store_le64(fields.data(), static_cast<uint64_t>(st.st_dev));
  store_le64(fields.data() + 8, static_cast<uint64_t>(st.st_ino));
  store_le64(fields.data() + 16, static_cast<uint64_t>(st.st_size));
  store_le64(fields.data() + 24, static_cast<uint64_t>(st.st_mtim.tv_sec));
  store_le64(fields.data() + 32, static_cast<uint64_t>(st.st_mtim.tv_nsec));
  const uint64_t hash = fnv1a64(fields);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string text(16, '0');
  for (int i = 0; i < 16; ++i) text[15 - i] = kHex[(hash >> (4 * i)) & 0xf];
  return text;
}

// Keys are relative paths made of non-empty components other than "." and "..", so joining
// one to the root can never name anything outside it.
Status check_key(std::string_view key) {
  if (key.empty()) return Status::InvalidArgument("empty object key");
  if (key.find('\0') != std::string_view::npos) {
    return Status::InvalidArgument("object key contains NUL");
  }
  if (key.front() == '/') {
    return Status::InvalidArgument("object key " + std::string(key) + " starts with '/'");
  }
  size_t start = 0;
  while (start <= key.size()) {
    size_t end = key.find('/', start);
    if (end == std::string_view::npos) end = key.size();
    const std::string_view component = key.substr(start, end - start);
    if (component.empty() || component == "." || component == "..") {
      return Status::InvalidArgument("object key " + std::string(key) +
                                     " has an empty, '.' or '..' component");
    }
    start = end + 1;
  }
  return Status::OK();
}

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

struct WalkContext {
  std::string_view prefix;
  std::vector<ObjectInfo>* objects;
};

// Lists the directory open at `dir_fd` (which this takes over), whose entries get keys
// `key_prefix` + name. Unreadable entries are skipped.
void walk(int dir_fd, const std::string& key_prefix, int depth, const WalkContext& context) {
  DIR* dir = ::fdopendir(dir_fd);
  if (dir == nullptr) {
    ::close(dir_fd);
    return;
  }
  dir_fd = ::dirfd(dir);
  while (const struct dirent* entry = ::readdir(dir)) {
    const std::string_view name = entry->d_name;
    if (name == "." || name == "..") continue;
    const std::string key = key_prefix + std::string(name);
    struct stat st;
    if (::fstatat(dir_fd, entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      const std::string child_prefix = key + "/";
      // Descend only where keys could still start with the prefix.
      const bool relevant =
          child_prefix.starts_with(context.prefix) || context.prefix.starts_with(child_prefix);
      if (!relevant || depth + 1 >= kMaxListDepth) continue;
      const int child_fd =
          ::openat(dir_fd, entry->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (child_fd >= 0) walk(child_fd, child_prefix, depth + 1, context);
      continue;
    }
    if (!key.starts_with(context.prefix)) continue;
    // A symlink counts when it points at a regular file; symlinked directories are not walked.
    if (S_ISLNK(st.st_mode) && ::fstatat(dir_fd, entry->d_name, &st, 0) != 0) continue;
    if (!S_ISREG(st.st_mode)) continue;
    context.objects->push_back(ObjectInfo{key, static_cast<uint64_t>(st.st_size), etag_of(st)});
  }
  ::closedir(dir);
}

}  // namespace

Result<std::unique_ptr<DirStore>> DirStore::open(std::string root) {
  if (root.starts_with(kFileScheme)) {
    root.erase(0, kFileScheme.size());
    if (!root.starts_with("/")) {
      return Status::InvalidArgument("file:// root must be an absolute path: file://" + root);
    }
  }
  if (root.empty()) return Status::InvalidArgument("empty directory root");
  if (root.find('\0') != std::string::npos) {
    return Status::InvalidArgument("directory root contains NUL");
  }
  struct stat st;
  if (::stat(root.c_str(), &st) != 0) {
    const int error = errno;
    const std::string msg = "stat " + root + ": " + errno_text(error);
    return error == ENOENT ? Status::NotFound(msg) : Status::IOError(msg);
  }
  if (!S_ISDIR(st.st_mode)) return Status::InvalidArgument(root + " is not a directory");
  // Absolute, so a later chdir (a daemonizing FUSE process does one) cannot change its meaning.
  char* resolved = ::realpath(root.c_str(), nullptr);
  if (resolved == nullptr) {
    return Status::IOError("realpath " + root + ": " + errno_text(errno));
  }
  std::string absolute(resolved);
  std::free(resolved);
  return std::unique_ptr<DirStore>(new DirStore(std::move(absolute)));
}

Result<std::vector<ObjectInfo>> DirStore::list(std::string_view prefix) const {
  const int root_fd = ::open(root_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0) return Status::IOError("open " + root_ + ": " + errno_text(errno));
  std::vector<ObjectInfo> objects;
  walk(root_fd, "", 0, WalkContext{prefix, &objects});
  std::sort(objects.begin(), objects.end(),
            [](const ObjectInfo& a, const ObjectInfo& b) { return a.key < b.key; });
  return objects;
}

Result<ObjectInfo> DirStore::head(std::string_view key) const {
  if (Status s = check_key(key); !s.ok()) return s;
  const std::string path = root_ == "/" ? "/" + std::string(key) : root_ + "/" + std::string(key);
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int error = errno;
    const std::string msg = "stat " + path + ": " + errno_text(error);
    if (error == ENOENT || error == ENOTDIR) return Status::NotFound(msg);
    return Status::IOError(msg);
  }
  if (!S_ISREG(st.st_mode)) return Status::NotFound(path + " is not a regular file");
  return ObjectInfo{std::string(key), static_cast<uint64_t>(st.st_size), etag_of(st)};
}

Status DirStore::read_range(const ObjectInfo& object, uint64_t offset,
                            std::span<std::byte> out) const {
  if (Status s = check_key(object.key); !s.ok()) return s;
  const std::optional<uint64_t> end = checked_add(offset, out.size());
  if (!end || *end > object.size) {
    return Status::InvalidArgument("read of " + std::to_string(out.size()) + " bytes at " +
                                   std::to_string(offset) + " is past the size " +
                                   std::to_string(object.size) + " of " + object.key);
  }
  const std::string path = root_ == "/" ? "/" + object.key : root_ + "/" + object.key;
  const FdCloser file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) {
    const int error = errno;
    // A file that vanished after head is a changed object, not a missing one.
    if (error == ENOENT || error == ENOTDIR) {
      return Status::IOError("object " + object.key + " changed since it was opened (ETag " +
                             object.etag + ", now deleted)");
    }
    return Status::IOError("open " + path + ": " + errno_text(error));
  }
  struct stat st;
  if (::fstat(file.fd, &st) != 0) {
    return Status::IOError("fstat " + path + ": " + errno_text(errno));
  }
  const std::string etag = etag_of(st);
  if (etag != object.etag || !S_ISREG(st.st_mode)) {
    return Status::IOError("object " + object.key + " changed since it was opened (ETag " +
                           object.etag + ", now " + etag + ")");
  }
  size_t done = 0;
  while (done < out.size()) {
    const size_t want = std::min<size_t>(out.size() - done, SSIZE_MAX);
    const ssize_t n = ::pread(file.fd, out.data() + done, want, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::IOError("pread " + path + " at " + std::to_string(offset + done) + ": " +
                             errno_text(errno));
    }
    if (n == 0) {
      return Status::IOError("short read of " + path + ": got " + std::to_string(done) + " of " +
                             std::to_string(out.size()) + " bytes at " + std::to_string(offset));
    }
    done += static_cast<size_t>(n);
  }
  return Status::OK();
}

Status DirStore::put(const std::string& key, std::span<const std::byte> bytes) const {
  if (Status s = check_key(key); !s.ok()) return s;
  FdCloser dir{::open(root_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dir.fd < 0) return Status::IOError("open " + root_ + ": " + errno_text(errno));
  const std::string path = root_ == "/" ? "/" + key : root_ + "/" + key;
  // Down the key's folders one at a time, never through a symlink: a link inside root must not
  // let a write land outside it.
  size_t start = 0;
  for (size_t slash = key.find('/'); slash != std::string::npos; slash = key.find('/', start)) {
    const std::string component = key.substr(start, slash - start);
    constexpr int kFlags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
    int child = ::openat(dir.fd, component.c_str(), kFlags);
    if (child < 0 && errno == ENOENT) {
      if (::mkdirat(dir.fd, component.c_str(), 0755) != 0 && errno != EEXIST) {
        return Status::IOError("mkdir " + path.substr(0, path.size() - key.size() + slash) + ": " +
                               errno_text(errno));
      }
      child = ::openat(dir.fd, component.c_str(), kFlags);
    }
    if (child < 0) {
      const int error = errno;
      const std::string folder = path.substr(0, path.size() - key.size() + slash);
      if (error == ENOTDIR || error == ELOOP) {
        return Status::IOError("cannot store " + key + ": " + folder +
                               " is not a folder (or is a symlink)");
      }
      return Status::IOError("open " + folder + ": " + errno_text(error));
    }
    ::close(dir.fd);
    dir.fd = child;
    start = slash + 1;
  }
  const std::string name = key.substr(start);

  // A short temp name (a long key's name plus a suffix could pass NAME_MAX), in the object's own
  // folder so that the rename stays on one file system.
  std::string temp;
  FdCloser file{-1};
  for (int attempt = 0; attempt < 100 && file.fd < 0; ++attempt) {
    temp = ".imgfs-put." + std::to_string(::getpid()) + "." +
           std::to_string(next_temp_.fetch_add(1, std::memory_order_relaxed));
    file.fd =
        ::openat(dir.fd, temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (file.fd < 0 && errno != EEXIST) {
      return Status::IOError("create a temp file beside " + path + ": " + errno_text(errno));
    }
  }
  if (file.fd < 0) return Status::IOError("no free temp file name beside " + path);
  auto fail = [&](const std::string& what, int error) {
    ::unlinkat(dir.fd, temp.c_str(), 0);
    return Status::IOError(what + " " + path + ": " + errno_text(error));
  };
  // Exactly 0644 whatever the umask: other readers of the folder (a web server) need it.
  if (::fchmod(file.fd, 0644) != 0) return fail("chmod the temp file of", errno);
  size_t done = 0;
  while (done < bytes.size()) {
    const size_t want = std::min<size_t>(bytes.size() - done, SSIZE_MAX);
    const ssize_t n = ::write(file.fd, bytes.data() + done, want);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail("write the temp file of", errno);
    done += static_cast<size_t>(n);
  }
  // The data must be on disk before the rename publishes it, or a crash could leave an empty
  // or partial file under the final name.
  if (::fsync(file.fd) != 0) return fail("fsync the temp file of", errno);
  if (::renameat(dir.fd, temp.c_str(), dir.fd, name.c_str()) != 0) {
    return fail("rename a temp file to", errno);
  }
  if (::fsync(dir.fd) != 0) {
    return Status::IOError("fsync the folder of " + path + ": " + errno_text(errno));
  }
  return Status::OK();
}

std::string DirStore::describe() const { return "dir:" + root_; }

}  // namespace imgfs::remote
