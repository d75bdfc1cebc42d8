#include "formats/manifest_xml.h"

#include <libxml/parser.h>
#include <libxml/xmlerror.h>

#include <algorithm>
#include <utility>

#include "formats/checked_math.h"

namespace imgfs::formats {

void XmlDocFree::operator()(xmlDoc* doc) const { xmlFreeDoc(doc); }

namespace {

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

std::string_view name_of(const xmlNode* node) { return reinterpret_cast<const char*>(node->name); }

bool has_dtd(const xmlDoc* doc) {
  if (doc->intSubset != nullptr || doc->extSubset != nullptr) return true;
  for (const xmlNode* node = doc->children; node != nullptr; node = node->next) {
    if (node->type == XML_DTD_NODE) return true;
  }
  return false;
}

}  // namespace

Status manifest_corruption(std::string_view document, std::string_view what) {
  return Status::Corruption(std::string(document) + " " + std::string(what));
}

Result<XmlDocPtr> parse_manifest_xml(std::string_view document, std::string_view xml_text,
                                     size_t max_bytes) {
  if (xml_text.size() > max_bytes) {
    return manifest_corruption(document, "is " + std::to_string(xml_text.size()) +
                                             " bytes (limit " + std::to_string(max_bytes) + ")");
  }
  if (xml_text.find('\0') != std::string_view::npos) {
    return manifest_corruption(document, "contains a NUL byte (not ASCII/UTF-8 XML)");
  }
  if (xml_text.find("<!DOCTYPE") != std::string_view::npos) {
    return manifest_corruption(document, "has a DTD");
  }

  std::unique_ptr<xmlParserCtxt, ParserCtxtFree> ctxt(xmlNewParserCtxt());
  if (ctxt == nullptr) return Status::IOError("libxml2 could not allocate a parser context");
  MemoryReader reader{xml_text};
  XmlDocPtr doc(xmlCtxtReadIO(ctxt.get(), &MemoryReader::read, nullptr, &reader, "manifest.xml",
                              nullptr, XML_PARSE_NONET | XML_PARSE_NOWARNING | XML_PARSE_NOERROR));
  if (doc == nullptr) {
    std::string detail = "unknown error";
    const xmlError* error = xmlCtxtGetLastError(ctxt.get());
    if (error != nullptr && error->message != nullptr) {
      detail = "line " + std::to_string(error->line) + ": " +
               std::string(trim_xml_space(error->message));
    }
    return manifest_corruption(document, "is not well-formed XML (" + detail + ")");
  }
  if (has_dtd(doc.get())) return manifest_corruption(document, "has a DTD");
  return doc;
}

Result<std::vector<uint64_t>> check_signed_markup(std::string_view document, const xmlDoc* doc,
                                                  std::span<const std::string_view> counted_names) {
  std::vector<uint64_t> counts(counted_names.size(), 0);
  std::vector<const xmlNode*> pending;
  for (const xmlNode* node = doc->children; node != nullptr; node = node->next) {
    pending.push_back(node);
  }
  while (!pending.empty()) {
    const xmlNode* current = pending.back();
    pending.pop_back();
    switch (current->type) {
      case XML_ELEMENT_NODE: {
        const std::string_view name = name_of(current);
        for (size_t i = 0; i < counted_names.size(); ++i) {
          if (name == counted_names[i]) ++counts[i];
        }
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
          return manifest_corruption(
              document, "has a comment, CDATA section or processing instruction holding '<'");
        }
        break;
      }
      case XML_ENTITY_REF_NODE:
      case XML_ENTITY_NODE:
      case XML_ENTITY_DECL:
      case XML_DTD_NODE:
        return manifest_corruption(document, "has a DTD");
      default:
        break;
    }
  }
  return counts;
}

Result<std::string_view> raw_element(std::string_view document, std::string_view xml_text,
                                     std::string_view name) {
  const std::string open = "<" + std::string(name) + ">";
  const std::string close = "</" + std::string(name) + ">";
  const size_t begin = xml_text.find(open);
  const size_t end = xml_text.find(close);
  if (begin == std::string_view::npos || end == std::string_view::npos || end < begin) {
    return manifest_corruption(
        document, "lacks the literal text " + open + "..." + close + " that the signature covers");
  }
  return xml_text.substr(begin, end + close.size() - begin);
}

bool is_element(const xmlNode* node, std::string_view name) {
  return node->type == XML_ELEMENT_NODE && node->ns == nullptr && name_of(node) == name;
}

Result<const xmlNode*> unique_child(std::string_view document, const xmlNode* parent,
                                    std::string_view name, std::string_view path) {
  const xmlNode* found = nullptr;
  for (const xmlNode* child = parent->children; child != nullptr; child = child->next) {
    if (!is_element(child, name)) continue;
    if (found != nullptr)
      return manifest_corruption(document, "has more than one " + std::string(path));
    found = child;
  }
  return found;
}

Result<const xmlNode*> required_child(std::string_view document, const xmlNode* parent,
                                      std::string_view name, std::string_view path) {
  Result<const xmlNode*> child = unique_child(document, parent, name, path);
  if (!child.ok()) return child.status();
  if (*child == nullptr) return manifest_corruption(document, "lacks " + std::string(path));
  return child;
}

Result<std::string> leaf_text(std::string_view document, const xmlNode* element,
                              std::string_view path) {
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
        return manifest_corruption(document, std::string(path) + " must hold only text");
    }
  }
  return std::string(trim_xml_space(text));
}

Result<std::string> required_text(std::string_view document, const xmlNode* parent,
                                  std::string_view name, std::string_view path) {
  Result<const xmlNode*> child = required_child(document, parent, name, path);
  if (!child.ok()) return child.status();
  return leaf_text(document, *child, path);
}

