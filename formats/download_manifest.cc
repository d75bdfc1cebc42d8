#include "formats/download_manifest.h"

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

// A manifest of 100000 parts with one pre-signed URL each is about 50 MB.
constexpr size_t kMaxManifestBytes = 128u << 20;
constexpr std::string_view kDownloadVersion = "2014-01-14";
constexpr std::string_view kSignatureAlgorithm = "RSA-SHA256";
constexpr size_t kSniffBytes = 64u << 10;

struct DocFree {
  void operator()(xmlDoc* doc) const { xmlFreeDoc(doc); }
};
struct ParserCtxtFree {
  void operator()(xmlParserCtxt* ctxt) const { xmlFreeParserCtxt(ctxt); }
};
struct XmlCharFree {
  void operator()(xmlChar* text) const { xmlFree(text); }
};

// Hands libxml2 the text in pieces, as a file would arrive: xmlCtxtReadMemory refuses a document
// over 10 MB in libxml2 2.9 unless XML_PARSE_HUGE also lifts its other limits.
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

Status corruption(std::string_view what) {
  return Status::Corruption("download manifest " + std::string(what));
}

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

std::string to_lower_ascii(std::string_view text) {
  std::string lower(text);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return lower;
}

std::string_view name_of(const xmlNode* node) { return reinterpret_cast<const char*>(node->name); }

bool is_element(const xmlNode* node, std::string_view name) {
  return node->type == XML_ELEMENT_NODE && node->ns == nullptr && name_of(node) == name;
}

// Counts of the elements whose raw text the signature covers, wherever they appear.
struct SignedElementCensus {
  uint64_t version = 0;
  uint64_t file_format = 0;
  uint64_t bundle = 0;
  uint64_t image = 0;
};

// The signed text is cut from the raw bytes by string search, the fields from the parsed tree.
// They agree only if the first literal "<image>" etc. is the start tag of the one element the
// parser reads: so markup characters inside comments, PIs and CDATA, a DTD, and duplicates of a
// signed element anywhere in the document are refused.
Status check_markup(const xmlNode* node, SignedElementCensus* census) {
  // An explicit stack: the depth of attacker-supplied XML must not set our recursion depth.
  std::vector<const xmlNode*> pending;
  for (; node != nullptr; node = node->next) pending.push_back(node);
  while (!pending.empty()) {
    const xmlNode* current = pending.back();
    pending.pop_back();
    switch (current->type) {
      case XML_ELEMENT_NODE: {
        const std::string_view name = name_of(current);
        if (name == "version") ++census->version;
        if (name == "file-format") ++census->file_format;
        if (name == "bundle") ++census->bundle;
        if (name == "image") ++census->image;
        for (const xmlNode* child = current->children; child != nullptr; child = child->next) {
          pending.push_back(child);
        }
        break;
      }
      case XML_COMMENT_NODE:
      case XML_PI_NODE:
      case XML_CDATA_SECTION_NODE: {
        const char* content = reinterpret_cast<const char*>(current->content);
        if (content != nullptr && std::string_view(content).find('<') != std::string_view::npos) {
          return corruption("has a comment, CDATA section or processing instruction holding '<'");
        }
        break;
      }
      case XML_ENTITY_REF_NODE:
      case XML_ENTITY_NODE:
      case XML_ENTITY_DECL:
      case XML_DTD_NODE:
        return corruption("has a DTD");
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
    if (found != nullptr) return corruption("has more than one " + std::string(path));
    found = child;
  }
  return found;
}

Result<const xmlNode*> required_child(const xmlNode* parent, std::string_view name,
                                      std::string_view path) {
  Result<const xmlNode*> child = unique_child(parent, name, path);
  if (!child.ok()) return child.status();
  if (*child == nullptr) return corruption("lacks " + std::string(path));
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
        return corruption(std::string(path) + " must hold only text");
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

std::optional<std::string> attribute(const xmlNode* element, const char* name) {
  std::unique_ptr<xmlChar, XmlCharFree> value(
      xmlGetNoNsProp(element, reinterpret_cast<const xmlChar*>(name)));
  if (value == nullptr) return std::nullopt;
  return std::string(trim(reinterpret_cast<const char*>(value.get())));
}

Result<uint64_t> parse_decimal(std::string_view text, std::string_view what) {
  if (text.empty()) return corruption(std::string(what) + " is empty");
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') {
      return corruption(std::string(what) + " '" + std::string(text) + "' is not a decimal number");
    }
    std::optional<uint64_t> shifted = checked_mul(value, 10);
    std::optional<uint64_t> next =
        shifted ? checked_add(*shifted, static_cast<uint64_t>(c - '0')) : std::nullopt;
    if (!next) {
      return corruption(std::string(what) + " '" + std::string(text) + "' does not fit in 64 bits");
    }
    value = *next;
  }
  return value;
}

