#include "formats/vhd_source.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "formats/byte_order.h"
#include "formats/memory_source.h"
#include "tests/support/file_fixtures.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

using testing::CountingSource;
using testing::pattern_bytes;
using testing::read_file;
using testing::run_in;

namespace fs = std::filesystem;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kBlock = 2 * kMiB;  // qemu's VHD block size
// Not a multiple of the block size; a whole number of sectors, as VHD sizes are.
constexpr uint64_t kRawSize = 9 * kMiB + 3584;

// Writes a sparse raw disk of `size` bytes: data runs (from `seed`), written zeros, and holes
// never written, at odd offsets; whole 2 MiB blocks [4 MiB, 6 MiB) and [6 MiB + 2 KiB, 9 MiB -
// 5000) hold no data so qemu leaves blocks unallocated.
void write_raw(const fs::path& path, uint32_t seed) {
  const std::vector<std::byte> data = pattern_bytes(kRawSize, seed);
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  ASSERT_GE(fd, 0);
  auto put = [&](uint64_t begin, uint64_t end, bool zeros) {
    std::vector<std::byte> chunk(data.begin() + begin, data.begin() + end);
    if (zeros) std::fill(chunk.begin(), chunk.end(), std::byte{0});
    ASSERT_EQ(::pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(begin)),
              static_cast<ssize_t>(chunk.size()));
  };
  put(0, 100000, false);
  put(100000, 1572864 + 777, true);
  put(1572864 + 777, 2 * kMiB + 4097, false);  // crosses the first block boundary
  put(3 * kMiB + 13, 3 * kMiB + 70000, false);
  put(6 * kMiB + 1536, 6 * kMiB + 2560, false);
  put(9 * kMiB - 5000, kRawSize - 1000, false);  // crosses 8 MiB's block into the tail
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(kRawSize)), 0);  // ends in a hole
  ::close(fd);
}

// One temp folder per test process with base.raw; images are made on first use.
class VhdFixture {
 public:
  static VhdFixture& get() {
    static VhdFixture fixture;
    return fixture;
  }

  const fs::path& dir() const { return dir_; }

  // `name` made by `command` (run in the folder) once.
  fs::path make(const std::string& name, const std::string& command) {
    const fs::path path = dir_ / name;
    if (!fs::exists(path)) {
      EXPECT_TRUE(run_in(dir_, command)) << command;
    }
    return path;
  }

  // The image made from base.raw with qemu-img convert `options`, and qemu's raw view of it.
  std::pair<std::vector<std::byte>, std::vector<std::byte>> image_and_oracle(
      const std::string& name, const std::string& options) {
    make(name, "qemu-img convert -f raw -O vpc " + options + " base.raw " + name);
    make(name + ".raw", "qemu-img convert -f vpc -O raw " + name + " " + name + ".raw");
    return {read_file(dir_ / name), read_file(dir_ / (name + ".raw"))};
  }

