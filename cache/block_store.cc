#include "cache/block_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <optional>
#include <string_view>
#include <system_error>
#include <vector>

#include "cache/crc32c.h"
#include "formats/byte_order.h"
#include "formats/checked_math.h"

namespace imgfs::cache {

namespace {

// Header layout, little-endian:
//   0  magic "IMGFSBLK"          8
//   8  version                   4
//  12  crc32c of the data        4
//  16  data length               8
//  24  block index               8
//  32  source_id length n        4, then n bytes
//      etag length m             4, then m bytes
//      crc32c of all the above   4
// then the data.
constexpr std::array<char, 8> kMagic = {'I', 'M', 'G', 'F', 'S', 'B', 'L', 'K'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kFixedHeaderBytes = 32 + 4 + 4 + 4;
constexpr std::string_view kBlocksSubdir = "blocks";
constexpr std::string_view kTempPrefix = ".tmp-";
constexpr time_t kTouchSeconds = 60;

std::string errno_text(int error) {
  return std::error_code(error, std::generic_category()).message();
}

uint64_t header_bytes(const BlockKey& key) {
  return kFixedHeaderBytes + key.source_id.size() + key.etag.size();
}

std::span<const std::byte> as_bytes(std::string_view text) {
  return std::as_bytes(std::span<const char>(text.data(), text.size()));
}

std::vector<std::byte> encode_header(const BlockKey& key, uint64_t data_bytes, uint32_t data_crc) {
  std::vector<std::byte> header(header_bytes(key));
  std::byte* p = header.data();
  std::memcpy(p, kMagic.data(), kMagic.size());
  store_le32(p + 8, kVersion);
  store_le32(p + 12, data_crc);
  store_le64(p + 16, data_bytes);
  store_le64(p + 24, key.index);
  p += 32;
  for (const std::string* text : {&key.source_id, &key.etag}) {
    store_le32(p, static_cast<uint32_t>(text->size()));
    if (!text->empty()) std::memcpy(p + 4, text->data(), text->size());
    p += 4 + text->size();
  }
  store_le32(p, crc32c(std::span<const std::byte>(header.data(), p - header.data())));
  return header;
}

// The data crc of `header` when it is a well-formed header for exactly `key` and `data_bytes`;
// nullopt otherwise. Pure: no I/O.
std::optional<uint32_t> check_header(std::span<const std::byte> header, const BlockKey& key,
                                     uint64_t data_bytes) {
  if (header.size() != header_bytes(key)) return std::nullopt;
  const std::byte* p = header.data();
  const size_t body_bytes = header.size() - 4;
  if (load_le32(p + body_bytes) != crc32c(header.first(body_bytes))) return std::nullopt;
  if (std::memcmp(p, kMagic.data(), kMagic.size()) != 0) return std::nullopt;
  if (load_le32(p + 8) != kVersion) return std::nullopt;
  if (load_le64(p + 16) != data_bytes || load_le64(p + 24) != key.index) return std::nullopt;
  size_t at = 32;
  for (const std::string* text : {&key.source_id, &key.etag}) {
    if (load_le32(p + at) != text->size()) return std::nullopt;
    at += 4;
    if (!std::equal(as_bytes(*text).begin(), as_bytes(*text).end(), p + at)) {
      return std::nullopt;
    }
    at += text->size();
  }
  return load_le32(p + 12);
}

// FNV-1a 64 over length-prefixed fields: a short, stable file name "<hash>-<index>". Two keys
// whose names collide share one file; the header check then turns the loser into a miss.
std::string file_name_prefix(const std::string& source_id, const std::string& etag) {
  uint64_t hash = 0xcbf29ce484222325ull;
  auto mix = [&hash](std::span<const std::byte> bytes) {
    for (std::byte b : bytes) {
      hash ^= std::to_integer<uint64_t>(b);
      hash *= 0x100000001b3ull;
    }
  };
  for (const std::string* text : {&source_id, &etag}) {
    std::array<std::byte, 8> length;
    store_le64(length.data(), text->size());
    mix(length);
    mix(as_bytes(*text));
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string name(16, '0');
  for (int i = 0; i < 16; ++i) name[15 - i] = kHex[(hash >> (4 * i)) & 0xf];
  return name + "-";
}

std::string file_name(const BlockKey& key) {
  return file_name_prefix(key.source_id, key.etag) + std::to_string(key.index);
}

// Block file names: "<16 hex>-<digits>", as file_name() makes them.
bool is_block_name(std::string_view name) {
  if (name.size() < 18 || name[16] != '-') return false;
  const auto is_hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); };
  const auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
  return std::all_of(name.begin(), name.begin() + 16, is_hex) &&
         std::all_of(name.begin() + 17, name.end(), is_digit);
}

// mkdir -p with mode 0700 for every folder it creates, then tightens `path` itself to 0700:
// cached blocks are decrypted image data.
Status make_private_dir(const std::string& path) {
  for (size_t slash = path.find('/', 1);; slash = path.find('/', slash + 1)) {
    const std::string prefix = path.substr(0, slash);
    if (!prefix.empty() && ::mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) {
      return Status::IOError("mkdir " + prefix + ": " + errno_text(errno));
    }
    if (slash == std::string::npos) break;
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return Status::IOError("stat " + path + ": " + errno_text(errno));
  }
  if (!S_ISDIR(st.st_mode)) return Status::InvalidArgument(path + " is not a directory");
  if ((st.st_mode & 077) != 0 && ::chmod(path.c_str(), 0700) != 0) {
    return Status::IOError("chmod 0700 " + path + ": " + errno_text(errno));
  }
  return Status::OK();
}

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

bool pread_full(int fd, std::span<std::byte> out, uint64_t offset) {
  size_t done = 0;
  while (done < out.size()) {
    const size_t want = std::min<size_t>(out.size() - done, SSIZE_MAX);
    const ssize_t n = ::pread(fd, out.data() + done, want, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// A block file's header and data, in one system call when the kernel gives it all at once
// (regular files do), else piece by piece.
bool read_header_and_data(int fd, std::span<std::byte> header, std::span<std::byte> data) {
  struct iovec parts[2] = {{header.data(), header.size()}, {data.data(), data.size()}};
  const ssize_t n = ::preadv(fd, parts, 2, 0);
  if (n >= 0 && static_cast<size_t>(n) == header.size() + data.size()) return true;
  return pread_full(fd, header, 0) && pread_full(fd, data, header.size());
}

Status write_full(int fd, std::span<const std::byte> data, const std::string& path) {
  size_t done = 0;
  while (done < data.size()) {
    const size_t want = std::min<size_t>(data.size() - done, SSIZE_MAX);
    const ssize_t n = ::write(fd, data.data() + done, want);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::IOError("write " + path + ": " + errno_text(errno));
    if (n == 0) return Status::IOError("write " + path + ": no progress");
    done += static_cast<size_t>(n);
  }
  return Status::OK();
}

}  // namespace

Result<std::unique_ptr<BlockStore>> BlockStore::open(std::string dir, uint64_t capacity_bytes,
                                                     IoCounters* mount_counters) {
  if (dir.empty()) return Status::InvalidArgument("empty cache directory");
  if (dir.find('\0') != std::string::npos) {
    return Status::InvalidArgument("cache directory contains NUL");
  }
  if (capacity_bytes == 0) return Status::InvalidArgument("cache capacity must be > 0 bytes");
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (Status s = make_private_dir(dir); !s.ok()) return s;
  // Absolute, so a later chdir (a daemonizing FUSE process does one) cannot move the cache.
  char* resolved = ::realpath(dir.c_str(), nullptr);
  if (resolved == nullptr) return Status::IOError("realpath " + dir + ": " + errno_text(errno));
  dir = resolved;
  std::free(resolved);
  std::string blocks_dir = (dir == "/" ? "" : dir) + "/" + std::string(kBlocksSubdir);
  if (Status s = make_private_dir(blocks_dir); !s.ok()) return s;
  std::unique_ptr<BlockStore> store(new BlockStore(std::move(blocks_dir), capacity_bytes));
  if (Status s = store->load_index(); !s.ok()) return s;
  return store;
}

Status BlockStore::load_index() {
  struct Found {
    struct timespec mtime;
    std::string name;
    uint64_t bytes;
  };
  std::vector<Found> found;
  DIR* listing = ::opendir(blocks_dir_.c_str());
  if (listing == nullptr) {
    return Status::IOError("opendir " + blocks_dir_ + ": " + errno_text(errno));
  }
  const int dir_fd = ::dirfd(listing);
  Status status;
  for (;;) {
    errno = 0;  // readdir reports its errors only through errno
    const struct dirent* entry = ::readdir(listing);
    if (entry == nullptr) {
      if (errno != 0) status = Status::IOError("readdir " + blocks_dir_ + ": " + errno_text(errno));
      break;
    }
    const std::string_view name = entry->d_name;
    if (name.starts_with(kTempPrefix)) {
      // A put cut short by a crash: its block was never renamed into place.
      if (::unlinkat(dir_fd, entry->d_name, 0) != 0 && errno != ENOENT) {
        status = Status::IOError("unlink " + blocks_dir_ + "/" + entry->d_name + ": " +
                                 errno_text(errno));
        break;
      }
    } else if (is_block_name(name)) {
      struct stat st;
      if (::fstatat(dir_fd, entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno == ENOENT) continue;
        status = Status::IOError("stat " + blocks_dir_ + "/" + entry->d_name + ": " +
                                 errno_text(errno));
        break;
      }
      // Only regular files are blocks; get() opens with O_NOFOLLOW and misses anything else.
      if (S_ISREG(st.st_mode)) {
        found.push_back(Found{st.st_mtim, std::string(name), static_cast<uint64_t>(st.st_size)});
      }
    }
  }
  ::closedir(listing);
  if (!status.ok()) return status;

  // Oldest first, so the last inserted (newest mtime) is the most recent. Ties (coarse
  // timestamps) break by name: an arbitrary but stable order.
  std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) {
    if (a.mtime.tv_sec != b.mtime.tv_sec) return a.mtime.tv_sec < b.mtime.tv_sec;
    if (a.mtime.tv_nsec != b.mtime.tv_nsec) return a.mtime.tv_nsec < b.mtime.tv_nsec;
    return a.name < b.name;
  });
  std::lock_guard<std::mutex> lock(mu_);
  for (Found& file : found) index_.insert(std::move(file.name), file.bytes);
  if (index_.total_bytes() > capacity_bytes_) evict_locked(low_watermark_bytes());
  return Status::OK();
}

void BlockStore::evict_locked(uint64_t limit_bytes) {
  for (const std::string& victim : index_.evict_until(limit_bytes)) {
    ::unlink((blocks_dir_ + "/" + victim).c_str());
  }
}

uint64_t BlockStore::file_bytes(const BlockKey& key, uint64_t data_bytes) {
  return header_bytes(key) + data_bytes;
}

Result<bool> BlockStore::get(const BlockKey& key, std::span<std::byte> out) {
  const std::string name = file_name(key);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!index_.touch(name)) return false;
  }
  const std::string path = blocks_dir_ + "/" + name;
  const FdCloser file{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW)};
  if (file.fd < 0) {
    std::lock_guard<std::mutex> lock(mu_);
    drop_locked(name, 0, 0);
    return false;
  }
  struct stat st;
  if (::fstat(file.fd, &st) != 0) return false;
  std::vector<std::byte> header(header_bytes(key));
  std::optional<uint32_t> data_crc;
  if (static_cast<uint64_t>(st.st_size) == header.size() + out.size() &&
      read_header_and_data(file.fd, header, out)) {
    data_crc = check_header(header, key, out.size());
  }
  if (!data_crc || crc32c(out) != *data_crc) {
    std::lock_guard<std::mutex> lock(mu_);
    drop_locked(name, st.st_dev, st.st_ino);
    return false;
  }
  // Records the use for the LRU order of the next open, at most once per kTouchSeconds per
  // block: an order finer than that is not worth an inode write on every hit. Best effort: a
  // failure only makes the block look older after a restart.
  if (std::time(nullptr) - st.st_mtime >= kTouchSeconds) {
    const struct timespec times[2] = {{0, UTIME_OMIT}, {0, UTIME_NOW}};
    (void)::futimens(file.fd, times);
  }
  return true;
}

