#include "cli/commands.h"

#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>

#include "cli/bundle_writer.h"
#include "formats/bundle_keys.h"
#include "formats/gzip_source.h"
#include "formats/image_stack.h"
#include "formats/verified_part_source.h"
#include "fusefs/image_opener.h"
#include "fusefs/mount_options.h"
#include "remote/dir_store.h"

namespace imgfs::cli {

namespace {

constexpr uint64_t kPartMemoryBytes = 64ull << 20;
constexpr size_t kCopyChunkBytes = 1 << 20;

// Options shared by cat, info and verify.
struct ReadOptions {
  std::string path;
  std::vector<std::string> key_paths;
  std::optional<std::string> verify_cert;
  uint64_t offset = 0;
  std::optional<uint64_t> length;
};

int fail(const std::string& command, const std::string& message, int code = 1) {
  std::cerr << "imgfs " << command << ": " << message << "\n";
  return code;
}

Result<ReadOptions> parse_read_options(const std::vector<std::string>& args) {
  ReadOptions options;
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    const bool has_value = i + 1 < args.size();
    if (arg == "--key" || arg == "--verify-cert" || arg == "--offset" || arg == "--length") {
      if (!has_value) return Status::InvalidArgument(arg + " needs a value");
      const std::string& value = args[++i];
      if (arg == "--key") {
        options.key_paths.push_back(value);
      } else if (arg == "--verify-cert") {
        options.verify_cert = value;
      } else {
        auto number = fusefs::parse_byte_size(value);
        if (!number.ok()) return number.status().with_context(arg);
        if (arg == "--offset") {
          options.offset = *number;
        } else {
          options.length = *number;
        }
      }
    } else if (!arg.empty() && arg[0] == '-') {
      return Status::InvalidArgument("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 1) return Status::InvalidArgument("expected one PATH");
  options.path = positional[0];
  return options;
}

// A local bundle or file opened through the same engine as the mount (without the disk cache).
class LocalImage {
 public:
  static Result<std::unique_ptr<LocalImage>> open(const ReadOptions& options) {
    std::unique_ptr<LocalImage> image(new LocalImage());
    for (const std::string& path : options.key_paths) {
      auto key = formats::PrivateKey::load_file(path);
      if (!key.ok()) return key.status();
      image->keys_.push_back(std::move(key).value());
    }
    if (options.verify_cert) {
      auto cert = formats::Certificate::load_file(*options.verify_cert);
      if (!cert.ok()) return cert.status();
      image->cert_ = std::move(cert).value();
    }
    namespace fs = std::filesystem;
    const fs::path path = fs::absolute(options.path).lexically_normal();
    const std::string name = path.filename().string();
    std::string key = name;
    bool is_manifest = !formats::image_key_for_manifest(name).empty();
    for (const char* suffix : {".manifest.xml", "manifest.xml"}) {
      if (is_manifest) break;
      if (fs::is_regular_file(path.string() + suffix)) {
        key = name + suffix;
        is_manifest = true;
      }
    }
    auto store = remote::DirStore::open(path.parent_path().string());
    if (!store.ok()) return store.status();
    image->store_ = std::move(store).value();
    fusefs::ImageOpenerConfig config;
    for (const formats::PrivateKey& k : image->keys_) config.keys.push_back(&k);
    config.verify_cert = image->cert_ ? &*image->cert_ : nullptr;
    config.part_pool = &image->part_pool_;
    image->opener_ = std::make_unique<fusefs::ImageOpener>(*image->store_, config);

    auto object = image->store_->head(key);
    if (!object.ok()) return object.status();
    if (is_manifest) {
      auto manifest = image->opener_->read_manifest(*object);
      if (!manifest.ok()) return manifest.status();
      image->manifest_ = std::move(manifest).value();
      // A bundled disk image (qcow2, VMDK, ...) reads raw, as in the mount.
      auto peek = image->opener_->peek_image(*object, *image->manifest_, nullptr);
      if (!peek.ok()) return peek.status();
      auto opened =
          image->opener_->open_manifest(*object, *image->manifest_, nullptr, peek->format);
      if (!opened.ok()) return opened.status();
      image->opened_ = std::move(opened).value();
    } else {
      auto opened = image->opener_->open_object(*object, nullptr);
      if (!opened.ok()) return opened.status();
      image->opened_ = std::move(opened).value();
    }
    return image;
  }

  const BlockSource& source() const { return *opened_.source; }
  const formats::GzipSource* gzip() const { return opened_.gzip; }

 private:
  LocalImage() : part_pool_(kPartMemoryBytes) {}

  std::vector<formats::PrivateKey> keys_;
  std::optional<formats::Certificate> cert_;
  formats::VerifiedPartPool part_pool_;
  std::unique_ptr<remote::DirStore> store_;
  std::unique_ptr<fusefs::ImageOpener> opener_;
  std::optional<fusefs::ParsedManifest> manifest_;
  fusefs::OpenedImage opened_;
};

// Streams [offset, offset + length) of `source` to stdout in bounded chunks.
Status copy_to_stdout(const BlockSource& source, uint64_t offset, uint64_t length) {
  std::vector<std::byte> buffer(std::min<uint64_t>(length, kCopyChunkBytes));
  while (length > 0) {
    const size_t chunk = std::min<uint64_t>(length, buffer.size());
    Status s = source.read_at(offset, std::span(buffer.data(), chunk));
    if (!s.ok()) return s;
    size_t written = 0;
    while (written < chunk) {
      const ssize_t n = ::write(STDOUT_FILENO, buffer.data() + written, chunk - written);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Status::IOError("writing to stdout failed");
      written += static_cast<size_t>(n);
    }
    offset += chunk;
    length -= chunk;
  }
  return Status::OK();
}

}  // namespace

int run_cat_command(const std::vector<std::string>& args) {
  auto options = parse_read_options(args);
  if (!options.ok()) return fail("cat", options.status().message(), 2);
  auto image = LocalImage::open(*options);
  if (!image.ok()) return fail("cat", image.status().to_string());
  const BlockSource& source = (*image)->source();
  const uint64_t size = source.size();
  const uint64_t offset = std::min(options->offset, size);
  const uint64_t length = std::min(options->length.value_or(size), size - offset);
  Status s = copy_to_stdout(source, offset, length);
  if (!s.ok()) return fail("cat", s.to_string());
  return 0;
}

int run_info_command(const std::vector<std::string>& args) {
  auto options = parse_read_options(args);
  if (!options.ok()) return fail("info", options.status().message(), 2);
  namespace fs = std::filesystem;
  std::string manifest_path = options->path;
  if (formats::image_key_for_manifest(fs::path(manifest_path).filename().string()).empty()) {
    manifest_path += fs::is_regular_file(manifest_path + ".manifest.xml") ? ".manifest.xml"
                                                                          : "manifest.xml";
  }
  auto store = remote::DirStore::open(fs::absolute(manifest_path).parent_path().string());
  if (!store.ok()) return fail("info", store.status().to_string());
  auto object = (*store)->head(fs::path(manifest_path).filename().string());
  if (!object.ok()) return fail("info", object.status().to_string());
  formats::VerifiedPartPool pool(kPartMemoryBytes);
  fusefs::ImageOpenerConfig config;
  config.part_pool = &pool;
  fusefs::ImageOpener opener(**store, config);
  auto manifest = opener.read_manifest(*object);
  if (!manifest.ok()) return fail("info", manifest.status().to_string());
  if (const auto* import = std::get_if<formats::ImportManifest>(&*manifest)) {
    std::cout << "manifest:      " << manifest_path << " (import, " << import->version << ")\n"
              << "file format:   " << formats::import_file_format_name(import->file_format) << "\n"
              << "file size:     " << import->file_size() << "\n"
              << "parts:         " << import->parts.size() << "\n";
    return 0;
  }
  if (const auto* download = std::get_if<formats::DownloadManifest>(&*manifest)) {
    std::cout << "manifest:      " << manifest_path << " (download, " << download->version << ")\n"
              << "file format:   " << formats::download_file_format_name(download->file_format)
              << "\n"
              << "image size:    "
              << (download->bundle ? download->bundle->unbundled_size : download->image_size)
              << "\n"
              << "bundled size:  " << download->image_size << "\n"
              << "parts:         " << download->parts.size() << "\n";
    return 0;
  }
  const formats::BundleManifest& m = std::get<formats::BundleManifest>(*manifest);
  std::cout << "manifest:      " << manifest_path << "\n"
            << "image name:    " << m.image.name << "\n"
            << "image size:    " << m.image.size << "\n"
            << "bundled size:  " << m.image.bundled_size << "\n"
            << "parts:         " << m.parts.size() << "\n"
            << "architecture:  " << m.architecture << "\n"
            << "bundler:       " << m.bundler.name << " " << m.bundler.version << "\n"
            << "digest (SHA1): " << m.image.digest_hex << "\n"
            << "signed:        " << (m.signature == "UNSIGNED" ? "no" : "yes") << "\n";
  int code = 0;
  for (const std::string& path : options->key_paths) {
    auto key = formats::PrivateKey::load_file(path);
    if (!key.ok()) return fail("info", key.status().message());
    auto unwrapped = formats::unwrap_bundle_key_iv(m, {&*key});
    std::cout << "key " << path << ": "
              << (unwrapped.ok() ? "unwraps the AES key" : unwrapped.status().to_string())
              << "\n";
    if (!unwrapped.ok()) code = 1;
  }
  return code;
}

int run_verify_command(const std::vector<std::string>& args) {
  auto options = parse_read_options(args);
  if (!options.ok()) return fail("verify", options.status().message(), 2);
  auto image = LocalImage::open(*options);
  if (!image.ok()) return fail("verify", image.status().to_string());
  const formats::GzipSource* gzip = (*image)->gzip();
  if (gzip == nullptr) return fail("verify", options->path + " is not a bundle");
  // Inflating the whole tar stream checks every part's SHA1, the gzip CRC32 and ISIZE, and the
  // tar stream's SHA1 (all inside the chain); reading the last byte drives it to the end.
  std::vector<std::byte> buffer(kCopyChunkBytes);
  for (uint64_t offset = 0; offset < gzip->size(); offset += buffer.size()) {
    const size_t chunk = std::min<uint64_t>(buffer.size(), gzip->size() - offset);
    Status s = gzip->read_at(offset, std::span(buffer.data(), chunk));
    if (!s.ok()) return fail("verify", s.to_string());
  }
  std::cout << options->path << ": OK (" << (*image)->source().size()
            << " bytes; parts, gzip CRC32 and tar SHA1 match the manifest)\n";
  return 0;
}

int run_bundle_command(const std::vector<std::string>& args) {
  BundleWriteOptions options;
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    auto value = [&]() -> std::optional<std::string> {
      if (i + 1 >= args.size()) return std::nullopt;
      return args[++i];
    };
    std::optional<std::string> v;
    if (arg == "--cert" || arg == "--user-cert" || arg == "--user-key" || arg == "--prefix" ||
        arg == "--part-size" || arg == "-d" || arg == "--destination" || arg == "--user" ||
        arg == "--arch") {
      v = value();
      if (!v) return fail("bundle", arg + " needs a value", 2);
    }
    if (arg == "--cert") {
      options.cert_path = *v;
    } else if (arg == "--user-cert") {
      options.user_cert_path = *v;
    } else if (arg == "--user-key") {
      options.user_key_path = *v;
    } else if (arg == "--prefix") {
      options.prefix = *v;
    } else if (arg == "--part-size") {
      auto bytes = fusefs::parse_byte_size(*v);
      if (!bytes.ok() || *bytes == 0) return fail("bundle", "bad --part-size " + *v, 2);
      options.part_size = *bytes;
    } else if (arg == "-d" || arg == "--destination") {
      options.out_dir = *v;
    } else if (arg == "--user") {
      options.user_account = *v;
    } else if (arg == "--arch") {
      options.arch = *v;
    } else if (!arg.empty() && arg[0] == '-') {
      return fail("bundle", "unknown option " + arg, 2);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 1 || options.cert_path.empty() || options.out_dir.empty()) {
    return fail("bundle", "usage: imgfs bundle IMAGE --cert CERT -d OUTDIR [options]", 2);
  }
  if (options.user_key_path.has_value() != options.user_cert_path.has_value()) {
    return fail("bundle", "--user-cert and --user-key go together", 2);
  }
  options.image_path = positional[0];
  auto manifest_path = write_bundle(options);
  if (!manifest_path.ok()) return fail("bundle", manifest_path.status().to_string());
  std::cout << *manifest_path << "\n";
  return 0;
}

}  // namespace imgfs::cli