 private:
  VhdFixture() {
    dir_ = fs::path(::testing::TempDir()) / ("imgfs_vhd_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    write_raw(dir_ / "base.raw", 1);
  }
  ~VhdFixture() {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  fs::path dir_;
};

std::unique_ptr<BlockSource> open_ok(std::vector<std::byte> file, const VhdOptions& options = {}) {
  Result<std::unique_ptr<BlockSource>> r =
      open_vhd(std::make_unique<MemorySource>(std::move(file), "file"), options);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(*r) : nullptr;
}

Status open_status(std::vector<std::byte> file, const VhdOptions& options = {}) {
  return open_vhd(std::make_unique<MemorySource>(std::move(file), "file"), options).status();
}

void expect_range(const BlockSource& source, const std::vector<std::byte>& oracle, uint64_t offset,
                  uint64_t length) {
  std::vector<std::byte> out(length);
  Status s = source.read_at(offset, out);
  ASSERT_TRUE(s.ok()) << s.to_string() << " at " << offset << "+" << length;
  ASSERT_TRUE(std::equal(out.begin(), out.end(), oracle.begin() + offset))
      << "mismatch at " << offset << "+" << length;
}

// Reads at 0, the end, across every block boundary, at random, and the whole disk.
void expect_matches(const BlockSource& source, const std::vector<std::byte>& oracle) {
  ASSERT_EQ(source.size(), oracle.size());
  expect_range(source, oracle, 0, 1);
  expect_range(source, oracle, 0, 4096);
  expect_range(source, oracle, oracle.size() - 1, 1);
  expect_range(source, oracle, oracle.size() - 7777, 7777);
  for (uint64_t b = kBlock; b < oracle.size(); b += kBlock) {
    expect_range(source, oracle, b - 1, 2);
    expect_range(source, oracle, b - 3000, 5001);
  }
  std::mt19937_64 rng(7);
  for (int i = 0; i < 200; ++i) {
    const uint64_t length = 1 + rng() % 300000;
    const uint64_t offset = rng() % (oracle.size() - length + 1);
    expect_range(source, oracle, offset, length);
  }
  EXPECT_EQ(testing::read_all(source), oracle);
}

// Walks map() over the whole disk: the runs tile it and every zero run reads as zeros.
std::vector<std::pair<Extent::Kind, uint64_t>> expect_map_consistent(
    const BlockSource& source, const std::vector<std::byte>& oracle) {
  std::vector<std::pair<Extent::Kind, uint64_t>> runs;
  uint64_t offset = 0;
  while (offset < source.size()) {
    Result<Extent> e = source.map(offset);
    EXPECT_TRUE(e.ok()) << e.status().to_string();
    if (!e.ok()) break;
    EXPECT_GT(e->length, 0u);
    EXPECT_LE(e->length, source.size() - offset);
    if (e->length == 0) break;
    if (e->kind == Extent::Kind::kZero) {
      EXPECT_TRUE(std::all_of(oracle.begin() + offset, oracle.begin() + offset + e->length,
                              [](std::byte b) { return b == std::byte{0}; }))
          << "zero run at " << offset << " holds data";
    }
    runs.emplace_back(e->kind, offset);
    offset += e->length;
  }
  EXPECT_EQ(offset, source.size());
  EXPECT_FALSE(source.map(source.size()).ok());
  return runs;
}

bool is_zero_at(const std::vector<std::pair<Extent::Kind, uint64_t>>& runs, uint64_t offset) {
  auto it = std::upper_bound(runs.begin(), runs.end(), offset,
                             [](uint64_t o, const auto& run) { return o < run.second; });
  return std::prev(it)->first == Extent::Kind::kZero;
}

uint32_t checksum(std::span<const std::byte> bytes, size_t at) {
  uint32_t sum = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (i < at || i >= at + 4) sum += std::to_integer<uint32_t>(bytes[i]);
  }
  return ~sum;
}

void fix_footer_checksum(std::byte* footer) {
  store_be32(footer + 64, checksum(std::span<const std::byte>(footer, 512), 64));
}
void fix_header_checksum(std::byte* header) {
  store_be32(header + 36, checksum(std::span<const std::byte>(header, 1024), 36));
}

struct Variant {
  const char* name;
  const char* options;
  bool fixed;
};

const Variant kVariants[] = {
    {"dynamic.vhd", "-o subformat=dynamic", false},
    {"dynamic_force.vhd", "-o subformat=dynamic,force_size=on", false},
    {"fixed.vhd", "-o subformat=fixed", true},
    {"fixed_force.vhd", "-o subformat=fixed,force_size=on", true},
};

TEST(VhdSourceTest, EveryVariantMatchesQemu) {
  for (const Variant& v : kVariants) {
    SCOPED_TRACE(v.name);
    auto [file, oracle] = VhdFixture::get().image_and_oracle(v.name, v.options);
    std::unique_ptr<BlockSource> source = open_ok(file);
    ASSERT_NE(source, nullptr);
    expect_matches(*source, oracle);
    EXPECT_EQ(source->describe(), "vhd(file(" + std::to_string(file.size()) + " bytes))");
    EXPECT_EQ(source->block_size(), v.fixed ? 512u : kBlock);
  }
}

TEST(VhdSourceTest, VirtualSizeIsCurrentSize) {
  auto [plain, plain_oracle] =
      VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  auto [forced, forced_oracle] =
      VhdFixture::get().image_and_oracle("dynamic_force.vhd", "-o subformat=dynamic,force_size=on");
  // force_size keeps the raw size; without it qemu rounds up to a CHS geometry.
  EXPECT_EQ(open_ok(forced)->size(), kRawSize);
  EXPECT_GT(open_ok(plain)->size(), kRawSize);
  EXPECT_EQ(open_ok(plain)->size(), plain_oracle.size());
}

TEST(VhdSourceTest, MapAgreesWithAllocation) {
  for (const Variant& v : kVariants) {
    SCOPED_TRACE(v.name);
    auto [file, oracle] = VhdFixture::get().image_and_oracle(v.name, v.options);
    std::unique_ptr<BlockSource> source = open_ok(file);
    ASSERT_NE(source, nullptr);
    const auto runs = expect_map_consistent(*source, oracle);
    if (v.fixed) {
      ASSERT_EQ(runs.size(), 1u);
      EXPECT_EQ(runs[0].first, Extent::Kind::kData);
      continue;
    }
    // Blocks 2 ([4, 6) MiB) and 3 ([6, 8) MiB) differ: 2 holds nothing, 3 holds 1 KiB.
    EXPECT_TRUE(is_zero_at(runs, 4 * kMiB));
    EXPECT_TRUE(is_zero_at(runs, 6 * kMiB - 1));
    EXPECT_FALSE(is_zero_at(runs, 6 * kMiB + 1536));
    EXPECT_FALSE(is_zero_at(runs, 0));
    EXPECT_FALSE(is_zero_at(runs, 2 * kMiB));
  }
}

TEST(VhdSourceTest, ConcurrentReadersWithATinyBitmapCache) {
  // Named variables, not structured bindings: clang 14 cannot capture those in a lambda.
  const auto image = VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  const std::vector<std::byte>& file = image.first;
  const std::vector<std::byte>& oracle = image.second;
  VhdOptions options;
  options.bitmap_cache_bytes = 512;  // one bitmap: readers keep evicting each other's
  std::unique_ptr<BlockSource> source = open_ok(file, options);
  ASSERT_NE(source, nullptr);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int i = 0; i < 150; ++i) {
        const uint64_t length = 1 + rng() % 70000;
        const uint64_t offset = rng() % (oracle.size() - length + 1);
        std::vector<std::byte> out(length);
        if (!source->read_at(offset, out).ok() ||
            !std::equal(out.begin(), out.end(), oracle.begin() + offset)) {
          ++failures;
        }
        if (!source->map(offset).ok()) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(VhdSourceTest, ColdReadCostsABitmapAndOneDataFetch) {
  auto [file, oracle] = VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  auto counting = std::make_unique<CountingSource>(std::make_unique<MemorySource>(file));
  const CountingSource* counter = counting.get();
  Result<std::unique_ptr<BlockSource>> source = open_vhd(std::move(counting), {});
  ASSERT_TRUE(source.ok());
  const uint64_t opened_reads = counter->reads();
  EXPECT_LE(opened_reads, 5u);  // head, tail, dynamic header, BAT
  expect_range(**source, oracle, 3 * kMiB + 5000, 4096);
  EXPECT_EQ(counter->reads() - opened_reads, 2u);
  expect_range(**source, oracle, 2 * kMiB + 100, 4096);  // same block: bitmap cached
  EXPECT_EQ(counter->reads() - opened_reads, 3u);
  expect_range(**source, oracle, 4 * kMiB + 100, 4096);  // unallocated: no fetch
  EXPECT_EQ(counter->reads() - opened_reads, 3u);
}

TEST(VhdSourceTest, ProbeFindsHeadAndTailFooters) {
  auto [dynamic, unused1] =
      VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  auto [fixed, unused2] = VhdFixture::get().image_and_oracle("fixed.vhd", "-o subformat=fixed");
  const std::span<const std::byte> d(dynamic), f(fixed);
  EXPECT_EQ(probe_vhd(d.first(4096), d.last(512)), 100);
  EXPECT_EQ(probe_vhd(d.first(4096), {}), 100);
  EXPECT_EQ(probe_vhd(f.first(4096), f.last(512)), 100);
  EXPECT_EQ(probe_vhd(f.first(4096), {}), 0);
  std::vector<std::byte> bad_tail(f.last(512).begin(), f.last(512).end());
  bad_tail[100] ^= std::byte{1};
  EXPECT_EQ(probe_vhd(f.first(4096), bad_tail), 0);
  const std::vector<std::byte> raw = pattern_bytes(8192);
  EXPECT_EQ(probe_vhd(raw, std::span<const std::byte>(raw).last(512)), 0);
  EXPECT_EQ(probe_vhd({}, {}), 0);
}

TEST(VhdSourceTest, ParsersDecodeQemuImages) {
  auto [file, oracle] =
      VhdFixture::get().image_and_oracle("dynamic_force.vhd", "-o subformat=dynamic,force_size=on");
  Result<VhdFooter> footer = parse_vhd_footer(file);
  ASSERT_TRUE(footer.ok()) << footer.status().to_string();
  EXPECT_EQ(footer->disk_type, VhdDiskType::kDynamic);
  EXPECT_EQ(footer->current_size, kRawSize);
  EXPECT_EQ(footer->creator_app, "qem2");
  Result<VhdDynamicHeader> header = parse_vhd_dynamic_header(
      std::span<const std::byte>(file).subspan(footer->data_offset), file.size());
  ASSERT_TRUE(header.ok()) << header.status().to_string();
  EXPECT_EQ(header->block_size, kBlock);
  EXPECT_EQ(header->bitmap_bytes(), 512u);
  Result<std::vector<uint32_t>> bat =
      parse_vhd_bat(std::span<const std::byte>(file).subspan(header->table_offset), *header,
                    kRawSize, file.size());
  ASSERT_TRUE(bat.ok()) << bat.status().to_string();
  ASSERT_EQ(bat->size(), 5u);
  EXPECT_EQ((*bat)[2], kVhdUnallocated);
  EXPECT_NE((*bat)[0], kVhdUnallocated);
  EXPECT_NE((*bat)[3], kVhdUnallocated);
}

TEST(VhdSourceTest, BadChecksumsAreCorruption) {
  auto [file, oracle] = VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  {
    std::vector<std::byte> bad = file;
    bad[48 + 7] ^= std::byte{0x02};  // current_size in the copy at offset 0
    Status s = open_status(bad);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
    EXPECT_NE(s.message().find("checksum"), std::string::npos) << s.to_string();
  }
  {
    std::vector<std::byte> bad = file;
    bad[512 + 32 + 3] ^= std::byte{0x01};  // block_size in the dynamic header
    Status s = open_status(bad);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
    EXPECT_NE(s.message().find("dynamic header: checksum"), std::string::npos) << s.to_string();
  }
  auto [fixed, fixed_oracle] =
      VhdFixture::get().image_and_oracle("fixed.vhd", "-o subformat=fixed");
  {
    std::vector<std::byte> bad = fixed;
    bad[bad.size() - 512 + 60 + 3] ^= std::byte{0x01};  // disk type
    Status s = open_status(bad);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
  }
}

TEST(VhdSourceTest, BadCookiesAndFieldsAreRefused) {
  auto [file, oracle] = VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  {
    std::vector<std::byte> bad = file;
    bad[0] = std::byte{'C'};  // the copy at offset 0 loses its cookie: only a dynamic tail remains
    EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  }
  {
    std::vector<std::byte> bad = file;
    bad[512] = std::byte{'X'};  // "cxsparse"
    Status s = open_status(bad);
    EXPECT_EQ(s.code(), StatusCode::kCorruption);
    EXPECT_NE(s.message().find("cxsparse"), std::string::npos) << s.to_string();
  }
  {
    std::vector<std::byte> bad = file;
    store_be32(bad.data() + 512 + 28, 2);  // max_table_entries too small for the disk
    fix_header_checksum(bad.data() + 512);
    Status s = open_status(bad);
    EXPECT_EQ(s.code(), StatusCode::kCorruption);
    EXPECT_NE(s.message().find("max_table_entries"), std::string::npos) << s.to_string();
  }
  {
    std::vector<std::byte> bad = file;
    store_be32(bad.data() + 512 + 32, 3 * 1000 * 1000);  // not a power of two
    fix_header_checksum(bad.data() + 512);
    EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  }
  {
    std::vector<std::byte> bad = file;
    store_be64(bad.data() + 16, file.size() - 100);  // data_offset: header past the end
    fix_footer_checksum(bad.data());
    EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  }
  {
    std::vector<std::byte> bad = file;
    store_be32(bad.data() + 60, 7);  // unknown disk type
    fix_footer_checksum(bad.data());
    EXPECT_EQ(open_status(bad).code(), StatusCode::kCorruption);
  }
  const std::vector<std::byte> raw = pattern_bytes(64 * 1024);
  EXPECT_EQ(open_status(raw).code(), StatusCode::kCorruption);
  EXPECT_EQ(open_status(std::vector<std::byte>(100)).code(), StatusCode::kCorruption);
  EXPECT_EQ(open_vhd(nullptr, {}).status().code(), StatusCode::kInvalidArgument);
}

TEST(VhdSourceTest, BatEntryPastTheEndIsCorruption) {
  auto [file, oracle] = VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  Result<VhdFooter> footer = parse_vhd_footer(file);
  ASSERT_TRUE(footer.ok());
  const uint64_t table_offset = load_be64(file.data() + footer->data_offset + 16);
  for (uint32_t sector : {static_cast<uint32_t>(file.size() / 512 - 10), 0xFFFFFFF0u}) {
    std::vector<std::byte> bad = file;
    store_be32(bad.data() + table_offset + 4 * 3, sector);
    Status s = open_status(bad);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
    EXPECT_NE(s.message().find("BAT entry 3"), std::string::npos) << s.to_string();
  }
}

TEST(VhdSourceTest, TruncatedFilesAreRefused) {
  for (const Variant& v : kVariants) {
    SCOPED_TRACE(v.name);
    auto [file, oracle] = VhdFixture::get().image_and_oracle(v.name, v.options);
    for (uint64_t cut : {uint64_t{1}, uint64_t{512}, uint64_t{kMiB}, file.size() - 1000}) {
      std::vector<std::byte> bad(file.begin(), file.end() - static_cast<ptrdiff_t>(cut));
      Status s = open_status(bad);
      EXPECT_FALSE(s.ok()) << "cut " << cut;
    }
  }
}

TEST(VhdSourceTest, ReadErrorsPropagate) {
  auto [file, oracle] = VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  Result<VhdFooter> footer = parse_vhd_footer(file);
  ASSERT_TRUE(footer.ok());
  const uint64_t table_offset = load_be64(file.data() + footer->data_offset + 16);
  const uint64_t block1 = uint64_t{load_be32(file.data() + table_offset + 4)} * 512;
  auto faulty = std::make_unique<testing::FaultySource>(std::make_unique<MemorySource>(file),
                                                        block1 + 512 + 1000, 1);
  Result<std::unique_ptr<BlockSource>> source = open_vhd(std::move(faulty), {});
  ASSERT_TRUE(source.ok()) << source.status().to_string();
  std::vector<std::byte> out(4096);
  EXPECT_TRUE((*source)->read_at(kBlock + 8192, out).ok());
  Status s = (*source)->read_at(kBlock, out);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("vhd("), std::string::npos) << s.to_string();
  EXPECT_EQ((*source)->read_at((*source)->size() - 10, out).code(), StatusCode::kInvalidArgument);
}

TEST(VhdSourceTest, ParentNamesStayBesideTheImage) {
  EXPECT_EQ(*vhd_relative_parent_name(".\\parent.vhd"), "parent.vhd");
  EXPECT_EQ(*vhd_relative_parent_name("sub\\dir\\p.vhd"), "sub/dir/p.vhd");
  EXPECT_EQ(*vhd_relative_parent_name("p.vhd"), "p.vhd");
  EXPECT_EQ(vhd_relative_parent_name("..\\p.vhd").status().code(), StatusCode::kNotSupported);
  EXPECT_EQ(vhd_relative_parent_name("a\\..\\..\\p.vhd").status().code(),
            StatusCode::kNotSupported);
  EXPECT_EQ(vhd_relative_parent_name("C:\\vms\\p.vhd").status().code(), StatusCode::kNotSupported);
  EXPECT_EQ(vhd_relative_parent_name("\\p.vhd").status().code(), StatusCode::kNotSupported);
  EXPECT_EQ(vhd_relative_parent_name("").status().code(), StatusCode::kCorruption);
  EXPECT_EQ(vhd_relative_parent_name(".\\").status().code(), StatusCode::kCorruption);
  const std::byte le[] = {std::byte{'a'}, std::byte{0}, std::byte{0xAC}, std::byte{0x20},
                          std::byte{0},   std::byte{0}, std::byte{'z'},  std::byte{0}};
  EXPECT_EQ(*vhd_utf16_to_utf8(le, /*big_endian=*/false), "a\xE2\x82\xAC");
  const std::byte lone_surrogate[] = {std::byte{0x00}, std::byte{0xD8}};
  EXPECT_FALSE(vhd_utf16_to_utf8(lone_surrogate, false).ok());
  EXPECT_FALSE(vhd_utf16_to_utf8(std::span<const std::byte>(le, 3), false).ok());
}

// qemu-img cannot make differencing VHDs ("Backing file not supported for file format 'vpc'"),
// so the test turns a qemu-made dynamic VHD of other data into a child of the first: disk type 4,
// parent_uuid, the parent's name (UTF-16BE), a W2ru locator (UTF-16LE ".\parent.vhd") put in
// front of the end footer, and some sector bits cleared so those sectors come from the parent.
class VhdDifferencingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    VhdFixture& fx = VhdFixture::get();
    parent_ = fx.image_and_oracle("dynamic_force.vhd", "-o subformat=dynamic,force_size=on").first;
    parent_raw_ = read_file(fx.dir() / "base.raw");
    if (!fs::exists(fx.dir() / "child_src.raw")) write_raw(fx.dir() / "child_src.raw", 2);
    fx.make("child.vhd",
            "qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on child_src.raw "
            "child.vhd");
    const std::vector<std::byte> child_raw = read_file(fx.dir() / "child_src.raw");
    child_ = read_file(fx.dir() / "child.vhd");

