#include "formats/bundle_keys.h"

#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tests/support/crypto_fixtures.h"

namespace imgfs::formats {
namespace {

using testing::certificate_of;
using testing::generate_rsa_key;
using testing::private_key_of;
using testing::private_key_pem;
using testing::self_signed_certificate_pem;

std::string bio_text(BIO* bio) {
  char* data = nullptr;
  const long length = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(length));
}

// Raw RSA PKCS#1 v1.5 encryption of arbitrary plaintext, as hex.
std::string rsa_encrypt_hex(EVP_PKEY* key, const std::string& plain) {
  return hex_encode(testing::rsa_pkcs1_encrypt(key, plain));
}

void write_file(const std::string& path, const std::string& text, mode_t mode) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
  ASSERT_EQ(0, ::chmod(path.c_str(), mode));
}

std::array<uint8_t, 16> secret_of(uint8_t seed) {
  std::array<uint8_t, 16> secret;
  for (size_t i = 0; i < secret.size(); ++i) secret[i] = static_cast<uint8_t>(seed * 31 + i * 7);
  return secret;
}

bool have_openssl_cli() { return std::system("command -v openssl >/dev/null 2>&1") == 0; }

class BundleKeysTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cloud_ = generate_rsa_key(2048).release();
    user_ = generate_rsa_key(2048).release();
    other_ = generate_rsa_key(2048).release();
    small_ = generate_rsa_key(1024).release();
  }
  static void TearDownTestSuite() {
    for (EVP_PKEY* key : {cloud_, user_, other_, small_}) EVP_PKEY_free(key);
  }

  void SetUp() override {
    char pattern[] = "/tmp/imgfs_keys_test_XXXXXX";
    ASSERT_NE(nullptr, ::mkdtemp(pattern));
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // A manifest whose ec2 pair is wrapped for `cloud_` and whose user pair for `user_`.
  BundleManifest wrapped_manifest(const std::array<uint8_t, 16>& key,
                                  const std::array<uint8_t, 16>& iv, bool with_user) {
    BundleManifest manifest;
    Certificate cloud = certificate_of(cloud_);
    manifest.image.ec2_encrypted_key = *wrap_bundle_secret(cloud, key);
    manifest.image.ec2_encrypted_iv = *wrap_bundle_secret(cloud, iv);
    if (with_user) {
      Certificate user = certificate_of(user_);
      manifest.image.user_encrypted_key = *wrap_bundle_secret(user, key);
      manifest.image.user_encrypted_iv = *wrap_bundle_secret(user, iv);
    }
    return manifest;
  }

  static EVP_PKEY* cloud_;
  static EVP_PKEY* user_;
  static EVP_PKEY* other_;
  static EVP_PKEY* small_;
  std::string dir_;
};

EVP_PKEY* BundleKeysTest::cloud_ = nullptr;
EVP_PKEY* BundleKeysTest::user_ = nullptr;
EVP_PKEY* BundleKeysTest::other_ = nullptr;
EVP_PKEY* BundleKeysTest::small_ = nullptr;

TEST_F(BundleKeysTest, LoadsPkcs1AndPkcs8KeysFromFiles) {
  for (bool pkcs8 : {false, true}) {
    const std::string path = dir_ + (pkcs8 ? "/pkcs8.pem" : "/pkcs1.pem");
    write_file(path, private_key_pem(user_, pkcs8), 0600);
    Result<PrivateKey> key = PrivateKey::load_file(path);
    ASSERT_TRUE(key.ok()) << key.status().to_string();
    EXPECT_EQ(key->describe(), path);
    EXPECT_EQ(1, EVP_PKEY_eq(key->evp_pkey(), user_));
  }
  write_file(dir_ + "/owner_only.pem", private_key_pem(user_, true), 0400);
  EXPECT_TRUE(PrivateKey::load_file(dir_ + "/owner_only.pem").ok());
}

