// Crypto fixtures: freshly generated RSA keys turned into the PEM keys, self-signed X.509
// certificates, RSA PKCS#1 v1.5 blobs and SHA256withRSA signatures that the key, manifest and
// bundle-writer tests feed to the code under test. OpenSSL 3 EVP only; nothing is read from disk.
#pragma once

#include <openssl/types.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "formats/bundle_keys.h"

namespace imgfs::testing {

// A new RSA key pair of `bits` bits (a 2048-bit key takes tens of milliseconds: generate once per
// suite). Null, with a test failure recorded, if OpenSSL fails.
formats::EvpPkeyPtr generate_rsa_key(unsigned bits);

// The private key as unencrypted PEM: PKCS#8 ("BEGIN PRIVATE KEY") or, with pkcs8 false, the
// traditional PKCS#1 form ("BEGIN RSA PRIVATE KEY"). Also works for non-RSA keys.
std::string private_key_pem(EVP_PKEY* key, bool pkcs8 = true);

// A self-signed X.509 v3 certificate (CN "imgfs test", valid for one hour from now, signed with
// SHA-256) for the public half of `key`, as PEM.
std::string self_signed_certificate_pem(EVP_PKEY* key);

// RSA PKCS#1 v1.5 encryption of arbitrary `plain` with the public half of `key`. Random padding,
// so never the same twice.
std::vector<uint8_t> rsa_pkcs1_encrypt(EVP_PKEY* key, std::string_view plain);

// The SHA256withRSA (PKCS#1 v1.5) signature of `text`, as the Eucalyptus CLC signs a download
// manifest. Deterministic for a given key and text.
std::vector<uint8_t> sign_sha256_rsa(EVP_PKEY* key, std::string_view text);

// The code under test's own types for `key`, loaded from the PEM forms above. Record a test
// failure if loading fails.
formats::PrivateKey private_key_of(EVP_PKEY* key);
formats::Certificate certificate_of(EVP_PKEY* key);

}  // namespace imgfs::testing
