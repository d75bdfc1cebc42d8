#include "formats/index_signature.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "formats/byte_order.h"
#include "formats/gzip_index.h"
#include "tests/support/crypto_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::certificate_of;
using testing::generate_rsa_key;
using testing::pattern_bytes;
using testing::private_key_of;

constexpr std::string_view kBinding =
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 "
    "etags:\"0cc175b9c0f1b6a831c399e269772661\",\"92eb5ffee6ae2fec3ad71c777531578f\"";

class IndexSignatureTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    signer_ = generate_rsa_key(2048).release();
    other_ = generate_rsa_key(2048).release();
    small_ = generate_rsa_key(1024).release();
  }
  static void TearDownTestSuite() {
    for (EVP_PKEY* key : {signer_, other_, small_}) EVP_PKEY_free(key);
  }

  static std::vector<std::byte> signed_sidecar(const std::vector<std::byte>& index,
                                               EVP_PKEY* key = signer_,
                                               std::string_view binding = kBinding) {
    Result<std::vector<std::byte>> sidecar =
        sign_index_sidecar(index, private_key_of(key), binding);
    EXPECT_TRUE(sidecar.ok()) << sidecar.status().to_string();
    return sidecar.ok() ? *sidecar : std::vector<std::byte>();
  }

  static EVP_PKEY* signer_;
  static EVP_PKEY* other_;
  static EVP_PKEY* small_;
};

EVP_PKEY* IndexSignatureTest::signer_ = nullptr;
EVP_PKEY* IndexSignatureTest::other_ = nullptr;
EVP_PKEY* IndexSignatureTest::small_ = nullptr;

Result<std::vector<std::byte>> verify_with(std::span<const std::byte> sidecar,
                                           const Certificate& certificate,
                                           std::string_view binding = kBinding) {
  const Certificate* trusted[] = {&certificate};
  return verify_index_sidecar(sidecar, trusted, binding);
}

TEST_F(IndexSignatureTest, RoundTripReturnsTheIndexUnchanged) {
  const std::vector<std::byte> index = pattern_bytes(5000, 7);
  const std::vector<std::byte> sidecar = signed_sidecar(index);
  // Header, binding, index, then 2 hex characters per byte of the 2048-bit signature.
  ASSERT_EQ(sidecar.size(), 24 + kBinding.size() + index.size() + 512);
  EXPECT_EQ(std::memcmp(sidecar.data(), "IMGFSIXS", 8), 0);
  EXPECT_EQ(load_le32(sidecar.data() + 8), 1u);
  EXPECT_EQ(load_le32(sidecar.data() + 12), kBinding.size());
  EXPECT_EQ(load_le64(sidecar.data() + 16), index.size());

  const Certificate certificate = certificate_of(signer_);
  Result<std::vector<std::byte>> verified = verify_with(sidecar, certificate);
  ASSERT_TRUE(verified.ok()) << verified.status().to_string();
  EXPECT_EQ(*verified, index);
  // Deterministic: PKCS#1 v1.5 signatures have no randomness.
  EXPECT_EQ(signed_sidecar(index), sidecar);
  // A one-byte index and a one-byte binding are fine too.
  const std::vector<std::byte> tiny = {std::byte{0x5a}};
  Result<std::vector<std::byte>> small =
      verify_with(signed_sidecar(tiny, signer_, "x"), certificate, "x");
  ASSERT_TRUE(small.ok()) << small.status().to_string();
  EXPECT_EQ(*small, tiny);
}

TEST_F(IndexSignatureTest, CarriesARealSerializedIndex) {
  GzipIndexSnapshot snapshot;
  snapshot.compressed_size = 4000;
  snapshot.uncompressed_size = 100000;
  snapshot.checkpoints.push_back(GzipCheckpoint{});
  snapshot.span_crcs.push_back(0x12345678);
  ASSERT_TRUE(validate_gzip_index(snapshot).ok()) << validate_gzip_index(snapshot).to_string();
  const std::vector<std::byte> serialized = serialize_gzip_index(snapshot);

  const Certificate certificate = certificate_of(signer_);
  Result<std::vector<std::byte>> index = verify_with(signed_sidecar(serialized), certificate);
  ASSERT_TRUE(index.ok()) << index.status().to_string();
  Result<GzipIndexSnapshot> parsed = parse_gzip_index(*index, 4000, 100000);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_EQ(parsed->span_crcs, snapshot.span_crcs);
  EXPECT_EQ(parsed->checkpoints.size(), 1u);
}

