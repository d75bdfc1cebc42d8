#include "formats/tar_member_source.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::expect_read;

using imgfs::testing::FaultySource;
using imgfs::testing::pattern_bytes;

enum class Magic { kUstar, kGnu, kV7 };

struct HeaderSpec {
  std::string name{};
  char type = '0';
  uint64_t size = 0;
  Magic magic = Magic::kUstar;
  std::string prefix{};
  bool base256_size = false;
  // Fields as Python 2.7's tarfile writes them for euca2ools 3 (FORMATS.md a.2).
  bool python27_fields = false;
  std::vector<TarSparseEntry> sparse{};
  bool sparse_extended = false;
  uint64_t real_size = 0;
};

void put_text(std::byte* block, size_t offset, std::string_view text) {
  std::memcpy(block + offset, text.data(), text.size());
}

// `width - 1` zero-padded octal digits then a NUL.
void put_octal(std::byte* block, size_t offset, size_t width, uint64_t value) {
  for (size_t i = 0; i + 1 < width; ++i) {
    block[offset + width - 2 - i] = static_cast<std::byte>('0' + (value & 7));
    value >>= 3;
  }
  block[offset + width - 1] = std::byte{0};
}

void put_checksum(std::byte* block) {
  std::memset(block + 148, ' ', 8);
  unsigned sum = 0;
  for (int i = 0; i < 512; ++i) sum += std::to_integer<unsigned>(block[i]);
  char text[8];
  std::snprintf(text, sizeof(text), "%06o", sum);
  std::memcpy(block + 148, text, 7);  // Six digits, NUL, and the space left in place.
}

void put_sparse(std::byte* area, const TarSparseEntry& entry) {
  put_octal(area, 0, 12, entry.offset);
  put_octal(area, 12, 12, entry.length);
}

std::vector<std::byte> make_header(const HeaderSpec& spec) {
  std::vector<std::byte> block(512);
  std::byte* b = block.data();
  put_text(b, 0, spec.name.substr(0, 100));
  if (spec.python27_fields) {
    put_text(b, 100, std::string_view("0000644\0", 8));
    put_text(b, 108, std::string_view("0000000\0", 8));
    put_text(b, 116, std::string_view("0000000\0", 8));
    put_text(b, 329, std::string_view("0000000\0", 8));
    put_text(b, 337, std::string_view("0000000\0", 8));
  } else {
    put_octal(b, 100, 8, 0644);
    put_octal(b, 108, 8, 1000);
    put_octal(b, 116, 8, 1000);
  }
  if (spec.base256_size) {
    b[124] = std::byte{0x80};
    for (int i = 0; i < 8; ++i) b[124 + 11 - i] = static_cast<std::byte>(spec.size >> (8 * i));
  } else {
    put_octal(b, 124, 12, spec.size);
  }
  put_octal(b, 136, 12, spec.python27_fields ? 0 : 1700000000);
  b[156] = static_cast<std::byte>(spec.type);
  if (spec.magic == Magic::kUstar) {
    put_text(b, 257, std::string_view("ustar", 6));  // With its NUL.
    put_text(b, 263, "00");
    put_text(b, 345, spec.prefix);
  } else if (spec.magic == Magic::kGnu) {
    put_text(b, 257, std::string_view("ustar  \0", 8));
  }
  for (size_t i = 0; i < spec.sparse.size() && i < 4; ++i)
    put_sparse(b + 386 + 24 * i, spec.sparse[i]);
  if (spec.type == 'S') {
    b[482] = spec.sparse_extended ? std::byte{1} : std::byte{0};
    put_octal(b, 483, 12, spec.real_size);
  }
  put_checksum(b);
  return block;
}

