#include "formats/manifest_xml.h"

#include <gtest/gtest.h>
#include <libxml/parser.h>

#include <string>
#include <thread>
#include <vector>

namespace imgfs::formats {
namespace {

constexpr std::string_view kDoc = "test manifest";
constexpr size_t kLimit = 1 << 20;

void expect_error(const Status& status, StatusCode code, const std::string& fragment) {
  EXPECT_EQ(status.code(), code) << status.to_string();
  EXPECT_NE(status.message().find(fragment), std::string::npos)
      << status.to_string() << " lacks '" << fragment << "'";
}

XmlDocPtr parse_ok(std::string_view xml) {
  Result<XmlDocPtr> doc = parse_manifest_xml(kDoc, xml, kLimit);
  EXPECT_TRUE(doc.ok()) << doc.status().to_string();
  return doc.ok() ? std::move(doc).value() : nullptr;
}

const xmlNode* root_of(const XmlDocPtr& doc) { return xmlDocGetRootElement(doc.get()); }

TEST(ManifestXmlTest, ParsesAndRefusesBadDocuments) {
  XmlDocPtr doc = parse_ok("<?xml version=\"1.0\"?>\n<manifest><a>1</a></manifest>");
  ASSERT_NE(doc, nullptr);
  EXPECT_TRUE(is_element(root_of(doc), "manifest"));

  expect_error(parse_manifest_xml(kDoc, std::string(65, 'x'), 64).status(), StatusCode::kCorruption,
               "test manifest is 65 bytes (limit 64)");
  expect_error(parse_manifest_xml(kDoc, std::string("<m>\0</m>", 8), kLimit).status(),
               StatusCode::kCorruption, "test manifest contains a NUL byte");
  expect_error(
      parse_manifest_xml(kDoc, "<!DOCTYPE m [<!ENTITY e \"x\">]><m>&e;</m>", kLimit).status(),
      StatusCode::kCorruption, "test manifest has a DTD");
  expect_error(parse_manifest_xml(kDoc, "<m>\n<a></b></m>", kLimit).status(),
               StatusCode::kCorruption, "test manifest is not well-formed XML (line 2: ");
  expect_error(parse_manifest_xml(kDoc, "", kLimit).status(), StatusCode::kCorruption,
               "is not well-formed XML");
}

// Beyond libxml2 2.9's 10 MB in-memory limit, which the read callback avoids.
TEST(ManifestXmlTest, ParsesLargeDocuments) {
  std::string xml = "<m>";
  while (xml.size() < (12u << 20)) xml += "<part index=\"1\"><key>abcdefghijklmnop</key></part>";
  xml += "</m>";
  Result<XmlDocPtr> doc = parse_manifest_xml(kDoc, xml, 16u << 20);
  ASSERT_TRUE(doc.ok()) << doc.status().to_string();
}

TEST(ManifestXmlTest, SignedMarkupCountsElementsAndRefusesHiddenMarkup) {
  XmlDocPtr doc = parse_ok(
      "<manifest><image><x/></image><other><image/></other><!-- plain --><?pi plain?>"
      "<a><![CDATA[plain]]></a><ns:image xmlns:ns=\"u\"/></manifest>");
  ASSERT_NE(doc, nullptr);
  constexpr std::string_view kNames[] = {"image", "x", "missing"};
  Result<std::vector<uint64_t>> counts = check_signed_markup(kDoc, doc.get(), kNames);
  ASSERT_TRUE(counts.ok()) << counts.status().to_string();
  // Namespaces are ignored: a prefixed <ns:image> counts as an image too.
  EXPECT_EQ(*counts, (std::vector<uint64_t>{3, 1, 0}));

  for (const std::string hidden :
       {"<!-- <image> -->", "<?pi <image>?>", "<a><![CDATA[<image>]]></a>"}) {
    XmlDocPtr bad = parse_ok("<manifest>" + hidden + "<image/></manifest>");
    ASSERT_NE(bad, nullptr);
    expect_error(check_signed_markup(kDoc, bad.get(), kNames).status(), StatusCode::kCorruption,
                 "test manifest has a comment, CDATA section or processing instruction");
  }
}

TEST(ManifestXmlTest, RawElementIsTheFirstOpenToTheFirstClose) {
  const std::string xml = "<m><image>a<b/></image><image>z</image></m>";
  Result<std::string_view> raw = raw_element(kDoc, xml, "image");
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(*raw, "<image>a<b/></image>");
  expect_error(raw_element(kDoc, xml, "version").status(), StatusCode::kCorruption,
               "test manifest lacks the literal text <version>...</version>");
  expect_error(raw_element(kDoc, "</v><v>", "v").status(), StatusCode::kCorruption,
               "lacks the literal text");
  // An attribute makes the start tag something other than the literal the signature covers.
  expect_error(raw_element(kDoc, "<v a=\"1\">x</v>", "v").status(), StatusCode::kCorruption,
               "lacks the literal text");
}

TEST(ManifestXmlTest, ChildrenAndText) {
  XmlDocPtr doc = parse_ok(
      "<m><one> \n text <!-- c --><![CDATA[ more]]>\t</one><two>a</two><two>b</two>"
      "<mixed>x<y/></mixed><empty/><n>42</n><bad>4x</bad></m>");
  ASSERT_NE(doc, nullptr);
  const xmlNode* root = root_of(doc);

  Result<std::string> one = required_text(kDoc, root, "one", "<one>");
  ASSERT_TRUE(one.ok()) << one.status().to_string();
  EXPECT_EQ(*one, "text  more");
  Result<std::optional<std::string>> empty = optional_text(kDoc, root, "empty", "<empty>");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, std::optional<std::string>(""));
  Result<std::optional<std::string>> absent = optional_text(kDoc, root, "absent", "<absent>");
  ASSERT_TRUE(absent.ok());
  EXPECT_FALSE(absent->has_value());
  Result<const xmlNode*> none = unique_child(kDoc, root, "absent", "<absent>");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, nullptr);
  Result<uint64_t> number = required_number(kDoc, root, "n", "<n>");
  ASSERT_TRUE(number.ok());
  EXPECT_EQ(*number, 42u);

