#include "formats/download_manifest.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "formats/bundle_keys.h"
#include "formats/bundle_manifest.h"
#include "formats/manifest_xml.h"

namespace imgfs::formats {

namespace {

// Error messages start with this.
constexpr std::string_view kDocument = "download manifest";
// A manifest of 100000 parts with one pre-signed URL each is about 50 MB.
constexpr size_t kMaxManifestBytes = 128u << 20;
constexpr std::string_view kDownloadVersion = "2014-01-14";
constexpr std::string_view kSignatureAlgorithm = "RSA-SHA256";
constexpr size_t kSniffBytes = 64u << 10;
// The elements the signature covers, in signing order; <bundle> only for BUNDLE.
constexpr std::string_view kSignedElements[] = {"version", "file-format", "bundle", "image"};

Status corruption(std::string_view what) { return manifest_corruption(kDocument, what); }

// Each format's name as the CLC writes it; parse_file_format() and download_file_format_name()
// both read this one table.
constexpr std::pair<DownloadFileFormat, std::string_view> kFileFormatNames[] = {
    {DownloadFileFormat::kBundle, "BUNDLE"},
    {DownloadFileFormat::kRaw, "RAW"},
    {DownloadFileFormat::kVmdk, "VMDK"},
    {DownloadFileFormat::kVhd, "VHD"},
};

// Exact upper case, as eucatoolkit compares it.
Result<DownloadFileFormat> parse_file_format(std::string_view text) {
  for (const auto& [format, name] : kFileFormatNames) {
    if (text == name) return format;
  }
  return Status::NotSupported("download manifest file-format '" + std::string(text) +
                              "' is not supported (BUNDLE, RAW, VMDK or VHD)");
}

Result<DownloadManifest::Bundle> parse_bundle(const xmlNode* bundle) {
  DownloadManifest::Bundle out;
  for (auto [name, target] : {std::pair{"encrypted-key", &out.encrypted_key_hex},
                              std::pair{"encrypted-iv", &out.encrypted_iv_hex}}) {
    const std::string path = "<bundle><" + std::string(name) + ">";
    Result<std::string> text = required_text(kDocument, bundle, name, path);
    if (!text.ok()) return text.status();
    Result<std::string> hex = parse_hex(kDocument, *text, path);
    if (!hex.ok()) return hex.status();
    *target = std::move(*hex);
  }
  Result<uint64_t> size =
      required_number(kDocument, bundle, "unbundled-size", "<bundle><unbundled-size>");
  if (!size.ok()) return size.status();
  out.unbundled_size = *size;
  return out;
}

Result<std::optional<std::array<uint8_t, 20>>> parse_digest(const xmlNode* part,
                                                            const std::string& label) {
  const std::string path = label + "<digest>";
  Result<const xmlNode*> digest = unique_child(kDocument, part, "digest", path);
  if (!digest.ok()) return digest.status();
  if (*digest == nullptr) return std::optional<std::array<uint8_t, 20>>();
  // The CLC copies the bundle manifest's algorithm attribute, which euca2ools writes as SHA1.
  Status s = check_algorithm(kDocument, *digest, "SHA1", path);
  if (!s.ok()) return s;
  Result<std::string> text = leaf_text(kDocument, *digest, path);
  if (!text.ok()) return text.status();
  if (text->size() != 40) return corruption(path + " '" + *text + "' is not 40 hex digits");
  Result<std::string> hex = parse_hex(kDocument, *text, path);
  if (!hex.ok()) return hex.status();
  const std::vector<uint8_t> bytes = *hex_decode(*hex);
  std::array<uint8_t, 20> sha1{};
  std::copy(bytes.begin(), bytes.end(), sha1.begin());
  return std::optional<std::array<uint8_t, 20>>(sha1);
}

Result<std::vector<DownloadPart>> parse_parts(const xmlNode* parts_element) {
  // parts@count is optional: the CLC does not write it; eucatoolkit checks it when present.
  std::vector<const xmlNode*> part_nodes;
  for (const xmlNode* node = parts_element->children; node != nullptr; node = node->next) {
    if (!is_element(node, "part")) continue;
    if (part_nodes.size() == kMaxDownloadParts) {
      return corruption("lists more than " + std::to_string(kMaxDownloadParts) + " parts");
    }
    part_nodes.push_back(node);
  }
  if (std::optional<std::string> count_text = attribute(parts_element, "count")) {
    Result<uint64_t> count = parse_decimal(kDocument, *count_text, "<image><parts> count");
    if (!count.ok()) return count.status();
    if (*count != part_nodes.size()) {
      return corruption("<image><parts> count is " + std::to_string(*count) + " but " +
                        std::to_string(part_nodes.size()) + " <part> elements are listed");
    }
  }
  if (part_nodes.empty()) return corruption("lists no parts");

  const uint64_t count = part_nodes.size();
  std::vector<DownloadPart> parts(count);
  std::vector<bool> seen(count, false);
  for (const xmlNode* node : part_nodes) {
    std::optional<std::string> index_text = attribute(node, "index");
    if (!index_text) return corruption("<part> lacks an index attribute");
    Result<uint64_t> index = parse_decimal(kDocument, *index_text, "<part> index");
    if (!index.ok()) return index.status();
    if (*index >= count) {
      return corruption("part index " + std::to_string(*index) + " is not below the " +
                        std::to_string(count) + " parts listed");
    }
    Status s = claim_part_index(kDocument, *index, &seen);
    if (!s.ok()) return s;

    const std::string label = "<part index=\"" + std::to_string(*index) + "\">";
    Result<std::string> get_url = required_text(kDocument, node, "get-url", label + "<get-url>");
    if (!get_url.ok()) return get_url.status();
    if (get_url->empty()) return corruption(label + "<get-url> is empty");
    Result<std::optional<std::array<uint8_t, 20>>> sha1 = parse_digest(node, label);
    if (!sha1.ok()) return sha1.status();

    DownloadPart& part = parts[*index];
    part.index = *index;
    part.get_url = std::move(*get_url);
    part.sha1 = *sha1;
  }
  return parts;
}

Status check_signature_algorithm(std::string_view algorithm) {
  if (!equals_ignore_case(algorithm, kSignatureAlgorithm)) {
    return Status::NotSupported("download manifest <signature> algorithm '" +
                                std::string(algorithm) + "' is not " +
                                std::string(kSignatureAlgorithm));
  }
  return Status::OK();
}

Status parse_signature(const xmlNode* root, DownloadManifest* manifest) {
  Result<const xmlNode*> signature = required_child(kDocument, root, "signature", "<signature>");
  if (!signature.ok()) return signature.status();
  std::optional<std::string> algorithm = attribute(*signature, "algorithm");
  if (!algorithm) return corruption("<signature> lacks an algorithm attribute");
  Status s = check_signature_algorithm(*algorithm);
  if (!s.ok()) return s;
  Result<std::string> text = leaf_text(kDocument, *signature, "<signature>");
  if (!text.ok()) return text.status();
  Result<std::string> hex = parse_hex(kDocument, *text, "<signature>");
  if (!hex.ok()) return hex.status();
  manifest->signature_algorithm = std::move(*algorithm);
  manifest->signature_hex = std::move(*hex);
  return Status::OK();
}

Result<std::string> signed_text_of(std::string_view xml_text, bool with_bundle) {
  std::string text;
  for (std::string_view name : kSignedElements) {
    if (name == "bundle" && !with_bundle) continue;
    Result<std::string_view> raw = raw_element(kDocument, xml_text, name);
    if (!raw.ok()) return raw.status();
    text += *raw;
  }
  return text;
}

}  // namespace

Result<DownloadManifest> parse_download_manifest(std::string_view xml_text) {
  Result<XmlDocPtr> doc = parse_manifest_xml(kDocument, xml_text, kMaxManifestBytes);
  if (!doc.ok()) return doc.status();
  Result<std::vector<uint64_t>> counts =
      check_signed_markup(kDocument, doc->get(), kSignedElements);
  if (!counts.ok()) return counts.status();

  const xmlNode* root = xmlDocGetRootElement(doc->get());
  if (root == nullptr || !is_element(root, "manifest")) {
    return corruption("root element is not <manifest>");
  }
  if (std::any_of(counts->begin(), counts->end(), [](uint64_t count) { return count > 1; })) {
    return corruption(
        "has more than one <version>, <file-format>, <bundle> or <image> element, which the "
        "signature could not tell apart");
  }

  DownloadManifest manifest;
  Result<std::string> version = required_version(kDocument, root, kDownloadVersion);
  if (!version.ok()) return version.status();
  manifest.version = std::move(*version);

  Result<std::string> format_text = required_text(kDocument, root, "file-format", "<file-format>");
  if (!format_text.ok()) return format_text.status();
  Result<DownloadFileFormat> format = parse_file_format(*format_text);
  if (!format.ok()) return format.status();
  manifest.file_format = *format;
  const bool is_bundle = manifest.file_format == DownloadFileFormat::kBundle;

  Result<const xmlNode*> bundle = unique_child(kDocument, root, "bundle", "<bundle>");
  if (!bundle.ok()) return bundle.status();
  if (is_bundle != (*bundle != nullptr)) {
    return corruption(std::string(is_bundle ? "lacks" : "has") + " a <bundle> element, but " +
                      "file-format is " + *format_text);
  }
  if (is_bundle) {
    Result<DownloadManifest::Bundle> parsed_bundle = parse_bundle(*bundle);
    if (!parsed_bundle.ok()) return parsed_bundle.status();
    manifest.bundle = std::move(*parsed_bundle);
  }

  Result<const xmlNode*> image = required_child(kDocument, root, "image", "<image>");
  if (!image.ok()) return image.status();
  Result<uint64_t> image_size = required_number(kDocument, *image, "size", "<image><size>");
  if (!image_size.ok()) return image_size.status();
  manifest.image_size = *image_size;
  // AES-CBC with PKCS#7 padding always yields whole blocks, at least one.
  if (is_bundle && (manifest.image_size == 0 || manifest.image_size % 16 != 0)) {
    return corruption("<image><size> " + std::to_string(manifest.image_size) +
                      " is not a nonzero multiple of 16 (a bundle's ciphertext size)");
  }
  Result<const xmlNode*> parts = required_child(kDocument, *image, "parts", "<image><parts>");
  if (!parts.ok()) return parts.status();
  Result<std::vector<DownloadPart>> parsed_parts = parse_parts(*parts);
  if (!parsed_parts.ok()) return parsed_parts.status();
  manifest.parts = std::move(*parsed_parts);

  Status s = parse_signature(root, &manifest);
  if (!s.ok()) return s;

  Result<std::string> signed_text = signed_text_of(xml_text, is_bundle);
  if (!signed_text.ok()) return signed_text.status();
  manifest.signed_text = std::move(*signed_text);
  return manifest;
}

std::string_view download_file_format_name(DownloadFileFormat format) {
  for (const auto& [known, name] : kFileFormatNames) {
    if (known == format) return name;
  }
  return "BUNDLE";
}

Status verify_download_manifest_signature(const DownloadManifest& manifest,
                                          const Certificate& certificate) {
  Status s = check_signature_algorithm(manifest.signature_algorithm);
  if (!s.ok()) return s;
  return verify_sha256_rsa_signature(certificate, manifest.signed_text, manifest.signature_hex);
}

bool looks_like_download_manifest(std::string_view xml_text) {
  const std::string_view head = xml_text.substr(0, kSniffBytes);
  return head.find("<manifest") != std::string_view::npos &&
         head.find(kDownloadVersion) != std::string_view::npos;
}

}  // namespace imgfs::formats
