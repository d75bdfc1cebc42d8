// Bundle keys: RSA private keys and X.509 certificates (PEM) turned into the bundle's AES-128
// key and IV (unwrapping), signature checks, and the writer's wrap and sign steps.
// Follows FORMATS.md (a.4) for the two hex layers around the RSA PKCS#1 v1.5 blob, (a.5) for
// the SHA1withRSA signature and (a.7) for a download manifest's SHA256withRSA one. OpenSSL 3 EVP
// only.
#pragma once

#include <openssl/types.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "formats/bundle_manifest.h"
#include "formats/status.h"

namespace imgfs::formats {

struct EvpPkeyFree {
  void operator()(EVP_PKEY* key) const;
};
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, EvpPkeyFree>;

// An RSA private key. Move-only; immutable once loaded, so one key may be used from many
// threads at once.
class PrivateKey {
 public:
  // Reads an unencrypted PEM RSA private key (PKCS#1 or PKCS#8). Like ssh, refuses a file that
  // group or others may read or write.
  // Errors: NotFound (no such file), IOError (read failure), InvalidArgument (permissions too
  // open, not a regular file, not an unencrypted PEM RSA private key).
  static Result<PrivateKey> load_file(const std::string& path);

  // The same from PEM text; `description` names it in errors and describe().
  // Errors: InvalidArgument (not an unencrypted PEM RSA private key).
  static Result<PrivateKey> from_pem(std::string_view pem,
                                     std::string description = "PEM private key");

  PrivateKey(PrivateKey&&) noexcept = default;
  PrivateKey& operator=(PrivateKey&&) noexcept = default;

  // The file path (or the description given to from_pem), for errors and logs.
  std::string describe() const { return description_; }

  EVP_PKEY* evp_pkey() const { return key_.get(); }

 private:
  PrivateKey(EvpPkeyPtr key, std::string description)
      : key_(std::move(key)), description_(std::move(description)) {}

  EvpPkeyPtr key_;
  std::string description_;
};

// The RSA public key of an X.509 certificate. Move-only; immutable and thread-safe like
// PrivateKey.
class Certificate {
 public:
  // Reads a PEM X.509 certificate that holds an RSA key.
  // Errors: NotFound, IOError, InvalidArgument (not a PEM certificate, or not RSA).
  static Result<Certificate> load_file(const std::string& path);

  // Errors: InvalidArgument.
  static Result<Certificate> from_pem(std::string_view pem,
                                      std::string description = "PEM certificate");

  Certificate(Certificate&&) noexcept = default;
  Certificate& operator=(Certificate&&) noexcept = default;

  std::string describe() const { return description_; }

  EVP_PKEY* public_key() const { return key_.get(); }

 private:
  Certificate(EvpPkeyPtr key, std::string description)
      : key_(std::move(key)), description_(std::move(description)) {}

  EvpPkeyPtr key_;
  std::string description_;
};

// Unwraps one of the manifest's *_encrypted_key / *_encrypted_iv values: unhex, RSA PKCS#1 v1.5
// decrypt, expect 32 ASCII hex characters (surrounding whitespace tolerated; 31 are left-padded
// with a zero), unhex to 16 bytes. Thread-safe.
// Errors: Corruption (the blob is not hex, or the plaintext is not a hex secret, which is also
// what a wrong key looks like under OpenSSL's implicit rejection), InvalidArgument (the key
// cannot decrypt the blob: wrong key, or a blob longer than its modulus).
Result<std::array<uint8_t, 16>> unwrap_bundle_secret(const PrivateKey& key,
                                                     std::string_view hex_rsa_blob);

// The bundle's AES key and IV: tries each key on ec2_encrypted_key/iv, then on
// user_encrypted_key/iv; the first pair that unwraps wins. Null entries are skipped.
// Errors: InvalidArgument when no key unwraps both the key and the IV.
Result<std::pair<std::array<uint8_t, 16>, std::array<uint8_t, 16>>> unwrap_bundle_key_iv(
    const BundleManifest& manifest, const std::vector<const PrivateKey*>& keys);

// Checks the SHA1withRSA (PKCS#1 v1.5) signature over manifest.signed_text. Thread-safe.
// Errors: Corruption ("manifest is unsigned", a signature that is not hex or does not verify),
// NotSupported (this OpenSSL refuses SHA1 signatures, e.g. under a crypto policy).
Status verify_bundle_signature(const BundleManifest& manifest, const Certificate& certificate);

// Checks a SHA256withRSA (RSA PKCS#1 v1.5 over SHA-256) signature of `signed_text`, given as hex
// of either case: what the Eucalyptus 4 CLC writes into a download manifest's <signature>
// (FORMATS.md a.7). Thread-safe.
// Errors: Corruption (the signature is empty, not hex, or does not verify with the certificate's
// key, e.g. a changed text or another key), NotSupported (this OpenSSL cannot verify SHA-256 RSA).
Status verify_sha256_rsa_signature(const Certificate& certificate, std::string_view signed_text,
                                   std::string_view signature_hex);

// The writer's side of unwrap_bundle_secret: RSA PKCS#1 v1.5 encryption of the 32-character
// lowercase hex form of `secret`, as lowercase hex. Random padding, so never the same twice.
// Errors: IOError (OpenSSL failure).
Result<std::string> wrap_bundle_secret(const Certificate& certificate,
                                       const std::array<uint8_t, 16>& secret);

// The lowercase hex SHA1withRSA signature of `text`, as a manifest's <signature>.
// Errors: IOError (OpenSSL failure), NotSupported (SHA1 signatures refused by policy).
Result<std::string> sign_bundle_text(const PrivateKey& key, std::string_view text);

// The lowercase hex SHA256withRSA (PKCS#1 v1.5) signature of `text`: what
// verify_sha256_rsa_signature checks. Deterministic for a given key and text. Thread-safe.
// Errors: IOError (OpenSSL failure), NotSupported (SHA-256 RSA signatures unavailable).
Result<std::string> sign_sha256_rsa_text(const PrivateKey& key, std::string_view text);

}  // namespace imgfs::formats