    const std::vector<std::byte> locator = utf16(".\\parent.vhd", /*big_endian=*/false);
    std::vector<std::byte> footer(child_.end() - 512, child_.end());
    child_.resize(child_.size() - 512);
    const uint64_t locator_offset = child_.size();
    child_.insert(child_.end(), locator.begin(), locator.end());
    child_.resize(child_.size() + (512 - locator.size() % 512) % 512);
    child_.insert(child_.end(), footer.begin(), footer.end());

    store_be32(child_.data() + 60, 4);
    fix_footer_checksum(child_.data());
    std::byte* tail = child_.data() + child_.size() - 512;
    store_be32(tail + 60, 4);
    fix_footer_checksum(tail);

    std::byte* header = child_.data() + 512;
    std::memcpy(header + 40, parent_.data() + 68, 16);  // parent_uuid = parent's unique id
    const std::vector<std::byte> name = utf16("parent.vhd", /*big_endian=*/true);
    std::memcpy(header + 64, name.data(), name.size());
    std::byte* loc = header + 576;
    store_be32(loc, kVhdPlatformW2ru);
    store_be32(loc + 4, 512);
    store_be32(loc + 8, static_cast<uint32_t>(locator.size()));
    store_be64(loc + 16, locator_offset);
    fix_header_checksum(header);

