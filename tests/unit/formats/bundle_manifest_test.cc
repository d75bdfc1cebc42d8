#include "formats/bundle_manifest.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

namespace imgfs::formats {
namespace {

const std::string kSha1A = "89e6c98d92887913cadf06b2adb97f26cde4849b";
const std::string kSha1B = "2aae6c35c94fcfb415dbe95f408b9ce91ee846ed";
const std::string kTarSha1 = "3f786850e387550fdab836ed7e6dc881de23001b";

std::string blob(char digit) { return std::string(512, digit); }

const std::string kConfig =
    "<machine_configuration><architecture>x86_64</architecture>"
    "<block_device_mapping><mapping><virtual>ami</virtual><device>sda1</device></mapping>"
    "</block_device_mapping><kernel_id>eki-0A1B2C3D</kernel_id></machine_configuration>";

std::string image_element(const std::string& parts) {
  return "<image><name>centos6.img</name><user>000123456789</user><type>machine</type>"
         "<digest algorithm=\"SHA1\">" +
         kTarSha1 +
         "</digest><size>2147483648</size><bundled_size>15728656</bundled_size>"
         "<ec2_encrypted_key algorithm=\"AES-128-CBC\">" +
         blob('a') + "</ec2_encrypted_key><user_encrypted_key algorithm=\"AES-128-CBC\">" +
         blob('b') + "</user_encrypted_key><ec2_encrypted_iv>" + blob('c') +
         "</ec2_encrypted_iv><user_encrypted_iv>" + blob('d') + "</user_encrypted_iv>" + parts +
         "</image>";
}

const std::string kParts =
    "<parts count=\"2\"><part index=\"0\"><filename>centos6.img.part.00</filename>"
    "<digest algorithm=\"SHA1\">" +
    kSha1A +
    "</digest></part><part index=\"1\"><filename>centos6.img.part.01</filename>"
    "<digest algorithm=\"SHA1\">" +
    kSha1B + "</digest></part></parts>";

// A euca2ools 3 style manifest: declaration, newline, one line, no trailing newline.
std::string manifest_with(const std::string& config, const std::string& image,
                          const std::string& signature = std::string(512, 'e')) {
  return "<?xml version='1.0' encoding='ASCII'?>\n<manifest><version>2007-10-10</version>"
         "<bundler><name>euca2ools</name><version>3.4.1</version><release>0</release></bundler>" +
         config + image + "<signature>" + signature + "</signature></manifest>";
}

std::string valid_manifest() { return manifest_with(kConfig, image_element(kParts)); }

std::string replace_once(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

void expect_error(const std::string& xml, StatusCode code, const std::string& fragment) {
  Result<BundleManifest> parsed = parse_bundle_manifest(xml);
  ASSERT_FALSE(parsed.ok()) << "accepted: " << xml.substr(0, 300);
  EXPECT_EQ(parsed.status().code(), code) << parsed.status().to_string();
  EXPECT_NE(parsed.status().message().find(fragment), std::string::npos)
      << parsed.status().to_string() << " lacks '" << fragment << "'";
}

std::string parts_of(const std::vector<std::pair<std::string, std::string>>& index_and_name,
                     const std::string& count) {
  std::string parts = "<parts count=\"" + count + "\">";
  for (const auto& [index, name] : index_and_name) {
    parts += "<part index=\"" + index + "\"><filename>" + name +
             "</filename><digest algorithm=\"SHA1\">" + kSha1A + "</digest></part>";
  }
  return parts + "</parts>";
}

TEST(BundleManifestTest, ParsesEuca2ools3Manifest) {
  const std::string xml = valid_manifest();
  Result<BundleManifest> parsed = parse_bundle_manifest(xml);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  const BundleManifest& m = *parsed;
  EXPECT_EQ(m.version, "2007-10-10");
  EXPECT_EQ(m.bundler.name, "euca2ools");
  EXPECT_EQ(m.bundler.version, "3.4.1");
  EXPECT_EQ(m.bundler.release, "0");
  EXPECT_EQ(m.architecture, "x86_64");
  ASSERT_TRUE(m.kernel_id.has_value());
  EXPECT_EQ(*m.kernel_id, "eki-0A1B2C3D");
  EXPECT_FALSE(m.ramdisk_id.has_value());
  EXPECT_EQ(m.image.name, "centos6.img");
  EXPECT_EQ(m.image.user, "000123456789");
  EXPECT_EQ(m.image.type, "machine");
  EXPECT_EQ(m.image.digest_hex, kTarSha1);
  EXPECT_EQ(m.image.size, 2147483648u);
  EXPECT_EQ(m.image.bundled_size, 15728656u);
  EXPECT_EQ(m.image.ec2_encrypted_key, blob('a'));
  EXPECT_EQ(m.image.user_encrypted_key, blob('b'));
  EXPECT_EQ(m.image.ec2_encrypted_iv, blob('c'));
  EXPECT_EQ(m.image.user_encrypted_iv, blob('d'));
  ASSERT_EQ(m.parts.size(), 2u);
  EXPECT_EQ(m.parts[0].index, 0u);
  EXPECT_EQ(m.parts[0].filename, "centos6.img.part.00");
  EXPECT_EQ(hex_encode(m.parts[0].sha1), kSha1A);
  EXPECT_EQ(m.parts[1].index, 1u);
  EXPECT_EQ(m.parts[1].filename, "centos6.img.part.01");
  EXPECT_EQ(hex_encode(m.parts[1].sha1), kSha1B);
  EXPECT_EQ(m.signature, std::string(512, 'e'));
  EXPECT_EQ(m.signed_text, kConfig + image_element(kParts));
}

TEST(BundleManifestTest, PrettyPrintedManifestKeepsRawSignedBytes) {
  const std::string config =
      "<machine_configuration>\n    <architecture>i386</architecture>\n"
      "  </machine_configuration>";
  const std::string image =
      "<image>\n    <name> img </name>\n    <user>1</user>\n    <type>kernel</type>\n"
      "    <digest algorithm=\"SHA1\">" +
      kTarSha1 +
      "</digest>\n    <size>\n 5 \n</size>\n    <bundled_size>32</bundled_size>\n"
      "    <ec2_encrypted_key algorithm=\"AES-128-CBC\">ab</ec2_encrypted_key>\n"
      "    <ec2_encrypted_iv>cd</ec2_encrypted_iv>\n"
      "    <parts count=\"3\">\n"
      "      <part index=\"2\"><filename>img.part.2</filename>\n"
      "        <digest algorithm=\"SHA1\">" +
      kSha1B +
      "</digest></part>\n"
      "      <part index=\"0\"><filename>img.part.0</filename>\n"
      "        <digest algorithm=\"SHA1\">" +
      kSha1A +
      "</digest></part>\n"
      "      <part index=\"1\"><filename>img.part.1</filename>\n"
      "        <digest algorithm=\"SHA1\">" +
      kSha1A +
      "</digest></part>\n"
      "    </parts>\n  </image>";
  const std::string xml =
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<manifest>\n  <version>2007-10-10</version>\n"
      "  " +
      image + "\n  " + config + "\n  <signature>UNSIGNED</signature>\n</manifest>\n";
  Result<BundleManifest> parsed = parse_bundle_manifest(xml);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_EQ(parsed->image.name, "img");
  EXPECT_EQ(parsed->image.size, 5u);
  EXPECT_EQ(parsed->image.type, "kernel");
  EXPECT_TRUE(parsed->image.user_encrypted_key.empty());
  EXPECT_TRUE(parsed->image.user_encrypted_iv.empty());
  EXPECT_TRUE(parsed->bundler.name.empty());
  EXPECT_EQ(parsed->signature, "UNSIGNED");
  ASSERT_EQ(parsed->parts.size(), 3u);
  for (uint64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(parsed->parts[i].index, i);
    EXPECT_EQ(parsed->parts[i].filename, "img.part." + std::to_string(i));
  }
  // Machine configuration first, whatever the document order, byte for byte.
  EXPECT_EQ(parsed->signed_text, config + image);
}

TEST(BundleManifestTest, AcceptsNoDeclarationEmptyUserKeysAndUppercaseHex) {
  std::string image = image_element(kParts);
  image = replace_once(
      image, "<user_encrypted_key algorithm=\"AES-128-CBC\">" + blob('b') + "</user_encrypted_key>",
      "<user_encrypted_key algorithm=\"AES-128-CBC\"/>");
  image = replace_once(image, "<user_encrypted_iv>" + blob('d') + "</user_encrypted_iv>",
                       "<user_encrypted_iv></user_encrypted_iv>");
  image = replace_once(image, kSha1A, "89E6C98D92887913CADF06B2ADB97F26CDE4849B");
  std::string xml = manifest_with(kConfig, image, "ABCDEF");
  xml = xml.substr(xml.find('\n') + 1);
  Result<BundleManifest> parsed = parse_bundle_manifest(xml);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_TRUE(parsed->image.user_encrypted_key.empty());
  EXPECT_TRUE(parsed->image.user_encrypted_iv.empty());
  EXPECT_EQ(hex_encode(parsed->parts[0].sha1), kSha1A);
  EXPECT_EQ(parsed->signature, "abcdef");
  EXPECT_EQ(parsed->signed_text, kConfig + image);
}

TEST(BundleManifestTest, AcceptsLargestNumbersAndSafeFilenames) {
  std::string image = image_element(parts_of({{"0", "sub/dir/x.part.00"}, {"1", "..x/y..z"}}, "2"));
  image = replace_once(image, "<size>2147483648</size>", "<size>18446744073709551615</size>");
  image = replace_once(image, "<bundled_size>15728656</bundled_size>",
                       "<bundled_size>018446744073709551600</bundled_size>");
  Result<BundleManifest> parsed = parse_bundle_manifest(manifest_with(kConfig, image));
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_EQ(parsed->image.size, UINT64_MAX);
  EXPECT_EQ(parsed->image.bundled_size, 18446744073709551600u);
  EXPECT_EQ(parsed->parts[0].filename, "sub/dir/x.part.00");
  EXPECT_EQ(parsed->parts[1].filename, "..x/y..z");
}

TEST(BundleManifestTest, AcceptsCommentsWithoutMarkup) {
  std::string xml = replace_once(valid_manifest(), "<version>", "<!-- made by hand --><version>");
  EXPECT_TRUE(parse_bundle_manifest(xml).ok());
}

TEST(BundleManifestTest, RejectsMalformedXml) {
  expect_error("", StatusCode::kCorruption, "not well-formed XML");
  expect_error("<manifest>", StatusCode::kCorruption, "not well-formed XML");
  expect_error(valid_manifest().substr(0, 500), StatusCode::kCorruption, "not well-formed XML");
  expect_error(replace_once(valid_manifest(), "</version>", "</versio>"), StatusCode::kCorruption,
               "not well-formed XML");
  expect_error(replace_once(valid_manifest(), "centos6.img.part.00", "a&b"),
               StatusCode::kCorruption, "not well-formed XML");
  expect_error(valid_manifest() + "<extra/>", StatusCode::kCorruption, "not well-formed XML");
  expect_error(std::string("<manifest>\0</manifest>", 22), StatusCode::kCorruption, "NUL");
}

TEST(BundleManifestTest, RejectsDtdsAndEntities) {
  const std::string body = valid_manifest().substr(valid_manifest().find('\n') + 1);
  const std::string laughs =
      "<?xml version='1.0'?>\n<!DOCTYPE manifest [<!ENTITY a \"aaaaaaaaaa\">"
      "<!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\"><!ENTITY c \"&b;&b;&b;&b;&b;&b;&b;&b;&b;\">"
      "<!ENTITY d \"&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;\"><!ENTITY e \"&d;&d;&d;&d;&d;&d;&d;&d;\">]>";
  expect_error(laughs + replace_once(body, "x86_64", "&e;"), StatusCode::kCorruption,
               "manifest has a DTD");
  expect_error("<!DOCTYPE manifest SYSTEM \"http://example.com/m.dtd\">" + body,
               StatusCode::kCorruption, "manifest has a DTD");
  expect_error("<!DOCTYPE manifest [<!ENTITY x SYSTEM \"file:///etc/passwd\">]>" +
                   replace_once(body, "centos6.img</name>", "&x;</name>"),
               StatusCode::kCorruption, "manifest has a DTD");
  // Without a DTD an entity reference is simply undefined.
  expect_error(replace_once(body, "x86_64", "&e;"), StatusCode::kCorruption, "not well-formed XML");
}

TEST(BundleManifestTest, RejectsHiddenOrDuplicateSignedElements) {
  // A decoy in a comment would be what the signature string search finds.
  expect_error(replace_once(valid_manifest(), "<version>",
                            "<!--" + kConfig + image_element(kParts) + "--><version>"),
               StatusCode::kCorruption, "comment, CDATA section or processing instruction");
  expect_error(replace_once(valid_manifest(), "<version>", "<?pi <image>?><version>"),
               StatusCode::kCorruption, "processing instruction");
  expect_error(replace_once(valid_manifest(), "<architecture>x86_64",
                            "<architecture><![CDATA[<image>]]>x86_64"),
               StatusCode::kCorruption, "CDATA");
  expect_error(replace_once(valid_manifest(), "<version>",
                            "<decoy>" + kConfig + image_element(kParts) + "</decoy><version>"),
               StatusCode::kCorruption, "exactly one <image>");
  expect_error(replace_once(valid_manifest(), "<kernel_id>", "<image/><kernel_id>"),
               StatusCode::kCorruption, "exactly one <image>");
  // The parser reads <image attr>, so the literal "<image>" the signature needs is missing.
  expect_error(replace_once(valid_manifest(), "<image>", "<image id=\"1\">"),
               StatusCode::kCorruption, "literal text <image>");
  expect_error(replace_once(valid_manifest(), "<size>2147483648</size>",
                            "<size>2147483648</size><size>1</size>"),
               StatusCode::kCorruption, "more than one <image><size>");
}

TEST(BundleManifestTest, RejectsWrongVersionRootAndMissingElements) {
  expect_error(replace_once(valid_manifest(), "2007-10-10", "2010-11-15"), StatusCode::kCorruption,
               "version is '2010-11-15'");
  expect_error("<manifests>" + kConfig + image_element(kParts) + "</manifests>",
               StatusCode::kCorruption, "root element is not <manifest>");
  expect_error(replace_once(valid_manifest(), "<version>2007-10-10</version>", ""),
               StatusCode::kCorruption, "lacks <version>");
  expect_error(replace_once(valid_manifest(), "<size>2147483648</size>", ""),
               StatusCode::kCorruption, "lacks <image><size>");
  expect_error(replace_once(valid_manifest(), "<architecture>x86_64</architecture>", ""),
               StatusCode::kCorruption, "lacks <machine_configuration><architecture>");
  expect_error(
      replace_once(valid_manifest(), "<ec2_encrypted_iv>" + blob('c') + "</ec2_encrypted_iv>", ""),
      StatusCode::kCorruption, "lacks <image><ec2_encrypted_iv>");
  expect_error(
      replace_once(valid_manifest(), "<ec2_encrypted_key algorithm=\"AES-128-CBC\">" + blob('a'),
                   "<ec2_encrypted_key algorithm=\"AES-128-CBC\">"),
      StatusCode::kCorruption, "<image><ec2_encrypted_key> is empty");
  expect_error(
      replace_once(valid_manifest(), "<signature>" + std::string(512, 'e') + "</signature>", ""),
      StatusCode::kCorruption, "lacks <signature>");
  expect_error(
      replace_once(valid_manifest(), "<size>2147483648</size>", "<size><b>2147483648</b></size>"),
      StatusCode::kCorruption, "must hold only text");
}

TEST(BundleManifestTest, RejectsPartCountMismatches) {
  expect_error(manifest_with(kConfig, image_element(parts_of({{"0", "a"}, {"1", "b"}}, "3"))),
               StatusCode::kCorruption, "count is 3 but 2 <part>");
  expect_error(manifest_with(kConfig, image_element(parts_of({{"0", "a"}, {"1", "b"}}, "1"))),
               StatusCode::kCorruption, "count is 1 but more");
  expect_error(manifest_with(kConfig, image_element(parts_of({}, "0"))), StatusCode::kCorruption,
               "no parts");
  expect_error(manifest_with(kConfig, image_element(parts_of({{"0", "a"}}, "100001"))),
               StatusCode::kCorruption, "limit 100000");
  expect_error(manifest_with(kConfig, image_element(parts_of({{"0", "a"}}, "x"))),
               StatusCode::kCorruption, "not a decimal number");
  expect_error(manifest_with(kConfig, image_element("<parts><part index=\"0\"><filename>a"
                                                    "</filename><digest>" +
                                                    kSha1A + "</digest></part></parts>")),
               StatusCode::kCorruption, "lacks a count attribute");
}

TEST(BundleManifestTest, RejectsBadPartIndexes) {
  expect_error(manifest_with(kConfig, image_element(parts_of({{"0", "a"}, {"0", "b"}}, "2"))),
               StatusCode::kCorruption, "duplicate part index 0");
  expect_error(manifest_with(kConfig, image_element(parts_of({{"0", "a"}, {"2", "b"}}, "2"))),
               StatusCode::kCorruption, "part index 2 is out of range 0..1");
  for (const std::string bad : {"-1", "1.0", "", "0x1", " 1 2"}) {
    expect_error(manifest_with(kConfig, image_element(parts_of({{bad, "a"}}, "1"))),
                 StatusCode::kCorruption, "<part> index");
  }
  expect_error(manifest_with(kConfig, image_element(replace_once(parts_of({{"0", "a"}}, "1"),
                                                                 " index=\"0\"", ""))),
               StatusCode::kCorruption, "lacks an index attribute");
}

TEST(BundleManifestTest, RejectsEscapingAndBadFilenames) {
  for (const std::string bad :
       {"../x", "/etc/passwd", "a/../../b", "..", "a/..", "a\\b", "..\\x"}) {
    expect_error(manifest_with(kConfig, image_element(parts_of({{"0", bad}}, "1"))),
                 StatusCode::kCorruption, "part filename escapes the manifest's folder");
  }
  expect_error(manifest_with(kConfig, image_element(parts_of({{"0", "  "}}, "1"))),
               StatusCode::kCorruption, "part 0 has an empty filename");
  expect_error(
      manifest_with(kConfig, image_element(parts_of({{"0", std::string(1025, 'f')}}, "1"))),
      StatusCode::kCorruption, "1025 bytes (limit 1024)");
  expect_error(manifest_with(kConfig, image_element(parts_of({{"0", "a&#9;b"}}, "1"))),
               StatusCode::kCorruption, "control character");
  EXPECT_TRUE(
      parse_bundle_manifest(
          manifest_with(kConfig, image_element(parts_of({{"0", std::string(1024, 'f')}}, "1"))))
          .ok());
}

TEST(BundleManifestTest, RejectsBadHex) {
  expect_error(replace_once(valid_manifest(), kTarSha1, kTarSha1.substr(1)),
               StatusCode::kCorruption, "<image><digest>");
  expect_error(replace_once(valid_manifest(), kSha1A, "g" + kSha1A.substr(1)),
               StatusCode::kCorruption, "is not 40 hex digits");
  expect_error(replace_once(valid_manifest(), kSha1B, kSha1B + "00"), StatusCode::kCorruption,
               "<part index=\"1\"><digest>");
  expect_error(replace_once(valid_manifest(), blob('a'), blob('a') + "0"), StatusCode::kCorruption,
               "<image><ec2_encrypted_key> is not an even-length hex");
  expect_error(replace_once(valid_manifest(), blob('d'), "zz"), StatusCode::kCorruption,
               "<image><user_encrypted_iv> is not an even-length hex");
  expect_error(replace_once(valid_manifest(), std::string(512, 'e'), "unsigned"),
               StatusCode::kCorruption, "<signature>");
  expect_error(replace_once(valid_manifest(), std::string(512, 'e'), ""), StatusCode::kCorruption,
               "<signature> is empty");
}

TEST(BundleManifestTest, RejectsBadNumbers) {
  for (const std::string bad :
       {"18446744073709551616", "99999999999999999999999", "-1", "1e3", "+5", "", "0x10", "1 2"}) {
    expect_error(
        replace_once(valid_manifest(), "<size>2147483648</size>", "<size>" + bad + "</size>"),
        StatusCode::kCorruption, "<image><size>");
  }
  for (const std::string bad : {"0", "15728657", "8"}) {
    expect_error(replace_once(valid_manifest(), "<bundled_size>15728656</bundled_size>",
                              "<bundled_size>" + bad + "</bundled_size>"),
                 StatusCode::kCorruption, "not a nonzero multiple of 16");
  }
}

TEST(BundleManifestTest, RejectsUnsupportedAlgorithms) {
  expect_error(replace_once(valid_manifest(), "<digest algorithm=\"SHA1\">" + kTarSha1,
                            "<digest algorithm=\"MD5\">" + kTarSha1),
               StatusCode::kNotSupported, "algorithm 'MD5'");
  expect_error(replace_once(valid_manifest(), "<ec2_encrypted_key algorithm=\"AES-128-CBC\">",
                            "<ec2_encrypted_key algorithm=\"AES-256-CBC\">"),
               StatusCode::kNotSupported, "AES-256-CBC");
  expect_error(replace_once(valid_manifest(), "<digest algorithm=\"SHA1\">" + kSha1B,
                            "<digest algorithm=\"SHA256\">" + kSha1B),
               StatusCode::kNotSupported, "SHA256");
}

TEST(BundleManifestTest, ParsesTheMaximumPartCount) {
  constexpr uint64_t kParts = kMaxBundleParts;
  std::vector<uint64_t> order(kParts);
  for (uint64_t i = 0; i < kParts; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  std::string parts = "<parts count=\"" + std::to_string(kParts) + "\">";
  for (uint64_t index : order) {
    parts += "<part index=\"" + std::to_string(index) + "\"><filename>p." + std::to_string(index) +
             "</filename><digest algorithm=\"SHA1\">" + kSha1B + "</digest></part>";
  }
  parts += "</parts>";
  Result<BundleManifest> parsed =
      parse_bundle_manifest(manifest_with(kConfig, image_element(parts)));
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  ASSERT_EQ(parsed->parts.size(), kParts);
  for (uint64_t i = 0; i < kParts; i += 9973) {
    EXPECT_EQ(parsed->parts[i].index, i);
    EXPECT_EQ(parsed->parts[i].filename, "p." + std::to_string(i));
  }
}

// Random byte damage must give a clean error or a consistent manifest, never a crash.
TEST(BundleManifestTest, SurvivesRandomDamage) {
  const std::string original = valid_manifest();
  std::mt19937 rng(12345);
  int accepted = 0;
  for (int round = 0; round < 3000; ++round) {
    std::string damaged = original;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % damaged.size();
      switch (rng() % 3) {
        case 0:
          damaged[at] = static_cast<char>(rng() % 256);
          break;
        case 1:
          damaged.erase(at, 1 + rng() % 8);
          break;
        default:
          damaged.insert(at, 1, "<>&/\"'=x0 "[rng() % 10]);
      }
    }
    Result<BundleManifest> parsed = parse_bundle_manifest(damaged);
    if (!parsed.ok()) continue;
    ++accepted;
    ASSERT_FALSE(parsed->parts.empty());
    for (size_t i = 0; i < parsed->parts.size(); ++i) EXPECT_EQ(parsed->parts[i].index, i);
    EXPECT_EQ(parsed->image.bundled_size % 16, 0u);
  }
  EXPECT_GT(accepted, 0);
}

TEST(BundleManifestTest, HexRoundTrip) {
  const std::vector<uint8_t> bytes = {0x00, 0x01, 0x7f, 0x80, 0xab, 0xff};
  EXPECT_EQ(hex_encode(bytes), "00017f80abff");
  std::optional<std::vector<uint8_t>> decoded = hex_decode("00017F80abFF");
  ASSERT_TRUE(decoded.has_value());
  EXPECT_EQ(*decoded, bytes);
  EXPECT_TRUE(hex_decode("")->empty());
  EXPECT_FALSE(hex_decode("abc").has_value());
  EXPECT_FALSE(hex_decode("0g").has_value());
  EXPECT_FALSE(hex_decode(" 0").has_value());
}

}  // namespace
}  // namespace imgfs::formats
