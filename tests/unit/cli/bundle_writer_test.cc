#include "cli/bundle_writer.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "formats/bundle_keys.h"
#include "formats/bundle_manifest.h"
#include "tests/support/crypto_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::cli {
namespace {

using formats::BundleManifest;
using formats::Certificate;
using formats::hex_encode;
using formats::PrivateKey;

constexpr uint64_t kMiB = 1 << 20;

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, std::span<const uint8_t> bytes, mode_t mode) {
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
  ASSERT_EQ(0, ::chmod(path.c_str(), mode));
}

void write_text(const std::string& path, const std::string& text, mode_t mode) {
  write_file(path,
             std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()),
             mode);
}

std::vector<uint8_t> image_bytes(uint64_t length, uint32_t seed) {
  std::vector<std::byte> pattern = testing::pattern_bytes(length, seed);
  std::vector<uint8_t> bytes(length);
  std::memcpy(bytes.data(), pattern.data(), length);
  return bytes;
}

std::string sha1_hex(std::span<const uint8_t> bytes) {
  std::array<uint8_t, 20> digest;
  unsigned int length = 0;
  EXPECT_EQ(1, EVP_Digest(bytes.data(), bytes.size(), digest.data(), &length, EVP_sha1(), nullptr));
  return hex_encode(digest);
}

std::vector<uint8_t> aes_128_cbc_decrypt(std::span<const uint8_t> cipher,
                                         const std::array<uint8_t, 16>& key,
                                         const std::array<uint8_t, 16>& iv) {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  EXPECT_EQ(1, EVP_DecryptInit_ex(ctx, EVP_aes_128_cbc(), nullptr, key.data(), iv.data()));
  std::vector<uint8_t> plain(cipher.size() + 16);
  int length = 0;
  int final_length = 0;
  EXPECT_EQ(1, EVP_DecryptUpdate(ctx, plain.data(), &length, cipher.data(),
                                 static_cast<int>(cipher.size())));
  EXPECT_EQ(1, EVP_DecryptFinal_ex(ctx, plain.data() + length, &final_length));
  EVP_CIPHER_CTX_free(ctx);
  plain.resize(static_cast<size_t>(length + final_length));
  return plain;
}

std::vector<uint8_t> gunzip(std::span<const uint8_t> gz) {
  z_stream stream{};
  EXPECT_EQ(Z_OK, inflateInit2(&stream, 15 + 16));
  std::vector<uint8_t> out;
  std::vector<uint8_t> buffer(kMiB);
  stream.next_in = const_cast<Bytef*>(gz.data());
  stream.avail_in = static_cast<uInt>(gz.size());
  int rc = Z_OK;
  while (rc == Z_OK) {
    stream.next_out = buffer.data();
    stream.avail_out = static_cast<uInt>(buffer.size());
    rc = inflate(&stream, Z_NO_FLUSH);
    out.insert(out.end(), buffer.data(), buffer.data() + (buffer.size() - stream.avail_out));
  }
  EXPECT_EQ(rc, Z_STREAM_END);
  EXPECT_EQ(stream.avail_in, 0u) << "bytes after the gzip member";
  inflateEnd(&stream);
  return out;
}

uint64_t parse_octal(const uint8_t* field, size_t width) {
  uint64_t value = 0;
  for (size_t i = 0; i < width && field[i] >= '0' && field[i] <= '7'; ++i) {
    value = value * 8 + (field[i] - '0');
  }
  return value;
}

std::string field_text(const uint8_t* field, size_t width) {
  return std::string(reinterpret_cast<const char*>(field), width);
}

