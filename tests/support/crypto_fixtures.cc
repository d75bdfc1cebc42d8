#include "tests/support/crypto_fixtures.h"

#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <memory>
#include <utility>

namespace imgfs::testing {

namespace {

// A unique_ptr deleter that calls OpenSSL's `kFree`.
template <auto kFree>
struct FreeWith {
  template <typename T>
  void operator()(T* object) const {
    kFree(object);
  }
};
using MemoryBio = std::unique_ptr<BIO, FreeWith<BIO_free>>;

MemoryBio new_memory_bio() { return MemoryBio(BIO_new(BIO_s_mem())); }

std::string bio_text(BIO* bio) {
  char* data = nullptr;
  const long length = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(length));
}

}  // namespace

formats::EvpPkeyPtr generate_rsa_key(unsigned bits) {
  formats::EvpPkeyPtr key(EVP_RSA_gen(bits));
  EXPECT_NE(key, nullptr) << "EVP_RSA_gen(" << bits << ") failed";
  return key;
}

std::string private_key_pem(EVP_PKEY* key, bool pkcs8) {
  MemoryBio bio = new_memory_bio();
  if (pkcs8) {
    EXPECT_EQ(1, PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr));
  } else {
    EXPECT_EQ(1, PEM_write_bio_PrivateKey_traditional(bio.get(), key, nullptr, nullptr, 0, nullptr,
                                                      nullptr));
  }
  return bio_text(bio.get());
}

std::string self_signed_certificate_pem(EVP_PKEY* key) {
  std::unique_ptr<X509, FreeWith<X509_free>> cert(X509_new());
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), 0);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("imgfs test"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  EXPECT_GT(X509_sign(cert.get(), key, EVP_sha256()), 0);
  MemoryBio bio = new_memory_bio();
  EXPECT_EQ(1, PEM_write_bio_X509(bio.get(), cert.get()));
  return bio_text(bio.get());
}

std::vector<uint8_t> rsa_pkcs1_encrypt(EVP_PKEY* key, std::string_view plain) {
  std::unique_ptr<EVP_PKEY_CTX, FreeWith<EVP_PKEY_CTX_free>> ctx(
      EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr));
  EXPECT_EQ(1, EVP_PKEY_encrypt_init(ctx.get()));
  EXPECT_EQ(1, EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING));
  const auto* in = reinterpret_cast<const unsigned char*>(plain.data());
  size_t length = 0;
  EXPECT_EQ(1, EVP_PKEY_encrypt(ctx.get(), nullptr, &length, in, plain.size()));
  std::vector<uint8_t> out(length);
  EXPECT_EQ(1, EVP_PKEY_encrypt(ctx.get(), out.data(), &length, in, plain.size()));
  out.resize(length);
  return out;
}

std::vector<uint8_t> sign_sha256_rsa(EVP_PKEY* key, std::string_view text) {
  std::unique_ptr<EVP_MD_CTX, FreeWith<EVP_MD_CTX_free>> ctx(EVP_MD_CTX_new());
  EXPECT_EQ(1, EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key));
  const auto* in = reinterpret_cast<const unsigned char*>(text.data());
  size_t length = 0;
  EXPECT_EQ(1, EVP_DigestSign(ctx.get(), nullptr, &length, in, text.size()));
  std::vector<uint8_t> out(length);
  EXPECT_EQ(1, EVP_DigestSign(ctx.get(), out.data(), &length, in, text.size()));
  out.resize(length);
  return out;
}

formats::PrivateKey private_key_of(EVP_PKEY* key) {
  Result<formats::PrivateKey> loaded = formats::PrivateKey::from_pem(private_key_pem(key));
  EXPECT_TRUE(loaded.ok()) << loaded.status().to_string();
  return std::move(loaded).value();
}

formats::Certificate certificate_of(EVP_PKEY* key) {
  Result<formats::Certificate> loaded =
      formats::Certificate::from_pem(self_signed_certificate_pem(key));
  EXPECT_TRUE(loaded.ok()) << loaded.status().to_string();
  return std::move(loaded).value();
}

}  // namespace imgfs::testing