Result<uint64_t> required_number(const xmlNode* parent, std::string_view name,
                                 std::string_view path) {
  Result<std::string> text = required_text(parent, name, path);
  if (!text.ok()) return text.status();
  return parse_decimal(*text, path);
}

// Non-empty, even-length hex, lowercased.
Result<std::string> parse_hex(std::string_view text, std::string_view what) {
  if (text.empty()) return corruption(std::string(what) + " is empty");
  const bool all_hex =
      std::all_of(text.begin(), text.end(), [](char c) { return hex_value(c) >= 0; });
  if (text.size() % 2 != 0 || !all_hex) {
    return corruption(std::string(what) + " is not an even-length hex string");
  }
  return to_lower_ascii(text);
}

bool equals_ignore_case(std::string_view a, std::string_view b) {
  return to_lower_ascii(a) == to_lower_ascii(b);
}

Result<DownloadFileFormat> parse_file_format(std::string_view text) {
  if (text == "BUNDLE") return DownloadFileFormat::kBundle;
  if (text == "RAW") return DownloadFileFormat::kRaw;
  if (text == "VMDK") return DownloadFileFormat::kVmdk;
  if (text == "VHD") return DownloadFileFormat::kVhd;
  return Status::NotSupported("download manifest file-format '" + std::string(text) +
                              "' is not supported (BUNDLE, RAW, VMDK or VHD)");
}

Result<DownloadManifest::Bundle> parse_bundle(const xmlNode* bundle) {
  DownloadManifest::Bundle out;
  for (auto [name, target] : {std::pair{"encrypted-key", &out.encrypted_key_hex},
                              std::pair{"encrypted-iv", &out.encrypted_iv_hex}}) {
    const std::string path = "<bundle><" + std::string(name) + ">";
    Result<std::string> text = required_text(bundle, name, path);
    if (!text.ok()) return text.status();
    Result<std::string> hex = parse_hex(*text, path);
    if (!hex.ok()) return hex.status();
    *target = std::move(*hex);
  }
  Result<uint64_t> size = required_number(bundle, "unbundled-size", "<bundle><unbundled-size>");
  if (!size.ok()) return size.status();
  out.unbundled_size = *size;
  return out;
}

