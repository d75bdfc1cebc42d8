#include "formats/import_manifest.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace imgfs::formats {
namespace {

constexpr uint64_t kTenMiB = 10485760;

struct PartSpec {
  std::string index;
  std::string start;
  std::string end;
  std::string key;
};

std::string part_xml(const PartSpec& p, bool with_urls = true) {
  std::string xml = "<part index=\"" + p.index + "\"><byte-range start=\"" + p.start + "\" end=\"" +
                    p.end + "\"/><key>" + p.key + "</key>";
  if (with_urls) {
    xml += "<head-url>https://s3.example/bkt/" + p.key + "?Signature=h&amp;Expires=1</head-url>";
    xml += "<get-url>https://s3.example/bkt/" + p.key + "?Signature=g&amp;Expires=1</get-url>";
    xml += "<delete-url>https://s3.example/bkt/" + p.key + "?Signature=d</delete-url>";
  }
  return xml + "</part>";
}

std::string manifest_with(const std::string& parts_xml, const std::string& count,
                          const std::string& format = "RAW",
                          const std::string& version = "2010-11-15") {
  return "<?xml version='1.0' encoding='UTF-8' standalone='yes'?>\n<manifest>\n"
         "  <version>" +
         version + "</version>\n  <file-format>" + format +
         "</file-format>\n"
         "  <importer><name>euca2ools</name><version>3.4.1</version><release>0</release>"
         "</importer>\n"
         "  <self-destruct-url>https://s3.example/bkt/7c1e/disk.raw.manifest.xml?"
         "AWSAccessKeyId=AKID&amp;Expires=1700000000&amp;Signature=x</self-destruct-url>\n"
         "  <import>\n    <size>15000000</size>\n    <volume-size>1</volume-size>\n"
         "    <parts count=\"" +
         count + "\">\n" + parts_xml + "\n    </parts>\n  </import>\n</manifest>\n";
}

// FORMATS.md (b)'s example: two parts, 10 MiB and the rest of 15000000 bytes.
std::string two_part_manifest() {
  return manifest_with(part_xml({"0", "0", "10485759", "7c1e/disk.raw.part.0"}) +
                           part_xml({"1", "10485760", "14999999", "7c1e/disk.raw.part.1"}),
                       "2");
}

void expect_error(const std::string& xml, StatusCode code, const std::string& fragment) {
  Result<ImportManifest> parsed = parse_import_manifest(xml);
  ASSERT_FALSE(parsed.ok()) << "accepted: " << xml.substr(0, 400);
  EXPECT_EQ(parsed.status().code(), code) << parsed.status().to_string();
  EXPECT_NE(parsed.status().message().find(fragment), std::string::npos)
      << parsed.status().to_string() << " lacks '" << fragment << "'";
}

TEST(ImportManifestTest, ParsesFormatsExample) {
  Result<ImportManifest> parsed = parse_import_manifest(two_part_manifest());
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  const ImportManifest& m = *parsed;
  EXPECT_EQ(m.version, "2010-11-15");
  EXPECT_EQ(m.file_format, ImportFileFormat::kRaw);
  EXPECT_EQ(m.importer.name, "euca2ools");
  EXPECT_EQ(m.importer.version, "3.4.1");
  EXPECT_EQ(m.importer.release, "0");
  EXPECT_EQ(m.self_destruct_url,
            "https://s3.example/bkt/7c1e/disk.raw.manifest.xml?AWSAccessKeyId=AKID&"
            "Expires=1700000000&Signature=x");
  EXPECT_EQ(m.declared_size, std::optional<uint64_t>(15000000));
  EXPECT_EQ(m.volume_size_gib, std::optional<uint64_t>(1));
  ASSERT_EQ(m.parts.size(), 2u);
  EXPECT_EQ(m.parts[0].index, 0u);
  EXPECT_EQ(m.parts[0].start, 0u);
  EXPECT_EQ(m.parts[0].end, kTenMiB - 1);
  EXPECT_EQ(m.parts[0].length(), kTenMiB);
  EXPECT_EQ(m.parts[0].key, "7c1e/disk.raw.part.0");
  EXPECT_EQ(m.parts[0].get_url,
            "https://s3.example/bkt/7c1e/disk.raw.part.0?Signature=g&Expires=1");
  EXPECT_EQ(m.parts[0].head_url,
            "https://s3.example/bkt/7c1e/disk.raw.part.0?Signature=h&Expires=1");
  EXPECT_EQ(m.parts[0].delete_url, "https://s3.example/bkt/7c1e/disk.raw.part.0?Signature=d");
  EXPECT_EQ(m.parts[1].index, 1u);
  EXPECT_EQ(m.parts[1].start, kTenMiB);
  EXPECT_EQ(m.parts[1].end, 14999999u);
  EXPECT_EQ(m.file_size(), 15000000u);
}

TEST(ImportManifestTest, SortsPartsByIndexAndAcceptsAttributeOrderAndFormats) {
  const std::string reversed =
      "<part index=\"1\"><byte-range end=\"199\" start=\"100\"/><key>k/p1</key></part>"
      "<part index=\"0\"><byte-range end=\"99\" start=\"0\"/><key>k/p0</key></part>";
  for (const auto& [text, format] :
       {std::pair{"VMDK", ImportFileFormat::kVmdk}, std::pair{"VHD", ImportFileFormat::kVhd},
        std::pair{" vhd ", ImportFileFormat::kVhd}, std::pair{"raw", ImportFileFormat::kRaw}}) {
    Result<ImportManifest> parsed = parse_import_manifest(manifest_with(reversed, "2", text));
    ASSERT_TRUE(parsed.ok()) << text << ": " << parsed.status().to_string();
    EXPECT_EQ(parsed->file_format, format);
    EXPECT_EQ(parsed->parts[0].key, "k/p0");
    EXPECT_EQ(parsed->parts[1].key, "k/p1");
    EXPECT_EQ(parsed->parts[1].start, 100u);
    EXPECT_TRUE(parsed->parts[1].get_url.empty());
    EXPECT_EQ(parsed->file_size(), 200u);
  }
  EXPECT_EQ(import_file_format_name(ImportFileFormat::kRaw), "RAW");
  EXPECT_EQ(import_file_format_name(ImportFileFormat::kVmdk), "VMDK");
  EXPECT_EQ(import_file_format_name(ImportFileFormat::kVhd), "VHD");
}

TEST(ImportManifestTest, MinimalManifestWithoutOptionalElements) {
  const std::string xml =
      "<manifest><version>2010-11-15</version><file-format>RAW</file-format><import>"
      "<parts count=\"1\"><part index=\"0\"><byte-range start=\"0\" end=\"0\"/>"
      "<key>one byte</key></part></parts></import></manifest>";
  Result<ImportManifest> parsed = parse_import_manifest(xml);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_TRUE(parsed->importer.name.empty());
  EXPECT_TRUE(parsed->self_destruct_url.empty());
  EXPECT_FALSE(parsed->declared_size.has_value());
  EXPECT_FALSE(parsed->volume_size_gib.has_value());
  EXPECT_EQ(parsed->file_size(), 1u);
  EXPECT_EQ(parsed->parts[0].key, "one byte");
}

TEST(ImportManifestTest, DeclaredSizeIsNotTrusted) {
  // euca2ools writes a VMDK's virtual capacity as import/size: far larger than the file.
  std::string xml = two_part_manifest();
  xml.replace(xml.find("<size>15000000"), 14, "<size>68719476736");
  Result<ImportManifest> parsed = parse_import_manifest(xml);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_EQ(parsed->declared_size, std::optional<uint64_t>(68719476736u));
  EXPECT_EQ(parsed->file_size(), 15000000u);
}

TEST(ImportManifestTest, ManyTenMiBPartsWithOddLastPart) {
  constexpr uint64_t kParts = 2000;
  const uint64_t size = (kParts - 1) * kTenMiB + 12345;
  std::string parts;
  for (uint64_t i = 0; i < kParts; ++i) {
    const uint64_t end = std::min((i + 1) * kTenMiB, size) - 1;
    parts += part_xml({std::to_string(i), std::to_string(i * kTenMiB), std::to_string(end),
                       "uuid/disk.img.part." + std::to_string(i)});
  }
  Result<ImportManifest> parsed = parse_import_manifest(manifest_with(parts, "2000"));
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  ASSERT_EQ(parsed->parts.size(), kParts);
  EXPECT_EQ(parsed->file_size(), size);
  EXPECT_EQ(parsed->parts.back().length(), 12345u);
  for (uint64_t i = 0; i < kParts; ++i) EXPECT_EQ(parsed->parts[i].index, i);
}

TEST(ImportManifestTest, ClampFixesTheAwsSinglePartQuirk) {
  // The AWS example: one part whose end equals the size.
  const std::string xml =
      manifest_with(part_xml({"0", "0", "15000000", "aws/disk.raw.part0"}), "1");
  Result<ImportManifest> parsed = parse_import_manifest(xml);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  ImportManifest m = *parsed;
  EXPECT_EQ(m.file_size(), 15000001u);
  ASSERT_TRUE(m.clamp_last_part_to(15000000).ok());
  EXPECT_EQ(m.parts[0].end, 14999999u);
  EXPECT_EQ(m.file_size(), 15000000u);
  // Idempotent once it fits.
  ASSERT_TRUE(m.clamp_last_part_to(15000000).ok());
  EXPECT_EQ(m.file_size(), 15000000u);
}

TEST(ImportManifestTest, ClampRefusesOtherMismatches) {
  Result<ImportManifest> parsed = parse_import_manifest(two_part_manifest());
  ASSERT_TRUE(parsed.ok());
  for (uint64_t object_size : {uint64_t{0}, uint64_t{4514238}, uint64_t{4514241}, kTenMiB}) {
    ImportManifest m = *parsed;
    Status s = m.clamp_last_part_to(object_size);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << object_size;
    EXPECT_NE(s.message().find("part 1 byte-range 10485760-14999999 holds 4514240 bytes"),
              std::string::npos)
        << s.to_string();
    EXPECT_EQ(m.file_size(), 15000000u);
  }
  ImportManifest m = *parsed;
  EXPECT_TRUE(m.clamp_last_part_to(4514240).ok());
  EXPECT_EQ(m.file_size(), 15000000u);
  EXPECT_TRUE(m.clamp_last_part_to(4514239).ok());
  EXPECT_EQ(m.file_size(), 14999999u);

  // A one-byte last part cannot shrink to nothing.
  Result<ImportManifest> tiny =
      parse_import_manifest(manifest_with(part_xml({"0", "0", "0", "k"}), "1"));
  ASSERT_TRUE(tiny.ok());
  EXPECT_EQ(tiny->clamp_last_part_to(0).code(), StatusCode::kCorruption);

  ImportManifest empty;
  EXPECT_EQ(empty.file_size(), 0u);
  EXPECT_EQ(empty.clamp_last_part_to(1).code(), StatusCode::kInvalidArgument);
}

TEST(ImportManifestTest, FitToObjectSizes) {
  Result<ImportManifest> parsed = parse_import_manifest(two_part_manifest());
  ASSERT_TRUE(parsed.ok());
  {
    ImportManifest m = *parsed;
    const std::vector<uint64_t> sizes = {kTenMiB, 4514240};
    EXPECT_TRUE(m.fit_to_object_sizes(sizes).ok());
    EXPECT_EQ(m.file_size(), 15000000u);
  }
  {
    ImportManifest m = *parsed;
    const std::vector<uint64_t> sizes = {kTenMiB - 1, 4514240};
    Status s = m.fit_to_object_sizes(sizes);
    EXPECT_EQ(s.code(), StatusCode::kCorruption);
    EXPECT_NE(s.message().find("part 0"), std::string::npos) << s.to_string();
    EXPECT_NE(s.message().find("7c1e/disk.raw.part.0"), std::string::npos) << s.to_string();
  }
  {
    ImportManifest m = *parsed;
    const std::vector<uint64_t> sizes = {kTenMiB};
    EXPECT_EQ(m.fit_to_object_sizes(sizes).code(), StatusCode::kInvalidArgument);
  }
  {
    ImportManifest m = *parsed;
    const std::vector<uint64_t> sizes = {kTenMiB, 4514239};
    EXPECT_TRUE(m.fit_to_object_sizes(sizes).ok());
    EXPECT_EQ(m.file_size(), 14999999u);
  }
}

TEST(ImportManifestTest, RejectsUnsupportedFileFormat) {
  for (const std::string format : {"QCOW2", "VDI", "", "OVA"}) {
    expect_error(manifest_with(part_xml({"0", "0", "9", "k"}), "1", format),
                 StatusCode::kNotSupported, "file-format '" + format + "'");
  }
}

TEST(ImportManifestTest, RejectsBadDocuments) {
  const std::string one = part_xml({"0", "0", "9", "k"});
  expect_error(manifest_with(one, "1", "RAW", "2007-10-10"), StatusCode::kCorruption,
               "version is '2007-10-10', expected 2010-11-15");
  expect_error("<manifest><version>2010-11-15</version>", StatusCode::kCorruption,
               "not well-formed XML");
  expect_error("", StatusCode::kCorruption, "not well-formed XML");
  expect_error("<other/>", StatusCode::kCorruption, "root element is not <manifest>");
  expect_error(std::string("<manifest>\0</manifest>", 22), StatusCode::kCorruption, "NUL");
  expect_error(
      "<?xml version=\"1.0\"?><!DOCTYPE manifest [<!ENTITY x \"a\">]><manifest>&x;</manifest>",
      StatusCode::kCorruption, "DTD");
  expect_error("<manifest><file-format>RAW</file-format></manifest>", StatusCode::kCorruption,
               "lacks <version>");
  expect_error("<manifest><version>2010-11-15</version><version>2010-11-15</version></manifest>",
               StatusCode::kCorruption, "more than one <version>");
  expect_error("<manifest><version>2010-11-15</version><file-format>RAW</file-format></manifest>",
               StatusCode::kCorruption, "lacks <import>");
  expect_error(
      "<manifest><version>2010-11-15</version><file-format>RAW</file-format><import><size>1"
      "</size></import></manifest>",
      StatusCode::kCorruption, "lacks <import><parts>");
  std::string bad_size = two_part_manifest();
  bad_size.replace(bad_size.find("<size>15000000"), 14, "<size>15e6");
  expect_error(bad_size, StatusCode::kCorruption, "<import><size> '15e6' is not a decimal number");
  std::string nested = two_part_manifest();
  nested.replace(nested.find("<name>euca2ools</name>"), 22, "<name><b>x</b></name>");
  expect_error(nested, StatusCode::kCorruption, "<importer><name> must hold only text");
}

TEST(ImportManifestTest, RejectsBadPartLists) {
  const std::string p0 = part_xml({"0", "0", "9", "k/0"});
  const std::string p1 = part_xml({"1", "10", "19", "k/1"});
  expect_error(manifest_with(p0 + p1, "3"), StatusCode::kCorruption,
               "parts@count is 3 but 2 <part> elements are listed");
  expect_error(manifest_with(p0 + p1, "1"), StatusCode::kCorruption,
               "parts@count is 1 but more <part> elements are listed");
  expect_error(manifest_with("", "0"), StatusCode::kCorruption, "lists no parts");
  expect_error(manifest_with(p0, "100001"), StatusCode::kCorruption,
               "lists 100001 parts (limit 100000)");
  expect_error(manifest_with(p0, "x"), StatusCode::kCorruption,
               "<import><parts> count 'x' is not a decimal number");
  std::string no_count = manifest_with(p0, "1");
  no_count.replace(no_count.find(" count=\"1\""), 10, "");
  expect_error(no_count, StatusCode::kCorruption, "<import><parts> lacks the count attribute");
  expect_error(manifest_with(p0 + part_xml({"0", "10", "19", "k/1"}), "2"), StatusCode::kCorruption,
               "duplicate part index 0");
  expect_error(manifest_with(p0 + part_xml({"2", "10", "19", "k/1"}), "2"), StatusCode::kCorruption,
               "part index 2 is not below parts@count 2");
  expect_error(manifest_with(p0 + part_xml({"-1", "10", "19", "k/1"}), "2"),
               StatusCode::kCorruption, "<part> index '-1' is not a decimal number");
  std::string no_index = manifest_with(p0, "1");
  no_index.replace(no_index.find(" index=\"0\""), 10, "");
  expect_error(no_index, StatusCode::kCorruption, "<part> lacks the index attribute");
}

TEST(ImportManifestTest, RejectsBadRanges) {
  expect_error(manifest_with(part_xml({"0", "1", "9", "k"}), "1"), StatusCode::kCorruption,
               "part 0 starts at 1, not 0");
  expect_error(manifest_with(part_xml({"0", "10", "9", "k"}), "1"), StatusCode::kCorruption,
               "part 0 byte-range 10-9 ends before it starts");
  expect_error(
      manifest_with(part_xml({"0", "0", "9", "k"}) + part_xml({"1", "11", "19", "k"}), "2"),
      StatusCode::kCorruption, "part 1 starts at 11 but part 0 ends at 9 (gap)");
  expect_error(manifest_with(part_xml({"0", "0", "9", "k"}) + part_xml({"1", "9", "19", "k"}), "2"),
               StatusCode::kCorruption, "part 1 starts at 9 but part 0 ends at 9 (overlap)");
  expect_error(manifest_with(part_xml({"0", "0", "18446744073709551616", "k"}), "1"),
               StatusCode::kCorruption, "does not fit in 64 bits");
  expect_error(manifest_with(part_xml({"0", "0", "18446744073709551615", "k"}), "1"),
               StatusCode::kCorruption, "end 18446744073709551615 is too large");
  expect_error(manifest_with(part_xml({"0", "0", "+9", "k"}), "1"), StatusCode::kCorruption,
               "<byte-range> end '+9' is not a decimal number");
  expect_error(manifest_with(part_xml({"0", "", "9", "k"}), "1"), StatusCode::kCorruption,
               "<byte-range> start is empty");
  std::string no_range = manifest_with("<part index=\"0\"><key>k</key></part>", "1");
  expect_error(no_range, StatusCode::kCorruption, "lacks <part index=\"0\"><byte-range>");
  std::string no_end =
      manifest_with("<part index=\"0\"><byte-range start=\"0\"/><key>k</key></part>", "1");
  expect_error(no_end, StatusCode::kCorruption, "lacks the end attribute");
  // The largest representable file: one part ending at 2^64 - 2.
  Result<ImportManifest> huge =
      parse_import_manifest(manifest_with(part_xml({"0", "0", "18446744073709551614", "k"}), "1"));
  ASSERT_TRUE(huge.ok()) << huge.status().to_string();
  EXPECT_EQ(huge->file_size(), 18446744073709551615u);
}

TEST(ImportManifestTest, RejectsBadKeys) {
  const auto with_key = [](const std::string& key) {
    return manifest_with(part_xml({"0", "0", "9", key}), "1");
  };
  expect_error(with_key(""), StatusCode::kCorruption, "part 0 key is empty");
  expect_error(with_key("  "), StatusCode::kCorruption, "part 0 key is empty");
  expect_error(with_key("/etc/passwd"), StatusCode::kCorruption, "is absolute");
  expect_error(with_key("a/../../b"), StatusCode::kCorruption, "has a '..' component");
  expect_error(with_key(".."), StatusCode::kCorruption, "has a '..' component");
  expect_error(with_key("a/.."), StatusCode::kCorruption, "has a '..' component");
  expect_error(with_key(std::string(1025, 'k')), StatusCode::kCorruption,
               "key is 1025 bytes (limit 1024)");
  expect_error(manifest_with("<part index=\"0\"><byte-range start=\"0\" end=\"9\"/></part>", "1"),
               StatusCode::kCorruption, "lacks <part index=\"0\"><key>");
  // Legal S3 keys that only look odd.
  for (const std::string key : {"a..b/c", "..a", "a/...", "dir one/disk image+1.part.0", "é"}) {
    Result<ImportManifest> parsed = parse_import_manifest(with_key(key));
    ASSERT_TRUE(parsed.ok()) << key << ": " << parsed.status().to_string();
    EXPECT_EQ(parsed->parts[0].key, key);
  }
}

TEST(ImportManifestTest, Detector) {
  EXPECT_TRUE(looks_like_import_manifest(two_part_manifest()));
  EXPECT_TRUE(looks_like_import_manifest(
      "<manifest><version>2010-11-15</version><import\n><parts/></import></manifest>"));
  EXPECT_FALSE(
      looks_like_import_manifest("<manifest><version>2007-10-10</version><importer/></manifest>"));
  EXPECT_FALSE(looks_like_import_manifest(
      "<manifest><version>2010-11-15</version><importer><name>x</name></importer></manifest>"));
  EXPECT_FALSE(looks_like_import_manifest(
      "<manifest><version>2014-01-14</version><file-format>RAW</file-format></manifest>"));
  EXPECT_FALSE(looks_like_import_manifest(""));
  EXPECT_FALSE(looks_like_import_manifest(std::string(70000, ' ') + two_part_manifest()));
}

TEST(ImportManifestTest, ConcurrentParsesAgree) {
  const std::string xml = two_part_manifest();
  std::vector<std::thread> threads;
  std::vector<int> good(8, 0);
  for (size_t t = 0; t < good.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        Result<ImportManifest> parsed = parse_import_manifest(xml);
        if (parsed.ok() && parsed->file_size() == 15000000u) ++good[t];
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int count : good) EXPECT_EQ(count, 200);
}

}  // namespace
}  // namespace imgfs::formats