TEST_F(BundleKeysTest, RefusesKeyFilesOthersCanRead) {
  const std::string path = dir_ + "/open.pem";
  write_file(path, private_key_pem(user_, true), 0644);
  Result<PrivateKey> key = PrivateKey::load_file(path);
  ASSERT_FALSE(key.ok());
  EXPECT_EQ(key.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(key.status().message(), "key file " + path +
                                        " is readable by group or others (mode 0644); chmod "
                                        "600 it");
  for (mode_t mode : {0640, 0604, 0620, 0602}) {
    ASSERT_EQ(0, ::chmod(path.c_str(), mode));
    EXPECT_EQ(PrivateKey::load_file(path).status().code(), StatusCode::kInvalidArgument) << mode;
  }
}

TEST_F(BundleKeysTest, RejectsBadKeyFiles) {
  EXPECT_EQ(PrivateKey::load_file(dir_ + "/missing.pem").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(PrivateKey::load_file(dir_).status().code(), StatusCode::kInvalidArgument);

  EXPECT_EQ(PrivateKey::from_pem("not a key").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PrivateKey::from_pem(self_signed_certificate_pem(user_)).status().code(),
            StatusCode::kInvalidArgument);

  // An encrypted key must fail, not prompt on the terminal.
  BIO* bio = BIO_new(BIO_s_mem());
  ASSERT_EQ(1, PEM_write_bio_PrivateKey(bio, user_, EVP_aes_128_cbc(),
                                        reinterpret_cast<const unsigned char*>("secret"), 6,
                                        nullptr, nullptr));
  const std::string encrypted = bio_text(bio);
  BIO_free(bio);
  Result<PrivateKey> key = PrivateKey::from_pem(encrypted, "enc.pem");
  ASSERT_FALSE(key.ok());
  EXPECT_EQ(key.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(key.status().message().find("enc.pem is not an unencrypted PEM private key"),
            std::string::npos);

  EvpPkeyPtr ec(EVP_EC_gen("P-256"));
  Result<PrivateKey> ec_key = PrivateKey::from_pem(private_key_pem(ec.get(), true));
  ASSERT_FALSE(ec_key.ok());
  EXPECT_NE(ec_key.status().message().find("not an RSA private key"), std::string::npos);
}

TEST_F(BundleKeysTest, LoadsCertificates) {
  const std::string path = dir_ + "/cert.pem";
  write_file(path, self_signed_certificate_pem(cloud_), 0644);
  Result<Certificate> cert = Certificate::load_file(path);
  ASSERT_TRUE(cert.ok()) << cert.status().to_string();
  EXPECT_EQ(cert->describe(), path);
  EXPECT_EQ(1, EVP_PKEY_eq(cert->public_key(), cloud_));

  EXPECT_EQ(Certificate::load_file(dir_ + "/none.pem").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(Certificate::from_pem("junk").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Certificate::from_pem(private_key_pem(cloud_, true)).status().code(),
            StatusCode::kInvalidArgument);
  EvpPkeyPtr ec(EVP_EC_gen("P-256"));
  Result<Certificate> ec_cert = Certificate::from_pem(self_signed_certificate_pem(ec.get()));
  ASSERT_FALSE(ec_cert.ok());
  EXPECT_NE(ec_cert.status().message().find("does not hold an RSA public key"), std::string::npos);
}

TEST_F(BundleKeysTest, WrapsAndUnwrapsSecrets) {
  const Certificate cert = certificate_of(cloud_);
  const PrivateKey key = private_key_of(cloud_);
  const std::array<uint8_t, 16> secret = secret_of(3);
  Result<std::string> wrapped = wrap_bundle_secret(cert, secret);
  ASSERT_TRUE(wrapped.ok()) << wrapped.status().to_string();
  EXPECT_EQ(wrapped->size(), 512u);  // Two hex characters per byte of a 2048-bit modulus.
  EXPECT_EQ(*wrapped, hex_encode(*hex_decode(*wrapped)));  // Lowercase.
  EXPECT_NE(*wrapped, *wrap_bundle_secret(cert, secret));  // Random PKCS#1 padding.

  Result<std::array<uint8_t, 16>> unwrapped = unwrap_bundle_secret(key, *wrapped);
  ASSERT_TRUE(unwrapped.ok()) << unwrapped.status().to_string();
  EXPECT_EQ(*unwrapped, secret);

  // The plaintext really is the 32-character lowercase hex string (FORMATS.md a.4).
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_pkey(nullptr, cloud_, nullptr);
  ASSERT_EQ(1, EVP_PKEY_decrypt_init(ctx));
  ASSERT_EQ(1, EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING));
  const std::vector<uint8_t> blob = *hex_decode(*wrapped);
  std::vector<uint8_t> plain(256);
  size_t plain_length = plain.size();
  ASSERT_EQ(1, EVP_PKEY_decrypt(ctx, plain.data(), &plain_length, blob.data(), blob.size()));
  EVP_PKEY_CTX_free(ctx);
  EXPECT_EQ(std::string(plain.begin(), plain.begin() + plain_length), hex_encode(secret));
}

TEST_F(BundleKeysTest, UnwrapToleratesProducerQuirks) {
  const PrivateKey key = private_key_of(user_);
  const std::string hex = "00a1b2c3d4e5f60718293a4b5c6d7e8f";
  std::array<uint8_t, 16> expected;
  std::copy_n(hex_decode(hex)->begin(), 16, expected.begin());

  for (const std::string& plain :
       {hex, " " + hex + "\n", std::string("00A1B2C3D4E5F60718293A4B5C6D7E8F"), hex.substr(1)}) {
    Result<std::array<uint8_t, 16>> unwrapped =
        unwrap_bundle_secret(key, "  " + rsa_encrypt_hex(user_, plain) + "\n");
    ASSERT_TRUE(unwrapped.ok()) << plain << ": " << unwrapped.status().to_string();
    EXPECT_EQ(*unwrapped, expected) << plain;
  }
  for (const std::string& plain :
       {hex.substr(2), hex + "0", hex + "00", std::string("zz") + hex.substr(2), std::string(""),
        std::string(16, '\x01')}) {
    Result<std::array<uint8_t, 16>> unwrapped =
        unwrap_bundle_secret(key, rsa_encrypt_hex(user_, plain));
    ASSERT_FALSE(unwrapped.ok()) << plain;
    EXPECT_EQ(unwrapped.status().code(), StatusCode::kCorruption) << plain;
    EXPECT_NE(unwrapped.status().message().find("is not 32 hex characters"), std::string::npos);
  }
}

TEST_F(BundleKeysTest, UnwrapWithWrongKeyOrDamagedBlobFails) {
  const std::string wrapped = *wrap_bundle_secret(certificate_of(cloud_), secret_of(5));
  Result<std::array<uint8_t, 16>> wrong = unwrap_bundle_secret(private_key_of(other_), wrapped);
  ASSERT_FALSE(wrong.ok());
  EXPECT_TRUE(wrong.status().code() == StatusCode::kInvalidArgument ||
              wrong.status().code() == StatusCode::kCorruption)
      << wrong.status().to_string();
  EXPECT_NE(wrong.status().message().find("wrong key"), std::string::npos);

  Result<std::array<uint8_t, 16>> small = unwrap_bundle_secret(private_key_of(small_), wrapped);
  ASSERT_FALSE(small.ok());
  EXPECT_EQ(small.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("longer than the 128-byte modulus"), std::string::npos);

  const PrivateKey key = private_key_of(cloud_);
  for (const std::string& bad :
       {std::string(""), std::string("xyz"), wrapped.substr(1), wrapped.substr(0, 510) + "zz"}) {
    Result<std::array<uint8_t, 16>> result = unwrap_bundle_secret(key, bad);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), StatusCode::kCorruption) << result.status().to_string();
  }
  std::string flipped = wrapped;
  flipped[100] = flipped[100] == '0' ? '1' : '0';
  EXPECT_FALSE(unwrap_bundle_secret(key, flipped).ok());
}

TEST_F(BundleKeysTest, UnwrapsKeyAndIvWithEitherKeyPair) {
  const std::array<uint8_t, 16> aes_key = secret_of(7);
  const std::array<uint8_t, 16> aes_iv = secret_of(8);
  const BundleManifest manifest = wrapped_manifest(aes_key, aes_iv, true);
  const PrivateKey cloud = private_key_of(cloud_);
  const PrivateKey user = private_key_of(user_);
  const PrivateKey other = private_key_of(other_);

  for (const std::vector<const PrivateKey*>& keys : {std::vector<const PrivateKey*>{&cloud},
                                                     {&user},
                                                     {&other, &user},
                                                     {nullptr, &cloud},
                                                     {&user, &cloud}}) {
    auto unwrapped = unwrap_bundle_key_iv(manifest, keys);
    ASSERT_TRUE(unwrapped.ok()) << unwrapped.status().to_string();
    EXPECT_EQ(unwrapped->first, aes_key);
    EXPECT_EQ(unwrapped->second, aes_iv);
  }

  auto none = unwrap_bundle_key_iv(manifest, {&other});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(none.status().message().find("none of the 1 keys unwraps this bundle's AES key "
                                         "(tried ec2_encrypted_key and user_encrypted_key)"),
            std::string::npos)
      << none.status().to_string();
  EXPECT_EQ(unwrap_bundle_key_iv(manifest, {}).status().code(), StatusCode::kInvalidArgument);

  // Without a user pair, the user's key cannot open the bundle.
  const BundleManifest cloud_only = wrapped_manifest(aes_key, aes_iv, false);
  EXPECT_FALSE(unwrap_bundle_key_iv(cloud_only, {&user}).ok());
  EXPECT_TRUE(unwrap_bundle_key_iv(cloud_only, {&user, &cloud}).ok());

  // An IV blob that the key cannot open fails the pair; the other pair still works.
  BundleManifest damaged = manifest;
  damaged.image.ec2_encrypted_iv = damaged.image.user_encrypted_iv;
  EXPECT_FALSE(unwrap_bundle_key_iv(damaged, {&cloud}).ok());
  auto fallback = unwrap_bundle_key_iv(damaged, {&cloud, &user});
  ASSERT_TRUE(fallback.ok());
  EXPECT_EQ(fallback->second, aes_iv);
}

TEST_F(BundleKeysTest, SignsAndVerifies) {
  const PrivateKey user = private_key_of(user_);
  BundleManifest manifest;
  manifest.signed_text = "<machine_configuration>x</machine_configuration><image>y</image>";
  Result<std::string> signature = sign_bundle_text(user, manifest.signed_text);
  ASSERT_TRUE(signature.ok()) << signature.status().to_string();
  EXPECT_EQ(signature->size(), 512u);
  manifest.signature = *signature;
  EXPECT_TRUE(verify_bundle_signature(manifest, certificate_of(user_)).ok());

  Status other = verify_bundle_signature(manifest, certificate_of(other_));
  EXPECT_EQ(other.code(), StatusCode::kCorruption);
  EXPECT_NE(other.message().find("does not verify"), std::string::npos);

  BundleManifest modified = manifest;
  modified.signed_text[30] = 'z';
  EXPECT_EQ(verify_bundle_signature(modified, certificate_of(user_)).code(),
            StatusCode::kCorruption);

  modified = manifest;
  modified.signature = "UNSIGNED";
  Status unsigned_status = verify_bundle_signature(modified, certificate_of(user_));
  EXPECT_EQ(unsigned_status.code(), StatusCode::kCorruption);
  EXPECT_EQ(unsigned_status.message(), "manifest is unsigned");
  modified.signature = "xyz";
  EXPECT_EQ(verify_bundle_signature(modified, certificate_of(user_)).code(),
            StatusCode::kCorruption);
  modified.signature = manifest.signature.substr(2);
  EXPECT_EQ(verify_bundle_signature(modified, certificate_of(user_)).code(),
            StatusCode::kCorruption);
}

// The openssl CLI, as euca2ools drives it, agrees with our wrap, unwrap and signature.
TEST_F(BundleKeysTest, InteroperatesWithOpensslCli) {
  if (!have_openssl_cli()) GTEST_SKIP() << "openssl command not found";
  const std::string cert_path = dir_ + "/cert.pem";
  const std::string key_path = dir_ + "/key.pem";
  write_file(cert_path, self_signed_certificate_pem(user_), 0644);
  write_file(key_path, private_key_pem(user_, false), 0600);
  const std::string hex = "0123456789abcdef00112233445566ff";
  write_file(dir_ + "/secret.txt", hex, 0600);
  ASSERT_EQ(0, std::system(("openssl pkeyutl -encrypt -certin -inkey " + cert_path +
                            " -pkeyopt rsa_padding_mode:pkcs1 -in " + dir_ + "/secret.txt -out " +
                            dir_ + "/secret.bin")
                               .c_str()));
  std::ifstream in(dir_ + "/secret.bin", std::ios::binary);
  const std::string blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Result<std::array<uint8_t, 16>> unwrapped = unwrap_bundle_secret(
      private_key_of(user_), hex_encode(std::vector<uint8_t>(blob.begin(), blob.end())));
  ASSERT_TRUE(unwrapped.ok()) << unwrapped.status().to_string();
  EXPECT_EQ(hex_encode(*unwrapped), hex);

  // Our wrap, opened by `openssl rsautl -decrypt -pkcs` (here pkeyutl).
  const std::string wrapped = *wrap_bundle_secret(certificate_of(user_), secret_of(9));
  const std::vector<uint8_t> wrapped_bytes = *hex_decode(wrapped);
  write_file(dir_ + "/wrapped.bin", std::string(wrapped_bytes.begin(), wrapped_bytes.end()), 0600);
  ASSERT_EQ(0, std::system(("openssl pkeyutl -decrypt -inkey " + key_path +
                            " -pkeyopt rsa_padding_mode:pkcs1 -in " + dir_ + "/wrapped.bin -out " +
                            dir_ + "/plain.txt")
                               .c_str()));
  std::ifstream plain_in(dir_ + "/plain.txt", std::ios::binary);
  std::stringstream plain;
  plain << plain_in.rdbuf();
  EXPECT_EQ(plain.str(), hex_encode(secret_of(9)));

  // A signature made as euca2ools 3 makes it: pkeyutl -sign over the SHA1 digest.
  const std::string text = "<machine_configuration/><image>abc</image>";
  write_file(dir_ + "/text.txt", text, 0600);
  ASSERT_EQ(0, std::system(("openssl dgst -sha1 -sign " + key_path + " -out " + dir_ + "/sig.bin " +
                            dir_ + "/text.txt")
                               .c_str()));
  std::ifstream sig_in(dir_ + "/sig.bin", std::ios::binary);
  const std::string sig((std::istreambuf_iterator<char>(sig_in)), std::istreambuf_iterator<char>());
  BundleManifest manifest;
  manifest.signed_text = text;
  manifest.signature = hex_encode(std::vector<uint8_t>(sig.begin(), sig.end()));
  EXPECT_TRUE(verify_bundle_signature(manifest, certificate_of(user_)).ok());
  EXPECT_EQ(manifest.signature, *sign_bundle_text(private_key_of(user_), text));  // Deterministic.

  // A SHA256withRSA signature as the Eucalyptus CLC makes it for a download manifest.
  ASSERT_EQ(0, std::system(("openssl dgst -sha256 -sign " + key_path + " -out " + dir_ +
                            "/sig256.bin " + dir_ + "/text.txt")
                               .c_str()));
  std::ifstream sig256_in(dir_ + "/sig256.bin", std::ios::binary);
  const std::string sig256((std::istreambuf_iterator<char>(sig256_in)),
                           std::istreambuf_iterator<char>());
  const std::string sig256_hex = hex_encode(std::vector<uint8_t>(sig256.begin(), sig256.end()));
  EXPECT_TRUE(verify_sha256_rsa_signature(certificate_of(user_), text, sig256_hex).ok());
  EXPECT_EQ(verify_sha256_rsa_signature(certificate_of(user_), text, manifest.signature).code(),
            StatusCode::kCorruption);  // The SHA1 signature is not a SHA256 one.
}

TEST_F(BundleKeysTest, VerifiesSha256Signatures) {
  const Certificate user = certificate_of(user_);
  const std::string text = "<version>2014-01-14</version><image><size>16</size></image>";
  const std::string signature = hex_encode(testing::sign_sha256_rsa(user_, text));
  EXPECT_EQ(signature.size(), 512u);
  EXPECT_TRUE(verify_sha256_rsa_signature(user, text, signature).ok());
  std::string upper = signature;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  EXPECT_TRUE(verify_sha256_rsa_signature(user, text, upper).ok());

  std::string modified = text;
  modified[10] = '5';
  Status changed = verify_sha256_rsa_signature(user, modified, signature);
  EXPECT_EQ(changed.code(), StatusCode::kCorruption);
  EXPECT_NE(changed.message().find("does not verify"), std::string::npos);
  EXPECT_EQ(verify_sha256_rsa_signature(user, text + " ", signature).code(),
            StatusCode::kCorruption);
  EXPECT_EQ(verify_sha256_rsa_signature(certificate_of(other_), text, signature).code(),
            StatusCode::kCorruption);

  std::string flipped = signature;
  flipped[100] = flipped[100] == '0' ? '1' : '0';
  EXPECT_EQ(verify_sha256_rsa_signature(user, text, flipped).code(), StatusCode::kCorruption);
  EXPECT_EQ(verify_sha256_rsa_signature(user, text, "").code(), StatusCode::kCorruption);
  EXPECT_EQ(verify_sha256_rsa_signature(user, text, "xyz").code(), StatusCode::kCorruption);
  EXPECT_EQ(verify_sha256_rsa_signature(user, text, signature.substr(1)).code(),
            StatusCode::kCorruption);
  EXPECT_EQ(verify_sha256_rsa_signature(user, text, signature.substr(2)).code(),
            StatusCode::kCorruption);
  // A SHA1withRSA signature of the same text does not pass as SHA256withRSA.
  EXPECT_EQ(verify_sha256_rsa_signature(user, text, *sign_bundle_text(private_key_of(user_), text))
                .code(),
            StatusCode::kCorruption);
}

// Our SHA256withRSA signer makes what the fixture (an independent EVP path) and the openssl
// command make, which verify_sha256_rsa_signature accepts.
TEST_F(BundleKeysTest, SignsSha256) {
  constexpr char kText[] = "index sidecar bytes\0with a NUL";
  const std::string text(kText, sizeof kText - 1);
  Result<std::string> signature = sign_sha256_rsa_text(private_key_of(user_), text);
  ASSERT_TRUE(signature.ok()) << signature.status().to_string();
  EXPECT_EQ(*signature, hex_encode(testing::sign_sha256_rsa(user_, text)));
  EXPECT_TRUE(verify_sha256_rsa_signature(certificate_of(user_), text, *signature).ok());
  EXPECT_EQ(verify_sha256_rsa_signature(certificate_of(other_), text, *signature).code(),
            StatusCode::kCorruption);
  EXPECT_NE(*signature, *sign_bundle_text(private_key_of(user_), text));
}

TEST_F(BundleKeysTest, ConcurrentUnwrapsWithOneKey) {
  const PrivateKey key = private_key_of(cloud_);
  const Certificate cert = certificate_of(cloud_);
  std::vector<std::string> blobs;
  for (uint8_t i = 0; i < 8; ++i) blobs.push_back(*wrap_bundle_secret(cert, secret_of(i)));
  std::vector<int> failures(8, 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 10; ++round) {
        const size_t i = (t + round) % blobs.size();
        Result<std::array<uint8_t, 16>> secret = unwrap_bundle_secret(key, blobs[i]);
        if (!secret.ok() || *secret != secret_of(static_cast<uint8_t>(i))) ++failures[t];
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int count : failures) EXPECT_EQ(count, 0);
}

}  // namespace
}  // namespace imgfs::formats
