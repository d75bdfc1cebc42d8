#include "formats/bundle_keys.h"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <optional>

namespace imgfs::formats {

void EvpPkeyFree::operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }

namespace {

// PEM keys and certificates are a few KiB; a bigger file is a mistake, not a key.
constexpr size_t kMaxPemBytes = 1u << 20;
constexpr size_t kSecretHexChars = 32;

struct BioFree {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Free {
  void operator()(X509* cert) const { X509_free(cert); }
};
struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* ctx) const { EVP_PKEY_CTX_free(ctx); }
};
struct MdCtxFree {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

// Wipes secret bytes (the RSA plaintext is the AES key in hex) when it goes out of scope.
class SecretBuffer {
 public:
  explicit SecretBuffer(size_t size) : bytes_(size) {}
  ~SecretBuffer() { OPENSSL_cleanse(bytes_.data(), bytes_.size()); }
  SecretBuffer(const SecretBuffer&) = delete;
  SecretBuffer& operator=(const SecretBuffer&) = delete;
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

// The OpenSSL error queue of this thread as one line, emptied.
std::string openssl_error() {
  std::string detail;
  unsigned long code;
  while ((code = ERR_get_error()) != 0) {
    char text[256];
    ERR_error_string_n(code, text, sizeof(text));
    if (!detail.empty()) detail += "; ";
    detail += text;
  }
  return detail.empty() ? "no OpenSSL detail" : detail;
}

// OpenSSL would otherwise prompt on the terminal for an encrypted key's passphrase.
int refuse_passphrase(char*, int, int, void*) { return -1; }

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

std::string_view trim(std::string_view text) {
  while (!text.empty() && is_space(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_space(text.back())) text.remove_suffix(1);
  return text;
}

std::string octal_mode(mode_t mode) {
  char text[16];
  std::snprintf(text, sizeof(text), "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

Status errno_status(const std::string& what, int error) {
  std::string msg = what + ": " + std::strerror(error);
  if (error == ENOENT) return Status::NotFound(msg);
  return Status::IOError(msg);
}

// The whole of a small regular file; `private_key` adds the group/other permission check.
Result<std::string> read_pem_file(const std::string& path, bool private_key) {
  const char* kind = private_key ? "key file " : "certificate file ";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return errno_status(kind + path, errno);
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};

  struct stat st;
  if (::fstat(fd, &st) != 0) return errno_status(kind + path, errno);
  if (!S_ISREG(st.st_mode)) {
    return Status::InvalidArgument(kind + path + " is not a regular file");
  }
  if (private_key && (st.st_mode & 077) != 0) {
    return Status::InvalidArgument(kind + path + " is readable by group or others (mode " +
                                   octal_mode(st.st_mode) + "); chmod 600 it");
  }
  if (static_cast<uint64_t>(st.st_size) > kMaxPemBytes) {
    return Status::InvalidArgument(kind + path + " is larger than " + std::to_string(kMaxPemBytes) +
                                   " bytes");
  }

  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_status(kind + path, errno);
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  text.resize(done);
  return text;
}

Result<std::unique_ptr<BIO, BioFree>> memory_bio(std::string_view pem) {
  if (pem.size() > kMaxPemBytes) return Status::InvalidArgument("PEM text is too large");
  std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (bio == nullptr) return Status::IOError("OpenSSL: " + openssl_error());
  return bio;
}

bool is_rsa(EVP_PKEY* key) { return EVP_PKEY_is_a(key, "RSA") == 1; }

Result<std::vector<uint8_t>> rsa_pkcs1_crypt(EVP_PKEY* key, std::span<const uint8_t> input,
                                             bool decrypt) {
  std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr));
  if (ctx == nullptr) return Status::IOError("OpenSSL: " + openssl_error());
  const int init = decrypt ? EVP_PKEY_decrypt_init(ctx.get()) : EVP_PKEY_encrypt_init(ctx.get());
  if (init != 1 || EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) != 1) {
    return Status::IOError("OpenSSL RSA setup: " + openssl_error());
  }
  auto run = [&](unsigned char* out, size_t* out_length) {
    return decrypt ? EVP_PKEY_decrypt(ctx.get(), out, out_length, input.data(), input.size())
                   : EVP_PKEY_encrypt(ctx.get(), out, out_length, input.data(), input.size());
  };
  size_t length = 0;
  if (run(nullptr, &length) != 1) return Status::IOError("OpenSSL RSA: " + openssl_error());
  std::vector<uint8_t> output(length);
  if (run(output.data(), &length) != 1) {
    OPENSSL_cleanse(output.data(), output.size());
    return Status::IOError("OpenSSL RSA: " + openssl_error());
  }
  output.resize(length);
  return output;
}

using UnwrappedPair = std::pair<std::array<uint8_t, 16>, std::array<uint8_t, 16>>;

Result<UnwrappedPair> unwrap_pair(const PrivateKey& key, std::string_view key_hex,
                                  std::string_view iv_hex) {
  Result<std::array<uint8_t, 16>> aes_key = unwrap_bundle_secret(key, key_hex);
  if (!aes_key.ok()) return aes_key.status();
  Result<std::array<uint8_t, 16>> iv = unwrap_bundle_secret(key, iv_hex);
  if (!iv.ok()) return iv.status().with_context("IV");
  return UnwrappedPair(*aes_key, *iv);
}

// Checks an RSA PKCS#1 v1.5 signature with digest `md` (named `algorithm` in errors), given as
// hex of either case, over `text`.
Status verify_rsa_pkcs1_hex(const EVP_MD* md, const char* algorithm, const Certificate& certificate,
                            std::string_view text, std::string_view signature_hex) {
  std::optional<std::vector<uint8_t>> signature = hex_decode(signature_hex);
  if (!signature || signature->empty()) {
    return Status::Corruption("manifest signature is not a hex string");
  }
  ERR_clear_error();
  std::unique_ptr<EVP_MD_CTX, MdCtxFree> ctx(EVP_MD_CTX_new());
  EVP_PKEY_CTX* pkey_ctx = nullptr;  // Owned by ctx.
  if (ctx == nullptr ||
      EVP_DigestVerifyInit(ctx.get(), &pkey_ctx, md, nullptr, certificate.public_key()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(pkey_ctx, RSA_PKCS1_PADDING) != 1) {
    return Status::NotSupported(std::string(algorithm) +
                                " verification is unavailable: " + openssl_error());
  }
  const int verified =
      EVP_DigestVerify(ctx.get(), signature->data(), signature->size(),
                       reinterpret_cast<const unsigned char*>(text.data()), text.size());
  if (verified != 1) {
    return Status::Corruption("manifest signature does not verify with certificate " +
                              certificate.describe() + ": " + openssl_error());
  }
  return Status::OK();
}

// The lowercase hex RSA PKCS#1 v1.5 signature with digest `md` (named `algorithm` in errors)
// of `text`.
Result<std::string> sign_rsa_pkcs1_hex(const EVP_MD* md, const char* algorithm,
                                       const PrivateKey& key, std::string_view text) {
  ERR_clear_error();
  std::unique_ptr<EVP_MD_CTX, MdCtxFree> ctx(EVP_MD_CTX_new());
  EVP_PKEY_CTX* pkey_ctx = nullptr;  // Owned by ctx.
  if (ctx == nullptr ||
      EVP_DigestSignInit(ctx.get(), &pkey_ctx, md, nullptr, key.evp_pkey()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(pkey_ctx, RSA_PKCS1_PADDING) != 1) {
    return Status::NotSupported(std::string(algorithm) +
                                " signing is unavailable: " + openssl_error());
  }
  const auto* data = reinterpret_cast<const unsigned char*>(text.data());
  size_t length = 0;
  if (EVP_DigestSign(ctx.get(), nullptr, &length, data, text.size()) != 1) {
    return Status::IOError("OpenSSL sign: " + openssl_error());
  }
  std::vector<uint8_t> signature(length);
  if (EVP_DigestSign(ctx.get(), signature.data(), &length, data, text.size()) != 1) {
    return Status::IOError("OpenSSL sign: " + openssl_error());
  }
  signature.resize(length);
  return hex_encode(signature);
}

}  // namespace

Result<PrivateKey> PrivateKey::load_file(const std::string& path) {
  Result<std::string> pem = read_pem_file(path, /*private_key=*/true);
  if (!pem.ok()) return pem.status();
  Result<PrivateKey> key = from_pem(*pem, path);
  OPENSSL_cleanse(pem->data(), pem->size());
  return key;
}

Result<PrivateKey> PrivateKey::from_pem(std::string_view pem, std::string description) {
  ERR_clear_error();
  Result<std::unique_ptr<BIO, BioFree>> bio = memory_bio(pem);
  if (!bio.ok()) return bio.status().with_context(description);
  EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio->get(), nullptr, refuse_passphrase, nullptr));
  if (key == nullptr) {
    return Status::InvalidArgument(description +
                                   " is not an unencrypted PEM private key: " + openssl_error());
  }
  if (!is_rsa(key.get())) {
    return Status::InvalidArgument(description + " is not an RSA private key");
  }
  return PrivateKey(std::move(key), std::move(description));
}