// Checks a header block the way tar does, and the fixed fields Python 2.7 tarfile writes.
void expect_gnu_header(const uint8_t* header, const std::string& mode, char typeflag) {
  unsigned sum = 0;
  for (size_t i = 0; i < 512; ++i) sum += (i >= 148 && i < 156) ? ' ' : header[i];
  char checksum[8];
  std::snprintf(checksum, sizeof(checksum), "%06o", sum);
  EXPECT_EQ(field_text(header + 148, 8), std::string(checksum) + std::string("\0 ", 2));
  EXPECT_EQ(field_text(header + 100, 8), mode + std::string(1, '\0'));
  EXPECT_EQ(field_text(header + 108, 8), std::string("0000000\0", 8));
  EXPECT_EQ(field_text(header + 116, 8), std::string("0000000\0", 8));
  EXPECT_EQ(field_text(header + 136, 12), std::string("00000000000\0", 12));
  EXPECT_EQ(header[156], typeflag);
  EXPECT_EQ(field_text(header + 157, 100), std::string(100, '\0'));
  EXPECT_EQ(field_text(header + 257, 8), std::string("ustar  \0", 8));
  EXPECT_EQ(field_text(header + 265, 64), std::string(64, '\0'));
  EXPECT_EQ(field_text(header + 329, 8), std::string("0000000\0", 8));
  EXPECT_EQ(field_text(header + 337, 8), std::string("0000000\0", 8));
  EXPECT_EQ(field_text(header + 345, 167), std::string(167, '\0'));
}

bool have_commands(const char* names) {
  return std::system(("command -v " + std::string(names) + " >/dev/null 2>&1").c_str()) == 0;
}

struct Unbundled {
  BundleManifest manifest;
  std::string manifest_text;
  std::vector<uint64_t> part_sizes;
  std::vector<uint8_t> gzip;
  std::vector<uint8_t> tar;
  std::array<uint8_t, 16> key{};
  std::array<uint8_t, 16> iv{};
};

class BundleWriterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cloud_ = testing::generate_rsa_key(2048).release();
    user_ = testing::generate_rsa_key(2048).release();
  }
  static void TearDownTestSuite() {
    EVP_PKEY_free(cloud_);
    EVP_PKEY_free(user_);
  }

  void SetUp() override {
    char pattern[] = "/tmp/imgfs_bundle_writer_test_XXXXXX";
    ASSERT_NE(nullptr, ::mkdtemp(pattern));
    dir_ = pattern;
    write_text(dir_ + "/cloud-cert.pem", testing::self_signed_certificate_pem(cloud_), 0644);
    write_text(dir_ + "/cloud-pk.pem", testing::private_key_pem(cloud_), 0600);
    write_text(dir_ + "/user-cert.pem", testing::self_signed_certificate_pem(user_), 0644);
    write_text(dir_ + "/user-pk.pem", testing::private_key_pem(user_), 0600);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  BundleWriteOptions options_for(const std::vector<uint8_t>& image, const std::string& name) {
    BundleWriteOptions options;
    options.image_path = dir_ + "/" + name;
    write_file(options.image_path, image, 0644);
    options.cert_path = dir_ + "/cloud-cert.pem";
    options.user_cert_path = dir_ + "/user-cert.pem";
    options.user_key_path = dir_ + "/user-pk.pem";
    options.out_dir = dir_ + "/out";
    return options;
  }

  // Reads a written bundle back with nothing but the manifest, OpenSSL and zlib.
  Unbundled unbundle(const std::string& manifest_path, const std::string& key_file) {
    Unbundled out;
    const std::vector<uint8_t> text = read_file(manifest_path);
    out.manifest_text.assign(text.begin(), text.end());
    Result<BundleManifest> manifest = formats::parse_bundle_manifest(out.manifest_text);
    EXPECT_TRUE(manifest.ok()) << manifest.status().to_string();
    if (!manifest.ok()) return out;
    out.manifest = *manifest;

    Result<PrivateKey> key = PrivateKey::load_file(dir_ + "/" + key_file);
    EXPECT_TRUE(key.ok()) << key.status().to_string();
    auto key_iv = formats::unwrap_bundle_key_iv(out.manifest, {&*key});
    EXPECT_TRUE(key_iv.ok()) << key_iv.status().to_string();
    if (!key_iv.ok()) return out;
    out.key = key_iv->first;
    out.iv = key_iv->second;

    const std::filesystem::path folder = std::filesystem::path(manifest_path).parent_path();
    std::vector<uint8_t> cipher;
    for (const formats::BundlePart& part : out.manifest.parts) {
      const std::string path = (folder / part.filename).string();
      const std::vector<uint8_t> bytes = read_file(path);
      EXPECT_EQ(sha1_hex(bytes), hex_encode(part.sha1)) << part.filename;
      struct stat st;
      EXPECT_EQ(0, ::stat(path.c_str(), &st));
      EXPECT_EQ(st.st_mode & 07777, 0644u) << part.filename;
      out.part_sizes.push_back(bytes.size());
      cipher.insert(cipher.end(), bytes.begin(), bytes.end());
    }
    EXPECT_EQ(cipher.size(), out.manifest.image.bundled_size);
    out.gzip = aes_128_cbc_decrypt(cipher, out.key, out.iv);
    out.tar = gunzip(out.gzip);
    EXPECT_EQ(sha1_hex(out.tar), out.manifest.image.digest_hex);
    return out;
  }

  // Writes, reads back with both keys, and checks the whole layout for a plain (short) name.
  void round_trip(uint64_t image_size, uint64_t part_size) {
    SCOPED_TRACE("image size " + std::to_string(image_size));
    const std::vector<uint8_t> image = image_bytes(image_size, 7);
    BundleWriteOptions options = options_for(image, "disk.img");
    options.part_size = part_size;
    Result<std::string> manifest_path = write_bundle(options);
    ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
    EXPECT_EQ(*manifest_path, dir_ + "/out/disk.img.manifest.xml");

    for (const char* key_file : {"cloud-pk.pem", "user-pk.pem"}) {
      Unbundled bundle = unbundle(*manifest_path, key_file);
      ASSERT_FALSE(bundle.tar.empty());
      const BundleManifest& m = bundle.manifest;
      EXPECT_EQ(m.image.name, "disk.img");
      EXPECT_EQ(m.image.size, image_size);
      EXPECT_EQ(m.image.user, "000000000000");
      EXPECT_EQ(m.image.type, "machine");
      EXPECT_EQ(m.architecture, "x86_64");
      EXPECT_EQ(m.bundler.name, "imgfs");
      EXPECT_EQ(m.bundler.version, "0.1.0");
      EXPECT_EQ(m.bundler.release, "0");

      // a.2: header, data at 512, padding and two zero blocks, record padding to 10240.
      const uint64_t data_blocks = (image_size + 511) / 512;
      const uint64_t expected_tar = ((512 + data_blocks * 512 + 1024) + 10239) / 10240 * 10240;
      ASSERT_EQ(bundle.tar.size(), expected_tar);
      EXPECT_EQ(field_text(bundle.tar.data(), 100),
                std::string("disk.img") + std::string(92, '\0'));
      expect_gnu_header(bundle.tar.data(), "0000644", '0');
      char size_field[12];
      std::snprintf(size_field, sizeof(size_field), "%011llo",
                    static_cast<unsigned long long>(image_size));
      EXPECT_EQ(field_text(bundle.tar.data() + 124, 12),
                std::string(size_field) + std::string(1, '\0'));
      EXPECT_TRUE(std::equal(image.begin(), image.end(), bundle.tar.begin() + 512));
      EXPECT_TRUE(std::all_of(bundle.tar.begin() + 512 + static_cast<long>(image_size),
                              bundle.tar.end(), [](uint8_t b) { return b == 0; }));

      // a.3: GNU gzip's header for stdin, level 6.
      const std::vector<uint8_t> gzip_header(bundle.gzip.begin(), bundle.gzip.begin() + 10);
      EXPECT_EQ(gzip_header,
                (std::vector<uint8_t>{0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03}));
      // a.4: PKCS#7 always adds 1..16 bytes.
      EXPECT_EQ(m.image.bundled_size, bundle.gzip.size() / 16 * 16 + 16);

      // a.1 step 5: full parts, then one shorter (possibly empty) part.
      ASSERT_FALSE(bundle.part_sizes.empty());
      for (size_t i = 0; i + 1 < bundle.part_sizes.size(); ++i) {
        EXPECT_EQ(bundle.part_sizes[i], part_size) << i;
      }
      EXPECT_LT(bundle.part_sizes.back(), part_size);
      for (size_t i = 0; i < m.parts.size(); ++i) {
        char name[48];
        std::snprintf(name, sizeof(name), "disk.img.part.%02zu", i);
        EXPECT_EQ(m.parts[i].filename, name);
      }
    }
  }

  static EVP_PKEY* cloud_;
  static EVP_PKEY* user_;
  std::string dir_;
};

EVP_PKEY* BundleWriterTest::cloud_ = nullptr;
EVP_PKEY* BundleWriterTest::user_ = nullptr;

TEST_F(BundleWriterTest, OneByteImage) { round_trip(1, 10485760); }

