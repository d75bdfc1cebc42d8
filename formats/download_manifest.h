// Download manifest: the text of a Eucalyptus 4 download manifest (version 2014-01-14, written
// by the CLC's DownloadManifestFactory into the `<6 chars>-download-manifests-v2` bucket as
// `DM-<name>`, read by the NC's eucatoolkit) turned into a checked DownloadManifest. Follows
// FORMATS.md (a.7), confirmed against eucalyptus/eucalyptus DownloadManifestFactory.java,
// BundleImageManifest.java and tools/imaging/eucatoolkit/stages/{downloadmanifest,cryptoutils}.py.
//
// Layout (no whitespace between elements as the CLC writes it):
//   <manifest><version>2014-01-14</version><file-format>BUNDLE</file-format>
//     <bundle><encrypted-key>HEX</encrypted-key><encrypted-iv>HEX</encrypted-iv>
//             <unbundled-size>N</unbundled-size></bundle>             (BUNDLE only)
//     <image><size>N</size><parts [count="n"]>
//       <part index="i"><get-url>URL</get-url>[<digest algorithm="SHA1">HEX</digest>]</part>...
//     </parts></image>
//     <signature algorithm="RSA-SHA256">HEX</signature></manifest>
// The key and IV are the bundle's ec2_encrypted_* secrets, unwrapped by the CLC with the cloud
// key and wrapped again (RSA PKCS#1 v1.5, same plaintext: the 32 hex characters) for the node's
// public key, so bundle_keys' unwrap_bundle_secret() opens them with the node's private key.
// The signature is SHA256withRSA by the cloud key over signed_text (see below).
// A pure parser: no I/O; verify_download_manifest_signature() is the one key-handling step.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "formats/status.h"

namespace imgfs::formats {

class Certificate;

// Manifests with more parts are refused (10 MiB parts make that a 1 TB image).
inline constexpr uint64_t kMaxDownloadParts = 100000;

// Eucalyptus' FileType. The CLC writes RAW for every import (ImportImageManifest.getFileType).
enum class DownloadFileFormat { kBundle, kRaw, kVmdk, kVhd };

struct DownloadPart {
  uint64_t index = 0;
  // Pre-signed GET URL of the part (expires: 3 hours by default).
  std::string get_url;
  // SHA1 of the part's own bytes (ciphertext for a bundle), copied from the bundle manifest.
  // Absent when the manifest has no <digest> (imports; manifests from before digests were
  // added). There is no per-part size in this format: take sizes from the GET or a HEAD.
  std::optional<std::array<uint8_t, 20>> sha1;
};

struct DownloadManifest {
  // The <bundle> element, present exactly when file_format is kBundle.
  struct Bundle {
    // Hex RSA blobs wrapped for the node's key (lowercased, even length, non-empty).
    std::string encrypted_key_hex;
    std::string encrypted_iv_hex;
    // The image size inside the bundle (the bundle manifest's <image><size>).
    uint64_t unbundled_size = 0;
  };

  std::string version;
  DownloadFileFormat file_format = DownloadFileFormat::kBundle;
  std::optional<Bundle> bundle;
  // <image><size>: bytes to download, the sum of the part sizes. For a bundle this is the
  // bundled_size (total ciphertext), checked to be a nonzero multiple of 16.
  uint64_t image_size = 0;
  // Sorted by index; indexes are exactly 0..parts.size()-1. Never empty.
  std::vector<DownloadPart> parts;
  // The <signature> algorithm attribute as written (always RSA-SHA256, case-insensitively).
  std::string signature_algorithm;
  // Lowercase hex of the RSA-SHA256 (PKCS#1 v1.5) signature; the CLC writes it in upper case.
  std::string signature_hex;
  // The bytes the signature covers: the raw text of the <version>, <file-format>, <bundle> (only
  // for BUNDLE) and <image> elements, each from its start tag to its end tag inclusive,
  // concatenated in that order. That is what the CLC signs (each element serialized alone) and
  // what eucatoolkit verifies (lxml tostring of each element), because the CLC writes the
  // document with the same serializer and no whitespace between elements.
  std::string signed_text;
};

// "BUNDLE", "RAW", "VMDK" or "VHD".
std::string_view download_file_format_name(DownloadFileFormat format);

// Parses and checks a download manifest. Pure and thread-safe (libxml2 parses separate
// documents concurrently; libxml2 < 2.11 wants xmlInitParser() once in main before threads parse).
// Errors: Corruption with a precise message for malformed XML, a DTD, a comment, CDATA section
// or processing instruction holding '<' (it could hide a second <image> from the parser but not
// from the signed-text search), more than one <version>, <file-format>, <bundle> or <image>
// element anywhere, a version other than 2014-01-14, a missing element, a <bundle> missing for
// BUNDLE or present for another format, bad hex or numbers, an image size that is not a
// nonzero multiple of 16 for a bundle, parts@count (optional) unequal to the number of parts, no
// parts or more than kMaxDownloadParts, indexes that are not exactly 0..n-1, an empty get-url, a
// signature without an algorithm attribute, or signed elements that are not written as plain
// start tags. NotSupported for a file-format other than BUNDLE, RAW, VMDK or VHD (exact upper
// case, as eucatoolkit compares it), a digest algorithm other than SHA1 or a signature algorithm
// other than RSA-SHA256. Unknown elements are ignored.
Result<DownloadManifest> parse_download_manifest(std::string_view xml_text);

// Checks manifest.signature_hex, the CLC's SHA256withRSA signature, over manifest.signed_text
// with `certificate` (the cloud certificate). Thread-safe.
// Errors: those of verify_sha256_rsa_signature() (bundle_keys.h): Corruption when the signature
// is not hex or does not verify; NotSupported when OpenSSL cannot verify, or when
// signature_algorithm is not RSA-SHA256 (possible only in a manifest not made by the parser).
Status verify_download_manifest_signature(const DownloadManifest& manifest,
                                          const Certificate& certificate);

// True when the text looks like a download manifest: "<manifest" and "2014-01-14" appear in its
// first 64 KiB. A cheap sniff for routing, not a check. Pure and thread-safe.
bool looks_like_download_manifest(std::string_view xml_text);

}  // namespace imgfs::formats
