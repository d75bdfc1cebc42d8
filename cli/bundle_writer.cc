#include "cli/bundle_writer.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include "formats/bundle_keys.h"
#include "formats/bundle_manifest.h"
#include "formats/checked_math.h"

namespace imgfs::cli {

namespace {

using formats::Certificate;
using formats::hex_encode;
using formats::PrivateKey;

constexpr size_t kReadChunkBytes = 1u << 20;
constexpr size_t kDeflateOutBytes = 256u << 10;
constexpr size_t kTarBlock = 512;
// Python tarfile pads the archive to its 20-block record (RECORDSIZE).
constexpr uint64_t kTarRecord = 10240;
// Names longer than the 100-byte ustar field get a GNU ././@LongLink header (tarfile uses '>').
constexpr size_t kTarNameField = 100;
// The largest size that fits in 11 octal digits; tarfile switches to GNU base-256 above it.
constexpr uint64_t kMaxOctalSize = 077777777777;
constexpr int kGzipLevel = 6;
// deflateInit2 windowBits: 15 (32 KiB window) + 16 selects the gzip wrapper.
constexpr int kGzipWindowBits = 15 + 16;
constexpr int kGzipOsUnix = 3;
constexpr std::string_view kBundlerName = "imgfs";
constexpr std::string_view kBundlerVersion = "0.1.0";
constexpr std::string_view kBundlerRelease = "0";
constexpr mode_t kFileMode = 0644;

Status errno_status(const std::string& what, int error) {
  const std::string msg = what + ": " + std::strerror(error);
  if (error == ENOENT) return Status::NotFound(msg);
  return Status::IOError(msg);
}

std::string openssl_error() {
  const unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return "no OpenSSL detail";
  char text[256];
  ERR_error_string_n(code, text, sizeof(text));
  return text;
}

class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      if (fd_ >= 0) ::close(fd_);
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  int get() const { return fd_; }
  // Closes now, reporting the error a deferred write may surface only at close.
  int close() { return fd_ < 0 ? 0 : ::close(std::exchange(fd_, -1)); }

 private:
  int fd_;
};

Status write_all(int fd, std::span<const uint8_t> data, const std::string& path) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_status("write " + path, errno);
    data = data.subspan(static_cast<size_t>(n));
  }
  return Status::OK();
}

// Creates (or truncates) `path` with exactly kFileMode, whatever the umask.
Result<UniqueFd> create_output(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, kFileMode));
  if (fd.get() < 0) return errno_status("create " + path, errno);
  if (::fchmod(fd.get(), kFileMode) != 0) return errno_status("chmod " + path, errno);
  return fd;
}

// Removes the files of a failed run; a successful run calls keep().
class CreatedFiles {
 public:
  ~CreatedFiles() {
    if (keep_) return;
    for (const std::string& path : paths_) ::unlink(path.c_str());
  }
  void add(std::string path) { paths_.push_back(std::move(path)); }
  void keep() { keep_ = true; }

 private:
  std::vector<std::string> paths_;
  bool keep_ = false;
};

struct MdCtxFree {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};
struct CipherCtxFree {
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, MdCtxFree>;

Result<MdCtxPtr> new_sha1() {
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha1(), nullptr) != 1) {
    return Status::IOError("OpenSSL SHA1 init: " + openssl_error());
  }
  return ctx;
}

Result<std::string> finish_sha1_hex(EVP_MD_CTX* ctx) {
  std::array<uint8_t, EVP_MAX_MD_SIZE> digest;
  unsigned int length = 0;
  if (EVP_DigestFinal_ex(ctx, digest.data(), &length) != 1) {
    return Status::IOError("OpenSSL SHA1 final: " + openssl_error());
  }
  return hex_encode(std::span<const uint8_t>(digest.data(), length));
}

// ---- tar (FORMATS.md a.2) -------------------------------------------------------------------