Result<Certificate> Certificate::load_file(const std::string& path) {
  Result<std::string> pem = read_pem_file(path, /*private_key=*/false);
  if (!pem.ok()) return pem.status();
  return from_pem(*pem, path);
}

Result<Certificate> Certificate::from_pem(std::string_view pem, std::string description) {
  ERR_clear_error();
  Result<std::unique_ptr<BIO, BioFree>> bio = memory_bio(pem);
  if (!bio.ok()) return bio.status().with_context(description);
  std::unique_ptr<X509, X509Free> cert(
      PEM_read_bio_X509(bio->get(), nullptr, refuse_passphrase, nullptr));
  if (cert == nullptr) {
    return Status::InvalidArgument(description +
                                   " is not a PEM X.509 certificate: " + openssl_error());
  }
  EvpPkeyPtr key(X509_get_pubkey(cert.get()));
  if (key == nullptr) {
    return Status::InvalidArgument(description + " has no usable public key: " + openssl_error());
  }
  if (!is_rsa(key.get())) {
    return Status::InvalidArgument(description + " does not hold an RSA public key");
  }
  return Certificate(std::move(key), std::move(description));
}

Result<std::array<uint8_t, 16>> unwrap_bundle_secret(const PrivateKey& key,
                                                     std::string_view hex_rsa_blob) {
  ERR_clear_error();
  std::optional<std::vector<uint8_t>> blob = hex_decode(trim(hex_rsa_blob));
  if (!blob || blob->empty()) {
    return Status::Corruption("encrypted bundle secret is not a hex string");
  }
  const int modulus_bytes = EVP_PKEY_get_size(key.evp_pkey());
  if (modulus_bytes <= 0 || blob->size() > static_cast<size_t>(modulus_bytes)) {
    return Status::InvalidArgument("encrypted bundle secret is " + std::to_string(blob->size()) +
                                   " bytes, longer than the " + std::to_string(modulus_bytes) +
                                   "-byte modulus of key " + key.describe() + " (wrong key)");
  }
  Result<std::vector<uint8_t>> decrypted = rsa_pkcs1_crypt(key.evp_pkey(), *blob, true);
  if (!decrypted.ok()) {
    return Status::InvalidArgument("key " + key.describe() +
                                   " cannot decrypt the bundle secret (wrong key or damaged "
                                   "blob): " +
                                   decrypted.status().message());
  }
  SecretBuffer plain(0);
  plain.bytes().swap(*decrypted);

  std::string_view text = trim(
      std::string_view(reinterpret_cast<const char*>(plain.bytes().data()), plain.bytes().size()));
  // euca2ools 1.x formatted the secret without zero padding; at most one digit goes missing.
  const bool usable_length = text.size() == kSecretHexChars || text.size() == kSecretHexChars - 1;
  SecretBuffer padded(kSecretHexChars);
  std::fill(padded.bytes().begin(), padded.bytes().end(), '0');
  if (usable_length) {
    std::copy(text.begin(), text.end(), padded.bytes().end() - static_cast<long>(text.size()));
  }
  std::optional<std::vector<uint8_t>> secret =
      usable_length ? hex_decode(std::string_view(
                          reinterpret_cast<const char*>(padded.bytes().data()), kSecretHexChars))
                    : std::nullopt;
  if (!secret) {
    return Status::Corruption("the secret unwrapped with key " + key.describe() +
                              " is not 32 hex characters (wrong key?)");
  }
  std::array<uint8_t, 16> result;
  std::copy(secret->begin(), secret->end(), result.begin());
  OPENSSL_cleanse(secret->data(), secret->size());
  return result;
}