class TarWriter {
 public:
  void header(const HeaderSpec& spec) { append(make_header(spec)); }
  void data(const std::vector<std::byte>& bytes) {
    append(bytes);
    bytes_.resize((bytes_.size() + 511) / 512 * 512);
  }
  // A GNU long-name (or long-link) entry for `name`, NUL included.
  void long_name(const std::string& name, char type = 'L') {
    std::vector<std::byte> text(name.size() + 1);
    std::memcpy(text.data(), name.data(), name.size());
    header({.name = "././@LongLink", .type = type, .size = text.size(), .magic = Magic::kGnu});
    data(text);
  }
  void pax(const std::string& records, char type = 'x') {
    std::vector<std::byte> text(records.size());
    std::memcpy(text.data(), records.data(), records.size());
    header({.name = "PaxHeaders/x", .type = type, .size = text.size()});
    data(text);
  }
  // Two zero blocks, then zeros up to the 10240-byte record.
  void finish() {
    bytes_.resize(bytes_.size() + 1024);
    bytes_.resize((bytes_.size() + 10239) / 10240 * 10240);
  }
  void append(const std::vector<std::byte>& bytes) {
    bytes_.insert(bytes_.end(), bytes.begin(), bytes.end());
  }
  std::vector<std::byte>& bytes() { return bytes_; }

 private:
  std::vector<std::byte> bytes_;
};

// A pax record with its length prefix computed.
std::string pax_record(const std::string& key, const std::string& value) {
  const std::string body = " " + key + "=" + value + "\n";
  size_t length = body.size() + 1;
  while (std::to_string(length).size() + body.size() != length) ++length;
  return std::to_string(length) + body;
}

Result<std::unique_ptr<TarMemberSource>> open_bytes(const std::vector<std::byte>& bytes) {
  return open_tar_member(std::make_unique<MemorySource>(bytes, "tarball"));
}

// Reads at 0, the end, every 512-byte boundary (and `extra_boundaries`), whole and random.
void check_reads(const BlockSource& source, const std::vector<std::byte>& ref,
                 const std::vector<uint64_t>& extra_boundaries = {}) {
  ASSERT_EQ(ref.size(), source.size());
  expect_read(source, ref, 0, ref.size());
  expect_read(source, ref, ref.size(), 0);
  if (ref.empty()) return;
  expect_read(source, ref, 0, 1);
  expect_read(source, ref, ref.size() - 1, 1);
  std::vector<uint64_t> boundaries = extra_boundaries;
  for (uint64_t b = 512; b < ref.size(); b += 512) boundaries.push_back(b);
  for (uint64_t b : boundaries) {
    for (uint64_t before : {0, 1, 100}) {
      for (uint64_t span : {1, 2, 600, 5000}) {
        if (before > b || b >= ref.size()) continue;
        expect_read(source, ref, b - before, std::min(span, ref.size() - (b - before)));
      }
    }
  }
  std::mt19937_64 rng(ref.size());
  for (int i = 0; i < 100; ++i) {
    const uint64_t offset = rng() % ref.size();
    expect_read(source, ref, offset, rng() % (ref.size() - offset + 1));
  }
}

TEST(TarMemberSourceTest, UstarMemberWithPrefix) {
  const std::vector<std::byte> image = pattern_bytes(70001, 2);
  TarWriter tar;
  tar.header({.name = "disk.img", .size = image.size(), .prefix = "images/prod"});
  tar.data(image);
  tar.finish();
  auto opened = open_bytes(tar.bytes());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ("images/prod/disk.img", (*opened)->member_name());
  EXPECT_EQ(512u, (*opened)->data_offset());
  EXPECT_EQ("tar(tarball(" + std::to_string(tar.bytes().size()) + " bytes))",
            (*opened)->describe());
  check_reads(**opened, image);
  auto extent = (*opened)->map(100);
  ASSERT_TRUE(extent.ok());
  EXPECT_EQ(Extent::Kind::kData, extent->kind);
  EXPECT_EQ(image.size() - 100, extent->length);
  EXPECT_EQ(StatusCode::kInvalidArgument, (*opened)->map(image.size()).status().code());
}