TEST_F(BundleWriterTest, ThreeMiBImageInManyParts) { round_trip(3 * kMiB, 1000000); }

TEST_F(BundleWriterTest, ThreeMiBPlus123InOddSizedParts) { round_trip(3 * kMiB + 123, 65537); }

TEST_F(BundleWriterTest, TarStreamOfThreeMiBImageIs3153920Bytes) {
  BundleWriteOptions options = options_for(image_bytes(3145728, 3), "three.img");
  Result<std::string> manifest_path = write_bundle(options);
  ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
  EXPECT_EQ(unbundle(*manifest_path, "cloud-pk.pem").tar.size(), 3153920u);
}

// euca2ools' quirk: a ciphertext that fills its last part exactly gets an empty part after it.
TEST_F(BundleWriterTest, ExactMultipleOfPartSizeAddsEmptyLastPart) {
  const std::vector<uint8_t> image = image_bytes(200000, 11);
  BundleWriteOptions options = options_for(image, "exact.img");
  options.part_size = 1u << 30;
  Result<std::string> first = write_bundle(options);
  ASSERT_TRUE(first.ok()) << first.status().to_string();
  const uint64_t cipher_size = unbundle(*first, "cloud-pk.pem").manifest.image.bundled_size;
  ASSERT_EQ(cipher_size % 16, 0u);

  for (uint64_t parts : {uint64_t{1}, uint64_t{4}, uint64_t{16}}) {
    std::filesystem::remove_all(options.out_dir);
    options.part_size = cipher_size / parts;
    Result<std::string> manifest_path = write_bundle(options);
    ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
    Unbundled bundle = unbundle(*manifest_path, "user-pk.pem");
    ASSERT_EQ(bundle.manifest.image.bundled_size, cipher_size);  // Deterministic deflate.
    ASSERT_EQ(bundle.part_sizes.size(), parts + 1);
    EXPECT_EQ(bundle.part_sizes.back(), 0u);
    EXPECT_EQ(bundle.manifest.parts.back().filename,
              (parts + 1 <= 10 ? "exact.img.part.0" : "exact.img.part.") + std::to_string(parts));
    EXPECT_EQ(hex_encode(bundle.manifest.parts.back().sha1),
              "da39a3ee5e6b4b0d3255bfef95601890afd80709");  // SHA1 of nothing.
    EXPECT_TRUE(std::equal(image.begin(), image.end(), bundle.tar.begin() + 512));
  }
}

TEST_F(BundleWriterTest, PartNamesUseAtLeastTwoDigits) {
  BundleWriteOptions options = options_for(image_bytes(20000, 5), "many.img");
  options.part_size = 160;
  Result<std::string> manifest_path = write_bundle(options);
  ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
  Unbundled bundle = unbundle(*manifest_path, "cloud-pk.pem");
  ASSERT_GT(bundle.manifest.parts.size(), 101u);
  EXPECT_EQ(bundle.manifest.parts[0].filename, "many.img.part.00");
  EXPECT_EQ(bundle.manifest.parts[9].filename, "many.img.part.09");
  EXPECT_EQ(bundle.manifest.parts[99].filename, "many.img.part.99");
  EXPECT_EQ(bundle.manifest.parts[100].filename, "many.img.part.100");
}

TEST_F(BundleWriterTest, ManifestIsOneLineInEuca2ools3Order) {
  BundleWriteOptions options = options_for(image_bytes(5000, 2), "order.img");
  options.user_account = "0001-2345-6789";
  options.arch = "i386";
  Result<std::string> manifest_path = write_bundle(options);
  ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
  struct stat st;
  ASSERT_EQ(0, ::stat(manifest_path->c_str(), &st));
  EXPECT_EQ(st.st_mode & 07777, 0644u);

  const std::vector<uint8_t> bytes = read_file(*manifest_path);
  const std::string text(bytes.begin(), bytes.end());
  const std::string declaration = "<?xml version='1.0' encoding='ASCII'?>\n";
  ASSERT_EQ(text.substr(0, declaration.size()), declaration);
  const std::string body = text.substr(declaration.size());
  EXPECT_EQ(body.find('\n'), std::string::npos);
  EXPECT_EQ(body.substr(0, 10), "<manifest>");
  EXPECT_EQ(body.substr(body.size() - 11), "</manifest>");
  size_t last = 0;
  for (const char* tag :
       {"<version>2007-10-10</version>", "<bundler><name>imgfs</name>",
        "<machine_configuration><architecture>i386</architecture></machine_configuration>",
        "<image><name>order.img</name>", "<user>000123456789</user>", "<type>machine</type>",
        "<digest algorithm=\"SHA1\">", "<size>5000</size>", "<bundled_size>",
        "<ec2_encrypted_key algorithm=\"AES-128-CBC\">",
        "<user_encrypted_key algorithm=\"AES-128-CBC\">", "<ec2_encrypted_iv>",
        "<user_encrypted_iv>", "<parts count=\"1\"><part index=\"0\"><filename>order.img.part.00",
        "</filename><digest algorithm=\"SHA1\">", "</parts></image><signature>",
        "</signature></manifest>"}) {
    const size_t at = body.find(tag, last);
    ASSERT_NE(at, std::string::npos) << tag;
    last = at;
  }
}