// Every single changed byte (header, binding, index or signature) makes the sidecar unusable.
TEST_F(IndexSignatureTest, AChangedByteAnywhereIsRefused) {
  const std::vector<std::byte> sidecar = signed_sidecar(pattern_bytes(1500, 3));
  const Certificate certificate = certificate_of(signer_);
  for (size_t i = 0; i < sidecar.size(); ++i) {
    for (uint8_t flip : {0x01, 0x20, 0x80}) {
      std::vector<std::byte> tampered = sidecar;
      tampered[i] ^= std::byte{flip};
      Result<std::vector<std::byte>> verified = verify_with(tampered, certificate);
      ASSERT_FALSE(verified.ok()) << "byte " << i << " xor " << int{flip} << " was accepted";
      const StatusCode code = verified.status().code();
      // Only the version field may say "newer version"; everything else is Corruption.
      if (i >= 8 && i < 12) {
        EXPECT_EQ(code, StatusCode::kNotSupported) << i;
      } else {
        EXPECT_EQ(code, StatusCode::kCorruption) << i << ": " << verified.status().to_string();
      }
    }
  }
}

TEST_F(IndexSignatureTest, ASignatureByAnotherKeyIsRefused) {
  const std::vector<std::byte> index = pattern_bytes(800, 5);
  const Certificate signer = certificate_of(signer_);
  const Certificate other = certificate_of(other_);
  const Certificate small = certificate_of(small_);

  Result<std::vector<std::byte>> verified = verify_with(signed_sidecar(index, other_), signer);
  ASSERT_FALSE(verified.ok());
  EXPECT_EQ(verified.status().code(), StatusCode::kCorruption);
  EXPECT_NE(verified.status().message().find("not signed by a trusted key"), std::string::npos)
      << verified.status().message();
  // A shorter key's signature has another length; still simply "not trusted".
  EXPECT_EQ(verify_with(signed_sidecar(index, small_), signer).status().code(),
            StatusCode::kCorruption);

  // With several trusted certificates, any one of them is enough; null entries are skipped.
  const std::vector<const Certificate*> trusted = {&other, nullptr, &small, &signer};
  Result<std::vector<std::byte>> any =
      verify_index_sidecar(signed_sidecar(index), trusted, kBinding);
  ASSERT_TRUE(any.ok()) << any.status().to_string();
  EXPECT_EQ(*any, index);
  const std::vector<const Certificate*> untrusted = {&other, &small};
  Result<std::vector<std::byte>> none =
      verify_index_sidecar(signed_sidecar(index), untrusted, kBinding);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kCorruption);
}

// A valid signature for one bundle version cannot be replayed for another.
TEST_F(IndexSignatureTest, AnotherBindingIsRefused) {
  const std::vector<std::byte> index = pattern_bytes(800, 6);
  const std::vector<std::byte> sidecar = signed_sidecar(index);
  const Certificate certificate = certificate_of(signer_);
  const std::vector<std::string> others = {"sha256:0000 etags:\"a\"",
                                           std::string(kBinding.substr(0, kBinding.size() - 1)),
                                           std::string(kBinding) + " "};
  for (const std::string& binding : others) {
    Result<std::vector<std::byte>> verified = verify_with(sidecar, certificate, binding);
    ASSERT_FALSE(verified.ok()) << binding;
    EXPECT_EQ(verified.status().code(), StatusCode::kCorruption);
    EXPECT_NE(verified.status().message().find("another bundle version"), std::string::npos)
        << verified.status().message();
  }
  // Moving bytes between the binding and the index (same signed bytes, other lengths) breaks
  // the signature, since the lengths are signed too.
  std::vector<std::byte> shifted = sidecar;
  store_le32(shifted.data() + 12, static_cast<uint32_t>(kBinding.size() + 1));
  store_le64(shifted.data() + 16, index.size() - 1);
  EXPECT_EQ(verify_with(shifted, certificate).status().code(), StatusCode::kCorruption);
}

TEST_F(IndexSignatureTest, TruncatedEmptyAndOverlongSidecarsAreRefused) {
  const std::vector<std::byte> sidecar = signed_sidecar(pattern_bytes(600, 8));
  const Certificate certificate = certificate_of(signer_);
  for (size_t length = 0; length < sidecar.size(); ++length) {
    Result<std::vector<std::byte>> verified =
        verify_with(std::span<const std::byte>(sidecar).first(length), certificate);
    ASSERT_FALSE(verified.ok()) << "accepted the first " << length << " bytes";
    EXPECT_EQ(verified.status().code(), StatusCode::kCorruption) << length;
  }
  std::vector<std::byte> longer = sidecar;
  longer.push_back(std::byte{'0'});
  longer.push_back(std::byte{'0'});
  EXPECT_EQ(verify_with(longer, certificate).status().code(), StatusCode::kCorruption);
  longer.resize(sidecar.size() + 5000, std::byte{'a'});
  Result<std::vector<std::byte>> overlong = verify_with(longer, certificate);
  EXPECT_EQ(overlong.status().code(), StatusCode::kCorruption);
  EXPECT_NE(overlong.status().message().find("more than any signature"), std::string::npos);
}

