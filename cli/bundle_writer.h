// Bundle writer: a raw image file turned into an AMI bundle (NAME.part.NN files plus
// NAME.manifest.xml) exactly as euca2ools 3 `euca-bundle-image` builds one, following
// FORMATS.md (a.1)-(a.6): a one-member GNU tar as Python 2.7 tarfile writes it, SHA1 of the tar
// stream, gzip level 6, AES-128-CBC with PKCS#7 padding, split into parts (with euca2ools' empty
// final part when the ciphertext fills the last part exactly), and a one-line manifest.
// Used by tests and tools to produce bundles without euca2ools.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "formats/status.h"

namespace imgfs::cli {

struct BundleWriteOptions {
  // The raw image file to bundle (a regular file; read once, sequentially).
  std::string image_path;
  // The cloud certificate (PEM X.509): wraps <ec2_encrypted_key>/<ec2_encrypted_iv>.
  std::string cert_path;
  // The user certificate: wraps <user_encrypted_key>/<user_encrypted_iv>; left empty without.
  std::optional<std::string> user_cert_path;
  // The user private key: signs the manifest; "UNSIGNED" without.
  std::optional<std::string> user_key_path;
  // Bundle name (tar member, <image><name>, file names); default: the image's basename.
  std::optional<std::string> prefix;
  // Ciphertext bytes per part; any nonzero size (euca2ools' hidden --part-size).
  uint64_t part_size = 10485760;
  // Output folder, created if missing. Existing files of the same names are overwritten.
  std::string out_dir;
  // <image><user>; dashes are removed as euca2ools does.
  std::string user_account = "000000000000";
  std::string arch = "x86_64";
};

// Writes the bundle and returns the manifest's path (out_dir/PREFIX.manifest.xml). Streams the
// image in 1 MiB chunks, so memory stays bounded whatever the image size. Files are created
// with mode 0644. The AES key and IV are fresh random values each call, so two bundles of one
// image differ. On failure, the files this call created are removed.
// Thread-safe (no shared state); concurrent calls must use different output names.
// Errors: InvalidArgument (bad option, prefix or key/cert file, a part size giving more than
// kMaxBundleParts parts), NotFound (missing input file), IOError (read, write or crypto failure),
// NotSupported (SHA1 signing refused by the OpenSSL policy).
Result<std::string> write_bundle(const BundleWriteOptions& options);

// The tar bytes before a member's data, as Python 2.7 tarfile writes them in GNU format
// (FORMATS.md a.2): a ././@LongLink header and name blocks when `member_name` exceeds 100 bytes,
// then the member header (mode 0644, owner 0, mtime 0, size in octal or, from 8 GiB, base-256).
// Pure; exposed so the header layout can be tested without multi-GiB images.
std::vector<uint8_t> bundle_tar_prologue(std::string_view member_name, uint64_t size);

}  // namespace imgfs::cli