// tarfile's itn(): `width - 1` zero-padded octal digits and a NUL.
void put_octal(uint8_t* field, size_t width, uint64_t value) {
  for (size_t i = width - 1; i-- > 0;) {
    field[i] = static_cast<uint8_t>('0' + (value & 7));
    value >>= 3;
  }
  field[width - 1] = 0;
}

using TarBlock = std::array<uint8_t, kTarBlock>;

// One header block as Python 2.7 tarfile._create_header writes it in GNU format.
TarBlock tar_header(std::string_view name, uint64_t size, char typeflag, uint64_t mode) {
  TarBlock block{};
  std::copy_n(name.begin(), std::min(name.size(), kTarNameField), block.begin());
  put_octal(&block[100], 8, mode);
  put_octal(&block[108], 8, 0);  // uid
  put_octal(&block[116], 8, 0);  // gid
  if (size <= kMaxOctalSize) {
    put_octal(&block[124], 12, size);
  } else {
    block[124] = 0x80;  // GNU base-256: the value big-endian in the other 11 bytes.
    uint64_t rest = size;
    for (size_t i = 11; i >= 1; --i) {
      block[124 + i] = static_cast<uint8_t>(rest & 0xff);
      rest >>= 8;
    }
  }
  put_octal(&block[136], 12, 0);  // mtime
  std::fill_n(&block[148], 8, ' ');
  block[156] = static_cast<uint8_t>(typeflag);
  std::memcpy(&block[257], "ustar  ", 8);  // GNU magic + version, with its NUL.
  put_octal(&block[329], 8, 0);            // devmajor
  put_octal(&block[337], 8, 0);            // devminor
  unsigned checksum = 0;
  for (uint8_t byte : block) checksum += byte;
  // "%06o\0" and the eighth byte stays a space, as tarfile writes it.
  put_octal(&block[148], 7, checksum);
  return block;
}

// ---- parts (FORMATS.md a.1 step 5) ----------------------------------------------------------

struct WrittenPart {
  std::string filename;
  std::string sha1_hex;
};

// Cuts the ciphertext into part_size slices. A part is opened only when a byte needs it, and
// finish() always closes with a part that is not full, so a ciphertext that fills its last
// part exactly gets euca2ools' extra zero-length part.
class PartWriter {
 public:
  PartWriter(std::filesystem::path out_dir, std::string prefix, uint64_t part_size,
             CreatedFiles* created)
      : out_dir_(std::move(out_dir)),
        prefix_(std::move(prefix)),
        part_size_(part_size),
        created_(created) {}

  Status write(std::span<const uint8_t> data) {
    while (!data.empty()) {
      if (fd_.get() < 0) {
        Status s = open_next();
        if (!s.ok()) return s;
      }
      const size_t take = static_cast<size_t>(std::min<uint64_t>(data.size(), part_size_ - used_));
      const std::span<const uint8_t> slice = data.first(take);
      if (EVP_DigestUpdate(sha1_.get(), slice.data(), slice.size()) != 1) {
        return Status::IOError("OpenSSL SHA1: " + openssl_error());
      }
      Status s = write_all(fd_.get(), slice, path_);
      if (!s.ok()) return s;
      used_ += take;
      total_ += take;
      data = data.subspan(take);
      if (used_ == part_size_) {
        s = close_current();
        if (!s.ok()) return s;
      }
    }
    return Status::OK();
  }

  Status finish() {
    if (fd_.get() < 0) {
      Status s = open_next();
      if (!s.ok()) return s;
    }
    return close_current();
  }

  const std::vector<WrittenPart>& parts() const { return parts_; }
  uint64_t total_bytes() const { return total_; }

 private:
  Status open_next() {
    const size_t index = parts_.size();
    if (index >= formats::kMaxBundleParts) {
      return Status::InvalidArgument("part size " + std::to_string(part_size_) +
                                     " gives more than " +
                                     std::to_string(formats::kMaxBundleParts) + " parts");
    }
    filename_ = prefix_ + ".part." + (index < 10 ? "0" : "") + std::to_string(index);
    path_ = (out_dir_ / filename_).string();
    Result<UniqueFd> fd = create_output(path_);
    if (!fd.ok()) return fd.status();
    created_->add(path_);
    fd_ = std::move(*fd);
    Result<MdCtxPtr> sha1 = new_sha1();
    if (!sha1.ok()) return sha1.status();
    sha1_ = std::move(*sha1);
    used_ = 0;
    return Status::OK();
  }