TEST_F(IndexSignatureTest, HeaderFieldsAreCheckedBeforeAnyUse) {
  const std::vector<std::byte> sidecar = signed_sidecar(pattern_bytes(600, 9));
  const Certificate certificate = certificate_of(signer_);
  auto code_with = [&](size_t offset, uint64_t value, int width) {
    std::vector<std::byte> changed = sidecar;
    if (width == 4) {
      store_le32(changed.data() + offset, static_cast<uint32_t>(value));
    } else {
      store_le64(changed.data() + offset, value);
    }
    Result<std::vector<std::byte>> verified = verify_with(changed, certificate);
    EXPECT_FALSE(verified.ok());
    return verified.status().code();
  };
  EXPECT_EQ(code_with(8, 2, 4), StatusCode::kNotSupported);                 // version
  EXPECT_EQ(code_with(12, 0, 4), StatusCode::kCorruption);                  // empty binding
  EXPECT_EQ(code_with(12, 0xffffffffu, 4), StatusCode::kCorruption);        // huge binding
  EXPECT_EQ(code_with(16, 0, 8), StatusCode::kCorruption);                  // empty index
  EXPECT_EQ(code_with(16, ~uint64_t{0}, 8), StatusCode::kCorruption);       // overflowing index
  EXPECT_EQ(code_with(16, uint64_t{1} << 30, 8), StatusCode::kCorruption);  // past the end
  std::vector<std::byte> magic = sidecar;
  magic[0] = std::byte{'X'};
  Result<std::vector<std::byte>> bad_magic = verify_with(magic, certificate);
  EXPECT_EQ(bad_magic.status().code(), StatusCode::kCorruption);
  EXPECT_NE(bad_magic.status().message().find("bad magic"), std::string::npos);
  // Upper-case hex would verify with a lenient decoder; only the one spelling is accepted.
  std::vector<std::byte> upper = sidecar;
  for (size_t i = upper.size() - 512; i < upper.size(); ++i) {
    const char c = static_cast<char>(upper[i]);
    if (c >= 'a' && c <= 'f') upper[i] = std::byte(static_cast<unsigned char>(c - 'a' + 'A'));
  }
  EXPECT_EQ(verify_with(upper, certificate).status().code(), StatusCode::kCorruption);
}

TEST_F(IndexSignatureTest, ArgumentsAreChecked) {
  const PrivateKey key = private_key_of(signer_);
  const std::vector<std::byte> index = pattern_bytes(100, 1);
  EXPECT_EQ(sign_index_sidecar(index, key, "").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(sign_index_sidecar({}, key, kBinding).status().code(), StatusCode::kInvalidArgument);
  const std::string huge(kMaxIndexBindingBytes + 1, 'b');
  EXPECT_EQ(sign_index_sidecar(index, key, huge).status().code(), StatusCode::kInvalidArgument);

  const std::vector<std::byte> sidecar = signed_sidecar(index);
  const Certificate certificate = certificate_of(signer_);
  EXPECT_EQ(verify_with(sidecar, certificate, "").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(verify_index_sidecar(sidecar, {}, kBinding).status().code(),
            StatusCode::kInvalidArgument);
  const std::vector<const Certificate*> only_null = {nullptr};
  EXPECT_EQ(verify_index_sidecar(sidecar, only_null, kBinding).status().code(),
            StatusCode::kInvalidArgument);
  // The bound on a binding is not a bound on what can be checked: a long expected binding
  // simply does not match.
  EXPECT_EQ(verify_with(sidecar, certificate, huge).status().code(), StatusCode::kCorruption);
}

TEST_F(IndexSignatureTest, ConcurrentVerifiers) {
  const std::vector<std::byte> index = pattern_bytes(3000, 4);
  const std::vector<std::byte> sidecar = signed_sidecar(index);
  std::vector<std::byte> tampered = sidecar;
  tampered[40] ^= std::byte{1};
  const Certificate certificate = certificate_of(signer_);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        const bool good = (i + t) % 2 == 0;
        Result<std::vector<std::byte>> verified =
            verify_with(good ? sidecar : tampered, certificate);
        if (verified.ok() != good || (good && *verified != index)) ++failures;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
}

}  // namespace
}  // namespace imgfs::formats