  expect_error(unique_child(kDoc, root, "two", "<two>").status(), StatusCode::kCorruption,
               "test manifest has more than one <two>");
  expect_error(required_child(kDoc, root, "absent", "<m><absent>").status(),
               StatusCode::kCorruption, "test manifest lacks <m><absent>");
  expect_error(required_text(kDoc, root, "mixed", "<mixed>").status(), StatusCode::kCorruption,
               "test manifest <mixed> must hold only text");
  expect_error(required_number(kDoc, root, "bad", "<bad>").status(), StatusCode::kCorruption,
               "test manifest <bad> '4x' is not a decimal number");
}

TEST(ManifestXmlTest, AttributesAndAlgorithms) {
  XmlDocPtr doc = parse_ok(
      "<m><d algorithm=\" sha1 \" count=\"7\"/><e algorithm=\"MD5\"/><f/><g ns:a=\"1\" "
      "xmlns:ns=\"u\"/></m>");
  ASSERT_NE(doc, nullptr);
  const xmlNode* d = root_of(doc)->children;
  const xmlNode* e = d->next;
  const xmlNode* f = e->next;
  const xmlNode* g = f->next;
  EXPECT_EQ(attribute(d, "algorithm"), std::optional<std::string>("sha1"));
  EXPECT_EQ(attribute(d, "count"), std::optional<std::string>("7"));
  EXPECT_EQ(attribute(f, "algorithm"), std::nullopt);
  EXPECT_EQ(attribute(g, "a"), std::nullopt);  // Namespaced attributes are not ours.

  EXPECT_TRUE(check_algorithm(kDoc, d, "SHA1", "<d>").ok());
  EXPECT_TRUE(check_algorithm(kDoc, f, "SHA1", "<f>").ok());
  expect_error(check_algorithm(kDoc, e, "SHA1", "<e>"), StatusCode::kNotSupported,
               "test manifest <e> algorithm 'MD5' is not SHA1");
}

