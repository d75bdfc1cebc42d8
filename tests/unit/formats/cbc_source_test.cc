#include "formats/cbc_source.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <cstring>
#include <random>
#include <thread>

#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::expect_read;

using imgfs::testing::CountingSource;
using imgfs::testing::FaultySource;
using imgfs::testing::pattern_bytes;

CbcOptions test_options() {
  CbcOptions options;
  for (int i = 0; i < 16; ++i) {
    options.key[i] = static_cast<uint8_t>(0x10 + 3 * i);
    options.iv[i] = static_cast<uint8_t>(0xA0 ^ (7 * i));
  }
  return options;
}

// What `openssl enc -e -aes-128-cbc -K -iv` writes: CBC with PKCS#7 padding.
std::vector<std::byte> encrypt(const std::vector<std::byte>& plain, const CbcOptions& options) {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  EXPECT_EQ(1, EVP_EncryptInit_ex(ctx, EVP_aes_128_cbc(), nullptr, options.key.data(),
                                  options.iv.data()));
  std::vector<std::byte> cipher(plain.size() + 16);
  int written = 0;
  int final_written = 0;
  auto* out = reinterpret_cast<unsigned char*>(cipher.data());
  EXPECT_EQ(
      1, EVP_EncryptUpdate(ctx, out, &written, reinterpret_cast<const unsigned char*>(plain.data()),
                           static_cast<int>(plain.size())));
  EXPECT_EQ(1, EVP_EncryptFinal_ex(ctx, out + written, &final_written));
  EVP_CIPHER_CTX_free(ctx);
  cipher.resize(static_cast<size_t>(written + final_written));
  return cipher;
}

class CbcSourceLengthTest : public ::testing::TestWithParam<uint64_t> {};

TEST_P(CbcSourceLengthTest, ReadsMatchPlaintext) {
  const uint64_t length = GetParam();
  const std::vector<std::byte> plain = pattern_bytes(length, 3);
  const std::vector<std::byte> cipher = encrypt(plain, test_options());
  ASSERT_EQ(16 * (length / 16) + 16, cipher.size());
  auto opened = open_cbc(std::make_unique<MemorySource>(cipher, "cipher"), test_options());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  const BlockSource& source = **opened;
  ASSERT_EQ(length, source.size());
  EXPECT_EQ(16u, source.block_size());
  EXPECT_EQ("cbc(cipher(" + std::to_string(cipher.size()) + " bytes))", source.describe());
  expect_read(source, plain, 0, length);
  expect_read(source, plain, length, 0);
  if (length == 0) return;
  expect_read(source, plain, 0, 1);
  expect_read(source, plain, length - 1, 1);
  // Every 16-byte boundary, with reads ending on, before and after the next ones.
  const uint64_t step = length > 200000 ? 4096 : 16;
  for (uint64_t boundary = 0; boundary < length; boundary += step) {
    for (uint64_t before : {0, 1, 15}) {
      for (uint64_t span : {1, 15, 16, 17, 33}) {
        if (before > boundary) continue;
        const uint64_t offset = boundary - before;
        expect_read(source, plain, offset, std::min(span, length - offset));
      }
    }
  }
  std::mt19937_64 rng(length);
  for (int i = 0; i < 200; ++i) {
    const uint64_t offset = rng() % length;
    const uint64_t size = rng() % (length - offset + 1);
    expect_read(source, plain, offset, size);
  }
}

// 0 bytes of plaintext is one whole pad block; 3 MiB + 5 spans several 1 MiB chunks.
INSTANTIATE_TEST_SUITE_P(Lengths, CbcSourceLengthTest,
                         ::testing::Values(0, 1, 15, 16, 17, 31, 32, 33, 4097, 100003,
                                           (3u << 20) + 5));

TEST(CbcSourceTest, HugeReadIsChunked) {
  const uint64_t length = (3u << 20) + 100;
  const std::vector<std::byte> plain = pattern_bytes(length, 9);
  auto counting = std::make_unique<CountingSource>(
      std::make_unique<MemorySource>(encrypt(plain, test_options())));
  const CountingSource* counter = counting.get();
  auto opened = open_cbc(std::move(counting), test_options());
  ASSERT_TRUE(opened.ok());
  const uint64_t reads_at_open = counter->reads();
  expect_read(**opened, plain, 5, length - 5);
  // Four chunks of at most 1 MiB (plus one chaining block each, except the first).
  EXPECT_EQ(4u, counter->reads() - reads_at_open);
}

TEST(CbcSourceTest, WrongKeyIsCorruption) {
  const std::vector<std::byte> plain = pattern_bytes(1000, 3);
  const std::vector<std::byte> cipher = encrypt(plain, test_options());
  CbcOptions wrong = test_options();
  wrong.key[0] ^= 1;  // Checked: this key leaves a pad byte that fails the check.
  auto opened = open_cbc(std::make_unique<MemorySource>(cipher), wrong);
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(StatusCode::kCorruption, opened.status().code());
  EXPECT_NE(std::string::npos,
            opened.status().message().find("bad PKCS#7 padding: wrong key or corrupt data"));
}