Result<UnwrappedPair> unwrap_bundle_key_iv(const BundleManifest& manifest,
                                           const std::vector<const PrivateKey*>& keys) {
  const BundleManifest::Image& image = manifest.image;
  size_t tried_keys = 0;
  std::string last_error;
  for (const PrivateKey* key : keys) {
    if (key == nullptr) continue;
    ++tried_keys;
    const std::pair<std::string_view, std::string_view> candidates[] = {
        {image.ec2_encrypted_key, image.ec2_encrypted_iv},
        {image.user_encrypted_key, image.user_encrypted_iv}};
    for (const auto& [key_hex, iv_hex] : candidates) {
      if (key_hex.empty() || iv_hex.empty()) continue;
      Result<UnwrappedPair> pair = unwrap_pair(*key, key_hex, iv_hex);
      if (pair.ok()) return pair;
      last_error = pair.status().to_string();
    }
  }
  if (tried_keys == 0) {
    return Status::InvalidArgument("no private key was given to unwrap this bundle's AES key");
  }
  std::string msg = "none of the " + std::to_string(tried_keys) +
                    " keys unwraps this bundle's AES key (tried ec2_encrypted_key and "
                    "user_encrypted_key)";
  if (!last_error.empty()) msg += "; last error: " + last_error;
  return Status::InvalidArgument(msg);
}