Result<std::optional<std::array<uint8_t, 20>>> parse_digest(const xmlNode* part,
                                                            const std::string& label) {
  const std::string path = label + "<digest>";
  Result<const xmlNode*> digest = unique_child(part, "digest", path);
  if (!digest.ok()) return digest.status();
  if (*digest == nullptr) return std::optional<std::array<uint8_t, 20>>();
  // The CLC copies the bundle manifest's algorithm attribute, which euca2ools writes as SHA1.
  std::optional<std::string> algorithm = attribute(*digest, "algorithm");
  if (algorithm && !equals_ignore_case(*algorithm, "SHA1")) {
    return Status::NotSupported("download manifest " + path + " algorithm '" + *algorithm +
                                "' is not SHA1");
  }
  Result<std::string> text = leaf_text(*digest, path);
  if (!text.ok()) return text.status();
  if (text->size() != 40) return corruption(path + " '" + *text + "' is not 40 hex digits");
  Result<std::string> hex = parse_hex(*text, path);
  if (!hex.ok()) return hex.status();
  std::array<uint8_t, 20> sha1{};
  for (size_t i = 0; i < sha1.size(); ++i) {
    sha1[i] = static_cast<uint8_t>((hex_value((*hex)[2 * i]) << 4) | hex_value((*hex)[2 * i + 1]));
  }
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
    Result<uint64_t> count = parse_decimal(*count_text, "<image><parts> count");
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
    Result<uint64_t> index = parse_decimal(*index_text, "<part> index");
    if (!index.ok()) return index.status();
    if (*index >= count) {
      return corruption("part index " + std::to_string(*index) + " is not below the " +
                        std::to_string(count) + " parts listed");
    }
    if (seen[*index]) return corruption("has duplicate part index " + std::to_string(*index));
    seen[*index] = true;

    const std::string label = "<part index=\"" + std::to_string(*index) + "\">";
    Result<std::string> get_url = required_text(node, "get-url", label + "<get-url>");
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

Status parse_signature(const xmlNode* root, DownloadManifest* manifest) {
  Result<const xmlNode*> signature = required_child(root, "signature", "<signature>");
  if (!signature.ok()) return signature.status();
  std::optional<std::string> algorithm = attribute(*signature, "algorithm");
  if (!algorithm) return corruption("<signature> lacks an algorithm attribute");
  if (!equals_ignore_case(*algorithm, kSignatureAlgorithm)) {
    return Status::NotSupported("download manifest <signature> algorithm '" + *algorithm +
                                "' is not " + std::string(kSignatureAlgorithm));
  }
  Result<std::string> text = leaf_text(*signature, "<signature>");
  if (!text.ok()) return text.status();
  Result<std::string> hex = parse_hex(*text, "<signature>");
  if (!hex.ok()) return hex.status();
  manifest->signature_algorithm = std::move(*algorithm);
  manifest->signature_hex = std::move(*hex);
  return Status::OK();
}

// The raw bytes from the first `<name>` to the first `</name>`, inclusive.
Result<std::string_view> raw_element(std::string_view xml_text, std::string_view name) {
  const std::string open = "<" + std::string(name) + ">";
  const std::string close = "</" + std::string(name) + ">";
  const size_t begin = xml_text.find(open);
  const size_t end = xml_text.find(close);
  if (begin == std::string_view::npos || end == std::string_view::npos || end < begin) {
    return corruption("lacks the literal text " + open + "..." + close +
                      " that the signature covers");
  }
  return xml_text.substr(begin, end + close.size() - begin);
}

Result<std::string> signed_text_of(std::string_view xml_text, bool with_bundle) {
  std::string text;
  for (std::string_view name : {"version", "file-format", "bundle", "image"}) {
    if (name == "bundle" && !with_bundle) continue;
    Result<std::string_view> raw = raw_element(xml_text, name);
    if (!raw.ok()) return raw.status();
    text += *raw;
  }
  return text;
}

}  // namespace

