#include "formats/bundle_manifest.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "formats/manifest_xml.h"

namespace imgfs::formats {

namespace {

// Error messages start with this.
constexpr std::string_view kDocument = "manifest";
// A manifest of 100000 parts is about 20 MB; anything far beyond that is not a manifest.
constexpr size_t kMaxManifestBytes = 64u << 20;
constexpr std::string_view kManifestVersion = "2007-10-10";
constexpr std::string_view kUnsigned = "UNSIGNED";

Result<std::string> parse_sha1_hex(std::string_view text, std::string_view what) {
  if (text.size() != 40 || !is_hex(text)) {
    return manifest_corruption(
        kDocument, std::string(what) + " '" + std::string(text) + "' is not 40 hex digits");
  }
  return to_lower_ascii(text);
}

// The checked SHA1 hex of a <digest> element whose algorithm attribute, if any, says SHA1.
Result<std::string> parse_sha1_digest(const xmlNode* digest, std::string_view what) {
  Status s = check_algorithm(kDocument, digest, "SHA1", what);
  if (!s.ok()) return s;
  Result<std::string> text = leaf_text(kDocument, digest, what);
  if (!text.ok()) return text.status();
  return parse_sha1_hex(*text, what);
}

Status check_part_filename(uint64_t index, std::string_view filename) {
  const std::string label = "part " + std::to_string(index);
  if (filename.empty()) return Status::Corruption(label + " has an empty filename");
  if (filename.size() > kMaxBundlePartFilenameBytes) {
    return Status::Corruption(label + " filename is " + std::to_string(filename.size()) +
                              " bytes (limit " + std::to_string(kMaxBundlePartFilenameBytes) + ")");
  }
  for (char c : filename) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      return Status::Corruption(label + " filename has a control character");
    }
  }
  if (filename.front() == '/' || filename.find('\\') != std::string_view::npos ||
      has_dot_dot_component(filename)) {
    return Status::Corruption("part filename escapes the manifest's folder: " + label + " '" +
                              std::string(filename) + "'");
  }
  return Status::OK();
}

Result<std::vector<BundlePart>> parse_parts(const xmlNode* parts_element) {
  std::optional<std::string> count_text = attribute(parts_element, "count");
  if (!count_text) return Status::Corruption("manifest <image><parts> lacks a count attribute");
  Result<uint64_t> count = parse_decimal(kDocument, *count_text, "<image><parts> count");
  if (!count.ok()) return count.status();
  Result<std::vector<const xmlNode*>> part_nodes = counted_part_elements(
      kDocument, parts_element, *count, kMaxBundleParts, "<image><parts> count");
  if (!part_nodes.ok()) return part_nodes.status();

  std::vector<BundlePart> parts(*count);
  std::vector<bool> seen(*count, false);
  for (const xmlNode* node : *part_nodes) {
    std::optional<std::string> index_text = attribute(node, "index");
    if (!index_text) return Status::Corruption("manifest <part> lacks an index attribute");
    Result<uint64_t> index = parse_decimal(kDocument, *index_text, "<part> index");
    if (!index.ok()) return index.status();
    if (*index >= *count) {
      return Status::Corruption("manifest part index " + std::to_string(*index) +
                                " is out of range 0.." + std::to_string(*count - 1));
    }
    Status s = claim_part_index(kDocument, *index, &seen);
    if (!s.ok()) return s;

    const std::string label = "<part index=\"" + std::to_string(*index) + "\">";
    Result<std::string> filename = required_text(kDocument, node, "filename", label + "<filename>");
    if (!filename.ok()) return filename.status();
    s = check_part_filename(*index, *filename);
    if (!s.ok()) return s;
    Result<const xmlNode*> digest_element =
        required_child(kDocument, node, "digest", label + "<digest>");
    if (!digest_element.ok()) return digest_element.status();
    Result<std::string> digest_hex = parse_sha1_digest(*digest_element, label + "<digest>");
    if (!digest_hex.ok()) return digest_hex.status();

    BundlePart& part = parts[*index];
    part.index = *index;
    part.filename = std::move(*filename);
    std::optional<std::vector<uint8_t>> sha1 = hex_decode(*digest_hex);
    std::copy(sha1->begin(), sha1->end(), part.sha1.begin());
  }
  return parts;
}