  Status close_current() {
    if (fd_.close() != 0) return errno_status("close " + path_, errno);
    Result<std::string> digest = finish_sha1_hex(sha1_.get());
    if (!digest.ok()) return digest.status();
    parts_.push_back(WrittenPart{filename_, std::move(*digest)});
    return Status::OK();
  }

  const std::filesystem::path out_dir_;
  const std::string prefix_;
  const uint64_t part_size_;
  CreatedFiles* const created_;
  UniqueFd fd_{-1};
  MdCtxPtr sha1_;
  std::string filename_;
  std::string path_;
  uint64_t used_ = 0;
  uint64_t total_ = 0;
  std::vector<WrittenPart> parts_;
};

// ---- tar stream -> SHA1 tap -> gzip -> AES-128-CBC -> parts (FORMATS.md a.1) ----------------

class BundlePipeline {
 public:
  explicit BundlePipeline(PartWriter* parts) : parts_(parts) {}

  ~BundlePipeline() {
    if (deflate_ready_) deflateEnd(&deflate_);
  }
  BundlePipeline(const BundlePipeline&) = delete;
  BundlePipeline& operator=(const BundlePipeline&) = delete;

  Status init(const std::array<uint8_t, 16>& key, const std::array<uint8_t, 16>& iv) {
    Result<MdCtxPtr> sha1 = new_sha1();
    if (!sha1.ok()) return sha1.status();
    tar_sha1_ = std::move(*sha1);

    deflate_ = z_stream{};
    if (deflateInit2(&deflate_, kGzipLevel, Z_DEFLATED, kGzipWindowBits, 8, Z_DEFAULT_STRATEGY) !=
        Z_OK) {
      return Status::IOError("zlib deflateInit2 failed");
    }
    deflate_ready_ = true;
    // GNU gzip reading stdin: no name, MTIME 0, OS 3 (Unix). zlib fills in XFL from the level.
    gzip_header_ = gz_header{};
    gzip_header_.os = kGzipOsUnix;
    if (deflateSetHeader(&deflate_, &gzip_header_) != Z_OK) {
      return Status::IOError("zlib deflateSetHeader failed");
    }

    cipher_.reset(EVP_CIPHER_CTX_new());
    if (cipher_ == nullptr ||
        EVP_EncryptInit_ex(cipher_.get(), EVP_aes_128_cbc(), nullptr, key.data(), iv.data()) != 1) {
      return Status::IOError("OpenSSL AES-128-CBC init: " + openssl_error());
    }
    deflate_out_.resize(kDeflateOutBytes);
    cipher_out_.resize(kDeflateOutBytes + EVP_MAX_BLOCK_LENGTH);
    return Status::OK();
  }

  // Appends bytes to the tar stream.
  Status add_tar_bytes(std::span<const uint8_t> data) {
    if (EVP_DigestUpdate(tar_sha1_.get(), data.data(), data.size()) != 1) {
      return Status::IOError("OpenSSL SHA1: " + openssl_error());
    }
    tar_length_ += data.size();
    return compress(data, Z_NO_FLUSH);
  }

  // Ends the tar stream and flushes every stage. Returns the tar stream's SHA1 in hex.
  Result<std::string> finish() {
    Status s = compress({}, Z_FINISH);
    if (!s.ok()) return s;
    int final_length = 0;
    if (EVP_EncryptFinal_ex(cipher_.get(), cipher_out_.data(), &final_length) != 1) {
      return Status::IOError("OpenSSL AES-128-CBC final: " + openssl_error());
    }
    s = parts_->write(std::span<const uint8_t>(cipher_out_.data(), final_length));
    if (!s.ok()) return s;
    s = parts_->finish();
    if (!s.ok()) return s;
    return finish_sha1_hex(tar_sha1_.get());
  }