TEST(TarMemberSourceTest, Python27GnuHeaderAsEuca2ools3Writes) {
  const std::vector<std::byte> image = pattern_bytes(3 << 20, 4);
  TarWriter tar;
  tar.header(
      {.name = "centos6.img", .size = image.size(), .magic = Magic::kGnu, .python27_fields = true});
  tar.data(image);
  tar.finish();
  // FORMATS.md a.2: a 3145728-byte image gives a 3153920-byte tar stream, data at 512.
  EXPECT_EQ(3153920u, tar.bytes().size());
  auto opened = open_bytes(tar.bytes());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ("centos6.img", (*opened)->member_name());
  EXPECT_EQ(512u, (*opened)->data_offset());
  check_reads(**opened, image);
}

TEST(TarMemberSourceTest, Base256SizeParses) {
  const std::vector<std::byte> image = pattern_bytes(1000, 5);
  TarWriter tar;
  tar.header({.name = "big", .size = image.size(), .magic = Magic::kGnu, .base256_size = true});
  tar.data(image);
  tar.finish();
  auto opened = open_bytes(tar.bytes());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  check_reads(**opened, image);
}

TEST(TarMemberSourceTest, HugeBase256SizeOverSmallStreamIsTruncated) {
  TarWriter tar;
  tar.header(
      {.name = "big", .size = (uint64_t{9} << 30) + 7, .magic = Magic::kGnu, .base256_size = true});
  tar.data(pattern_bytes(4096, 5));
  tar.finish();
  auto opened = open_bytes(tar.bytes());
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(StatusCode::kCorruption, opened.status().code());
  EXPECT_NE(std::string::npos, opened.status().message().find("truncated tar member"));
}

TEST(TarMemberSourceTest, Base256NegativeOrOverflowingIsCorruption) {
  std::vector<std::byte> block =
      make_header({.name = "x", .size = 1, .magic = Magic::kGnu, .base256_size = true});
  block[124] = std::byte{0xFF};  // Negative.
  put_checksum(block.data());
  EXPECT_EQ(StatusCode::kCorruption,
            parse_tar_header(std::span<const std::byte, 512>(block.data(), 512)).status().code());
  block[124] = std::byte{0x81};  // 1 << 88: overflows.
  put_checksum(block.data());
  EXPECT_EQ(StatusCode::kCorruption,
            parse_tar_header(std::span<const std::byte, 512>(block.data(), 512)).status().code());
}

TEST(TarMemberSourceTest, LongNamesViaLongLink) {
  for (size_t length : {100, 150, 1500}) {
    std::string name;
    for (size_t i = 0; i < length; ++i) name += static_cast<char>('a' + i % 26);
    const std::vector<std::byte> image = pattern_bytes(2000 + length, 6);
    TarWriter tar;
    tar.long_name(name);
    tar.long_name("some/link/target", 'K');
    tar.header({.name = name.substr(0, 100), .size = image.size(), .magic = Magic::kGnu});
    tar.data(image);
    tar.finish();
    auto opened = open_bytes(tar.bytes());
    ASSERT_TRUE(opened.ok()) << opened.status().to_string();
    EXPECT_EQ(name, (*opened)->member_name());
    EXPECT_EQ(512u * (2 + (length + 1 + 511) / 512 + 2), (*opened)->data_offset());
    check_reads(**opened, image);
  }
}

TEST(TarMemberSourceTest, PaxPathAndSize) {
  const std::vector<std::byte> image = pattern_bytes(12345, 7);
  TarWriter tar;
  tar.pax(pax_record("comment", "global"), 'g');
  tar.pax(pax_record("mtime", "1700000000.5") + pax_record("path", "a/very/long/pax/name.img") +
          pax_record("size", std::to_string(image.size())));
  // The header's own size field says 0, as writers do when the real size does not fit.
  tar.header({.name = "short", .size = 0});
  tar.data(image);
  tar.finish();
  auto opened = open_bytes(tar.bytes());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ("a/very/long/pax/name.img", (*opened)->member_name());
  EXPECT_EQ(2560u, (*opened)->data_offset());  // After g, its data, x, its data, the header.
  check_reads(**opened, image);
}