    // Clear the bits of sectors [16, 48) and 200 of block 0, so they come from the parent.
    const uint64_t table_offset = load_be64(header + 16);
    const uint64_t bitmap0 = uint64_t{load_be32(child_.data() + table_offset)} * 512;
    ASSERT_NE(load_be32(child_.data() + table_offset), kVhdUnallocated);
    child_[bitmap0 + 2] = std::byte{0};
    child_[bitmap0 + 3] = std::byte{0};
    child_[bitmap0 + 4] = std::byte{0};
    child_[bitmap0 + 5] = std::byte{0};
    child_[bitmap0 + 200 / 8] &= ~std::byte{0x80};

    // Expected: a block the child left unallocated (no data in child_src) comes from the parent.
    expected_ = child_raw;
    for (uint64_t b = 0; b < kRawSize; b += kBlock) {
      const uint64_t end = std::min(kRawSize, b + kBlock);
      if (std::all_of(child_raw.begin() + b, child_raw.begin() + end,
                      [](std::byte x) { return x == std::byte{0}; })) {
        std::copy(parent_raw_.begin() + b, parent_raw_.begin() + end, expected_.begin() + b);
      }
    }
    for (uint64_t s = 16; s <= 200; s = (s == 47 ? 200 : s + 1)) {
      std::copy(parent_raw_.begin() + s * 512, parent_raw_.begin() + (s + 1) * 512,
                expected_.begin() + s * 512);
    }
  }

  static std::vector<std::byte> utf16(std::string_view ascii, bool big_endian) {
    std::vector<std::byte> out;
    for (char c : ascii) {
      out.push_back(big_endian ? std::byte{0} : static_cast<std::byte>(c));
      out.push_back(big_endian ? static_cast<std::byte>(c) : std::byte{0});
    }
    return out;
  }

  // open_sibling over a map of names to file bytes; records the names asked for.
  VhdOptions options_with(std::map<std::string, std::vector<std::byte>> files) {
    VhdOptions options;
    options.open_sibling = [files = std::move(files),
                            this](std::string_view name) -> Result<std::unique_ptr<BlockSource>> {
      asked_.emplace_back(name);
      auto it = files.find(std::string(name));
      if (it == files.end()) return Status::NotFound("no sibling " + std::string(name));
      return std::unique_ptr<BlockSource>(std::make_unique<MemorySource>(it->second, it->first));
    };
    return options;
  }

  std::vector<std::byte> parent_, parent_raw_, child_, expected_;
  std::vector<std::string> asked_;
};

