#include "formats/import_manifest.h"

#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xmlerror.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "formats/checked_math.h"

namespace imgfs::formats {

namespace {

// A manifest of 100000 parts with four pre-signed URLs each is about 60 MB.
constexpr size_t kMaxManifestBytes = 128u << 20;
constexpr std::string_view kImportVersion = "2010-11-15";
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

bool is_xml_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

std::string_view trim(std::string_view text) {
  while (!text.empty() && is_xml_space(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_xml_space(text.back())) text.remove_suffix(1);
  return text;
}

std::string_view name_of(const xmlNode* node) { return reinterpret_cast<const char*>(node->name); }

bool is_element(const xmlNode* node, std::string_view name) {
  return node->type == XML_ELEMENT_NODE && node->ns == nullptr && name_of(node) == name;
}

// A DTD is refused outright (before parsing too), so no entity is ever declared or expanded.
Status check_no_dtd(const xmlDoc* doc) {
  if (doc->intSubset != nullptr || doc->extSubset != nullptr) {
    return Status::Corruption("import manifest has a DTD");
  }
  for (const xmlNode* node = doc->children; node != nullptr; node = node->next) {
    if (node->type == XML_DTD_NODE) return Status::Corruption("import manifest has a DTD");
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
      return Status::Corruption("import manifest has more than one " + std::string(path));
    }
    found = child;
  }
  return found;
}

Result<const xmlNode*> required_child(const xmlNode* parent, std::string_view name,
                                      std::string_view path) {
  Result<const xmlNode*> child = unique_child(parent, name, path);
  if (!child.ok()) return child.status();
  if (*child == nullptr) return Status::Corruption("import manifest lacks " + std::string(path));
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
        return Status::Corruption("import manifest " + std::string(path) + " must hold only text");
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

// nullopt when the element is absent.
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
  return std::string(trim(reinterpret_cast<const char*>(value.get())));
}

Result<uint64_t> parse_decimal(std::string_view text, std::string_view what) {
  if (text.empty()) return Status::Corruption("import manifest " + std::string(what) + " is empty");
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') {
      return Status::Corruption("import manifest " + std::string(what) + " '" + std::string(text) +
                                "' is not a decimal number");
    }
    std::optional<uint64_t> shifted = checked_mul(value, 10);
    std::optional<uint64_t> next =
        shifted ? checked_add(*shifted, static_cast<uint64_t>(c - '0')) : std::nullopt;
    if (!next) {
      return Status::Corruption("import manifest " + std::string(what) + " '" + std::string(text) +
                                "' does not fit in 64 bits");
    }
    value = *next;
  }
  return value;
}

Result<uint64_t> required_attribute_number(const xmlNode* element, const char* name,
                                           std::string_view path) {
  std::optional<std::string> text = attribute(element, name);
  if (!text) {
    return Status::Corruption("import manifest " + std::string(path) + " lacks the " + name +
                              " attribute");
  }
  return parse_decimal(*text, std::string(path) + " " + name);
}

Result<std::optional<uint64_t>> optional_number(const xmlNode* parent, std::string_view name,
                                                std::string_view path) {
  Result<std::optional<std::string>> text = optional_text(parent, name, path);
  if (!text.ok()) return text.status();
  if (!text->has_value()) return std::optional<uint64_t>();
  Result<uint64_t> value = parse_decimal(**text, path);
  if (!value.ok()) return value.status();
  return std::optional<uint64_t>(*value);
}

Result<ImportFileFormat> parse_file_format(std::string_view text) {
  std::string upper(text);
  for (char& c : upper) {
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  }
  if (upper == "RAW") return ImportFileFormat::kRaw;
  if (upper == "VMDK") return ImportFileFormat::kVmdk;
  if (upper == "VHD") return ImportFileFormat::kVhd;
  return Status::NotSupported("import manifest file-format '" + std::string(text) +
                              "' is not supported (RAW, VMDK or VHD)");
}