TEST(TarMemberSourceTest, PaxSizeDoesNotApplyToMetadataEntries) {
  const std::vector<std::byte> image = pattern_bytes(3000, 14);
  TarWriter tar;
  tar.pax(pax_record("size", std::to_string(image.size())));
  tar.pax(pax_record("mtime", "1"));  // A second pax header: its own size, not 3000.
  tar.long_name(std::string(120, 'q'));
  tar.header({.name = "q", .size = 0});
  tar.data(image);
  tar.finish();
  auto opened = open_bytes(tar.bytes());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ(std::string(120, 'q'), (*opened)->member_name());
  EXPECT_EQ(512u * 7, (*opened)->data_offset());
  check_reads(**opened, image);
}

TEST(TarMemberSourceTest, PaxGnuSparseIsNotSupported) {
  TarWriter tar;
  tar.pax(pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0") +
          pax_record("GNU.sparse.realsize", "1000000"));
  tar.header({.name = "GNUSparseFile.0/disk", .size = 1024});
  tar.data(pattern_bytes(1024, 1));
  tar.finish();
  auto opened = open_bytes(tar.bytes());
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(StatusCode::kNotSupported, opened.status().code());
  EXPECT_NE(std::string::npos, opened.status().message().find("GNU.sparse"));
}

TEST(TarMemberSourceTest, MalformedPaxIsCorruption) {
  for (const std::string& records :
       {std::string("5 a=b\n"), std::string("x path=a\n"), std::string("11 path=a\n"),
        std::string("9 patha\nX"), std::string("9 =abcde\n"), std::string("12 size=1x3\n"),
        std::string("30 size=99999999999999999999\n"), std::string("9 path=a\n\0x", 11)}) {
    TarWriter tar;
    tar.pax(records);
    tar.header({.name = "f", .size = 10});
    tar.data(pattern_bytes(10, 1));
    tar.finish();
    auto opened = open_bytes(tar.bytes());
    ASSERT_FALSE(opened.ok()) << records;
    EXPECT_EQ(StatusCode::kCorruption, opened.status().code()) << records;
  }
}

TEST(TarMemberSourceTest, ParsePaxRecords) {
  const std::string text = pax_record("path", "p=q") + pax_record("size", "42") +
                           pax_record("linkpath", "z") + std::string(7, '\0');
  auto records = parse_pax_records(std::as_bytes(std::span(text)));
  ASSERT_TRUE(records.ok()) << records.status().to_string();
  EXPECT_EQ("p=q", records->path.value_or(""));
  EXPECT_EQ(42u, records->size.value_or(0));
  EXPECT_FALSE(records->gnu_sparse);
  const std::string reset = text.substr(0, text.size() - 7) + pax_record("size", "");
  records = parse_pax_records(std::as_bytes(std::span(reset)));
  ASSERT_TRUE(records.ok());
  EXPECT_FALSE(records->size.has_value());
}

TEST(TarMemberSourceTest, EntriesBeforeTheFileAreSkipped) {
  const std::vector<std::byte> image = pattern_bytes(5000, 8);
  TarWriter tar;
  tar.header({.name = "dir/", .type = '5'});
  tar.header({.name = "link", .type = '2'});
  tar.header({.name = "olddir/", .type = '\0', .magic = Magic::kV7});
  // An unknown type carries data, which is skipped.
  tar.header({.name = "weird", .type = 'Z', .size = 700});
  tar.data(pattern_bytes(700, 9));
  tar.header({.name = "dir/disk.img", .type = '7', .size = image.size()});
  tar.data(image);
  tar.header({.name = "second", .size = 10});
  tar.data(pattern_bytes(10, 10));
  tar.finish();
  auto opened = open_bytes(tar.bytes());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ("dir/disk.img", (*opened)->member_name());
  EXPECT_EQ(512u * 7, (*opened)->data_offset());
  check_reads(**opened, image);
}

TEST(TarMemberSourceTest, V7HeaderWithoutMagic) {
  const std::vector<std::byte> image = pattern_bytes(999, 11);
  TarWriter tar;
  tar.header({.name = "old.img",
              .type = '\0',
              .size = image.size(),
              .magic = Magic::kV7,
              .prefix = "ignored"});
  tar.data(image);
  auto opened = open_bytes(tar.bytes());  // No end-of-archive blocks either.
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ("old.img", (*opened)->member_name());
  check_reads(**opened, image);
}

