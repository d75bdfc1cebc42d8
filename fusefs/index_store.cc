#include "fusefs/index_store.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace imgfs::fusefs {

namespace {
// Saved indexes larger than this are not read back (a 1 TiB image at 1 MiB spans and random
// data needs about 32 MiB).
constexpr uintmax_t kMaxIndexFileBytes = 256ull << 20;
}  // namespace

Result<std::unique_ptr<IndexStore>> IndexStore::open(std::string dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::IOError("cannot create " + dir + ": " + ec.message());
  if (::chmod(dir.c_str(), 0700) != 0) {
    return Status::IOError("cannot chmod " + dir + ": " + std::strerror(errno));
  }
  return std::unique_ptr<IndexStore>(new IndexStore(std::move(dir)));
}

std::string IndexStore::path_for(const std::string& id) const {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(id.data(), id.size(), digest, &length, EVP_sha256(), nullptr);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string name;
  for (unsigned int i = 0; i < length; ++i) {
    name += kHex[digest[i] >> 4];
    name += kHex[digest[i] & 0xF];
  }
  return dir_ + "/" + name + ".gzi";
}

std::optional<std::vector<std::byte>> IndexStore::load(const std::string& id) const {
  const std::string path = path_for(id);
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec || size > kMaxIndexFileBytes) return std::nullopt;
  std::ifstream file(path, std::ios::binary);
  std::vector<char> text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (!file.good() && !file.eof()) return std::nullopt;
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

Status IndexStore::save(const std::string& id, std::span<const std::byte> bytes) const {
  static std::atomic<uint64_t> counter{0};
  const std::string path = path_for(id);
  const std::string temp = path + ".tmp-" + std::to_string(::getpid()) + "-" +
                           std::to_string(counter.fetch_add(1));
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Status::IOError("cannot create " + temp + ": " + std::strerror(errno));
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    written += static_cast<size_t>(n);
  }
  const bool ok = written == bytes.size() && ::close(fd) == 0;
  if (!ok || ::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string error = std::strerror(errno);
    ::unlink(temp.c_str());
    return Status::IOError("cannot save " + path + ": " + error);
  }
  return Status::OK();
}

}  // namespace imgfs::fusefs