// Keys name objects in the bucket; a local directory store maps them to paths, so nothing may
// climb out of the bucket or start at the root.
Status check_key(uint64_t index, std::string_view key) {
  const std::string label = "import manifest part " + std::to_string(index) + " key";
  if (key.empty()) return Status::Corruption(label + " is empty");
  if (key.size() > kMaxImportKeyBytes) {
    return Status::Corruption(label + " is " + std::to_string(key.size()) + " bytes (limit " +
                              std::to_string(kMaxImportKeyBytes) + ")");
  }
  if (key.find('\0') != std::string_view::npos) return Status::Corruption(label + " has a NUL");
  if (key.front() == '/') {
    return Status::Corruption(label + " '" + std::string(key) + "' is absolute");
  }
  size_t start = 0;
  while (start <= key.size()) {
    size_t end = key.find('/', start);
    if (end == std::string_view::npos) end = key.size();
    if (key.substr(start, end - start) == "..") {
      return Status::Corruption(label + " '" + std::string(key) + "' has a '..' component");
    }
    start = end + 1;
  }
  return Status::OK();
}

Result<std::string> url_text(const xmlNode* part, const char* name, const std::string& label) {
  Result<std::optional<std::string>> text = optional_text(part, name, label + "<" + name + ">");
  if (!text.ok()) return text.status();
  return text->value_or("");
}

Result<ImportPart> parse_part(const xmlNode* node, uint64_t index) {
  const std::string label = "<part index=\"" + std::to_string(index) + "\">";
  ImportPart part;
  part.index = index;

  Result<const xmlNode*> range = required_child(node, "byte-range", label + "<byte-range>");
  if (!range.ok()) return range.status();
  Result<uint64_t> start = required_attribute_number(*range, "start", label + "<byte-range>");
  if (!start.ok()) return start.status();
  Result<uint64_t> end = required_attribute_number(*range, "end", label + "<byte-range>");
  if (!end.ok()) return end.status();
  if (*start > *end) {
    return Status::Corruption("import manifest part " + std::to_string(index) + " byte-range " +
                              std::to_string(*start) + "-" + std::to_string(*end) +
                              " ends before it starts");
  }
  // Keeps end + 1 (the file size, the next part's start) representable.
  if (*end == std::numeric_limits<uint64_t>::max()) {
    return Status::Corruption("import manifest part " + std::to_string(index) + " byte-range end " +
                              std::to_string(*end) + " is too large");
  }
  part.start = *start;
  part.end = *end;

  Result<std::string> key = required_text(node, "key", label + "<key>");
  if (!key.ok()) return key.status();
  Status s = check_key(index, *key);
  if (!s.ok()) return s;
  part.key = std::move(*key);

  struct UrlField {
    const char* name;
    std::string* target;
  };
  for (const UrlField& field :
       {UrlField{"head-url", &part.head_url}, UrlField{"get-url", &part.get_url},
        UrlField{"delete-url", &part.delete_url}}) {
    Result<std::string> url = url_text(node, field.name, label);
    if (!url.ok()) return url.status();
    *field.target = std::move(*url);
  }
  return part;
}