TEST(TarMemberSourceTest, SizeZeroMember) {
  TarWriter tar;
  tar.header({.name = "empty", .size = 0});
  tar.finish();
  auto opened = open_bytes(tar.bytes());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ(0u, (*opened)->size());
  std::vector<std::byte> none;
  EXPECT_TRUE((*opened)->read_at(0, none).ok());
  // A zero-size member right at the end of a stream with no padding at all.
  TarWriter bare;
  bare.header({.name = "empty", .size = 0});
  auto bare_opened = open_bytes(bare.bytes());
  ASSERT_TRUE(bare_opened.ok()) << bare_opened.status().to_string();
  EXPECT_EQ(0u, (*bare_opened)->size());
}

TEST(TarMemberSourceTest, MemberDataNotPaddedToBlockAtStreamEnd) {
  // The stream stops right after the data: the data fits, the padding is missing.
  const std::vector<std::byte> image = pattern_bytes(1000, 12);
  TarWriter tar;
  tar.header({.name = "f", .size = image.size()});
  tar.append(image);
  ASSERT_EQ(1512u, tar.bytes().size());
  auto opened = open_bytes(tar.bytes());
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  check_reads(**opened, image);
  tar.bytes().pop_back();
  auto truncated = open_bytes(tar.bytes());
  EXPECT_EQ(StatusCode::kCorruption, truncated.status().code());
}

TEST(TarMemberSourceTest, NoRegularMemberIsNotFound) {
  TarWriter only_dirs;
  only_dirs.header({.name = "dir/", .type = '5'});
  only_dirs.finish();
  EXPECT_EQ(StatusCode::kNotFound, open_bytes(only_dirs.bytes()).status().code());
  EXPECT_NE(std::string::npos, open_bytes(only_dirs.bytes())
                                   .status()
                                   .message()
                                   .find("tar stream has no regular file member"));
  EXPECT_EQ(StatusCode::kNotFound, open_bytes(std::vector<std::byte>(10240)).status().code());
  EXPECT_EQ(StatusCode::kNotFound, open_bytes({}).status().code());
  // Half a header is a truncated stream, not an empty one.
  std::vector<std::byte> half = make_header({.name = "f"});
  half.resize(100);
  EXPECT_EQ(StatusCode::kCorruption, open_bytes(half).status().code());
}

TEST(TarMemberSourceTest, SkippedEntryRunningPastTheStreamIsCorruption) {
  for (char type : {'K', 'g', 'Z'}) {
    TarWriter tar;
    tar.header({.name = "skip", .type = type, .size = 100000});
    tar.data(pattern_bytes(1000, 1));
    auto opened = open_bytes(tar.bytes());
    EXPECT_EQ(StatusCode::kCorruption, opened.status().code()) << type;
  }
}

TEST(TarMemberSourceTest, BadChecksumIsCorruption) {
  TarWriter tar;
  tar.header({.name = "f", .size = 10});
  tar.data(pattern_bytes(10, 1));
  tar.finish();
  tar.bytes()[5] = std::byte{'z'};  // Inside the name, after the checksum was computed.
  auto opened = open_bytes(tar.bytes());
  EXPECT_EQ(StatusCode::kCorruption, opened.status().code());
  EXPECT_NE(std::string::npos, opened.status().message().find("checksum"));
}

TEST(TarMemberSourceTest, SignedChecksumIsAccepted) {
  std::vector<std::byte> block = make_header({.name = "\xE9t\xE9.img", .size = 3});
  // Rewrite the checksum as a signed-char sum, as some old tars computed it.
  std::memset(block.data() + 148, ' ', 8);
  int sum = 0;
  for (std::byte b : block) sum += static_cast<int8_t>(std::to_integer<uint8_t>(b));
  char text[8];
  std::snprintf(text, sizeof(text), "%06o", sum);
  std::memcpy(block.data() + 148, text, 7);
  auto header = parse_tar_header(std::span<const std::byte, 512>(block.data(), 512));
  ASSERT_TRUE(header.ok()) << header.status().to_string();
  EXPECT_EQ(3u, header->size);
  EXPECT_EQ(TarFormat::kUstar, header->format);
}