TEST_F(BundleWriterTest, SignedManifestVerifiesAndTamperingFails) {
  BundleWriteOptions options = options_for(image_bytes(4096, 4), "signed.img");
  Result<std::string> manifest_path = write_bundle(options);
  ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
  const std::vector<uint8_t> bytes = read_file(*manifest_path);
  const std::string text(bytes.begin(), bytes.end());
  Result<Certificate> user_cert = Certificate::load_file(dir_ + "/user-cert.pem");
  ASSERT_TRUE(user_cert.ok());

  Result<BundleManifest> manifest = formats::parse_bundle_manifest(text);
  ASSERT_TRUE(manifest.ok()) << manifest.status().to_string();
  EXPECT_EQ(manifest->signature.size(), 512u);
  EXPECT_TRUE(formats::verify_bundle_signature(*manifest, *user_cert).ok());

  std::string tampered = text;
  const size_t at = tampered.find("<size>4096</size>");
  ASSERT_NE(at, std::string::npos);
  tampered.replace(at, 17, "<size>4097</size>");
  Result<BundleManifest> tampered_manifest = formats::parse_bundle_manifest(tampered);
  ASSERT_TRUE(tampered_manifest.ok());
  EXPECT_EQ(formats::verify_bundle_signature(*tampered_manifest, *user_cert).code(),
            StatusCode::kCorruption);

  Result<Certificate> cloud_cert = Certificate::load_file(dir_ + "/cloud-cert.pem");
  EXPECT_EQ(formats::verify_bundle_signature(*manifest, *cloud_cert).code(),
            StatusCode::kCorruption);
}

TEST_F(BundleWriterTest, WithoutUserCertOrKeyOnlyTheCloudCanOpenIt) {
  BundleWriteOptions options = options_for(image_bytes(3000, 6), "cloud.img");
  options.user_cert_path.reset();
  options.user_key_path.reset();
  Result<std::string> manifest_path = write_bundle(options);
  ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
  Unbundled bundle = unbundle(*manifest_path, "cloud-pk.pem");
  EXPECT_EQ(bundle.manifest.signature, "UNSIGNED");
  EXPECT_TRUE(bundle.manifest.image.user_encrypted_key.empty());
  EXPECT_TRUE(bundle.manifest.image.user_encrypted_iv.empty());
  Result<PrivateKey> user_key = PrivateKey::load_file(dir_ + "/user-pk.pem");
  EXPECT_EQ(formats::unwrap_bundle_key_iv(bundle.manifest, {&*user_key}).status().code(),
            StatusCode::kInvalidArgument);
  Result<Certificate> user_cert = Certificate::load_file(dir_ + "/user-cert.pem");
  EXPECT_EQ(formats::verify_bundle_signature(bundle.manifest, *user_cert).message(),
            "manifest is unsigned");
}