Status parse_image(const xmlNode* image, BundleManifest* manifest) {
  BundleManifest::Image& out = manifest->image;
  struct TextField {
    const char* name;
    std::string* target;
  };
  for (const TextField& field :
       {TextField{"name", &out.name}, TextField{"user", &out.user}, TextField{"type", &out.type}}) {
    Result<std::string> text =
        required_text(kDocument, image, field.name, "<image><" + std::string(field.name) + ">");
    if (!text.ok()) return text.status();
    *field.target = std::move(*text);
  }

  Result<const xmlNode*> digest = required_child(kDocument, image, "digest", "<image><digest>");
  if (!digest.ok()) return digest.status();
  Result<std::string> digest_hex = parse_sha1_digest(*digest, "<image><digest>");
  if (!digest_hex.ok()) return digest_hex.status();
  out.digest_hex = std::move(*digest_hex);

  for (auto [name, target] :
       {std::pair{"size", &out.size}, std::pair{"bundled_size", &out.bundled_size}}) {
    Result<uint64_t> value =
        required_number(kDocument, image, name, "<image><" + std::string(name) + ">");
    if (!value.ok()) return value.status();
    *target = *value;
  }
  // AES-CBC with PKCS#7 padding always yields whole blocks, at least one.
  if (out.bundled_size == 0 || out.bundled_size % 16 != 0) {
    return Status::Corruption("manifest <image><bundled_size> " + std::to_string(out.bundled_size) +
                              " is not a nonzero multiple of 16 (the AES block size)");
  }

  struct BlobField {
    const char* name;
    std::string* target;
    bool required;
    bool has_algorithm;
  };
  for (const BlobField& field :
       {BlobField{"ec2_encrypted_key", &out.ec2_encrypted_key, true, true},
        BlobField{"ec2_encrypted_iv", &out.ec2_encrypted_iv, true, false},
        BlobField{"user_encrypted_key", &out.user_encrypted_key, false, true},
        BlobField{"user_encrypted_iv", &out.user_encrypted_iv, false, false}}) {
    const std::string path = "<image><" + std::string(field.name) + ">";
    Result<const xmlNode*> element = unique_child(kDocument, image, field.name, path);
    if (!element.ok()) return element.status();
    if (*element == nullptr) {
      if (field.required) return Status::Corruption("manifest lacks " + path);
      continue;
    }
    if (field.has_algorithm) {
      Status s = check_algorithm(kDocument, *element, "AES-128-CBC", path);
      if (!s.ok()) return s;
    }
    Result<std::string> text = leaf_text(kDocument, *element, path);
    if (!text.ok()) return text.status();
    // An empty optional blob stays empty; a required one gets parse_hex's "is empty".
    if (text->empty() && !field.required) continue;
    Result<std::string> blob = parse_hex(kDocument, *text, path);
    if (!blob.ok()) return blob.status();
    *field.target = std::move(*blob);
  }

  Result<const xmlNode*> parts = required_child(kDocument, image, "parts", "<image><parts>");
  if (!parts.ok()) return parts.status();
  Result<std::vector<BundlePart>> parsed_parts = parse_parts(*parts);
  if (!parsed_parts.ok()) return parsed_parts.status();
  manifest->parts = std::move(*parsed_parts);
  return Status::OK();
}

Status parse_machine_configuration(const xmlNode* config, BundleManifest* manifest) {
  Result<std::string> architecture =
      required_text(kDocument, config, "architecture", "<machine_configuration><architecture>");
  if (!architecture.ok()) return architecture.status();
  manifest->architecture = std::move(*architecture);
  Result<std::optional<std::string>> kernel_id =
      optional_text(kDocument, config, "kernel_id", "<machine_configuration><kernel_id>");
  if (!kernel_id.ok()) return kernel_id.status();
  manifest->kernel_id = std::move(*kernel_id);
  Result<std::optional<std::string>> ramdisk_id =
      optional_text(kDocument, config, "ramdisk_id", "<machine_configuration><ramdisk_id>");
  if (!ramdisk_id.ok()) return ramdisk_id.status();
  manifest->ramdisk_id = std::move(*ramdisk_id);
  return Status::OK();
}