Result<std::vector<ImportPart>> parse_parts(const xmlNode* parts_element) {
  Result<uint64_t> count = required_attribute_number(parts_element, "count", "<import><parts>");
  if (!count.ok()) return count.status();
  if (*count == 0) return Status::Corruption("import manifest lists no parts");
  if (*count > kMaxImportParts) {
    return Status::Corruption("import manifest lists " + std::to_string(*count) + " parts (limit " +
                              std::to_string(kMaxImportParts) + ")");
  }

  std::vector<ImportPart> parts(*count);
  std::vector<bool> seen(*count, false);
  uint64_t listed = 0;
  for (const xmlNode* node = parts_element->children; node != nullptr; node = node->next) {
    if (!is_element(node, "part")) continue;
    ++listed;
    if (listed > *count) break;
    Result<uint64_t> index = required_attribute_number(node, "index", "<part>");
    if (!index.ok()) return index.status();
    if (*index >= *count) {
      return Status::Corruption("import manifest part index " + std::to_string(*index) +
                                " is not below parts@count " + std::to_string(*count));
    }
    if (seen[*index]) {
      return Status::Corruption("import manifest has duplicate part index " +
                                std::to_string(*index));
    }
    seen[*index] = true;
    Result<ImportPart> part = parse_part(node, *index);
    if (!part.ok()) return part.status();
    parts[*index] = std::move(*part);
  }
  if (listed != *count) {
    return Status::Corruption("import manifest parts@count is " + std::to_string(*count) + " but " +
                              (listed > *count ? "more" : std::to_string(listed)) +
                              " <part> elements are listed");
  }

  // Indexes are 0..n-1 by now (n distinct values below n); the ranges must tile the file.
  if (parts.front().start != 0) {
    return Status::Corruption("import manifest part 0 starts at " +
                              std::to_string(parts.front().start) + ", not 0");
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    const uint64_t expected = parts[i - 1].end + 1;
    if (parts[i].start != expected) {
      return Status::Corruption(
          "import manifest part " + std::to_string(i) + " starts at " +
          std::to_string(parts[i].start) + " but part " + std::to_string(i - 1) + " ends at " +
          std::to_string(parts[i - 1].end) + (parts[i].start < expected ? " (overlap)" : " (gap)"));
    }
  }
  return parts;
}

Status parse_importer(const xmlNode* root, ImportManifest* manifest) {
  Result<const xmlNode*> importer = unique_child(root, "importer", "<importer>");
  if (!importer.ok()) return importer.status();
  if (*importer == nullptr) return Status::OK();
  ImportManifest::Importer& out = manifest->importer;
  for (auto [name, target] : {std::pair{"name", &out.name}, std::pair{"version", &out.version},
                              std::pair{"release", &out.release}}) {
    Result<std::optional<std::string>> text =
        optional_text(*importer, name, "<importer><" + std::string(name) + ">");
    if (!text.ok()) return text.status();
    *target = text->value_or("");
  }
  return Status::OK();
}

Status parse_import(const xmlNode* import_element, ImportManifest* manifest) {
  Result<std::optional<uint64_t>> size = optional_number(import_element, "size", "<import><size>");
  if (!size.ok()) return size.status();
  manifest->declared_size = *size;
  Result<std::optional<uint64_t>> volume =
      optional_number(import_element, "volume-size", "<import><volume-size>");
  if (!volume.ok()) return volume.status();
  manifest->volume_size_gib = *volume;

  Result<const xmlNode*> parts = required_child(import_element, "parts", "<import><parts>");
  if (!parts.ok()) return parts.status();
  Result<std::vector<ImportPart>> parsed = parse_parts(*parts);
  if (!parsed.ok()) return parsed.status();
  manifest->parts = std::move(*parsed);
  return Status::OK();
}

bool has_import_start_tag(std::string_view text) {
  constexpr std::string_view kTag = "<import";
  for (size_t at = text.find(kTag); at != std::string_view::npos; at = text.find(kTag, at + 1)) {
    const size_t next = at + kTag.size();
    if (next < text.size() && (text[next] == '>' || is_xml_space(text[next]))) return true;
  }
  return false;
}

}  // namespace