  uint64_t tar_length() const { return tar_length_; }

 private:
  Status compress(std::span<const uint8_t> data, int flush) {
    deflate_.next_in = const_cast<Bytef*>(data.data());
    deflate_.avail_in = static_cast<uInt>(data.size());
    while (true) {
      deflate_.next_out = deflate_out_.data();
      deflate_.avail_out = static_cast<uInt>(deflate_out_.size());
      const int rc = deflate(&deflate_, flush);
      if (rc == Z_STREAM_ERROR) return Status::IOError("zlib deflate failed");
      const size_t produced = deflate_out_.size() - deflate_.avail_out;
      Status s = encrypt(std::span<const uint8_t>(deflate_out_.data(), produced));
      if (!s.ok()) return s;
      if (flush == Z_FINISH ? rc == Z_STREAM_END : deflate_.avail_out != 0) return Status::OK();
    }
  }

  Status encrypt(std::span<const uint8_t> data) {
    if (data.empty()) return Status::OK();
    int length = 0;
    if (EVP_EncryptUpdate(cipher_.get(), cipher_out_.data(), &length, data.data(),
                          static_cast<int>(data.size())) != 1) {
      return Status::IOError("OpenSSL AES-128-CBC: " + openssl_error());
    }
    return parts_->write(std::span<const uint8_t>(cipher_out_.data(), length));
  }

  PartWriter* const parts_;
  MdCtxPtr tar_sha1_;
  z_stream deflate_{};
  bool deflate_ready_ = false;
  gz_header gzip_header_{};
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> cipher_;
  std::vector<uint8_t> deflate_out_;
  std::vector<uint8_t> cipher_out_;
  uint64_t tar_length_ = 0;
};

// Streams the image through the pipeline as one tar member, then the tar trailer.
Status stream_tar(int image_fd, const std::string& image_path, std::string_view member_name,
                  uint64_t image_size, BundlePipeline* pipeline) {
  Status s = pipeline->add_tar_bytes(bundle_tar_prologue(member_name, image_size));
  if (!s.ok()) return s;

  std::vector<uint8_t> buffer(kReadChunkBytes);
  uint64_t remaining = image_size;
  while (remaining > 0) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(remaining, buffer.size()));
    const ssize_t n = ::read(image_fd, buffer.data(), want);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_status("read " + image_path, errno);
    if (n == 0) return Status::IOError("image " + image_path + " shrank while being bundled");
    s = pipeline->add_tar_bytes(std::span<const uint8_t>(buffer.data(), static_cast<size_t>(n)));
    if (!s.ok()) return s;
    remaining -= static_cast<uint64_t>(n);
  }
  ssize_t extra;
  do {
    extra = ::read(image_fd, buffer.data(), 1);
  } while (extra < 0 && errno == EINTR);
  if (extra < 0) return errno_status("read " + image_path, errno);
  if (extra > 0) return Status::IOError("image " + image_path + " grew while being bundled");

  // Data padding to 512, two zero blocks, then zeros to the 10240-byte record.
  uint64_t trailer = (kTarBlock - image_size % kTarBlock) % kTarBlock + 2 * kTarBlock;
  const uint64_t end = pipeline->tar_length() + trailer;
  trailer += (kTarRecord - end % kTarRecord) % kTarRecord;
  const std::vector<uint8_t> zeros(static_cast<size_t>(trailer), 0);
  return pipeline->add_tar_bytes(zeros);
}

// ---- manifest (FORMATS.md a.6) --------------------------------------------------------------

