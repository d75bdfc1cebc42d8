#include "formats/import_manifest.h"

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "formats/manifest_xml.h"

namespace imgfs::formats {

namespace {

// Error messages start with this.
constexpr std::string_view kDocument = "import manifest";
// A manifest of 100000 parts with four pre-signed URLs each is about 60 MB.
constexpr size_t kMaxManifestBytes = 128u << 20;
constexpr std::string_view kImportVersion = "2010-11-15";
constexpr size_t kSniffBytes = 64u << 10;

Result<uint64_t> required_attribute_number(const xmlNode* element, const char* name,
                                           std::string_view path) {
  std::optional<std::string> text = attribute(element, name);
  if (!text) {
    return Status::Corruption("import manifest " + std::string(path) + " lacks the " + name +
                              " attribute");
  }
  return parse_decimal(kDocument, *text, std::string(path) + " " + name);
}

Result<std::optional<uint64_t>> optional_number(const xmlNode* parent, std::string_view name,
                                                std::string_view path) {
  Result<std::optional<std::string>> text = optional_text(kDocument, parent, name, path);
  if (!text.ok()) return text.status();
  if (!text->has_value()) return std::optional<uint64_t>();
  Result<uint64_t> value = parse_decimal(kDocument, **text, path);
  if (!value.ok()) return value.status();
  return std::optional<uint64_t>(*value);
}

// Each format's name as manifests write it; parse_file_format() and import_file_format_name()
// both read this one table.
constexpr std::pair<ImportFileFormat, std::string_view> kFileFormatNames[] = {
    {ImportFileFormat::kRaw, "RAW"},
    {ImportFileFormat::kVmdk, "VMDK"},
    {ImportFileFormat::kVhd, "VHD"},
};

// Producers write upper case (FORMATS.md b); other case is accepted too, since it is unambiguous.
Result<ImportFileFormat> parse_file_format(std::string_view text) {
  for (const auto& [format, name] : kFileFormatNames) {
    if (equals_ignore_case(text, name)) return format;
  }
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
  if (has_dot_dot_component(key)) {
    return Status::Corruption(label + " '" + std::string(key) + "' has a '..' component");
  }
  return Status::OK();
}

Result<std::string> url_text(const xmlNode* part, const char* name, const std::string& label) {
  Result<std::optional<std::string>> text =
      optional_text(kDocument, part, name, label + "<" + name + ">");
  if (!text.ok()) return text.status();
  return text->value_or("");
}

Result<ImportPart> parse_part(const xmlNode* node, uint64_t index) {
  const std::string label = "<part index=\"" + std::to_string(index) + "\">";
  ImportPart part;
  part.index = index;

  Result<const xmlNode*> range =
      required_child(kDocument, node, "byte-range", label + "<byte-range>");
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

  Result<std::string> key = required_text(kDocument, node, "key", label + "<key>");
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
  Result<std::vector<const xmlNode*>> part_nodes =
      counted_part_elements(kDocument, parts_element, *count, kMaxImportParts, "parts@count");
  if (!part_nodes.ok()) return part_nodes.status();

  std::vector<ImportPart> parts(*count);
  std::vector<bool> seen(*count, false);
  for (const xmlNode* node : *part_nodes) {
    Result<uint64_t> index = required_attribute_number(node, "index", "<part>");
    if (!index.ok()) return index.status();
    if (*index >= *count) {
      return Status::Corruption("import manifest part index " + std::to_string(*index) +
                                " is not below parts@count " + std::to_string(*count));
    }
    Status s = claim_part_index(kDocument, *index, &seen);
    if (!s.ok()) return s;
    Result<ImportPart> part = parse_part(node, *index);
    if (!part.ok()) return part.status();
    parts[*index] = std::move(*part);
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

Status parse_import(const xmlNode* import_element, ImportManifest* manifest) {
  Result<std::optional<uint64_t>> size = optional_number(import_element, "size", "<import><size>");
  if (!size.ok()) return size.status();
  manifest->declared_size = *size;
  Result<std::optional<uint64_t>> volume =
      optional_number(import_element, "volume-size", "<import><volume-size>");
  if (!volume.ok()) return volume.status();
  manifest->volume_size_gib = *volume;

  Result<const xmlNode*> parts =
      required_child(kDocument, import_element, "parts", "<import><parts>");
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
  Result<XmlDocPtr> doc = parse_manifest_xml(kDocument, xml_text, kMaxManifestBytes);
  if (!doc.ok()) return doc.status();

  const xmlNode* root = xmlDocGetRootElement(doc->get());
  if (root == nullptr || !is_element(root, "manifest")) {
    return Status::Corruption("import manifest's root element is not <manifest>");
  }

  ImportManifest manifest;
  Result<std::string> version = required_version(kDocument, root, kImportVersion);
  if (!version.ok()) return version.status();
  manifest.version = std::move(*version);

  Result<std::string> format = required_text(kDocument, root, "file-format", "<file-format>");
  if (!format.ok()) return format.status();
  Result<ImportFileFormat> file_format = parse_file_format(*format);
  if (!file_format.ok()) return file_format.status();
  manifest.file_format = *file_format;

  Result<ManifestTool> importer = parse_manifest_tool(kDocument, root, "importer");
  if (!importer.ok()) return importer.status();
  manifest.importer = {std::move(importer->name), std::move(importer->version),
                       std::move(importer->release)};

  Result<std::optional<std::string>> self_destruct =
      optional_text(kDocument, root, "self-destruct-url", "<self-destruct-url>");
  if (!self_destruct.ok()) return self_destruct.status();
  manifest.self_destruct_url = self_destruct->value_or("");

  Result<const xmlNode*> import_element = required_child(kDocument, root, "import", "<import>");
  if (!import_element.ok()) return import_element.status();
  Status s = parse_import(*import_element, &manifest);
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
  for (const auto& [known, name] : kFileFormatNames) {
    if (known == format) return name;
  }
  return "RAW";
}

bool looks_like_import_manifest(std::string_view xml_text) {
  const std::string_view head = xml_text.substr(0, kSniffBytes);
  return head.find(kImportVersion) != std::string_view::npos && has_import_start_tag(head);
}

}  // namespace imgfs::formats