Status parse_signature(const xmlNode* root, BundleManifest* manifest) {
  Result<std::string> signature = required_text(kDocument, root, "signature", "<signature>");
  if (!signature.ok()) return signature.status();
  if (*signature == kUnsigned) {
    manifest->signature = std::string(kUnsigned);
    return Status::OK();
  }
  Result<std::string> hex = parse_hex(kDocument, *signature, "<signature>");
  if (!hex.ok()) return hex.status();
  manifest->signature = std::move(*hex);
  return Status::OK();
}

}  // namespace

Result<BundleManifest> parse_bundle_manifest(std::string_view xml_text) {
  Result<XmlDocPtr> doc = parse_manifest_xml(kDocument, xml_text, kMaxManifestBytes);
  if (!doc.ok()) return doc.status();
  constexpr std::string_view kCounted[] = {"image", "machine_configuration"};
  Result<std::vector<uint64_t>> counts = check_signed_markup(kDocument, doc->get(), kCounted);
  if (!counts.ok()) return counts.status();

  const xmlNode* root = xmlDocGetRootElement(doc->get());
  if (root == nullptr || !is_element(root, "manifest")) {
    return Status::Corruption("manifest's root element is not <manifest>");
  }
  if ((*counts)[0] != 1 || (*counts)[1] != 1) {
    return Status::Corruption(
        "manifest must hold exactly one <image> and one <machine_configuration> element");
  }

  BundleManifest manifest;
  Result<std::string> version = required_version(kDocument, root, kManifestVersion);
  if (!version.ok()) return version.status();
  manifest.version = std::move(*version);

  Result<ManifestTool> bundler = parse_manifest_tool(kDocument, root, "bundler");
  if (!bundler.ok()) return bundler.status();
  manifest.bundler = {std::move(bundler->name), std::move(bundler->version),
                      std::move(bundler->release)};

  Result<const xmlNode*> config =
      required_child(kDocument, root, "machine_configuration", "<machine_configuration>");
  if (!config.ok()) return config.status();
  Status s = parse_machine_configuration(*config, &manifest);
  if (!s.ok()) return s;

  Result<const xmlNode*> image = required_child(kDocument, root, "image", "<image>");
  if (!image.ok()) return image.status();
  s = parse_image(*image, &manifest);
  if (!s.ok()) return s;

  s = parse_signature(root, &manifest);
  if (!s.ok()) return s;

  Result<std::string_view> signed_config =
      raw_element(kDocument, xml_text, "machine_configuration");
  if (!signed_config.ok()) return signed_config.status();
  Result<std::string_view> signed_image = raw_element(kDocument, xml_text, "image");
  if (!signed_image.ok()) return signed_image.status();
  manifest.signed_text = std::string(*signed_config);
  manifest.signed_text += *signed_image;
  return manifest;
}

std::string hex_encode(std::span<const uint8_t> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(bytes.size() * 2);
  for (uint8_t byte : bytes) {
    hex += kDigits[byte >> 4];
    hex += kDigits[byte & 0x0f];
  }
  return hex;
}

std::optional<std::vector<uint8_t>> hex_decode(std::string_view hex) {
  if (hex.size() % 2 != 0) return std::nullopt;
  std::vector<uint8_t> bytes(hex.size() / 2);
  for (size_t i = 0; i < bytes.size(); ++i) {
    const int high = hex_digit_value(hex[2 * i]);
    const int low = hex_digit_value(hex[2 * i + 1]);
    if (high < 0 || low < 0) return std::nullopt;
    bytes[i] = static_cast<uint8_t>((high << 4) | low);
  }
  return bytes;
}

}  // namespace imgfs::formats