TEST_F(BundleWriterTest, LongPrefixGetsGnuLongLink) {
  const std::string prefix(120, 'p');
  const std::vector<uint8_t> image = image_bytes(777, 9);
  BundleWriteOptions options = options_for(image, "long.img");
  options.prefix = prefix;
  Result<std::string> manifest_path = write_bundle(options);
  ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
  Unbundled bundle = unbundle(*manifest_path, "user-pk.pem");
  EXPECT_EQ(bundle.manifest.image.name, prefix);
  EXPECT_EQ(bundle.manifest.parts[0].filename, prefix + ".part.00");
  const uint8_t* tar = bundle.tar.data();
  EXPECT_EQ(field_text(tar, 100), std::string("././@LongLink") + std::string(87, '\0'));
  expect_gnu_header(tar, "0000000", 'L');
  EXPECT_EQ(parse_octal(tar + 124, 12), prefix.size() + 1);
  EXPECT_EQ(field_text(tar + 512, 512), prefix + std::string(512 - prefix.size(), '\0'));
  EXPECT_EQ(field_text(tar + 1024, 100), prefix.substr(0, 100));
  expect_gnu_header(tar + 1024, "0000644", '0');
  EXPECT_EQ(parse_octal(tar + 1024 + 124, 12), image.size());
  EXPECT_TRUE(std::equal(image.begin(), image.end(), bundle.tar.begin() + 1536));
}

TEST(BundleTarPrologueTest, NameOfExactly100BytesNeedsNoLongLink) {
  const std::string name(100, 'n');
  const std::vector<uint8_t> prologue = bundle_tar_prologue(name, 5);
  ASSERT_EQ(prologue.size(), 512u);
  EXPECT_EQ(field_text(prologue.data(), 100), name);
  EXPECT_EQ(bundle_tar_prologue(std::string(101, 'n'), 5).size(), 1536u);
  EXPECT_EQ(bundle_tar_prologue(std::string(511, 'n'), 5).size(), 1536u);
  EXPECT_EQ(bundle_tar_prologue(std::string(512, 'n'), 5).size(), 2048u);
}

TEST(BundleTarPrologueTest, SizesFrom8GiBUseBase256) {
  const uint64_t largest_octal = 077777777777ull;
  std::vector<uint8_t> header = bundle_tar_prologue("big", largest_octal);
  EXPECT_EQ(field_text(header.data() + 124, 12), std::string("77777777777\0", 12));
  expect_gnu_header(header.data(), "0000644", '0');

  const uint64_t size = 8ull << 30;  // 8 GiB = largest_octal + 1.
  header = bundle_tar_prologue("big", size);
  EXPECT_EQ(header[124], 0x80);
  uint64_t decoded = 0;
  for (size_t i = 1; i < 12; ++i) decoded = (decoded << 8) | header[124 + i];
  EXPECT_EQ(decoded, size);
  unsigned sum = 0;
  for (size_t i = 0; i < 512; ++i) sum += (i >= 148 && i < 156) ? ' ' : header[i];
  EXPECT_EQ(parse_octal(header.data() + 148, 7), sum);

  header = bundle_tar_prologue("big", 0x0123456789abcdefull);
  decoded = 0;
  for (size_t i = 1; i < 12; ++i) decoded = (decoded << 8) | header[124 + i];
  EXPECT_EQ(decoded, 0x0123456789abcdefull);
}

TEST_F(BundleWriterTest, EscapesNamesInTheManifest) {
  const std::string prefix = "a&b<c>d-\xc3\xa4\xe2\x82\xac";  // ä and €.
  BundleWriteOptions options = options_for(image_bytes(100, 1), "x.img");
  options.prefix = prefix;
  Result<std::string> manifest_path = write_bundle(options);
  ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
  const std::vector<uint8_t> bytes = read_file(*manifest_path);
  const std::string text(bytes.begin(), bytes.end());
  EXPECT_NE(text.find("<name>a&amp;b&lt;c&gt;d-&#228;&#8364;</name>"), std::string::npos);
  EXPECT_TRUE(std::all_of(text.begin(), text.end(),
                          [](char c) { return static_cast<unsigned char>(c) < 0x80; }));
  Unbundled bundle = unbundle(*manifest_path, "cloud-pk.pem");
  EXPECT_EQ(bundle.manifest.image.name, prefix);
  EXPECT_EQ(bundle.manifest.parts[0].filename, prefix + ".part.00");
  Result<Certificate> user_cert = Certificate::load_file(dir_ + "/user-cert.pem");
  EXPECT_TRUE(formats::verify_bundle_signature(bundle.manifest, *user_cert).ok());
}