TEST(TarMemberSourceTest, BadOctalIsCorruption) {
  std::vector<std::byte> block = make_header({.name = "f", .size = 3});
  block[124 + 3] = std::byte{'9'};
  put_checksum(block.data());
  EXPECT_EQ(StatusCode::kCorruption,
            parse_tar_header(std::span<const std::byte, 512>(block.data(), 512)).status().code());
}

// An old-GNU sparse member with 6 data entries (4 in the header, 2 in an extension block), a
// hole at the start, holes between, and a hole at the end closed by a (realsize, 0) entry.
struct SparseFixture {
  std::vector<std::byte> tar;
  std::vector<std::byte> expanded;
  std::vector<TarSparseEntry> entries;
};

SparseFixture make_sparse(uint64_t real_size, std::vector<TarSparseEntry> entries) {
  SparseFixture f;
  f.entries = entries;
  f.expanded.assign(real_size, std::byte{0});
  std::vector<std::byte> stored;
  uint64_t seed = 20;
  for (const TarSparseEntry& e : entries) {
    std::vector<std::byte> run = pattern_bytes(e.length, static_cast<uint32_t>(seed++));
    std::copy(run.begin(), run.end(), f.expanded.begin() + static_cast<ptrdiff_t>(e.offset));
    stored.insert(stored.end(), run.begin(), run.end());
  }
  TarWriter tar;
  tar.header({.name = "dir/", .type = '5', .magic = Magic::kGnu});
  HeaderSpec spec{.name = "sparse.img",
                  .type = 'S',
                  .size = stored.size(),
                  .magic = Magic::kGnu,
                  .sparse = entries,
                  .sparse_extended = entries.size() > 4,
                  .real_size = real_size};
  tar.header(spec);
  for (size_t first = 4; first < entries.size(); first += 21) {
    std::vector<std::byte> ext(512);
    for (size_t i = first; i < entries.size() && i < first + 21; ++i) {
      put_sparse(ext.data() + 24 * (i - first), entries[i]);
    }
    ext[504] = first + 21 < entries.size() ? std::byte{1} : std::byte{0};
    tar.append(ext);
  }
  tar.data(stored);
  tar.finish();
  f.tar = tar.bytes();
  return f;
}

TEST(TarMemberSourceTest, OldGnuSparseWithExtensionBlock) {
  const uint64_t real_size = 200000;
  SparseFixture f = make_sparse(real_size, {{4096, 1000},
                                            {5096, 3000},  // Adjacent: merges with the first.
                                            {20000, 1},
                                            {30001, 511},
                                            {65536, 65536},
                                            {150000, 777},
                                            {real_size, 0}});
  auto opened = open_bytes(f.tar);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  const TarMemberSource& source = **opened;
  EXPECT_EQ("sparse.img", source.member_name());
  EXPECT_EQ(512u * 3, source.data_offset());  // Directory, sparse header, one extension block.
  std::vector<uint64_t> boundaries;
  for (const TarSparseEntry& e : f.entries) {
    boundaries.push_back(e.offset);
    boundaries.push_back(e.offset + e.length);
  }
  check_reads(source, f.expanded, boundaries);
  // map(): zeros, then data, in runs that follow the entries.
  struct Expected {
    uint64_t offset;
    Extent::Kind kind;
    uint64_t length;
  };
  for (const Expected& e : std::vector<Expected>{{0, Extent::Kind::kZero, 4096},
                                                 {4096, Extent::Kind::kData, 4000},
                                                 {5000, Extent::Kind::kData, 3096},
                                                 {8096, Extent::Kind::kZero, 20000 - 8096},
                                                 {20000, Extent::Kind::kData, 1},
                                                 {20001, Extent::Kind::kZero, 10000},
                                                 {30001, Extent::Kind::kData, 511},
                                                 {131072, Extent::Kind::kZero, 150000 - 131072},
                                                 {150776, Extent::Kind::kData, 1},
                                                 {150777, Extent::Kind::kZero, real_size - 150777},
                                                 {real_size - 1, Extent::Kind::kZero, 1}}) {
    auto extent = source.map(e.offset);
    ASSERT_TRUE(extent.ok()) << e.offset;
    EXPECT_EQ(e.kind, extent->kind) << e.offset;
    EXPECT_EQ(e.length, extent->length) << e.offset;
  }
}