Result<std::optional<std::string>> optional_text(std::string_view document, const xmlNode* parent,
                                                 std::string_view name, std::string_view path) {
  Result<const xmlNode*> child = unique_child(document, parent, name, path);
  if (!child.ok()) return child.status();
  if (*child == nullptr) return std::optional<std::string>();
  Result<std::string> text = leaf_text(document, *child, path);
  if (!text.ok()) return text.status();
  return std::optional<std::string>(std::move(*text));
}

Result<std::vector<const xmlNode*>> counted_part_elements(std::string_view document,
                                                          const xmlNode* parts_element,
                                                          uint64_t count, uint64_t max_parts,
                                                          std::string_view count_path) {
  if (count == 0) return manifest_corruption(document, "lists no parts");
  if (count > max_parts) {
    return manifest_corruption(document, "lists " + std::to_string(count) + " parts (limit " +
                                             std::to_string(max_parts) + ")");
  }
  std::vector<const xmlNode*> part_nodes;
  for (const xmlNode* node = parts_element->children; node != nullptr; node = node->next) {
    if (!is_element(node, "part")) continue;
    if (part_nodes.size() == count) {
      return manifest_corruption(document, std::string(count_path) + " is " +
                                               std::to_string(count) +
                                               " but more <part> elements are listed");
    }
    part_nodes.push_back(node);
  }
  if (part_nodes.size() != count) {
    return manifest_corruption(document, std::string(count_path) + " is " + std::to_string(count) +
                                             " but " + std::to_string(part_nodes.size()) +
                                             " <part> elements are listed");
  }
  return part_nodes;
}

Status claim_part_index(std::string_view document, uint64_t index, std::vector<bool>* seen) {
  if ((*seen)[index]) {
    return manifest_corruption(document, "has duplicate part index " + std::to_string(index));
  }
  (*seen)[index] = true;
  return Status::OK();
}

Result<std::string> required_version(std::string_view document, const xmlNode* root,
                                     std::string_view expected) {
  Result<std::string> version = required_text(document, root, "version", "<version>");
  if (!version.ok()) return version.status();
  if (*version != expected) {
    return manifest_corruption(document,
                               "version is '" + *version + "', expected " + std::string(expected));
  }
  return version;
}

Result<ManifestTool> parse_manifest_tool(std::string_view document, const xmlNode* parent,
                                         std::string_view element_name) {
  const std::string path = "<" + std::string(element_name) + ">";
  Result<const xmlNode*> element = unique_child(document, parent, element_name, path);
  if (!element.ok()) return element.status();
  ManifestTool tool;
  if (*element == nullptr) return tool;
  for (auto [name, target] : {std::pair{"name", &tool.name}, std::pair{"version", &tool.version},
                              std::pair{"release", &tool.release}}) {
    Result<std::optional<std::string>> text =
        optional_text(document, *element, name, path + "<" + name + ">");
    if (!text.ok()) return text.status();
    *target = text->value_or("");
  }
  return tool;
}

Result<uint64_t> required_number(std::string_view document, const xmlNode* parent,
                                 std::string_view name, std::string_view path) {
  Result<std::string> text = required_text(document, parent, name, path);
  if (!text.ok()) return text.status();
  return parse_decimal(document, *text, path);
}

std::optional<std::string> attribute(const xmlNode* element, const char* name) {
  std::unique_ptr<xmlChar, XmlCharFree> value(
      xmlGetNoNsProp(element, reinterpret_cast<const xmlChar*>(name)));
  if (value == nullptr) return std::nullopt;
  return std::string(trim_xml_space(reinterpret_cast<const char*>(value.get())));
}

Status check_algorithm(std::string_view document, const xmlNode* element, std::string_view expected,
                       std::string_view what) {
  std::optional<std::string> algorithm = attribute(element, "algorithm");
  if (algorithm && !equals_ignore_case(*algorithm, expected)) {
    return Status::NotSupported(std::string(document) + " " + std::string(what) + " algorithm '" +
                                *algorithm + "' is not " + std::string(expected));
  }
  return Status::OK();
}

bool is_xml_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

std::string_view trim_xml_space(std::string_view text) {
  while (!text.empty() && is_xml_space(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_xml_space(text.back())) text.remove_suffix(1);
  return text;
}

Result<uint64_t> parse_decimal(std::string_view document, std::string_view text,
                               std::string_view what) {
  if (text.empty()) return manifest_corruption(document, std::string(what) + " is empty");
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') {
      return manifest_corruption(
          document, std::string(what) + " '" + std::string(text) + "' is not a decimal number");
    }
    std::optional<uint64_t> shifted = checked_mul(value, 10);
    std::optional<uint64_t> next =
        shifted ? checked_add(*shifted, static_cast<uint64_t>(c - '0')) : std::nullopt;
    if (!next) {
      return manifest_corruption(
          document, std::string(what) + " '" + std::string(text) + "' does not fit in 64 bits");
    }
    value = *next;
  }
  return value;
}

int hex_digit_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool is_hex(std::string_view text) {
  return std::all_of(text.begin(), text.end(), [](char c) { return hex_digit_value(c) >= 0; });
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

Result<std::string> parse_hex(std::string_view document, std::string_view text,
                              std::string_view what) {
  if (text.empty()) return manifest_corruption(document, std::string(what) + " is empty");
  if (text.size() % 2 != 0 || !is_hex(text)) {
    return manifest_corruption(document, std::string(what) + " is not an even-length hex string");
  }
  return to_lower_ascii(text);
}

bool has_dot_dot_component(std::string_view name) {
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('/', start);
    if (end == std::string_view::npos) end = name.size();
    if (name.substr(start, end - start) == "..") return true;
    start = end + 1;
  }
  return false;
}

}  // namespace imgfs::formats