TEST_F(VhdDifferencingTest, ReadsThroughToTheParent) {
  std::unique_ptr<BlockSource> source = open_ok(child_, options_with({{"parent.vhd", parent_}}));
  ASSERT_NE(source, nullptr);
  EXPECT_EQ(asked_, std::vector<std::string>{"parent.vhd"});
  const auto* vhd = dynamic_cast<const VhdSource*>(source.get());
  ASSERT_NE(vhd, nullptr);
  EXPECT_EQ(vhd->footer().disk_type, VhdDiskType::kDifferencing);
  ASSERT_NE(vhd->parent(), nullptr);
  expect_matches(*source, expected_);
  const auto runs = expect_map_consistent(*source, expected_);
  // The child's unallocated block 2 takes the parent's map: also unallocated, so zeros.
  EXPECT_TRUE(is_zero_at(runs, 4 * kMiB + 10));
  EXPECT_FALSE(is_zero_at(runs, 16 * 512));
}

TEST_F(VhdDifferencingTest, FallsBackToTheParentNameAndNeedsTheRightParent) {
  // The W2ru locator names a missing file: the unicode name is tried next.
  std::vector<std::byte> moved = child_;
  std::byte* header = moved.data() + 512;
  const std::vector<std::byte> locator = utf16("other.vhd", false);
  std::memcpy(moved.data() + load_be64(header + 576 + 16), locator.data(), locator.size());
  store_be32(header + 576 + 8, static_cast<uint32_t>(locator.size()));
  fix_header_checksum(header);
  std::unique_ptr<BlockSource> source = open_ok(moved, options_with({{"parent.vhd", parent_}}));
  ASSERT_NE(source, nullptr);
  EXPECT_EQ(asked_, (std::vector<std::string>{"other.vhd", "parent.vhd"}));
  expect_range(*source, expected_, 0, 300000);

  Status missing = open_status(child_, options_with({}));
  EXPECT_EQ(missing.code(), StatusCode::kNotFound) << missing.to_string();
  EXPECT_NE(missing.message().find("parent.vhd"), std::string::npos) << missing.to_string();

  Status no_opener = open_status(child_);
  EXPECT_EQ(no_opener.code(), StatusCode::kNotSupported) << no_opener.to_string();
  EXPECT_NE(no_opener.message().find("parent.vhd"), std::string::npos);

  // A parent with another unique id would give wrong bytes.
  auto [other, unused] = VhdFixture::get().image_and_oracle("dynamic.vhd", "-o subformat=dynamic");
  Status wrong = open_status(child_, options_with({{"parent.vhd", other}}));
  EXPECT_EQ(wrong.code(), StatusCode::kCorruption) << wrong.to_string();

  VhdOptions shallow = options_with({{"parent.vhd", parent_}});
  shallow.max_chain_depth = 1;
  EXPECT_EQ(open_status(child_, shallow).code(), StatusCode::kNotSupported);
}

