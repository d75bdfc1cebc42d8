#include "formats/download_manifest.h"

#include <gtest/gtest.h>

#include <array>
#include <cctype>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "formats/bundle_keys.h"
#include "formats/bundle_manifest.h"
#include "tests/support/crypto_fixtures.h"

namespace imgfs::formats {
namespace {

const std::string kSha1A = "89e6c98d92887913cadf06b2adb97f26cde4849b";
const std::string kSha1B = "2AAE6C35C94FCFB415DBE95F408B9CE91EE846ED";
const std::string kUrl0 =
    "http://osg.example:8773/services/objectstorage/images/centos.img.part.00?"
    "AWSAccessKeyId=AKIA&amp;Expires=1700000000&amp;Signature=abc%2Bdef%3D";
const std::string kUrl0Decoded =
    "http://osg.example:8773/services/objectstorage/images/centos.img.part.00?"
    "AWSAccessKeyId=AKIA&Expires=1700000000&Signature=abc%2Bdef%3D";
const std::string kUrl1 =
    "http://osg.example:8773/services/objectstorage/images/centos.img.part.01";

// The elements as the CLC's DownloadManifestFactory serializes them, one at a time.
struct Elements {
  std::string version = "<version>2014-01-14</version>";
  std::string file_format = "<file-format>BUNDLE</file-format>";
  std::string bundle = "<bundle><encrypted-key>" + std::string(512, 'A') +
                       "</encrypted-key><encrypted-iv>" + std::string(512, 'b') +
                       "</encrypted-iv><unbundled-size>2147483648</unbundled-size></bundle>";
  std::string image = "<image><size>15728656</size><parts><part index=\"0\"><get-url>" + kUrl0 +
                      "</get-url><digest algorithm=\"SHA1\">" + kSha1A +
                      "</digest></part><part index=\"1\"><get-url>" + kUrl1 +
                      "</get-url><digest algorithm=\"SHA1\">" + kSha1B +
                      "</digest></part></parts></image>";
  std::string signature_hex = std::string(512, 'C');
  std::string signature_algorithm = "RSA-SHA256";

  std::string signed_text() const { return version + file_format + bundle + image; }

