#include "formats/image_stack.h"

#include <thread>

#include "formats/byte_order.h"
#include "formats/cbc_source.h"
#include "formats/gzip_index.h"
#include "formats/checked_math.h"
#include "formats/concat_source.h"
#include "formats/shared_source.h"
#include "formats/tar_member_source.h"

namespace imgfs::formats {

namespace {

constexpr uint64_t kCbcBlock = 16;
constexpr uint64_t kTarBlock = 512;
constexpr uint64_t kTarTailBytes = 64 << 10;

Result<std::array<uint8_t, 20>> parse_sha1_hex(std::string_view hex) {
  std::array<uint8_t, 20> digest{};
  if (hex.size() != 40) return Status::Corruption("image digest is not 40 hex digits");
  for (size_t i = 0; i < 20; ++i) {
    auto nibble = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    const int hi = nibble(hex[2 * i]);
    const int lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Status::Corruption("image digest is not hex");
    digest[i] = static_cast<uint8_t>(hi * 16 + lo);
  }
  return digest;
}

// A saved index for the gzip stream `plain` (the decrypted bundle), or null when it does not
// parse for this stream's sizes. The uncompressed size comes from ISIZE as open_gzip finds it.
std::shared_ptr<const GzipIndexSnapshot> parse_saved_index(const BlockSource& plain,
                                                           const std::vector<std::byte>& saved,
                                                           uint64_t min_uncompressed_size) {
  if (plain.size() < 4) return nullptr;
  std::array<std::byte, 4> isize_bytes;
  if (!plain.read_at(plain.size() - 4, isize_bytes).ok()) return nullptr;
  auto uncompressed = size_from_isize(load_le32(isize_bytes.data()), min_uncompressed_size);
  if (!uncompressed.ok()) return nullptr;
  auto snapshot = parse_gzip_index(saved, plain.size(), *uncompressed);
  if (!snapshot.ok()) return nullptr;
  return std::make_shared<const GzipIndexSnapshot>(std::move(snapshot).value());
}

}  // namespace

std::string image_key_for_manifest(std::string_view manifest_key) {
  for (std::string_view suffix : {std::string_view(".manifest.xml"), std::string_view("manifest.xml")}) {
    if (manifest_key.size() > suffix.size() && manifest_key.ends_with(suffix)) {
      std::string_view image = manifest_key.substr(0, manifest_key.size() - suffix.size());
      if (image.ends_with('/')) return "";
      return std::string(image);
    }
  }
  return "";
}

Result<OpenedBundle> open_bundle_stack(const BundleManifest& manifest, const PartOpener& open_part,
                                       const BundleStackOptions& options) {
  if (options.verify_cert != nullptr) {
    if (Status s = verify_bundle_signature(manifest, *options.verify_cert); !s.ok()) {
      return s.with_context("manifest signature");
    }
  }
  auto key_iv = unwrap_bundle_key_iv(manifest, options.keys);
  if (!key_iv.ok()) return key_iv.status();
  auto digest = parse_sha1_hex(manifest.image.digest_hex);
  if (!digest.ok()) return digest.status();
  BundleLayout layout;
  layout.key = key_iv->first;
  layout.iv = key_iv->second;
  for (const BundlePart& part : manifest.parts) layout.parts.push_back({part.filename, part.sha1});
  layout.bundled_size = manifest.image.bundled_size;
  layout.image_size = manifest.image.size;
  layout.tar_sha1 = *digest;
  return open_bundle_layout(layout, open_part, options);
}

Result<OpenedBundle> open_download_stack(const DownloadManifest& manifest,
                                         const PartOpener& open_part,
                                         const BundleStackOptions& options) {
  if (manifest.file_format != DownloadFileFormat::kBundle || !manifest.bundle) {
    return Status::NotSupported("download manifest of a " +
                                std::string(download_file_format_name(manifest.file_format)) +
                                " image; only bundles are read");
  }
  if (options.verify_cert != nullptr) {
    if (Status s = verify_download_manifest_signature(manifest, *options.verify_cert); !s.ok()) {
      return s.with_context("download manifest signature");
    }
  }
  // The node's key unwraps both secrets; try every configured key.
  BundleLayout layout;
  Status last = Status::InvalidArgument("no --key given");
  bool unwrapped = false;
  for (const PrivateKey* key : options.keys) {
    auto secret_key = unwrap_bundle_secret(*key, manifest.bundle->encrypted_key_hex);
    auto secret_iv = unwrap_bundle_secret(*key, manifest.bundle->encrypted_iv_hex);
    if (secret_key.ok() && secret_iv.ok()) {
      layout.key = *secret_key;
      layout.iv = *secret_iv;
      unwrapped = true;
      break;
    }
    last = secret_key.ok() ? secret_iv.status() : secret_key.status();
  }
  if (!unwrapped) {
    return last.with_context("none of the " + std::to_string(options.keys.size()) +
                             " keys unwraps this download manifest's key (it is wrapped for a "
                             "node key)");
  }
  for (const DownloadPart& part : manifest.parts) layout.parts.push_back({part.get_url, part.sha1});
  layout.bundled_size = manifest.image_size;
  layout.image_size = manifest.bundle->unbundled_size;
  return open_bundle_layout(layout, open_part, options);
}

Result<OpenedBundle> open_bundle_layout(const BundleLayout& layout, const PartOpener& open_part,
                                        const BundleStackOptions& options) {
  if (options.part_pool == nullptr) return Status::InvalidArgument("no verified-part pool");
  std::vector<std::unique_ptr<BlockSource>> parts;
  parts.reserve(layout.parts.size());
  // The first of several verified parts, also held here so it can be fetched in the background.
  std::shared_ptr<const BlockSource> first_part;
  uint64_t ciphertext_size = 0;
  for (size_t i = 0; i < layout.parts.size(); ++i) {
    const BundleLayout::Part& part = layout.parts[i];
    // A get-url is a credential: name the part by its index then, never by its URL.
    const std::string label =
        part.name.find("://") == std::string::npos ? part.name : "part " + std::to_string(i);
    auto source = open_part(part.name);
    if (!source.ok()) return source.status().with_context(label);
    auto sum = checked_add(ciphertext_size, (*source)->size());
    if (!sum) return Status::Corruption(label + ": part sizes overflow");
    ciphertext_size = *sum;
    if (!part.sha1 || !options.verify_parts) {
      parts.push_back(std::move(source).value());
      continue;
    }
    auto verified =
        open_verified_part(std::move(source).value(), *part.sha1, label, *options.part_pool);
    if (!verified.ok()) return verified.status();
    if (i == 0 && layout.parts.size() > 1) {
      first_part = std::shared_ptr<const BlockSource>(std::move(verified).value());
      parts.push_back(std::make_unique<SharedSource>(first_part));
      continue;
    }
    parts.push_back(std::move(verified).value());
  }
  if (ciphertext_size != layout.bundled_size) {
    return Status::Corruption("parts hold " + std::to_string(ciphertext_size) +
                              " bytes but the manifest's bundled size is " +
                              std::to_string(layout.bundled_size));
  }
  if (ciphertext_size == 0 || ciphertext_size % kCbcBlock != 0) {
    return Status::Corruption("bundled size " + std::to_string(ciphertext_size) +
                              " is not a positive multiple of 16");
  }

  // Opening reads the CBC padding (in the last part) and then the gzip header (in part 0), and
  // parts are fetched and verified whole: part 0 is fetched alongside the last. The thread
  // holds the part itself and is joined on return.
  std::jthread fetch_first_part;
  if (first_part != nullptr && first_part->size() > 0) {
    fetch_first_part = std::jthread([first_part] {
      std::byte first{};
      (void)first_part->read_at(0, std::span(&first, 1));
    });
  }
  auto concat = open_concat(std::move(parts));
  if (!concat.ok()) return concat.status();
  CbcOptions cbc_options;
  cbc_options.key = layout.key;
  cbc_options.iv = layout.iv;
  auto cbc = open_cbc(std::move(concat).value(), cbc_options);
  if (!cbc.ok()) return cbc.status();

  GzipOptions gzip_options;
  // The tar stream holds at least one header block and the image padded to 512.
  auto min_tar = checked_add(layout.image_size, kTarBlock);
  if (!min_tar) return Status::Corruption("image size overflows");
  gzip_options.min_uncompressed_size = *min_tar;
  if (options.load_index) {
    if (auto saved = options.load_index()) {
      gzip_options.initial_index = parse_saved_index(**cbc, *saved, *min_tar);
    }
  }
  gzip_options.span_bytes = options.span_bytes;
  gzip_options.span_pool = options.span_pool;
  gzip_options.expected_sha1 = layout.tar_sha1;
  gzip_options.alternate_sha1_range = std::make_pair(kTarBlock, layout.image_size);
  // Covers what follows the member: its padding, two zero blocks and the 10240-byte record.
  gzip_options.finish_tail_bytes = kTarTailBytes;
  auto gzip = open_gzip(std::move(cbc).value(), gzip_options);
  if (!gzip.ok()) return gzip.status();
  const GzipSource* gzip_layer = gzip->get();

  auto member = open_tar_member(std::move(gzip).value());
  if (!member.ok()) return member.status();
  if ((*member)->size() != layout.image_size) {
    return Status::Corruption("tar member '" + (*member)->member_name() + "' holds " +
                              std::to_string((*member)->size()) +
                              " bytes but the manifest's image size is " +
                              std::to_string(layout.image_size));
  }
  OpenedBundle opened;
  opened.image = std::move(member).value();
  opened.gzip = gzip_layer;
  return opened;
}

}  // namespace imgfs::formats