TEST_F(VhdDifferencingTest, ACycleIsCorruption) {
  // The child names itself as its parent.
  std::vector<std::byte> self = child_;
  std::byte* header = self.data() + 512;
  std::memcpy(header + 40, self.data() + 68, 16);
  fix_header_checksum(header);
  Status s = open_status(self, options_with({{"parent.vhd", self}}));
  EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
  EXPECT_NE(s.message().find("cycle"), std::string::npos) << s.to_string();
}

TEST_F(VhdDifferencingTest, ParentOutsideTheFolderIsNotOpened) {
  std::vector<std::byte> up = child_;
  std::byte* header = up.data() + 512;
  const uint64_t locator_offset = load_be64(header + 576 + 16);
  const std::vector<std::byte> locator = utf16("..\\parent.vhd", false);
  std::memcpy(up.data() + locator_offset, locator.data(), locator.size());
  store_be32(header + 576 + 8, static_cast<uint32_t>(locator.size()));
  std::fill(header + 64, header + 64 + 512, std::byte{0});  // no unicode name to fall back on
  fix_header_checksum(header);
  Status s = open_status(up, options_with({{"parent.vhd", parent_}}));
  EXPECT_EQ(s.code(), StatusCode::kNotSupported) << s.to_string();
  EXPECT_TRUE(asked_.empty());
}

}  // namespace
}  // namespace imgfs::formats