void BlockStore::drop_locked(const std::string& name, uint64_t dev, uint64_t ino) {
  const std::string path = blocks_dir_ + "/" + name;
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    index_.erase(name);
    return;
  }
  if (ino == 0 || st.st_dev != dev || st.st_ino != ino) return;
  ::unlink(path.c_str());
  index_.erase(name);
}

Status BlockStore::put(const BlockKey& key, std::span<const std::byte> data) {
  if (key.source_id.size() > kMaxIdBytes || key.etag.size() > kMaxIdBytes) {
    return Status::InvalidArgument("block key source_id or etag longer than " +
                                   std::to_string(kMaxIdBytes) + " bytes");
  }
  const std::optional<uint64_t> needed = checked_add(header_bytes(key), data.size());
  if (!needed) return Status::InvalidArgument("block too large");
  const std::string name = file_name(key);
  const std::string path = blocks_dir_ + "/" + name;
  std::string temp_path;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Too large for the cache, or for the room left by other puts in flight: skip it.
    if (*needed > capacity_bytes_ || reserved_bytes_ > capacity_bytes_ - *needed) {
      return Status::OK();
    }
    // Cannot overflow: reserved_bytes_ + *needed <= capacity_bytes_ was checked above.
    const uint64_t in_flight = reserved_bytes_ + *needed;
    if (index_.total_bytes() > capacity_bytes_ - in_flight) {
      const uint64_t low = low_watermark_bytes();
      evict_locked(in_flight <= low ? low - in_flight : capacity_bytes_ - in_flight);
    }
    reserved_bytes_ = in_flight;
    temp_path =
        blocks_dir_ + "/" + std::string(kTempPrefix) + name + "-" + std::to_string(next_temp_id_++);
  }

  Status status;
  {
    const FdCloser file{
        ::open(temp_path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600)};
    if (file.fd < 0) {
      status = Status::IOError("create " + temp_path + ": " + errno_text(errno));
    } else {
      status = write_full(file.fd, encode_header(key, data.size(), crc32c(data)), temp_path);
      if (status.ok()) status = write_full(file.fd, data, temp_path);
    }
  }

  std::lock_guard<std::mutex> lock(mu_);
  reserved_bytes_ -= *needed;
  if (status.ok() && ::rename(temp_path.c_str(), path.c_str()) != 0) {
    status = Status::IOError("rename " + temp_path + " to " + path + ": " + errno_text(errno));
  }
  if (!status.ok()) {
    ::unlink(temp_path.c_str());
    return status;
  }
  index_.insert(name, *needed);
  return Status::OK();
}

uint64_t BlockStore::bytes_used_by(const std::string& source_id, const std::string& etag) const {
  const std::string prefix = file_name_prefix(source_id, etag);
  uint64_t total = 0;
  std::lock_guard lock(mu_);
  index_.for_each([&](const std::string& name, uint64_t bytes) {
    if (name.starts_with(prefix)) total += bytes;
  });
  return total;
}

uint64_t BlockStore::bytes_used() const {
  std::lock_guard<std::mutex> lock(mu_);
  return index_.total_bytes();
}

}  // namespace imgfs::cache