Status verify_bundle_signature(const BundleManifest& manifest, const Certificate& certificate) {
  if (manifest.signature == "UNSIGNED") return Status::Corruption("manifest is unsigned");
  return verify_rsa_pkcs1_hex(EVP_sha1(), "SHA1withRSA", certificate, manifest.signed_text,
                              manifest.signature);
}

Status verify_sha256_rsa_signature(const Certificate& certificate, std::string_view signed_text,
                                   std::string_view signature_hex) {
  return verify_rsa_pkcs1_hex(EVP_sha256(), "SHA256withRSA", certificate, signed_text,
                              signature_hex);
}

Result<std::string> wrap_bundle_secret(const Certificate& certificate,
                                       const std::array<uint8_t, 16>& secret) {
  ERR_clear_error();
  std::string hex = hex_encode(secret);
  Result<std::vector<uint8_t>> wrapped = rsa_pkcs1_crypt(
      certificate.public_key(),
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(hex.data()), hex.size()), false);
  OPENSSL_cleanse(hex.data(), hex.size());
  if (!wrapped.ok()) return wrapped.status().with_context(certificate.describe());
  return hex_encode(*wrapped);
}

Result<std::string> sign_bundle_text(const PrivateKey& key, std::string_view text) {
  return sign_rsa_pkcs1_hex(EVP_sha1(), "SHA1withRSA", key, text);
}

Result<std::string> sign_sha256_rsa_text(const PrivateKey& key, std::string_view text) {
  return sign_rsa_pkcs1_hex(EVP_sha256(), "SHA256withRSA", key, text);
}

}  // namespace imgfs::formats