// `value` as text for an encoding='ASCII' document: markup characters escaped, non-ASCII as
// numeric character references (as lxml writes them). Control characters cannot be in XML 1.0.
Result<std::string> xml_text(std::string_view value, std::string_view what) {
  std::string out;
  size_t i = 0;
  while (i < value.size()) {
    const auto lead = static_cast<unsigned char>(value[i]);
    if (lead < 0x80) {
      if (lead < 0x20 || lead == 0x7f) {
        return Status::InvalidArgument(std::string(what) + " contains a control character");
      }
      switch (lead) {
        case '&':
          out += "&amp;";
          break;
        case '<':
          out += "&lt;";
          break;
        case '>':
          out += "&gt;";
          break;
        default:
          out += static_cast<char>(lead);
      }
      ++i;
      continue;
    }
    // UTF-8: the sequence length from the lead byte, then continuation bytes 10xxxxxx.
    size_t length = 0;
    uint32_t code_point = 0;
    if ((lead & 0xe0) == 0xc0) {
      length = 2;
      code_point = lead & 0x1f;
    } else if ((lead & 0xf0) == 0xe0) {
      length = 3;
      code_point = lead & 0x0f;
    } else if ((lead & 0xf8) == 0xf0) {
      length = 4;
      code_point = lead & 0x07;
    }
    bool valid = length != 0 && i + length <= value.size();
    for (size_t k = 1; valid && k < length; ++k) {
      const auto next = static_cast<unsigned char>(value[i + k]);
      valid = (next & 0xc0) == 0x80;
      code_point = (code_point << 6) | (next & 0x3f);
    }
    static constexpr uint32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
    valid = valid && code_point >= kMinForLength[length] && code_point <= 0x10ffff &&
            !(code_point >= 0xd800 && code_point <= 0xdfff);
    if (!valid) return Status::InvalidArgument(std::string(what) + " is not valid UTF-8");
    out += "&#" + std::to_string(code_point) + ";";
    i += length;
  }
  return out;
}

struct ManifestFields {
  std::string prefix;
  std::string user_account;
  std::string arch;
  std::string tar_sha1_hex;
  uint64_t image_size = 0;
  uint64_t bundled_size = 0;
  std::string ec2_key;
  std::string ec2_iv;
  std::string user_key;
  std::string user_iv;
};

struct ManifestText {
  std::string machine_configuration;
  std::string image;
};

Result<ManifestText> manifest_elements(const ManifestFields& f,
                                       const std::vector<WrittenPart>& parts) {
  Result<std::string> arch = xml_text(f.arch, "architecture");
  if (!arch.ok()) return arch.status();
  Result<std::string> name = xml_text(f.prefix, "prefix");
  if (!name.ok()) return name.status();
  Result<std::string> user = xml_text(f.user_account, "user account");
  if (!user.ok()) return user.status();

  ManifestText text;
  text.machine_configuration =
      "<machine_configuration><architecture>" + *arch + "</architecture></machine_configuration>";
  std::string& image = text.image;
  image = "<image><name>" + *name + "</name><user>" + *user + "</user><type>machine</type>";
  image += "<digest algorithm=\"SHA1\">" + f.tar_sha1_hex + "</digest>";
  image += "<size>" + std::to_string(f.image_size) + "</size>";
  image += "<bundled_size>" + std::to_string(f.bundled_size) + "</bundled_size>";
  image += "<ec2_encrypted_key algorithm=\"AES-128-CBC\">" + f.ec2_key + "</ec2_encrypted_key>";
  image += "<user_encrypted_key algorithm=\"AES-128-CBC\">" + f.user_key + "</user_encrypted_key>";
  image += "<ec2_encrypted_iv>" + f.ec2_iv + "</ec2_encrypted_iv>";
  image += "<user_encrypted_iv>" + f.user_iv + "</user_encrypted_iv>";
  image += "<parts count=\"" + std::to_string(parts.size()) + "\">";
  for (size_t i = 0; i < parts.size(); ++i) {
    Result<std::string> filename = xml_text(parts[i].filename, "part filename");
    if (!filename.ok()) return filename.status();
    image += "<part index=\"" + std::to_string(i) + "\"><filename>" + *filename +
             "</filename><digest algorithm=\"SHA1\">" + parts[i].sha1_hex + "</digest></part>";
  }
  image += "</parts></image>";
  return text;
}