TEST_F(BundleWriterTest, RejectsBadOptions) {
  const BundleWriteOptions good = options_for(image_bytes(10, 1), "ok.img");
  auto code_of = [](const BundleWriteOptions& options) {
    return write_bundle(options).status().code();
  };
  BundleWriteOptions options = good;
  options.part_size = 0;
  EXPECT_EQ(code_of(options), StatusCode::kInvalidArgument);
  options = good;
  options.image_path = dir_ + "/missing.img";
  EXPECT_EQ(code_of(options), StatusCode::kNotFound);
  options = good;
  options.image_path = dir_;
  EXPECT_EQ(code_of(options), StatusCode::kInvalidArgument);
  options = good;
  options.cert_path = dir_ + "/missing.pem";
  EXPECT_EQ(code_of(options), StatusCode::kNotFound);
  options = good;
  options.cert_path = dir_ + "/user-pk.pem";
  EXPECT_EQ(code_of(options), StatusCode::kInvalidArgument);
  const std::vector<std::string> bad_prefixes = {
      "a/b", "", ".", "..", "tab\there", "bad\xff", std::string(1010, 'x')};
  for (const std::string& bad : bad_prefixes) {
    options = good;
    options.prefix = bad;
    EXPECT_EQ(code_of(options), StatusCode::kInvalidArgument) << bad;
  }
  options = good;
  options.arch = "x86\n64";
  EXPECT_EQ(code_of(options), StatusCode::kInvalidArgument);

  ASSERT_EQ(0, ::chmod((dir_ + "/user-pk.pem").c_str(), 0644));
  options = good;
  Result<std::string> open_key = write_bundle(options);
  EXPECT_EQ(open_key.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(open_key.status().message().find("chmod 600"), std::string::npos);
  // Nothing was written for any refused run.
  EXPECT_FALSE(std::filesystem::exists(good.out_dir) && !std::filesystem::is_empty(good.out_dir));
}

TEST_F(BundleWriterTest, FailureMidStreamRemovesTheFilesItCreated) {
  BundleWriteOptions options = options_for(image_bytes(100000, 8), "mid.img");
  options.part_size = 16384;
  // A folder where part 02 belongs makes its creation fail after two parts are written.
  ASSERT_TRUE(std::filesystem::create_directories(options.out_dir + "/mid.img.part.02"));
  Result<std::string> manifest_path = write_bundle(options);
  ASSERT_FALSE(manifest_path.ok());
  EXPECT_EQ(manifest_path.status().code(), StatusCode::kIOError);
  EXPECT_NE(manifest_path.status().message().find("mid.img.part.02"), std::string::npos);
  std::vector<std::string> left;
  for (const auto& entry : std::filesystem::directory_iterator(options.out_dir)) {
    left.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(left, std::vector<std::string>{"mid.img.part.02"});
}

// The bundle opens with the tools euca2ools itself pipes together.
TEST_F(BundleWriterTest, OpensWithOpensslGzipAndTar) {
  if (!have_commands("openssl") || !have_commands("gzip") || !have_commands("tar") ||
      !have_commands("cmp")) {
    GTEST_SKIP() << "openssl, gzip, tar or cmp not found";
  }
  for (const std::optional<std::string>& prefix :
       {std::optional<std::string>(), std::optional<std::string>(std::string(150, 'L'))}) {
    const std::vector<uint8_t> image = image_bytes(3 * kMiB + 123, 21);
    BundleWriteOptions options = options_for(image, "cli.img");
    options.prefix = prefix;
    options.part_size = 1000000;
    Result<std::string> manifest_path = write_bundle(options);
    ASSERT_TRUE(manifest_path.ok()) << manifest_path.status().to_string();
    Unbundled bundle = unbundle(*manifest_path, "cloud-pk.pem");
    std::string parts;
    for (const formats::BundlePart& part : bundle.manifest.parts) {
      parts += " '" + options.out_dir + "/" + part.filename + "'";
    }
    const std::string out = dir_ + "/cli.out";
    const std::string command = "cat" + parts + " | openssl enc -d -aes-128-cbc -K " +
                                hex_encode(bundle.key) + " -iv " + hex_encode(bundle.iv) +
                                " | gzip -dc | tar -xO > '" + out + "' && cmp -s '" + out + "' '" +
                                options.image_path + "'";
    EXPECT_EQ(0, std::system(command.c_str())) << command;
    std::filesystem::remove_all(options.out_dir);
  }
}

}  // namespace
}  // namespace imgfs::cli