Result<DownloadManifest> parse_download_manifest(std::string_view xml_text) {
  if (xml_text.size() > kMaxManifestBytes) {
    return corruption("is " + std::to_string(xml_text.size()) + " bytes (limit " +
                      std::to_string(kMaxManifestBytes) + ")");
  }
  // UTF-16 would also defeat the byte-wise signed-text search; the CLC writes UTF-8.
  if (xml_text.find('\0') != std::string_view::npos) {
    return corruption("contains a NUL byte (not ASCII/UTF-8 XML)");
  }
  if (xml_text.find("<!DOCTYPE") != std::string_view::npos) return corruption("has a DTD");

  std::unique_ptr<xmlParserCtxt, ParserCtxtFree> ctxt(xmlNewParserCtxt());
  if (ctxt == nullptr) return Status::IOError("libxml2 could not allocate a parser context");
  MemoryReader reader{xml_text};
  std::unique_ptr<xmlDoc, DocFree> doc(
      xmlCtxtReadIO(ctxt.get(), &MemoryReader::read, nullptr, &reader, "download-manifest.xml",
                    nullptr, XML_PARSE_NONET | XML_PARSE_NOWARNING | XML_PARSE_NOERROR));
  if (doc == nullptr) {
    std::string detail = "unknown error";
    const xmlError* error = xmlCtxtGetLastError(ctxt.get());
    if (error != nullptr && error->message != nullptr) {
      detail = "line " + std::to_string(error->line) + ": " + std::string(trim(error->message));
    }
    return corruption("is not well-formed XML (" + detail + ")");
  }
  if (doc->intSubset != nullptr || doc->extSubset != nullptr) return corruption("has a DTD");

  SignedElementCensus census;
  Status s = check_markup(doc->children, &census);
  if (!s.ok()) return s;

  const xmlNode* root = xmlDocGetRootElement(doc.get());
  if (root == nullptr || !is_element(root, "manifest")) {
    return corruption("root element is not <manifest>");
  }
  if (census.version > 1 || census.file_format > 1 || census.bundle > 1 || census.image > 1) {
    return corruption(
        "has more than one <version>, <file-format>, <bundle> or <image> element, which the "
        "signature could not tell apart");
  }

  DownloadManifest manifest;
  Result<std::string> version = required_text(root, "version", "<version>");
  if (!version.ok()) return version.status();
  if (*version != kDownloadVersion) {
    return corruption("version is '" + *version + "', expected " + std::string(kDownloadVersion));
  }
  manifest.version = std::move(*version);

  Result<std::string> format_text = required_text(root, "file-format", "<file-format>");
  if (!format_text.ok()) return format_text.status();
  Result<DownloadFileFormat> format = parse_file_format(*format_text);
  if (!format.ok()) return format.status();
  manifest.file_format = *format;
  const bool is_bundle = manifest.file_format == DownloadFileFormat::kBundle;

  Result<const xmlNode*> bundle = unique_child(root, "bundle", "<bundle>");
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

  Result<const xmlNode*> image = required_child(root, "image", "<image>");
  if (!image.ok()) return image.status();
  Result<uint64_t> image_size = required_number(*image, "size", "<image><size>");
  if (!image_size.ok()) return image_size.status();
  manifest.image_size = *image_size;
  // AES-CBC with PKCS#7 padding always yields whole blocks, at least one.
  if (is_bundle && (manifest.image_size == 0 || manifest.image_size % 16 != 0)) {
    return corruption("<image><size> " + std::to_string(manifest.image_size) +
                      " is not a nonzero multiple of 16 (a bundle's ciphertext size)");
  }
  Result<const xmlNode*> parts = required_child(*image, "parts", "<image><parts>");
  if (!parts.ok()) return parts.status();
  Result<std::vector<DownloadPart>> parsed_parts = parse_parts(*parts);
  if (!parsed_parts.ok()) return parsed_parts.status();
  manifest.parts = std::move(*parsed_parts);

  s = parse_signature(root, &manifest);
  if (!s.ok()) return s;

  Result<std::string> signed_text = signed_text_of(xml_text, is_bundle);
  if (!signed_text.ok()) return signed_text.status();
  manifest.signed_text = std::move(*signed_text);
  return manifest;
}

std::string_view download_file_format_name(DownloadFileFormat format) {
  switch (format) {
    case DownloadFileFormat::kBundle:
      return "BUNDLE";
    case DownloadFileFormat::kRaw:
      return "RAW";
    case DownloadFileFormat::kVmdk:
      return "VMDK";
    case DownloadFileFormat::kVhd:
      return "VHD";
  }
  return "BUNDLE";
}

bool looks_like_download_manifest(std::string_view xml_text) {
  const std::string_view head = xml_text.substr(0, kSniffBytes);
  return head.find("<manifest") != std::string_view::npos &&
         head.find(kDownloadVersion) != std::string_view::npos;
}

}  // namespace imgfs::formats
