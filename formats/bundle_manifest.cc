#include "formats/bundle_manifest.h"

#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xmlerror.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "formats/checked_math.h"

namespace imgfs::formats {

namespace {

// A manifest of 100000 parts is about 20 MB; anything far beyond that is not a manifest.
constexpr size_t kMaxManifestBytes = 64u << 20;
constexpr std::string_view kManifestVersion = "2007-10-10";
constexpr std::string_view kUnsigned = "UNSIGNED";

struct DocFree {
  void operator()(xmlDoc* doc) const { xmlFreeDoc(doc); }
};
struct ParserCtxtFree {
  void operator()(xmlParserCtxt* ctxt) const { xmlFreeParserCtxt(ctxt); }
};
struct XmlCharFree {
  void operator()(xmlChar* text) const { xmlFree(text); }
};

// Hands libxml2 the text in pieces, as a file would arrive.
struct MemoryReader {
  std::string_view rest;

  static int read(void* context, char* buffer, int length) {
    auto* self = static_cast<MemoryReader*>(context);
    const size_t count = std::min(self->rest.size(), static_cast<size_t>(length));
    std::copy_n(self->rest.data(), count, buffer);
    self->rest.remove_prefix(count);
    return static_cast<int>(count);
  }
};

bool is_xml_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

std::string_view trim(std::string_view text) {
  while (!text.empty() && is_xml_space(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_xml_space(text.back())) text.remove_suffix(1);
  return text;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool is_hex(std::string_view text) {
  for (char c : text) {
    if (hex_value(c) < 0) return false;
  }
  return true;
}

std::string to_lower_ascii(std::string_view text) {
  std::string lower(text);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return lower;
}

bool equals_ignore_case(std::string_view a, std::string_view b) {
  return to_lower_ascii(a) == to_lower_ascii(b);
}

std::string_view name_of(const xmlNode* node) { return reinterpret_cast<const char*>(node->name); }

bool is_element(const xmlNode* node, std::string_view name) {
  return node->type == XML_ELEMENT_NODE && node->ns == nullptr && name_of(node) == name;
}

// Comments, PIs and CDATA sections are where a literal "<image>" could hide from the parser
// while the signed-text string search (a.5) still finds it. Refusing markup characters inside
// them, a DTD, and duplicate <image>/<machine_configuration> elements makes the first
// "<image>" in the raw text the start tag of the one image element the parser reads.
struct MarkupCensus {
  uint64_t image_elements = 0;
  uint64_t machine_configuration_elements = 0;
};

Status check_markup(const xmlNode* node, MarkupCensus* census) {
  // An explicit stack: the depth of attacker-supplied XML must not set our recursion depth.
  std::vector<const xmlNode*> pending;
  for (; node != nullptr; node = node->next) pending.push_back(node);
  while (!pending.empty()) {
    const xmlNode* current = pending.back();
    pending.pop_back();
    switch (current->type) {
      case XML_ELEMENT_NODE:
        if (name_of(current) == "image") ++census->image_elements;
        if (name_of(current) == "machine_configuration") ++census->machine_configuration_elements;
        for (const xmlNode* child = current->children; child != nullptr; child = child->next) {
          pending.push_back(child);
        }
        break;
      case XML_COMMENT_NODE:
      case XML_PI_NODE:
      case XML_CDATA_SECTION_NODE: {
        const char* content = reinterpret_cast<const char*>(current->content);
        if (content != nullptr && std::string_view(content).find('<') != std::string_view::npos) {
          return Status::Corruption(
              "manifest has a comment, CDATA section or processing instruction holding '<'");
        }
        break;
      }
      case XML_ENTITY_REF_NODE:
      case XML_ENTITY_NODE:
      case XML_ENTITY_DECL:
      case XML_DTD_NODE:
        return Status::Corruption("manifest has a DTD");
      default:
        break;
    }
  }
  return Status::OK();
}

// The only child element `name` of `parent`, nullptr if there is none.
Result<const xmlNode*> unique_child(const xmlNode* parent, std::string_view name,
                                    std::string_view path) {
  const xmlNode* found = nullptr;
  for (const xmlNode* child = parent->children; child != nullptr; child = child->next) {
    if (!is_element(child, name)) continue;
    if (found != nullptr) {
      return Status::Corruption("manifest has more than one " + std::string(path));
    }
    found = child;
  }
  return found;
}

Result<const xmlNode*> required_child(const xmlNode* parent, std::string_view name,
                                      std::string_view path) {
  Result<const xmlNode*> child = unique_child(parent, name, path);
  if (!child.ok()) return child.status();
  if (*child == nullptr) return Status::Corruption("manifest lacks " + std::string(path));
  return child;
}

// The trimmed text of an element that must hold only text.
Result<std::string> leaf_text(const xmlNode* element, std::string_view path) {
  std::string text;
  for (const xmlNode* child = element->children; child != nullptr; child = child->next) {
    switch (child->type) {
      case XML_TEXT_NODE:
      case XML_CDATA_SECTION_NODE:
        if (child->content != nullptr) text += reinterpret_cast<const char*>(child->content);
        break;
      case XML_COMMENT_NODE:
      case XML_PI_NODE:
        break;
      default:
        return Status::Corruption("manifest " + std::string(path) + " must hold only text");
    }
  }
  return std::string(trim(text));
}

Result<std::string> required_text(const xmlNode* parent, std::string_view name,
                                  std::string_view path) {
  Result<const xmlNode*> child = required_child(parent, name, path);
  if (!child.ok()) return child.status();
  return leaf_text(*child, path);
}

// Empty when the element is absent.
Result<std::optional<std::string>> optional_text(const xmlNode* parent, std::string_view name,
                                                 std::string_view path) {
  Result<const xmlNode*> child = unique_child(parent, name, path);
  if (!child.ok()) return child.status();
  if (*child == nullptr) return std::optional<std::string>();
  Result<std::string> text = leaf_text(*child, path);
  if (!text.ok()) return text.status();
  return std::optional<std::string>(std::move(*text));
}

std::optional<std::string> attribute(const xmlNode* element, const char* name) {
  std::unique_ptr<xmlChar, XmlCharFree> value(
      xmlGetNoNsProp(element, reinterpret_cast<const xmlChar*>(name)));
  if (value == nullptr) return std::nullopt;
  return std::string(reinterpret_cast<const char*>(value.get()));
}

Result<uint64_t> parse_decimal(std::string_view text, std::string_view what) {
  if (text.empty()) return Status::Corruption("manifest " + std::string(what) + " is empty");
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') {
      return Status::Corruption("manifest " + std::string(what) + " '" + std::string(text) +
                                "' is not a decimal number");
    }
    std::optional<uint64_t> shifted = checked_mul(value, 10);
    std::optional<uint64_t> next =
        shifted ? checked_add(*shifted, static_cast<uint64_t>(c - '0')) : std::nullopt;
    if (!next) {
      return Status::Corruption("manifest " + std::string(what) + " '" + std::string(text) +
                                "' does not fit in 64 bits");
    }
    value = *next;
  }
  return value;
}

Result<std::string> parse_sha1_hex(std::string_view text, std::string_view what) {
  if (text.size() != 40 || !is_hex(text)) {
    return Status::Corruption("manifest " + std::string(what) + " '" + std::string(text) +
                              "' is not 40 hex digits");
  }
  return to_lower_ascii(text);
}

// A hex RSA blob, lowercased; empty only where `allow_empty`.
Result<std::string> parse_hex_blob(std::string_view text, std::string_view what, bool allow_empty) {
  if (text.empty()) {
    if (allow_empty) return std::string();
    return Status::Corruption("manifest " + std::string(what) + " is empty");
  }
  if (text.size() % 2 != 0 || !is_hex(text)) {
    return Status::Corruption("manifest " + std::string(what) +
                              " is not an even-length hex string");
  }
  return to_lower_ascii(text);
}

Status check_algorithm(const xmlNode* element, std::string_view expected, std::string_view what) {
  std::optional<std::string> algorithm = attribute(element, "algorithm");
  if (algorithm && !equals_ignore_case(trim(*algorithm), expected)) {
    return Status::NotSupported("manifest " + std::string(what) + " algorithm '" + *algorithm +
                                "' is not " + std::string(expected));
  }
  return Status::OK();
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
  bool escapes = filename.front() == '/' || filename.find('\\') != std::string_view::npos;
  size_t start = 0;
  while (!escapes && start <= filename.size()) {
    size_t end = filename.find('/', start);
    if (end == std::string_view::npos) end = filename.size();
    escapes = filename.substr(start, end - start) == "..";
    start = end + 1;
  }
  if (escapes) {
    return Status::Corruption("part filename escapes the manifest's folder: " + label + " '" +
                              std::string(filename) + "'");
  }
  return Status::OK();
}

Result<std::vector<BundlePart>> parse_parts(const xmlNode* parts_element) {
  std::optional<std::string> count_text = attribute(parts_element, "count");
  if (!count_text) return Status::Corruption("manifest <image><parts> lacks a count attribute");
  Result<uint64_t> count = parse_decimal(trim(*count_text), "<image><parts> count");
  if (!count.ok()) return count.status();
  if (*count == 0) return Status::Corruption("manifest lists no parts");
  if (*count > kMaxBundleParts) {
    return Status::Corruption("manifest lists " + std::to_string(*count) + " parts (limit " +
                              std::to_string(kMaxBundleParts) + ")");
  }

  std::vector<BundlePart> parts(*count);
  std::vector<bool> seen(*count, false);
  uint64_t listed = 0;
  for (const xmlNode* node = parts_element->children; node != nullptr; node = node->next) {
    if (!is_element(node, "part")) continue;
    ++listed;
    if (listed > *count) break;
    std::optional<std::string> index_text = attribute(node, "index");
    if (!index_text) return Status::Corruption("manifest <part> lacks an index attribute");
    Result<uint64_t> index = parse_decimal(trim(*index_text), "<part> index");
    if (!index.ok()) return index.status();
    if (*index >= *count) {
      return Status::Corruption("manifest part index " + std::to_string(*index) +
                                " is out of range 0.." + std::to_string(*count - 1));
    }
    if (seen[*index]) {
      return Status::Corruption("manifest has duplicate part index " + std::to_string(*index));
    }
    seen[*index] = true;

    const std::string label = "<part index=\"" + std::to_string(*index) + "\">";
    Result<std::string> filename = required_text(node, "filename", label + "<filename>");
    if (!filename.ok()) return filename.status();
    Status s = check_part_filename(*index, *filename);
    if (!s.ok()) return s;
    Result<const xmlNode*> digest_element = required_child(node, "digest", label + "<digest>");
    if (!digest_element.ok()) return digest_element.status();
    s = check_algorithm(*digest_element, "SHA1", label + "<digest>");
    if (!s.ok()) return s;
    Result<std::string> digest_text = leaf_text(*digest_element, label + "<digest>");
    if (!digest_text.ok()) return digest_text.status();
    Result<std::string> digest_hex = parse_sha1_hex(*digest_text, label + "<digest>");
    if (!digest_hex.ok()) return digest_hex.status();

    BundlePart& part = parts[*index];
    part.index = *index;
    part.filename = std::move(*filename);
    std::optional<std::vector<uint8_t>> sha1 = hex_decode(*digest_hex);
    std::copy(sha1->begin(), sha1->end(), part.sha1.begin());
  }
  if (listed != *count) {
    return Status::Corruption("manifest <image><parts> count is " + std::to_string(*count) +
                              " but " + (listed > *count ? "more" : std::to_string(listed)) +
                              " <part> elements are listed");
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
        required_text(image, field.name, "<image><" + std::string(field.name) + ">");
    if (!text.ok()) return text.status();
    *field.target = std::move(*text);
  }

  Result<const xmlNode*> digest = required_child(image, "digest", "<image><digest>");
  if (!digest.ok()) return digest.status();
  Status s = check_algorithm(*digest, "SHA1", "<image><digest>");
  if (!s.ok()) return s;
  Result<std::string> digest_text = leaf_text(*digest, "<image><digest>");
  if (!digest_text.ok()) return digest_text.status();
  Result<std::string> digest_hex = parse_sha1_hex(*digest_text, "<image><digest>");
  if (!digest_hex.ok()) return digest_hex.status();
  out.digest_hex = std::move(*digest_hex);

  for (auto [name, target] :
       {std::pair{"size", &out.size}, std::pair{"bundled_size", &out.bundled_size}}) {
    const std::string path = "<image><" + std::string(name) + ">";
    Result<std::string> text = required_text(image, name, path);
    if (!text.ok()) return text.status();
    Result<uint64_t> value = parse_decimal(*text, path);
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
    Result<const xmlNode*> element = unique_child(image, field.name, path);
    if (!element.ok()) return element.status();
    if (*element == nullptr) {
      if (field.required) return Status::Corruption("manifest lacks " + path);
      continue;
    }
    if (field.has_algorithm) {
      s = check_algorithm(*element, "AES-128-CBC", path);
      if (!s.ok()) return s;
    }
    Result<std::string> text = leaf_text(*element, path);
    if (!text.ok()) return text.status();
    Result<std::string> blob = parse_hex_blob(*text, path, !field.required);
    if (!blob.ok()) return blob.status();
    *field.target = std::move(*blob);
  }

  Result<const xmlNode*> parts = required_child(image, "parts", "<image><parts>");
  if (!parts.ok()) return parts.status();
  Result<std::vector<BundlePart>> parsed_parts = parse_parts(*parts);
  if (!parsed_parts.ok()) return parsed_parts.status();
  manifest->parts = std::move(*parsed_parts);
  return Status::OK();
}

Status parse_machine_configuration(const xmlNode* config, BundleManifest* manifest) {
  Result<std::string> architecture =
      required_text(config, "architecture", "<machine_configuration><architecture>");
  if (!architecture.ok()) return architecture.status();
  manifest->architecture = std::move(*architecture);
  Result<std::optional<std::string>> kernel_id =
      optional_text(config, "kernel_id", "<machine_configuration><kernel_id>");
  if (!kernel_id.ok()) return kernel_id.status();
  manifest->kernel_id = std::move(*kernel_id);
  Result<std::optional<std::string>> ramdisk_id =
      optional_text(config, "ramdisk_id", "<machine_configuration><ramdisk_id>");
  if (!ramdisk_id.ok()) return ramdisk_id.status();
  manifest->ramdisk_id = std::move(*ramdisk_id);
  return Status::OK();
}

Status parse_bundler(const xmlNode* root, BundleManifest* manifest) {
  Result<const xmlNode*> bundler = unique_child(root, "bundler", "<bundler>");
  if (!bundler.ok()) return bundler.status();
  if (*bundler == nullptr) return Status::OK();
  BundleManifest::Bundler& out = manifest->bundler;
  for (auto [name, target] : {std::pair{"name", &out.name}, std::pair{"version", &out.version},
                              std::pair{"release", &out.release}}) {
    Result<std::optional<std::string>> text =
        optional_text(*bundler, name, "<bundler><" + std::string(name) + ">");
    if (!text.ok()) return text.status();
    *target = text->value_or("");
  }
  return Status::OK();
}

// The raw bytes from the first `<name>` to the first `</name>`, inclusive (a.5).
Result<std::string_view> raw_element(std::string_view xml_text, std::string_view name) {
  const std::string open = "<" + std::string(name) + ">";
  const std::string close = "</" + std::string(name) + ">";
  const size_t begin = xml_text.find(open);
  const size_t end = xml_text.find(close);
  if (begin == std::string_view::npos || end == std::string_view::npos || end < begin) {
    return Status::Corruption("manifest lacks the literal text " + open + "..." + close +
                              " that the signature covers");
  }
  return xml_text.substr(begin, end + close.size() - begin);
}

Status parse_signature(const xmlNode* root, BundleManifest* manifest) {
  Result<std::string> signature = required_text(root, "signature", "<signature>");
  if (!signature.ok()) return signature.status();
  if (*signature == kUnsigned) {
    manifest->signature = std::string(kUnsigned);
    return Status::OK();
  }
  Result<std::string> hex = parse_hex_blob(*signature, "<signature>", false);
  if (!hex.ok()) return hex.status();
  manifest->signature = std::move(*hex);
  return Status::OK();
}

}  // namespace

Result<BundleManifest> parse_bundle_manifest(std::string_view xml_text) {
  if (xml_text.size() > kMaxManifestBytes) {
    return Status::Corruption("manifest is " + std::to_string(xml_text.size()) + " bytes (limit " +
                              std::to_string(kMaxManifestBytes) + ")");
  }
  // UTF-16 would also defeat the byte-wise signed-text search; no producer writes it.
  if (xml_text.find('\0') != std::string_view::npos) {
    return Status::Corruption("manifest contains a NUL byte (not ASCII/UTF-8 XML)");
  }
  // Refused before parsing so that no entity declaration is ever processed.
  if (xml_text.find("<!DOCTYPE") != std::string_view::npos) {
    return Status::Corruption("manifest has a DTD");
  }

  std::unique_ptr<xmlParserCtxt, ParserCtxtFree> ctxt(xmlNewParserCtxt());
  if (ctxt == nullptr) return Status::IOError("libxml2 could not allocate a parser context");
  // Fed through a read callback rather than xmlCtxtReadMemory: libxml2 2.9 refuses an in-memory
  // document over 10 MB ("Huge input lookup") unless XML_PARSE_HUGE also lifts its other limits.
  MemoryReader reader{xml_text};
  std::unique_ptr<xmlDoc, DocFree> doc(
      xmlCtxtReadIO(ctxt.get(), &MemoryReader::read, nullptr, &reader, "manifest.xml", nullptr,
                    XML_PARSE_NONET | XML_PARSE_NOWARNING | XML_PARSE_NOERROR));
  if (doc == nullptr) {
    std::string detail = "unknown error";
    const xmlError* error = xmlCtxtGetLastError(ctxt.get());
    if (error != nullptr && error->message != nullptr) {
      detail = "line " + std::to_string(error->line) + ": " + std::string(trim(error->message));
    }
    return Status::Corruption("manifest is not well-formed XML (" + detail + ")");
  }
  if (doc->intSubset != nullptr || doc->extSubset != nullptr) {
    return Status::Corruption("manifest has a DTD");
  }

  MarkupCensus census;
  Status s = check_markup(doc->children, &census);
  if (!s.ok()) return s;

  const xmlNode* root = xmlDocGetRootElement(doc.get());
  if (root == nullptr || !is_element(root, "manifest")) {
    return Status::Corruption("manifest's root element is not <manifest>");
  }
  if (census.image_elements != 1 || census.machine_configuration_elements != 1) {
    return Status::Corruption(
        "manifest must hold exactly one <image> and one <machine_configuration> element");
  }

  BundleManifest manifest;
  Result<std::string> version = required_text(root, "version", "<version>");
  if (!version.ok()) return version.status();
  if (*version != kManifestVersion) {
    return Status::Corruption("manifest version is '" + *version + "', expected " +
                              std::string(kManifestVersion));
  }
  manifest.version = std::move(*version);

  s = parse_bundler(root, &manifest);
  if (!s.ok()) return s;

  Result<const xmlNode*> config =
      required_child(root, "machine_configuration", "<machine_configuration>");
  if (!config.ok()) return config.status();
  s = parse_machine_configuration(*config, &manifest);
  if (!s.ok()) return s;

  Result<const xmlNode*> image = required_child(root, "image", "<image>");
  if (!image.ok()) return image.status();
  s = parse_image(*image, &manifest);
  if (!s.ok()) return s;

  s = parse_signature(root, &manifest);
  if (!s.ok()) return s;

  Result<std::string_view> signed_config = raw_element(xml_text, "machine_configuration");
  if (!signed_config.ok()) return signed_config.status();
  Result<std::string_view> signed_image = raw_element(xml_text, "image");
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
    const int high = hex_value(hex[2 * i]);
    const int low = hex_value(hex[2 * i + 1]);
    if (high < 0 || low < 0) return std::nullopt;
    bytes[i] = static_cast<uint8_t>((high << 4) | low);
  }
  return bytes;
}

}  // namespace imgfs::formats