TEST(ManifestXmlTest, Decimal) {
  EXPECT_EQ(*parse_decimal(kDoc, "0", "n"), 0u);
  EXPECT_EQ(*parse_decimal(kDoc, "007", "n"), 7u);
  EXPECT_EQ(*parse_decimal(kDoc, "18446744073709551615", "n"), UINT64_MAX);
  expect_error(parse_decimal(kDoc, "", "<n>").status(), StatusCode::kCorruption,
               "test manifest <n> is empty");
  expect_error(parse_decimal(kDoc, "18446744073709551616", "<n>").status(), StatusCode::kCorruption,
               "'18446744073709551616' does not fit in 64 bits");
  for (const char* bad : {"-1", "+1", " 1", "1 ", "0x10", "1e3", "1.0"}) {
    expect_error(parse_decimal(kDoc, bad, "<n>").status(), StatusCode::kCorruption,
                 "is not a decimal number");
  }
}

TEST(ManifestXmlTest, HexAndCase) {
  EXPECT_EQ(hex_digit_value('0'), 0);
  EXPECT_EQ(hex_digit_value('9'), 9);
  EXPECT_EQ(hex_digit_value('a'), 10);
  EXPECT_EQ(hex_digit_value('F'), 15);
  EXPECT_EQ(hex_digit_value('g'), -1);
  EXPECT_EQ(hex_digit_value(' '), -1);
  EXPECT_TRUE(is_hex(""));
  EXPECT_TRUE(is_hex("09afAF"));
  EXPECT_FALSE(is_hex("0x"));
  EXPECT_EQ(to_lower_ascii("AbC-Z\xC3\x89"), "abc-z\xC3\x89");
  EXPECT_TRUE(equals_ignore_case("RSA-sha256", "rsa-SHA256"));
  EXPECT_FALSE(equals_ignore_case("SHA1", "SHA12"));

  EXPECT_EQ(*parse_hex(kDoc, "00ABcd", "<h>"), "00abcd");
  expect_error(parse_hex(kDoc, "", "<h>").status(), StatusCode::kCorruption,
               "test manifest <h> is empty");
  expect_error(parse_hex(kDoc, "abc", "<h>").status(), StatusCode::kCorruption,
               "test manifest <h> is not an even-length hex string");
  expect_error(parse_hex(kDoc, "zz", "<h>").status(), StatusCode::kCorruption,
               "is not an even-length hex string");
}

TEST(ManifestXmlTest, SpaceAndPaths) {
  EXPECT_EQ(trim_xml_space(" \t\r\nab c\n"), "ab c");
  EXPECT_EQ(trim_xml_space("\v x \f"), "\v x \f");  // Only XML's four space characters.
  EXPECT_EQ(trim_xml_space("   "), "");
  EXPECT_TRUE(is_xml_space('\r'));
  EXPECT_FALSE(is_xml_space('\v'));

  for (const char* climbs : {"..", "../a", "a/..", "a/../b", "a/b/.."}) {
    EXPECT_TRUE(has_dot_dot_component(climbs)) << climbs;
  }
  for (const char* stays : {"", "a", "a..b", "...", "a/.../b", ".a/..b", "a/./b", "/a"}) {
    EXPECT_FALSE(has_dot_dot_component(stays)) << stays;
  }
}

