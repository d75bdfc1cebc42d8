// Manifest XML: what the bundle, import and download manifest parsers share. Turns manifest text
// into a libxml2 tree with no DTD (so no entity is ever declared or expanded), and elements of
// that tree into checked strings and numbers. Also the checks that keep a signature's raw-text
// search (FORMATS.md a.5, a.7) in step with the parsed tree. Pure functions: no I/O, no state.
//
// Every function that can fail takes `document`, the name its error messages start with
// ("manifest", "import manifest", "download manifest"), and a `path` or `what` naming the element
// or value (e.g. "<image><size>"), so a message reads "import manifest lacks <import><parts>".
// All are thread-safe: libxml2 parses separate documents concurrently and no global error
// handler is touched (libxml2 < 2.11 wants xmlInitParser() once in main before threads parse).
#pragma once

#include <libxml/tree.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/status.h"

namespace imgfs::formats {

struct XmlDocFree {
  void operator()(xmlDoc* doc) const;
};
using XmlDocPtr = std::unique_ptr<xmlDoc, XmlDocFree>;

// Corruption with the message "<document> <what>".
Status manifest_corruption(std::string_view document, std::string_view what);

// Parses manifest text into a tree. Refused with Corruption: text over `max_bytes`, a NUL byte
// (UTF-16 would defeat the byte-wise signed-text search), a "<!DOCTYPE" anywhere (refused before
// parsing so no entity declaration is processed), XML that is not well-formed (the message has
// libxml2's line and reason), and a document that still carries a DTD. IOError when libxml2
// cannot allocate a parser. Network access is off. The root element is not checked.
Result<XmlDocPtr> parse_manifest_xml(std::string_view document, std::string_view xml_text,
                                     size_t max_bytes);

// For documents with a signed text cut from the raw bytes: that text and the parsed fields agree
// only if the first literal "<image>" (etc.) is the start tag of the one element the parser
// reads. So this refuses (Corruption) a comment, processing instruction or CDATA section holding
// '<', and any entity or DTD node; and it returns how often each of `counted_names` occurs as an
// element name anywhere in `doc` (counts[i] for counted_names[i], namespaces ignored), for the
// caller to refuse duplicates. Walks with an explicit stack, so hostile nesting depth cannot
// exhaust ours.
Result<std::vector<uint64_t>> check_signed_markup(std::string_view document, const xmlDoc* doc,
                                                  std::span<const std::string_view> counted_names);

// The raw bytes from the first "<name>" to the first "</name>" in `xml_text`, both inclusive: the
// piece of a signed text (FORMATS.md a.5). Corruption when either is missing or they are out of
// order. The view points into `xml_text`.
Result<std::string_view> raw_element(std::string_view document, std::string_view xml_text,
                                     std::string_view name);

// True for an element named `name` with no namespace.
bool is_element(const xmlNode* node, std::string_view name);

// The only child element `name` of `parent`, or nullptr when there is none. Corruption "has more
// than one <path>" when there are several.
Result<const xmlNode*> unique_child(std::string_view document, const xmlNode* parent,
                                    std::string_view name, std::string_view path);

// As unique_child, but absence is Corruption "lacks <path>".
Result<const xmlNode*> required_child(std::string_view document, const xmlNode* parent,
                                      std::string_view name, std::string_view path);

// The text and CDATA of an element that must hold only text (comments and PIs are skipped), with
// XML whitespace trimmed from both ends. Corruption when it holds an element or anything else.
Result<std::string> leaf_text(std::string_view document, const xmlNode* element,
                              std::string_view path);

// leaf_text() of required_child().
Result<std::string> required_text(std::string_view document, const xmlNode* parent,
                                  std::string_view name, std::string_view path);

// leaf_text() of unique_child(); nullopt when the element is absent.
Result<std::optional<std::string>> optional_text(std::string_view document, const xmlNode* parent,
                                                 std::string_view name, std::string_view path);

// The <part> children of `parts_element`, for a format with a required parts@count `count`.
// Corruption "lists no parts" for a count of 0, "lists N parts (limit M)" above `max_parts`, and
// "<count_path> is N but X <part> elements are listed" when the number of <part> children differs
// (X reads "more" when there are more: reading stops at count + 1, so a huge list costs no more
// than the count allows).
Result<std::vector<const xmlNode*>> counted_part_elements(std::string_view document,
                                                          const xmlNode* parts_element,
                                                          uint64_t count, uint64_t max_parts,
                                                          std::string_view count_path);

// Marks part `index` as seen (the caller has checked index < seen->size()). Corruption "has
// duplicate part index N" when it already was; n distinct indexes below n are exactly 0..n-1.
Status claim_part_index(std::string_view document, uint64_t index, std::vector<bool>* seen);

// The trimmed text of root's one <version>. Corruption "lacks <version>", or "version is 'X',
// expected <expected>" when it differs.
Result<std::string> required_version(std::string_view document, const xmlNode* root,
                                     std::string_view expected);

// The tool that wrote a manifest: the texts of the optional <name>, <version> and <release>
// children of an optional element (<bundler>, <importer>). Empty strings for what is absent.
struct ManifestTool {
  std::string name;
  std::string version;
  std::string release;
};

// The ManifestTool in the child element `element_name` of `parent` (all empty when there is no
// such element). Corruption as for unique_child() and leaf_text().
Result<ManifestTool> parse_manifest_tool(std::string_view document, const xmlNode* parent,
                                         std::string_view element_name);

// parse_decimal() of required_text().
Result<uint64_t> required_number(std::string_view document, const xmlNode* parent,
                                 std::string_view name, std::string_view path);

// The attribute `name` (no namespace) of `element`, trimmed; nullopt when absent.
std::optional<std::string> attribute(const xmlNode* element, const char* name);

// Checks an element's optional algorithm attribute against `expected`, ignoring ASCII case and
// surrounding whitespace. NotSupported "<document> <what> algorithm 'X' is not <expected>" when
// it is present and differs; OK when it is absent.
Status check_algorithm(std::string_view document, const xmlNode* element, std::string_view expected,
                       std::string_view what);

// ' ', '\t', '\r' or '\n'.
bool is_xml_space(char c);

// `text` without leading and trailing XML whitespace.
std::string_view trim_xml_space(std::string_view text);

// An unsigned decimal number: digits only, no sign, no spaces, fits in 64 bits. Corruption
// ("is empty", "is not a decimal number", "does not fit in 64 bits") otherwise.
Result<uint64_t> parse_decimal(std::string_view document, std::string_view text,
                               std::string_view what);

// 0..15 for a hex digit of either case, -1 for anything else.
int hex_digit_value(char c);

// True when every character is a hex digit (also for empty text).
bool is_hex(std::string_view text);

// `text` with ASCII A-Z lowered; other bytes unchanged.
std::string to_lower_ascii(std::string_view text);

// Equal after to_lower_ascii().
bool equals_ignore_case(std::string_view a, std::string_view b);

// A non-empty, even-length hex string of either case, lowercased. Corruption ("is empty", "is not
// an even-length hex string") otherwise.
Result<std::string> parse_hex(std::string_view document, std::string_view text,
                              std::string_view what);

// True when a '/'-separated name has a ".." component (a relative path that could climb out of
// its folder). "a..b" and "..." are not "..".
bool has_dot_dot_component(std::string_view name);

}  // namespace imgfs::formats