  // The document as the CLC writes it: declaration, then no whitespace at all.
  std::string document() const {
    return "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?><manifest>" + version +
           file_format + bundle + image + "<signature algorithm=\"" + signature_algorithm + "\">" +
           signature_hex + "</signature></manifest>";
  }
};

std::string replace_once(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

void expect_error(const std::string& xml, StatusCode code, const std::string& fragment) {
  Result<DownloadManifest> parsed = parse_download_manifest(xml);
  ASSERT_FALSE(parsed.ok()) << "accepted: " << xml.substr(0, 400);
  EXPECT_EQ(parsed.status().code(), code) << parsed.status().to_string();
  EXPECT_NE(parsed.status().message().find(fragment), std::string::npos)
      << parsed.status().to_string() << " lacks '" << fragment << "'";
}

std::string parts_of(const std::vector<std::string>& indexes, const std::string& count_attr = "") {
  std::string parts = "<parts" + count_attr + ">";
  for (const std::string& index : indexes) {
    parts += "<part index=\"" + index + "\"><get-url>" + kUrl1 + "</get-url></part>";
  }
  return parts + "</parts>";
}

Elements with_parts(const std::string& parts) {
  Elements e;
  e.image = "<image><size>15728656</size>" + parts + "</image>";
  return e;
}

TEST(DownloadManifestTest, ParsesClcBundleManifest) {
  const Elements e;
  Result<DownloadManifest> parsed = parse_download_manifest(e.document());
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  const DownloadManifest& m = *parsed;
  EXPECT_EQ(m.version, "2014-01-14");
  EXPECT_EQ(m.file_format, DownloadFileFormat::kBundle);
  ASSERT_TRUE(m.bundle.has_value());
  EXPECT_EQ(m.bundle->encrypted_key_hex, std::string(512, 'a'));
  EXPECT_EQ(m.bundle->encrypted_iv_hex, std::string(512, 'b'));
  EXPECT_EQ(m.bundle->unbundled_size, 2147483648u);
  EXPECT_EQ(m.image_size, 15728656u);
  ASSERT_EQ(m.parts.size(), 2u);
  EXPECT_EQ(m.parts[0].index, 0u);
  EXPECT_EQ(m.parts[0].get_url, kUrl0Decoded);
  ASSERT_TRUE(m.parts[0].sha1.has_value());
  EXPECT_EQ(hex_encode(*m.parts[0].sha1), kSha1A);
  EXPECT_EQ(m.parts[1].get_url, kUrl1);
  ASSERT_TRUE(m.parts[1].sha1.has_value());
  EXPECT_EQ(hex_encode(*m.parts[1].sha1), "2aae6c35c94fcfb415dbe95f408b9ce91ee846ed");
  EXPECT_EQ(m.signature_algorithm, "RSA-SHA256");
  EXPECT_EQ(m.signature_hex, std::string(512, 'c'));
  EXPECT_EQ(m.signed_text, e.signed_text());
  EXPECT_EQ(download_file_format_name(m.file_format), "BUNDLE");
}

TEST(DownloadManifestTest, ParsesRawImportManifestWithoutBundleOrDigests) {
  Elements e = with_parts(parts_of({"1", "0", "2"}, " count=\"3\""));
  e.file_format = "<file-format>RAW</file-format>";
  e.bundle.clear();
  e.image = replace_once(e.image, "<size>15728656</size>", "<size>12345</size>");
  Result<DownloadManifest> parsed = parse_download_manifest(e.document());
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_EQ(parsed->file_format, DownloadFileFormat::kRaw);
  EXPECT_FALSE(parsed->bundle.has_value());
  EXPECT_EQ(parsed->image_size, 12345u);
  ASSERT_EQ(parsed->parts.size(), 3u);
  for (uint64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(parsed->parts[i].index, i);
    EXPECT_FALSE(parsed->parts[i].sha1.has_value());
  }
  EXPECT_EQ(parsed->signed_text, e.version + e.file_format + e.image);
  for (auto [name, format] :
       {std::pair{"VMDK", DownloadFileFormat::kVmdk}, std::pair{"VHD", DownloadFileFormat::kVhd}}) {
    e.file_format = "<file-format>" + std::string(name) + "</file-format>";
    Result<DownloadManifest> other = parse_download_manifest(e.document());
    ASSERT_TRUE(other.ok()) << other.status().to_string();
    EXPECT_EQ(other->file_format, format);
    EXPECT_EQ(download_file_format_name(format), name);
  }
}

TEST(DownloadManifestTest, SignedTextIsRawAndSurvivesWhitespaceOutsideElements) {
  Elements e;
  std::string xml = e.document();
  xml = replace_once(xml, "<manifest>", "<manifest>\n  ");
  xml = replace_once(xml, "<signature", "\n  <signature");
  xml = replace_once(xml, "</manifest>", "\n</manifest>\n");
  Result<DownloadManifest> parsed = parse_download_manifest(xml);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_EQ(parsed->signed_text, e.signed_text());
  // Text inside a signed element is signed as written, entity references included.
  EXPECT_NE(parsed->signed_text.find("&amp;Expires"), std::string::npos);
}

TEST(DownloadManifestTest, ManyParts) {
  std::vector<std::string> indexes;
  for (int i = 999; i >= 0; --i) indexes.push_back(std::to_string(i));
  Result<DownloadManifest> parsed =
      parse_download_manifest(with_parts(parts_of(indexes)).document());
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  ASSERT_EQ(parsed->parts.size(), 1000u);
  for (uint64_t i = 0; i < 1000; ++i) EXPECT_EQ(parsed->parts[i].index, i);
}

TEST(DownloadManifestTest, RejectsBadDocuments) {
  const Elements e;
  expect_error("", StatusCode::kCorruption, "not well-formed XML");
  expect_error("<manifest>", StatusCode::kCorruption, "not well-formed XML");
  expect_error("<image/>", StatusCode::kCorruption, "root element is not <manifest>");
  expect_error(std::string("<manifest>\0</manifest>", 22), StatusCode::kCorruption, "NUL");
  expect_error("<!DOCTYPE manifest [<!ENTITY x \"a\">]><manifest>&x;</manifest>",
               StatusCode::kCorruption, "DTD");
  Elements old = e;
  old.version = "<version>2007-10-10</version>";
  expect_error(old.document(), StatusCode::kCorruption,
               "version is '2007-10-10', expected 2014-01-14");
  Elements no_version = e;
  no_version.version.clear();
  expect_error(no_version.document(), StatusCode::kCorruption, "lacks <version>");
  expect_error(
      replace_once(e.document(),
                   "<signature algorithm=\"RSA-SHA256\">" + e.signature_hex + "</signature>", ""),
      StatusCode::kCorruption, "lacks <signature>");
  Elements no_image = e;
  no_image.image.clear();
  expect_error(no_image.document(), StatusCode::kCorruption, "lacks <image>");
}

TEST(DownloadManifestTest, RejectsAnythingThatCouldSplitSignedTextFromParsedFields) {
  const Elements e;
  // A second <image> hidden in a comment would be found by the raw search.
  expect_error(replace_once(e.document(), "<manifest>",
                            "<manifest><!-- <image><size>1</size>"
                            "</image> -->"),
               StatusCode::kCorruption, "comment, CDATA section or processing instruction");
  expect_error(replace_once(e.document(), "</manifest>",
                            "<extra><![CDATA[<version>x</version>]]></extra></manifest>"),
               StatusCode::kCorruption, "comment, CDATA section or processing instruction");
  // A second signed element anywhere, even nested in an unknown element.
  expect_error(replace_once(e.document(), "</manifest>",
                            "<extra><image><size>1</size></image></extra></manifest>"),
               StatusCode::kCorruption, "more than one <version>, <file-format>, <bundle>");
  expect_error(
      replace_once(e.document(), "</manifest>", "<version>2014-01-14</version></manifest>"),
      StatusCode::kCorruption, "more than one");
  // A signed element whose start tag is not written plainly cannot be found by the raw search.
  Elements attributed = e;
  attributed.image = replace_once(e.image, "<image>", "<image x=\"1\">");
  expect_error(attributed.document(), StatusCode::kCorruption,
               "lacks the literal text <image>...</image>");
}

TEST(DownloadManifestTest, RejectsBadFormatsAndBundles) {
  Elements qcow = Elements();
  qcow.file_format = "<file-format>QCOW2</file-format>";
  expect_error(qcow.document(), StatusCode::kNotSupported, "file-format 'QCOW2'");
  Elements lower = Elements();
  lower.file_format = "<file-format>bundle</file-format>";
  expect_error(lower.document(), StatusCode::kNotSupported, "file-format 'bundle'");
  Elements no_bundle = Elements();
  no_bundle.bundle.clear();
  expect_error(no_bundle.document(), StatusCode::kCorruption,
               "lacks a <bundle> element, but file-format is BUNDLE");
  Elements raw_with_bundle = Elements();
  raw_with_bundle.file_format = "<file-format>RAW</file-format>";
  expect_error(raw_with_bundle.document(), StatusCode::kCorruption,
               "has a <bundle> element, but file-format is RAW");
  Elements odd_key = Elements();
  odd_key.bundle = replace_once(odd_key.bundle, std::string(512, 'A'), std::string(511, 'A'));
  expect_error(odd_key.document(), StatusCode::kCorruption,
               "<bundle><encrypted-key> is not an even-length hex string");
  Elements bad_iv = Elements();
  bad_iv.bundle = replace_once(bad_iv.bundle, std::string(512, 'b'), std::string(512, 'g'));
  expect_error(bad_iv.document(), StatusCode::kCorruption,
               "<bundle><encrypted-iv> is not an even-length hex string");
  Elements empty_iv = Elements();
  empty_iv.bundle = replace_once(empty_iv.bundle, std::string(512, 'b'), "");
  expect_error(empty_iv.document(), StatusCode::kCorruption, "<bundle><encrypted-iv> is empty");
  Elements no_unbundled = Elements();
  no_unbundled.bundle =
      replace_once(no_unbundled.bundle, "<unbundled-size>2147483648</unbundled-size>", "");
  expect_error(no_unbundled.document(), StatusCode::kCorruption, "lacks <bundle><unbundled-size>");
  for (const std::string size : {"0", "15728650", "-16", "1e6"}) {
    Elements bad_size = Elements();
    bad_size.image =
        replace_once(bad_size.image, "<size>15728656</size>", "<size>" + size + "</size>");
    expect_error(bad_size.document(), StatusCode::kCorruption, "<image><size>");
  }
}

TEST(DownloadManifestTest, RejectsBadParts) {
  expect_error(with_parts(parts_of({})).document(), StatusCode::kCorruption, "lists no parts");
  expect_error(with_parts("").document(), StatusCode::kCorruption, "lacks <image><parts>");
  expect_error(with_parts(parts_of({"0", "1"}, " count=\"3\"")).document(), StatusCode::kCorruption,
               "count is 3 but 2 <part> elements are listed");
  expect_error(with_parts(parts_of({"0", "1"}, " count=\"two\"")).document(),
               StatusCode::kCorruption, "count 'two' is not a decimal number");
  expect_error(with_parts(parts_of({"0", "0"})).document(), StatusCode::kCorruption,
               "duplicate part index 0");
  expect_error(with_parts(parts_of({"0", "2"})).document(), StatusCode::kCorruption,
               "part index 2 is not below the 2 parts listed");
  expect_error(with_parts(parts_of({"x"})).document(), StatusCode::kCorruption,
               "<part> index 'x' is not a decimal number");
  expect_error(with_parts("<parts><part><get-url>u</get-url></part></parts>").document(),
               StatusCode::kCorruption, "<part> lacks an index attribute");
  expect_error(with_parts("<parts><part index=\"0\"/></parts>").document(), StatusCode::kCorruption,
               "lacks <part index=\"0\"><get-url>");
  expect_error(
      with_parts("<parts><part index=\"0\"><get-url> </get-url></part></parts>").document(),
      StatusCode::kCorruption, "<part index=\"0\"><get-url> is empty");
  std::vector<std::string> too_many(100001, "0");
  expect_error(with_parts(parts_of(too_many)).document(), StatusCode::kCorruption,
               "lists more than 100000 parts");

  const std::string part_head = "<parts><part index=\"0\"><get-url>u</get-url>";
  expect_error(with_parts(part_head + "<digest algorithm=\"MD5\">" + kSha1A.substr(0, 32) +
                          "</digest></part></parts>")
                   .document(),
               StatusCode::kNotSupported, "algorithm 'MD5' is not SHA1");
  expect_error(
      with_parts(part_head + "<digest algorithm=\"SHA1\">abc</digest></part></parts>").document(),
      StatusCode::kCorruption, "'abc' is not 40 hex digits");
  expect_error(
      with_parts(part_head + "<digest>" + std::string(40, 'z') + "</digest></part></parts>")
          .document(),
      StatusCode::kCorruption, "<digest> is not an even-length hex string");
  Result<DownloadManifest> no_algorithm = parse_download_manifest(
      with_parts(part_head + "<digest>" + kSha1A + "</digest></part></parts>").document());
  ASSERT_TRUE(no_algorithm.ok()) << no_algorithm.status().to_string();
  EXPECT_EQ(hex_encode(*no_algorithm->parts[0].sha1), kSha1A);
}

TEST(DownloadManifestTest, RejectsBadSignatures) {
  Elements sha1 = Elements();
  sha1.signature_algorithm = "RSA-SHA1";
  expect_error(sha1.document(), StatusCode::kNotSupported,
               "algorithm 'RSA-SHA1' is not RSA-SHA256");
  Elements lower = Elements();
  lower.signature_algorithm = "rsa-sha256";
  EXPECT_TRUE(parse_download_manifest(lower.document()).ok());
  Elements odd = Elements();
  odd.signature_hex = "ABC";
  expect_error(odd.document(), StatusCode::kCorruption, "<signature> is not an even-length hex");
  Elements empty = Elements();
  empty.signature_hex.clear();
  expect_error(empty.document(), StatusCode::kCorruption, "<signature> is empty");
  const Elements e;
  expect_error(replace_once(e.document(), " algorithm=\"RSA-SHA256\"", ""), StatusCode::kCorruption,
               "<signature> lacks an algorithm attribute");
}

TEST(DownloadManifestTest, Detector) {
  const Elements e;
  EXPECT_TRUE(looks_like_download_manifest(e.document()));
  EXPECT_FALSE(looks_like_download_manifest(
      "<manifest><version>2010-11-15</version><import></import></manifest>"));
  EXPECT_FALSE(looks_like_download_manifest("<manifest><version>2007-10-10</version></manifest>"));
  EXPECT_FALSE(looks_like_download_manifest(""));
}

std::string upper_hex(const std::vector<uint8_t>& bytes) {
  std::string hex = hex_encode(bytes);
  for (char& c : hex) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return hex;
}

TEST(DownloadManifestTest, NodeKeyUnwrapsAndCloudSignatureVerifiesOverSignedText) {
  EvpPkeyPtr node = testing::generate_rsa_key(2048);
  EvpPkeyPtr cloud = testing::generate_rsa_key(2048);
  ASSERT_NE(node, nullptr);
  ASSERT_NE(cloud, nullptr);
  // What the CLC re-wraps: the same plaintext euca2ools wrapped, 32 ASCII hex characters.
  const std::string key_hex = "00112233445566778899aabbccddeeff";
  const std::string iv_hex = "0f0e0d0c0b0a09080706050403020100";
  Elements e;
  e.bundle = "<bundle><encrypted-key>" +
             hex_encode(testing::rsa_pkcs1_encrypt(node.get(), key_hex)) +
             "</encrypted-key><encrypted-iv>" +
             hex_encode(testing::rsa_pkcs1_encrypt(node.get(), iv_hex)) +
             "</encrypted-iv><unbundled-size>1048576</unbundled-size></bundle>";
  e.signature_hex = upper_hex(testing::sign_sha256_rsa(cloud.get(), e.signed_text()));

  Result<DownloadManifest> parsed = parse_download_manifest(e.document());
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  const Certificate cloud_cert = testing::certificate_of(cloud.get());
  const Certificate node_cert = testing::certificate_of(node.get());
  EXPECT_TRUE(verify_download_manifest_signature(*parsed, cloud_cert).ok());
  EXPECT_EQ(verify_download_manifest_signature(*parsed, node_cert).code(), StatusCode::kCorruption);

  Result<PrivateKey> node_key =
      PrivateKey::from_pem(testing::private_key_pem(node.get()), "node key");
  ASSERT_TRUE(node_key.ok()) << node_key.status().to_string();
  Result<std::array<uint8_t, 16>> key =
      unwrap_bundle_secret(*node_key, parsed->bundle->encrypted_key_hex);
  ASSERT_TRUE(key.ok()) << key.status().to_string();
  EXPECT_EQ(hex_encode(*key), key_hex);
  Result<std::array<uint8_t, 16>> iv =
      unwrap_bundle_secret(*node_key, parsed->bundle->encrypted_iv_hex);
  ASSERT_TRUE(iv.ok()) << iv.status().to_string();
  EXPECT_EQ(hex_encode(*iv), iv_hex);

  // Changing any signed byte (here a part URL) breaks the signature.
  const std::string tampered = replace_once(e.document(), "centos.img.part.01", "evil.part.01");
  Result<DownloadManifest> tampered_parsed = parse_download_manifest(tampered);
  ASSERT_TRUE(tampered_parsed.ok());
  EXPECT_EQ(verify_download_manifest_signature(*tampered_parsed, cloud_cert).code(),
            StatusCode::kCorruption);
}

TEST(DownloadManifestTest, SignatureCheckRefusesOtherAlgorithmsAndBadHex) {
  EvpPkeyPtr cloud = testing::generate_rsa_key(2048);
  ASSERT_NE(cloud, nullptr);
  Elements e;
  e.signature_hex = hex_encode(testing::sign_sha256_rsa(cloud.get(), e.signed_text()));
  Result<DownloadManifest> parsed = parse_download_manifest(e.document());
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  const Certificate cloud_cert = testing::certificate_of(cloud.get());
  ASSERT_TRUE(verify_download_manifest_signature(*parsed, cloud_cert).ok());

  DownloadManifest other_algorithm = *parsed;
  other_algorithm.signature_algorithm = "RSA-SHA1";
  EXPECT_EQ(verify_download_manifest_signature(other_algorithm, cloud_cert).code(),
            StatusCode::kNotSupported);
  DownloadManifest lower_case = *parsed;
  lower_case.signature_algorithm = "rsa-sha256";
  EXPECT_TRUE(verify_download_manifest_signature(lower_case, cloud_cert).ok());
  DownloadManifest not_hex = *parsed;
  not_hex.signature_hex = "zz";
  EXPECT_EQ(verify_download_manifest_signature(not_hex, cloud_cert).code(),
            StatusCode::kCorruption);
}

TEST(DownloadManifestTest, ConcurrentParsesAgree) {
  const std::string xml = Elements().document();
  std::vector<std::thread> threads;
  std::vector<int> good(8, 0);
  for (size_t t = 0; t < good.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        Result<DownloadManifest> parsed = parse_download_manifest(xml);
        if (parsed.ok() && parsed->parts.size() == 2 && parsed->signed_text.size() > 1000) {
          ++good[t];
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int count : good) EXPECT_EQ(count, 200);
}

}  // namespace
}  // namespace imgfs::formats