TEST(ManifestXmlTest, PartsVersionAndTool) {
  XmlDocPtr doc = parse_ok(
      "<m><version> 2007-10-10 </version><bundler><name>euca</name><release>31</release>"
      "</bundler><parts><part/><x/><part/></parts></m>");
  ASSERT_NE(doc, nullptr);
  const xmlNode* root = root_of(doc);
  const xmlNode* parts = *required_child(kDoc, root, "parts", "<parts>");

  Result<std::vector<const xmlNode*>> two = counted_part_elements(kDoc, parts, 2, 5, "count");
  ASSERT_TRUE(two.ok()) << two.status().to_string();
  ASSERT_EQ(two->size(), 2u);
  EXPECT_TRUE(is_element((*two)[0], "part"));
  expect_error(counted_part_elements(kDoc, parts, 0, 5, "count").status(), StatusCode::kCorruption,
               "test manifest lists no parts");
  expect_error(counted_part_elements(kDoc, parts, 6, 5, "count").status(), StatusCode::kCorruption,
               "test manifest lists 6 parts (limit 5)");
  expect_error(counted_part_elements(kDoc, parts, 3, 5, "<parts> count").status(),
               StatusCode::kCorruption, "<parts> count is 3 but 2 <part> elements are listed");
  expect_error(counted_part_elements(kDoc, parts, 1, 5, "count").status(), StatusCode::kCorruption,
               "count is 1 but more <part> elements are listed");

  std::vector<bool> seen(3, false);
  EXPECT_TRUE(claim_part_index(kDoc, 2, &seen).ok());
  EXPECT_TRUE(claim_part_index(kDoc, 0, &seen).ok());
  expect_error(claim_part_index(kDoc, 2, &seen), StatusCode::kCorruption,
               "test manifest has duplicate part index 2");
  EXPECT_EQ(seen, (std::vector<bool>{true, false, true}));

  Result<std::string> version = required_version(kDoc, root, "2007-10-10");
  ASSERT_TRUE(version.ok());
  EXPECT_EQ(*version, "2007-10-10");
  expect_error(required_version(kDoc, root, "2010-11-15").status(), StatusCode::kCorruption,
               "test manifest version is '2007-10-10', expected 2010-11-15");

  Result<ManifestTool> bundler = parse_manifest_tool(kDoc, root, "bundler");
  ASSERT_TRUE(bundler.ok()) << bundler.status().to_string();
  EXPECT_EQ(bundler->name, "euca");
  EXPECT_EQ(bundler->version, "");
  EXPECT_EQ(bundler->release, "31");
  Result<ManifestTool> importer = parse_manifest_tool(kDoc, root, "importer");
  ASSERT_TRUE(importer.ok());
  EXPECT_EQ(importer->name, "");
  XmlDocPtr twice = parse_ok("<m><bundler><name>a</name><name>b</name></bundler></m>");
  ASSERT_NE(twice, nullptr);
  expect_error(parse_manifest_tool(kDoc, root_of(twice), "bundler").status(),
               StatusCode::kCorruption, "test manifest has more than one <bundler><name>");
}

TEST(ManifestXmlTest, ConcurrentParsesAgree) {
  xmlInitParser();  // libxml2 < 2.11 initializes lazily; main does this once in the program.
  const std::string xml = "<m><image><a>1</a></image><!-- x --><n>12345</n></m>";
  std::vector<int> good(8, 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < good.size(); ++t) {
    threads.emplace_back([&, t] {
      constexpr std::string_view kNames[] = {"image"};
      for (int i = 0; i < 200; ++i) {
        Result<XmlDocPtr> doc = parse_manifest_xml(kDoc, xml, kLimit);
        if (!doc.ok()) continue;
        Result<std::vector<uint64_t>> counts = check_signed_markup(kDoc, doc->get(), kNames);
        Result<uint64_t> n = required_number(kDoc, xmlDocGetRootElement(doc->get()), "n", "<n>");
        if (counts.ok() && (*counts)[0] == 1 && n.ok() && *n == 12345) ++good[t];
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int count : good) EXPECT_EQ(count, 200);
}

}  // namespace
}  // namespace imgfs::formats