Result<std::string> bundle_prefix(const BundleWriteOptions& options) {
  const std::string prefix =
      options.prefix.value_or(std::filesystem::path(options.image_path).filename().string());
  if (prefix.empty() || prefix == "." || prefix == "..") {
    return Status::InvalidArgument("bundle prefix '" + prefix + "' is not a file name");
  }
  if (prefix.find('/') != std::string::npos) {
    return Status::InvalidArgument("bundle prefix '" + prefix + "' contains '/'");
  }
  // Leaves room for ".part.NNNNNN" within the manifest parser's filename limit.
  constexpr size_t kMaxPrefixBytes = formats::kMaxBundlePartFilenameBytes - 16;
  if (prefix.size() > kMaxPrefixBytes) {
    return Status::InvalidArgument("bundle prefix is longer than " +
                                   std::to_string(kMaxPrefixBytes) + " bytes");
  }
  Result<std::string> checked = xml_text(prefix, "bundle prefix");
  if (!checked.ok()) return checked.status();
  return prefix;
}

Result<std::array<uint8_t, 16>> random_secret() {
  std::array<uint8_t, 16> secret;
  if (RAND_bytes(secret.data(), static_cast<int>(secret.size())) != 1) {
    return Status::IOError("OpenSSL RAND_bytes: " + openssl_error());
  }
  return secret;
}

// Wipes the AES key and IV however write_bundle returns.
struct SecretsWiper {
  std::array<uint8_t, 16>* key;
  std::array<uint8_t, 16>* iv;
  ~SecretsWiper() {
    OPENSSL_cleanse(key->data(), key->size());
    OPENSSL_cleanse(iv->data(), iv->size());
  }
};

}  // namespace

std::vector<uint8_t> bundle_tar_prologue(std::string_view name, uint64_t size) {
  std::vector<uint8_t> out;
  if (name.size() > kTarNameField) {
    const uint64_t long_name_length = name.size() + 1;  // The name and its NUL.
    TarBlock long_header = tar_header("././@LongLink", long_name_length, 'L', 0);
    out.insert(out.end(), long_header.begin(), long_header.end());
    out.insert(out.end(), name.begin(), name.end());
    out.resize((out.size() + 1 + kTarBlock - 1) / kTarBlock * kTarBlock, 0);
  }
  TarBlock header = tar_header(name, size, '0', 0644);
  out.insert(out.end(), header.begin(), header.end());
  return out;
}