TEST(TarMemberSourceTest, OldGnuSparseAllHoleAndManyExtensionBlocks) {
  SparseFixture hole = make_sparse(1 << 20, {{1 << 20, 0}});
  auto opened = open_bytes(hole.tar);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  check_reads(**opened, hole.expanded);
  std::vector<TarSparseEntry> many;
  for (uint64_t i = 0; i < 60; ++i) many.push_back({i * 1000 + 7, 100 + i});
  SparseFixture f = make_sparse(61000, many);
  opened = open_bytes(f.tar);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ(512u * (2 + 3), (*opened)->data_offset());  // 56 entries over 3 extension blocks.
  check_reads(**opened, f.expanded);
}

TEST(TarMemberSourceTest, BadSparseMapIsCorruption) {
  // Overlapping entries.
  SparseFixture overlap = make_sparse(10000, {{0, 100}, {50, 100}});
  EXPECT_EQ(StatusCode::kCorruption, open_bytes(overlap.tar).status().code());
  // An entry past the real size.
  TarWriter past;
  past.header({.name = "s",
               .type = 'S',
               .size = 100,
               .magic = Magic::kGnu,
               .sparse = {{9990, 100}},
               .real_size = 10000});
  past.data(pattern_bytes(100, 1));
  past.finish();
  EXPECT_EQ(StatusCode::kCorruption, open_bytes(past.bytes()).status().code());
  // Stored size disagrees with the map.
  TarWriter mismatch;
  mismatch.header({.name = "s",
                   .type = 'S',
                   .size = 99,
                   .magic = Magic::kGnu,
                   .sparse = {{0, 100}},
                   .real_size = 10000});
  mismatch.data(pattern_bytes(100, 1));
  mismatch.finish();
  EXPECT_EQ(StatusCode::kCorruption, open_bytes(mismatch.bytes()).status().code());
  // An extension block promised but the stream ends.
  TarWriter cut;
  cut.header({.name = "s",
              .type = 'S',
              .size = 0,
              .magic = Magic::kGnu,
              .sparse = {{0, 1}, {2, 1}, {4, 1}, {6, 1}},
              .sparse_extended = true,
              .real_size = 10});
  EXPECT_EQ(StatusCode::kCorruption, open_bytes(cut.bytes()).status().code());
}

TEST(TarMemberSourceTest, LowerErrorPropagates) {
  const std::vector<std::byte> image = pattern_bytes(10000, 13);
  TarWriter tar;
  tar.header({.name = "f", .size = image.size()});
  tar.data(image);
  tar.finish();
  auto faulty =
      std::make_unique<FaultySource>(std::make_unique<MemorySource>(tar.bytes()), 512 + 4096, 1);
  auto opened = open_tar_member(std::move(faulty));
  ASSERT_TRUE(opened.ok());
  std::vector<std::byte> out(100);
  Status s = (*opened)->read_at(4050, out);
  EXPECT_EQ(StatusCode::kIOError, s.code());
  EXPECT_NE(std::string::npos, s.message().find("tar member f"));
  expect_read(**opened, image, 4097, 100);
  auto faulty_header =
      std::make_unique<FaultySource>(std::make_unique<MemorySource>(tar.bytes()), 0, 1);
  EXPECT_EQ(StatusCode::kIOError, open_tar_member(std::move(faulty_header)).status().code());
}