Result<ImportManifest> parse_import_manifest(std::string_view xml_text) {
  if (xml_text.size() > kMaxManifestBytes) {
    return Status::Corruption("import manifest is " + std::to_string(xml_text.size()) +
                              " bytes (limit " + std::to_string(kMaxManifestBytes) + ")");
  }
  if (xml_text.find('\0') != std::string_view::npos) {
    return Status::Corruption("import manifest contains a NUL byte (not ASCII/UTF-8 XML)");
  }
  if (xml_text.find("<!DOCTYPE") != std::string_view::npos) {
    return Status::Corruption("import manifest has a DTD");
  }

  std::unique_ptr<xmlParserCtxt, ParserCtxtFree> ctxt(xmlNewParserCtxt());
  if (ctxt == nullptr) return Status::IOError("libxml2 could not allocate a parser context");
  MemoryReader reader{xml_text};
  std::unique_ptr<xmlDoc, DocFree> doc(
      xmlCtxtReadIO(ctxt.get(), &MemoryReader::read, nullptr, &reader, "import-manifest.xml",
                    nullptr, XML_PARSE_NONET | XML_PARSE_NOWARNING | XML_PARSE_NOERROR));
  if (doc == nullptr) {
    std::string detail = "unknown error";
    const xmlError* error = xmlCtxtGetLastError(ctxt.get());
    if (error != nullptr && error->message != nullptr) {
      detail = "line " + std::to_string(error->line) + ": " + std::string(trim(error->message));
    }
    return Status::Corruption("import manifest is not well-formed XML (" + detail + ")");
  }
  Status s = check_no_dtd(doc.get());
  if (!s.ok()) return s;

  const xmlNode* root = xmlDocGetRootElement(doc.get());
  if (root == nullptr || !is_element(root, "manifest")) {
    return Status::Corruption("import manifest's root element is not <manifest>");
  }

  ImportManifest manifest;
  Result<std::string> version = required_text(root, "version", "<version>");
  if (!version.ok()) return version.status();
  if (*version != kImportVersion) {
    return Status::Corruption("import manifest version is '" + *version + "', expected " +
                              std::string(kImportVersion));
  }
  manifest.version = std::move(*version);

  Result<std::string> format = required_text(root, "file-format", "<file-format>");
  if (!format.ok()) return format.status();
  Result<ImportFileFormat> file_format = parse_file_format(*format);
  if (!file_format.ok()) return file_format.status();
  manifest.file_format = *file_format;

  s = parse_importer(root, &manifest);
  if (!s.ok()) return s;

  Result<std::optional<std::string>> self_destruct =
      optional_text(root, "self-destruct-url", "<self-destruct-url>");
  if (!self_destruct.ok()) return self_destruct.status();
  manifest.self_destruct_url = self_destruct->value_or("");

  Result<const xmlNode*> import_element = required_child(root, "import", "<import>");
  if (!import_element.ok()) return import_element.status();
  s = parse_import(*import_element, &manifest);
  if (!s.ok()) return s;
  return manifest;
}

Status ImportManifest::clamp_last_part_to(uint64_t object_size) {
  if (parts.empty()) return Status::InvalidArgument("import manifest has no parts to clamp");
  ImportPart& last = parts.back();
  const uint64_t length = last.length();
  if (object_size == length) return Status::OK();
  if (object_size != 0 && object_size == length - 1) {
    last.end -= 1;
    return Status::OK();
  }
  return Status::Corruption("import manifest part " + std::to_string(last.index) + " byte-range " +
                            std::to_string(last.start) + "-" + std::to_string(last.end) +
                            " holds " + std::to_string(length) + " bytes but its object '" +
                            last.key + "' has " + std::to_string(object_size));
}

Status ImportManifest::fit_to_object_sizes(std::span<const uint64_t> object_sizes) {
  if (object_sizes.size() != parts.size()) {
    return Status::InvalidArgument("import manifest has " + std::to_string(parts.size()) +
                                   " parts but " + std::to_string(object_sizes.size()) +
                                   " object sizes were given");
  }
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    if (object_sizes[i] != parts[i].length()) {
      return Status::Corruption("import manifest part " + std::to_string(i) + " byte-range " +
                                std::to_string(parts[i].start) + "-" +
                                std::to_string(parts[i].end) + " holds " +
                                std::to_string(parts[i].length()) + " bytes but its object '" +
                                parts[i].key + "' has " + std::to_string(object_sizes[i]));
    }
  }
  return clamp_last_part_to(object_sizes.back());
}

std::string_view import_file_format_name(ImportFileFormat format) {
  switch (format) {
    case ImportFileFormat::kRaw:
      return "RAW";
    case ImportFileFormat::kVmdk:
      return "VMDK";
    case ImportFileFormat::kVhd:
      return "VHD";
  }
  return "RAW";
}

bool looks_like_import_manifest(std::string_view xml_text) {
  const std::string_view head = xml_text.substr(0, kSniffBytes);
  return head.find(kImportVersion) != std::string_view::npos && has_import_start_tag(head);
}

}  // namespace imgfs::formats