Result<std::string> write_bundle(const BundleWriteOptions& options) {
  if (options.part_size == 0) return Status::InvalidArgument("part size must be nonzero");
  if (options.out_dir.empty()) return Status::InvalidArgument("no output folder given");
  Result<std::string> prefix = bundle_prefix(options);
  if (!prefix.ok()) return prefix.status();
  for (auto [value, what] : {std::pair{&options.arch, "architecture"},
                             std::pair{&options.user_account, "user account"}}) {
    Result<std::string> checked = xml_text(*value, what);
    if (!checked.ok()) return checked.status();
  }

  // Every key and certificate is checked before any output exists.
  Result<Certificate> cloud_cert = Certificate::load_file(options.cert_path);
  if (!cloud_cert.ok()) return cloud_cert.status();
  std::optional<Certificate> user_cert;
  if (options.user_cert_path) {
    Result<Certificate> loaded = Certificate::load_file(*options.user_cert_path);
    if (!loaded.ok()) return loaded.status();
    user_cert.emplace(std::move(*loaded));
  }
  std::optional<PrivateKey> user_key;
  if (options.user_key_path) {
    Result<PrivateKey> loaded = PrivateKey::load_file(*options.user_key_path);
    if (!loaded.ok()) return loaded.status();
    user_key.emplace(std::move(*loaded));
  }

  UniqueFd image_fd(::open(options.image_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (image_fd.get() < 0) return errno_status("open image " + options.image_path, errno);
  struct stat st;
  if (::fstat(image_fd.get(), &st) != 0) return errno_status("stat " + options.image_path, errno);
  if (!S_ISREG(st.st_mode)) {
    return Status::InvalidArgument("image " + options.image_path + " is not a regular file");
  }
  const uint64_t image_size = static_cast<uint64_t>(st.st_size);

  Result<std::array<uint8_t, 16>> aes_key = random_secret();
  if (!aes_key.ok()) return aes_key.status();
  Result<std::array<uint8_t, 16>> aes_iv = random_secret();
  if (!aes_iv.ok()) return aes_iv.status();
  SecretsWiper wiper{&*aes_key, &*aes_iv};

  ManifestFields fields;
  fields.prefix = *prefix;
  fields.user_account = options.user_account;
  std::erase(fields.user_account, '-');
  fields.arch = options.arch;
  fields.image_size = image_size;
  for (auto [certificate, key_out, iv_out] :
       {std::tuple{&*cloud_cert, &fields.ec2_key, &fields.ec2_iv},
        std::tuple{user_cert ? &*user_cert : nullptr, &fields.user_key, &fields.user_iv}}) {
    if (certificate == nullptr) continue;
    Result<std::string> wrapped_key = formats::wrap_bundle_secret(*certificate, *aes_key);
    if (!wrapped_key.ok()) return wrapped_key.status();
    Result<std::string> wrapped_iv = formats::wrap_bundle_secret(*certificate, *aes_iv);
    if (!wrapped_iv.ok()) return wrapped_iv.status();
    *key_out = std::move(*wrapped_key);
    *iv_out = std::move(*wrapped_iv);
  }

  const std::filesystem::path out_dir(options.out_dir);
  std::error_code error;
  std::filesystem::create_directories(out_dir, error);
  if (error) {
    return Status::IOError("create folder " + options.out_dir + ": " + error.message());
  }

  CreatedFiles created;
  PartWriter parts(out_dir, *prefix, options.part_size, &created);
  BundlePipeline pipeline(&parts);
  Status s = pipeline.init(*aes_key, *aes_iv);
  if (!s.ok()) return s;
  s = stream_tar(image_fd.get(), options.image_path, *prefix, image_size, &pipeline);
  if (!s.ok()) return s;
  Result<std::string> tar_sha1 = pipeline.finish();
  if (!tar_sha1.ok()) return tar_sha1.status();
  fields.tar_sha1_hex = std::move(*tar_sha1);
  fields.bundled_size = parts.total_bytes();

  Result<ManifestText> elements = manifest_elements(fields, parts.parts());
  if (!elements.ok()) return elements.status();
  std::string signature = "UNSIGNED";
  if (user_key) {
    Result<std::string> signed_hex =
        formats::sign_bundle_text(*user_key, elements->machine_configuration + elements->image);
    if (!signed_hex.ok()) return signed_hex.status();
    signature = std::move(*signed_hex);
  }
  std::string manifest = "<?xml version='1.0' encoding='ASCII'?>\n<manifest><version>2007-10-10";
  manifest += "</version><bundler><name>" + std::string(kBundlerName) + "</name><version>" +
              std::string(kBundlerVersion) + "</version><release>" + std::string(kBundlerRelease) +
              "</release></bundler>";
  manifest += elements->machine_configuration + elements->image;
  manifest += "<signature>" + signature + "</signature></manifest>";

  const std::string manifest_path = (out_dir / (*prefix + ".manifest.xml")).string();
  Result<UniqueFd> manifest_fd = create_output(manifest_path);
  if (!manifest_fd.ok()) return manifest_fd.status();
  created.add(manifest_path);
  s = write_all(
      manifest_fd->get(),
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(manifest.data()), manifest.size()),
      manifest_path);
  if (!s.ok()) return s;
  if (manifest_fd->close() != 0) return errno_status("close " + manifest_path, errno);
  created.keep();
  return manifest_path;
}

}  // namespace imgfs::cli