TEST(TarMemberSourceTest, ConcurrentReadersOnSparseMember) {
  std::vector<TarSparseEntry> entries;
  for (uint64_t i = 0; i < 30; ++i) entries.push_back({i * 10007 + 13, 3000 + i});
  SparseFixture f = make_sparse(310000, entries);
  auto opened = open_bytes(f.tar);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  const BlockSource& source = **opened;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<std::byte> out;
      for (int i = 0; i < 300; ++i) {
        const uint64_t offset = rng() % f.expanded.size();
        const uint64_t size = rng() % std::min<uint64_t>(f.expanded.size() - offset + 1, 50000);
        out.resize(size);
        if (!source.read_at(offset, out).ok() ||
            (size > 0 && std::memcmp(out.data(), f.expanded.data() + offset, size) != 0)) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(0, failures.load());
}

// Cross-check against GNU tar, where it is installed: plain, long-name, posix and sparse members.
class GnuTarTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::system("tar --version 2>/dev/null | grep -q 'GNU tar'") != 0) {
      GTEST_SKIP() << "GNU tar not available";
    }
    char dir_template[] = "/tmp/imgfs_tar_test_XXXXXX";
    ASSERT_NE(nullptr, mkdtemp(dir_template));
    dir_ = dir_template;
  }
  void TearDown() override {
    if (!dir_.empty()) {
      EXPECT_EQ(0, std::system(("rm -rf '" + dir_ + "'").c_str()));
    }
  }
  void write_file(const std::string& name, const std::vector<std::byte>& bytes) {
    std::ofstream out(dir_ + "/" + name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
  }
  std::vector<std::byte> run_tar(const std::string& args) {
    const std::string command =
        "cd '" + dir_ + "' && tar " + args + " -cf out.tar " + " 2>/dev/null";
    EXPECT_EQ(0, std::system(command.c_str())) << command;
    std::ifstream in(dir_ + "/out.tar", std::ios::binary);
    std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> bytes(chars.size());
    std::memcpy(bytes.data(), chars.data(), chars.size());
    return bytes;
  }
  std::string dir_;
};

TEST_F(GnuTarTest, PlainLongNameAndPosix) {
  const std::string long_name(130, 'n');
  const std::vector<std::byte> image = pattern_bytes(100003, 30);
  write_file(long_name, image);
  for (const std::string format : {"gnu", "posix", "ustar", "v7"}) {
    if (format == "ustar" || format == "v7") write_file("short.img", image);
    const std::string member = format == "ustar" || format == "v7" ? "short.img" : long_name;
    auto opened = open_bytes(run_tar("--format=" + format + " " + member));
    ASSERT_TRUE(opened.ok()) << format << ": " << opened.status().to_string();
    EXPECT_EQ(member, (*opened)->member_name()) << format;
    check_reads(**opened, image);
  }
}

TEST_F(GnuTarTest, SparseGnuAndPosix) {
  // A file with holes made by seeking; tar -S finds them with SEEK_HOLE where the filesystem
  // keeps holes, and stores a dense map otherwise: both must read back the same bytes.
  std::vector<std::byte> expanded(3 << 20, std::byte{0});
  const std::vector<std::byte> run = pattern_bytes(70000, 31);
  std::copy(run.begin(), run.end(), expanded.begin() + (1 << 20));
  {
    std::ofstream out(dir_ + "/sparse.img", std::ios::binary);
    out.seekp(1 << 20);
    out.write(reinterpret_cast<const char*>(run.data()), static_cast<std::streamsize>(run.size()));
  }
  ASSERT_EQ(0, truncate((dir_ + "/sparse.img").c_str(), 3 << 20));
  auto opened = open_bytes(run_tar("--format=gnu -S sparse.img"));
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  check_reads(**opened, expanded, {1 << 20, (1 << 20) + 70000});
  // tar -S finds the leading 1 MiB of zeros either through SEEK_HOLE or by scanning.
  auto extent = (*opened)->map(0);
  ASSERT_TRUE(extent.ok());
  EXPECT_EQ(Extent::Kind::kZero, extent->kind);
  // The posix format writes a pax GNU.sparse.* member when the file has holes; otherwise it is a
  // plain member. Either way we never return wrong bytes.
  auto posix = open_bytes(run_tar("--format=posix -S sparse.img"));
  if (posix.ok()) {
    check_reads(**posix, expanded);
  } else {
    EXPECT_EQ(StatusCode::kNotSupported, posix.status().code());
  }
}

}  // namespace
}  // namespace imgfs::formats