TEST(CbcSourceTest, WrongIvOnSingleBlockIsCorruption) {
  const std::vector<std::byte> cipher = encrypt(pattern_bytes(5, 3), test_options());
  ASSERT_EQ(16u, cipher.size());
  CbcOptions wrong = test_options();
  wrong.iv[15] ^= 0x40;  // Flips the last pad byte: 11 becomes 0x4B.
  EXPECT_EQ(StatusCode::kCorruption,
            open_cbc(std::make_unique<MemorySource>(cipher), wrong).status().code());
}

TEST(CbcSourceTest, CorruptPadIsCorruption) {
  // Craft a last block whose pad length byte is valid but whose other pad bytes differ: pad 4
  // with one byte 5. XOR of the IV edits the decrypted block of a one-block stream directly.
  std::vector<std::byte> plain = pattern_bytes(12, 3);
  std::vector<std::byte> cipher = encrypt(plain, test_options());
  CbcOptions edited = test_options();
  edited.iv[13] ^= 4 ^ 5;
  EXPECT_EQ(StatusCode::kCorruption,
            open_cbc(std::make_unique<MemorySource>(cipher), edited).status().code());
  // A pad byte of 0 or above 16.
  CbcOptions zero = test_options();
  zero.iv[15] ^= 4;
  EXPECT_EQ(StatusCode::kCorruption,
            open_cbc(std::make_unique<MemorySource>(cipher), zero).status().code());
  CbcOptions big = test_options();
  big.iv[15] ^= 4 ^ 17;
  EXPECT_EQ(StatusCode::kCorruption,
            open_cbc(std::make_unique<MemorySource>(cipher), big).status().code());
  // Sanity: the unedited options open with size 12.
  auto good = open_cbc(std::make_unique<MemorySource>(cipher), test_options());
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(12u, (*good)->size());
}

TEST(CbcSourceTest, LowerSizeNotMultipleOf16IsCorruption) {
  std::vector<std::byte> cipher = encrypt(pattern_bytes(100, 3), test_options());
  cipher.pop_back();
  EXPECT_EQ(StatusCode::kCorruption,
            open_cbc(std::make_unique<MemorySource>(cipher), test_options()).status().code());
  EXPECT_EQ(StatusCode::kCorruption,
            open_cbc(std::make_unique<MemorySource>(std::vector<std::byte>{}), test_options())
                .status()
                .code());
}

TEST(CbcSourceTest, ReadPastEndIsInvalidArgument) {
  auto opened =
      open_cbc(std::make_unique<MemorySource>(encrypt(pattern_bytes(40, 3), test_options())),
               test_options());
  ASSERT_TRUE(opened.ok());
  std::vector<std::byte> out(2);
  EXPECT_EQ(StatusCode::kInvalidArgument, (*opened)->read_at(39, out).code());
  EXPECT_EQ(StatusCode::kInvalidArgument, (*opened)->read_at(UINT64_MAX, out).code());
}

TEST(CbcSourceTest, LowerErrorPropagates) {
  const std::vector<std::byte> plain = pattern_bytes(10000, 3);
  auto faulty = std::make_unique<FaultySource>(
      std::make_unique<MemorySource>(encrypt(plain, test_options())), 4096, 16);
  auto opened = open_cbc(std::move(faulty), test_options());
  ASSERT_TRUE(opened.ok());
  std::vector<std::byte> out(100);
  // Block 256 is faulty: reading it, or block 257 (which chains from it), fails.
  EXPECT_EQ(StatusCode::kIOError, (*opened)->read_at(4090, out).code());
  EXPECT_EQ(StatusCode::kIOError, (*opened)->read_at(4112, out).code());
  expect_read(**opened, plain, 4128, 100);
  expect_read(**opened, plain, 3000, 1096);
  // An error at open (the last blocks) propagates too.
  auto faulty_tail = std::make_unique<FaultySource>(
      std::make_unique<MemorySource>(encrypt(plain, test_options())), 10000, 1);
  EXPECT_EQ(StatusCode::kIOError, open_cbc(std::move(faulty_tail), test_options()).status().code());
}

TEST(CbcSourceTest, ConcurrentReaders) {
  const uint64_t length = 300001;
  const std::vector<std::byte> plain = pattern_bytes(length, 5);
  auto opened =
      open_cbc(std::make_unique<MemorySource>(encrypt(plain, test_options())), test_options());
  ASSERT_TRUE(opened.ok());
  const BlockSource& source = **opened;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::vector<std::byte> out;
      for (int i = 0; i < 300; ++i) {
        const uint64_t offset = rng() % length;
        const uint64_t size = rng() % std::min<uint64_t>(length - offset + 1, 70000);
        out.resize(size);
        if (!source.read_at(offset, out).ok() ||
            (size > 0 && std::memcmp(out.data(), plain.data() + offset, size) != 0)) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(0, failures.load());
}

}  // namespace
}  // namespace imgfs::formats
