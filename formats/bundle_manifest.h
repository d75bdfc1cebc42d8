// Bundle manifest: the text of NAME.manifest.xml (version 2007-10-10) turned into a checked
// BundleManifest. Follows FORMATS.md (a.5) for the signed text and (a.6) for the elements.
// A pure parser: no I/O, no key handling (bundle_keys does that), no part naming.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/status.h"

namespace imgfs::formats {

// Manifests with more parts are refused (10 MiB parts make that a 1 TB image).
inline constexpr uint64_t kMaxBundleParts = 100000;
// Longest part filename accepted, in bytes.
inline constexpr size_t kMaxBundlePartFilenameBytes = 1024;

struct BundlePart {
  uint64_t index = 0;
  // Object name relative to the manifest's folder; checked not to escape it.
  std::string filename;
  // SHA1 of the part's own bytes (ciphertext).
  std::array<uint8_t, 20> sha1{};
};

struct BundleManifest {
  struct Bundler {
    std::string name;
    std::string version;
    std::string release;
  };
  struct Image {
    std::string name;
    std::string user;
    std::string type;
    // SHA1 of the uncompressed tar stream (raw image for euca2ools <= 1.3.1), 40 lowercase hex.
    std::string digest_hex;
    uint64_t size = 0;
    // Total ciphertext bytes: the sum of the part sizes, a nonzero multiple of 16.
    uint64_t bundled_size = 0;
    // Hex RSA blobs (lowercased). The ec2_* pair is always present; user_* may be empty.
    std::string ec2_encrypted_key;
    std::string ec2_encrypted_iv;
    std::string user_encrypted_key;
    std::string user_encrypted_iv;
  };

  std::string version;
  Bundler bundler;
  std::string architecture;
  std::optional<std::string> kernel_id;
  std::optional<std::string> ramdisk_id;
  Image image;
  // Sorted by index; indexes are exactly 0..parts.size()-1.
  std::vector<BundlePart> parts;
  // Lowercase hex of the RSA-SHA1 signature, or the literal "UNSIGNED".
  std::string signature;
  // The bytes the signature covers (FORMATS.md a.5): the raw text from the first
  // "<machine_configuration>" to the first "</machine_configuration>", then the raw text from
  // the first "<image>" to the first "</image>", both inclusive.
  std::string signed_text;
};

// Parses and checks a manifest. Pure and thread-safe (libxml2 parses separate documents
// concurrently; no global error handler is touched). libxml2 < 2.11 initializes itself lazily,
// so a program that parses from several threads calls xmlInitParser() once in main first.
// Errors: Corruption with a precise message for malformed XML, a DTD (refused outright, so
// entity tricks cannot work), a missing element, a wrong version, bad hex or numbers, a
// parts@count that does not match, indexes that are not exactly 0..n-1, or a part filename that
// is empty, too long or escapes the manifest's folder. NotSupported for a digest algorithm other
// than SHA1 or a cipher other than AES-128-CBC.
// Unknown elements (block_device_mapping, product_codes, ancestry, ...) are ignored.
Result<BundleManifest> parse_bundle_manifest(std::string_view xml_text);

// Lowercase hex of `bytes`.
std::string hex_encode(std::span<const uint8_t> bytes);

// The bytes of an even-length hex string (either case), or nullopt if it is not one.
std::optional<std::vector<uint8_t>> hex_decode(std::string_view hex);

}  // namespace imgfs::formats
