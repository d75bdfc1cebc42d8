#include "formats/vmdk_source.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>

#include "formats/byte_order.h"
#include "formats/memory_source.h"
#include "tests/support/test_sources.h"

namespace imgfs::formats {
namespace {

namespace fs = std::filesystem;
using imgfs::testing::CountingSource;
using imgfs::testing::FaultySource;
using imgfs::testing::pattern_bytes;
using imgfs::testing::read_all;

using Bytes = std::vector<std::byte>;

// 6 MiB + 3 sectors: the last 64 KiB grain is partial.
constexpr uint64_t kBaseSize = (6ull << 20) + 3 * 512;
constexpr uint64_t kGrain = 64 * 1024;

Bytes read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  Bytes bytes(fs::file_size(path));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return bytes;
}

void write_file(const fs::path& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

Bytes text_bytes(const std::string& text) {
  Bytes bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

int run(const std::string& command) { return std::system((command + " >/dev/null 2>&1").c_str()); }

// Data, explicit zero runs and holes at odd offsets, including both ends of the disk.
Bytes make_base() {
  Bytes base(kBaseSize);
  const Bytes pattern = pattern_bytes(kBaseSize, 11);
  const std::pair<uint64_t, uint64_t> data_runs[] = {{0, 200003},
                                                     {262141, 70000},
                                                     {1048573, 400001},
                                                     {2 * kGrain - 7, 14},
                                                     {2000001, 1000000},
                                                     {3500000, 1},
                                                     {4 * 1048576 + 3, 65536 * 3 + 11},
                                                     {kBaseSize - 70001, 70001}};
  for (auto [start, length] : data_runs) {
    std::memcpy(base.data() + start, pattern.data() + start, length);
  }
  // A written zero run inside data (qemu keeps it unallocated).
  std::memset(base.data() + 2200000, 0, 150000);
  return base;
}

// Map {start, length, data} from `qemu-img map --output=json`.
struct QemuRun {
  uint64_t start, length;
  bool data;
};

std::vector<QemuRun> qemu_map(const fs::path& image) {
  const fs::path out = image.string() + ".map.json";
  EXPECT_EQ(0, run("qemu-img map --output=json '" + image.string() + "' > '" + out.string() + "'"));
  std::ifstream in(out);
  std::vector<QemuRun> runs;
  std::string line;
  while (std::getline(in, line)) {
    const auto field = [&](const std::string& name) {
      const size_t at = line.find("\"" + name + "\": ");
      return at == std::string::npos ? std::string() : line.substr(at + name.size() + 4, 20);
    };
    if (field("start").empty()) continue;
    runs.push_back({std::stoull(field("start")), std::stoull(field("length")),
                    field("data").starts_with("true")});
  }
  return runs;
}

// A directory of image files and an open_sibling over it (MemorySources of the files).
struct Fixture {
  fs::path dir;
  std::string image;  // the file the user opens
  Bytes oracle;       // qemu-img convert -O raw

  fs::path path() const { return dir / image; }

  VmdkOptions options() const {
    VmdkOptions options;
    const fs::path d = dir;
    options.open_sibling = [d](std::string_view name) -> Result<std::unique_ptr<BlockSource>> {
      const fs::path p = d / std::string(name);
      if (!fs::exists(p)) return Status::NotFound(std::string(name));
      return std::unique_ptr<BlockSource>(
          std::make_unique<MemorySource>(read_file(p), std::string(name)));
    };
    return options;
  }

  Result<std::unique_ptr<BlockSource>> open() const { return open_bytes(read_file(path())); }
  Result<std::unique_ptr<BlockSource>> open_bytes(Bytes bytes) const {
    return open_vmdk(std::make_unique<MemorySource>(std::move(bytes), image), options());
  }
};

// Removes the fixtures directory after the last test.
class TempRootCleanup : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(fs::path(::testing::TempDir()) / ("vmdk_test_" + std::to_string(getpid())),
                   ignored);
  }
};
const ::testing::Environment* const kCleanup =
    ::testing::AddGlobalTestEnvironment(new TempRootCleanup);

fs::path test_root() {
  static const fs::path root = [] {
    fs::path p = fs::path(::testing::TempDir()) / ("vmdk_test_" + std::to_string(getpid()));
    fs::create_directories(p);
    write_file(p / "base.raw", make_base());
    return p;
  }();
  return root;
}

Bytes oracle_of(const fs::path& image, bool expect_success = true) {
  const fs::path raw = image.string() + ".oracle.raw";
  if (!expect_success) {
    run("qemu-img convert -f vmdk -O raw '" + image.string() + "' '" + raw.string() + "'");
    return {};
  }
  EXPECT_EQ(0,
            run("qemu-img convert -f vmdk -O raw '" + image.string() + "' '" + raw.string() + "'"));
  return read_file(raw);
}

// qemu-img convert of base.raw to `subformat` in its own directory.
Fixture make_fixture(const std::string& subformat, const std::string& extra = "") {
  static std::map<std::string, Fixture> made;
  if (auto it = made.find(subformat + extra); it != made.end()) return it->second;
  Fixture& f = made[subformat + extra];
  f.dir = test_root() / (subformat + extra);
  fs::create_directories(f.dir);
  f.image = "disk.vmdk";
  if (!fs::exists(f.path())) {
    EXPECT_EQ(0, run("cd '" + f.dir.string() +
                     "' && qemu-img convert -f raw -O vmdk -o subformat=" + subformat + extra +
                     " ../base.raw disk.vmdk"));
  }
  f.oracle = oracle_of(f.path());
  return f;
}

void expect_read(const BlockSource& source, const Bytes& ref, uint64_t offset, uint64_t length) {
  Bytes out(length);
  Status s = source.read_at(offset, out);
  ASSERT_TRUE(s.ok()) << s.to_string() << " at " << offset << "+" << length;
  ASSERT_TRUE(length == 0 || std::memcmp(out.data(), ref.data() + offset, length) == 0)
      << source.describe() << " differs at " << offset << "+" << length;
}

// Every byte, both ends, every grain boundary, random ranges, and map() against qemu's map.
void check_against_oracle(const BlockSource& source, const Fixture& f, bool exact_map = true) {
  const Bytes& ref = f.oracle;
  ASSERT_EQ(ref.size(), source.size());
  EXPECT_EQ(ref, read_all(source));
  expect_read(source, ref, 0, 1);
  expect_read(source, ref, ref.size() - 1, 1);
  expect_read(source, ref, ref.size(), 0);
  for (uint64_t b = kGrain; b < ref.size(); b += kGrain) {
    expect_read(source, ref, b - 1, 2);
    expect_read(source, ref, b - 100, std::min<uint64_t>(4096 + 200, ref.size() - (b - 100)));
  }
  std::mt19937_64 rng(5);
  for (int i = 0; i < 200; ++i) {
    const uint64_t offset = rng() % ref.size();
    expect_read(source, ref, offset, rng() % std::min<uint64_t>(300000, ref.size() - offset + 1));
  }
  // map(): zero runs read as zeros; data/zero agree with qemu's "data" flag.
  std::vector<QemuRun> qemu = qemu_map(f.path());
  uint64_t pos = 0;
  while (pos < source.size()) {
    Result<Extent> run = source.map(pos);
    ASSERT_TRUE(run.ok()) << run.status().to_string();
    ASSERT_GT(run->length, 0u);
    ASSERT_LE(run->length, source.size() - pos);
    if (run->kind == Extent::Kind::kZero) {
      for (uint64_t i = pos; i < pos + run->length; ++i) ASSERT_EQ(std::byte{0}, ref[i]) << i;
    }
    for (const QemuRun& q : qemu) {
      const uint64_t lo = std::max(q.start, pos);
      const uint64_t hi = std::min(q.start + q.length, pos + run->length);
      if (lo >= hi) continue;
      if (exact_map || run->kind == Extent::Kind::kZero) {
        EXPECT_EQ(q.data, run->kind == Extent::Kind::kData) << "map at " << lo;
      }
    }
    pos += run->length;
  }
}

void concurrent_reads(const BlockSource& source, const Bytes& ref) {
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int i = 0; i < 150; ++i) {
        const uint64_t offset = rng() % ref.size();
        const uint64_t length = 1 + rng() % std::min<uint64_t>(200000, ref.size() - offset);
        Bytes out(length);
        if (!source.read_at(offset, out).ok() ||
            std::memcmp(out.data(), ref.data() + offset, length) != 0) {
          ++failures;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(0, failures.load());
}

class VmdkSubformatTest : public ::testing::TestWithParam<std::string> {};

TEST_P(VmdkSubformatTest, MatchesQemuConvert) {
  const Fixture f = make_fixture(GetParam());
  Result<std::unique_ptr<BlockSource>> opened = f.open();
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  const BlockSource& source = **opened;
  EXPECT_EQ("vmdk(disk.vmdk(" + std::to_string(fs::file_size(f.path())) + " bytes))",
            source.describe());
  const auto& vmdk = dynamic_cast<const VmdkSource&>(source);
  EXPECT_EQ(GetParam(), vmdk.create_type());
  EXPECT_EQ(1u, vmdk.extent_count());
  const bool sparse =
      GetParam().find("Sparse") != std::string::npos || GetParam() == "streamOptimized";
  EXPECT_EQ(sparse ? kGrain : 512u, source.block_size());
  // The disk is base.raw rounded up to whole sectors.
  EXPECT_EQ(make_base(), Bytes(f.oracle.begin(), f.oracle.begin() + kBaseSize));
  check_against_oracle(source, f);
}

TEST_P(VmdkSubformatTest, ConcurrentReadersWithSmallCaches) {
  const Fixture f = make_fixture(GetParam());
  VmdkOptions options = f.options();
  options.table_cache_bytes = 2048;  // one grain table
  options.grain_cache_bytes = 2 * kGrain;
  Result<std::unique_ptr<BlockSource>> opened =
      open_vmdk(std::make_unique<MemorySource>(read_file(f.path())), options);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  concurrent_reads(**opened, f.oracle);
}

INSTANTIATE_TEST_SUITE_P(QemuSubformats, VmdkSubformatTest,
                         ::testing::Values("monolithicSparse", "streamOptimized", "monolithicFlat",
                                           "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"));

TEST(VmdkSourceTest, ZeroedGrainEntries) {
  Fixture f = make_fixture("monolithicSparse", ",zeroed_grain=on");
  // Zero a data range: qemu stores GTE 1 (zeroed grain) for the grains it covers.
  ASSERT_EQ(0, run("qemu-io -f vmdk -c 'write -z 1048576 262144' '" + f.path().string() + "'"));
  f.oracle = oracle_of(f.path());
  Result<std::unique_ptr<BlockSource>> opened = f.open();
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  check_against_oracle(**opened, f);
  Result<Extent> run = (*opened)->map(1048576);
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(Extent::Kind::kZero, run->kind);
}

TEST(VmdkSourceTest, ColdRandomReadCostsOneTableAndOneDataFetch) {
  for (const std::string subformat : {"monolithicSparse", "streamOptimized"}) {
    const Fixture f = make_fixture(subformat);
    auto counting =
        std::make_unique<CountingSource>(std::make_unique<MemorySource>(read_file(f.path())));
    const CountingSource* counter = counting.get();
    Result<std::unique_ptr<BlockSource>> opened = open_vmdk(std::move(counting), f.options());
    ASSERT_TRUE(opened.ok()) << opened.status().to_string();
    const uint64_t opened_reads = counter->reads();
    EXPECT_LE(opened_reads, 4u) << subformat;
    expect_read(**opened, f.oracle, 1048573 + 5000, 4096);
    EXPECT_EQ(opened_reads + 2, counter->reads()) << subformat;
    // The same grain again: cached (table, and the inflated grain for streamOptimized).
    expect_read(**opened, f.oracle, 1048573 + 5000, 4096);
    const bool compressed = subformat == "streamOptimized";
    EXPECT_EQ(opened_reads + (compressed ? 2 : 3), counter->reads()) << subformat;
  }
}

// ---- Stream-optimized files written by hand, as VMware does (qemu never writes GD_AT_END).

struct StreamLayout {
  Bytes file;
  std::map<uint64_t, uint64_t> grain_offsets;  // grain index -> byte offset of its marker
  uint64_t gd_offset = 0;
  uint64_t first_gt_offset = 0;
};

void put_marker(Bytes* file, uint64_t val, uint32_t size, uint32_t type) {
  Bytes sector(512);
  store_le64(sector.data(), val);
  store_le32(sector.data() + 8, size);
  store_le32(sector.data() + 12, type);
  file->insert(file->end(), sector.begin(), sector.end());
}

void pad_to_sector(Bytes* file) { file->resize((file->size() + 511) / 512 * 512); }

Bytes sparse_header(uint64_t capacity, uint64_t gd_offset, uint32_t flags, uint16_t compress) {
  Bytes h(512);
  std::memcpy(h.data(), "KDMV", 4);
  store_le32(h.data() + 4, 3);
  store_le32(h.data() + 8, flags);
  store_le64(h.data() + 12, capacity);
  store_le64(h.data() + 20, 128);
  store_le64(h.data() + 28, 1);  // descriptor in sector 1
  store_le64(h.data() + 36, 1);
  store_le32(h.data() + 44, 512);
  store_le64(h.data() + 56, gd_offset);
  store_le64(h.data() + 64, 128);
  const char check[] = {'\n', ' ', '\r', '\n'};
  std::memcpy(h.data() + 73, check, 4);
  h[77] = std::byte{static_cast<uint8_t>(compress)};
  return h;
}

// Compressed grains (zlib), GT/GD/footer/EOS markers; GD_AT_END in the header when asked.
StreamLayout build_stream_uncached(const Bytes& disk, bool markers, bool gd_at_end) {
  StreamLayout s;
  const uint64_t capacity = disk.size() / 512;
  const uint64_t grains = (disk.size() + kGrain - 1) / kGrain;
  const uint64_t tables = (grains + 511) / 512;
  const uint32_t flags = 1u | (1u << 16) | (markers ? 1u << 17 : 0);
  s.file = sparse_header(capacity, gd_at_end ? ~uint64_t{0} : 0, flags, 1);
  std::string descriptor =
      "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
      "createType=\"streamOptimized\"\nRW " +
      std::to_string(capacity) + " SPARSE \"disk.vmdk\"\n";
  descriptor.resize(512, '\0');
  const Bytes d = text_bytes(descriptor);
  s.file.insert(s.file.end(), d.begin(), d.end());
  s.file.resize(128 * 512);
  std::vector<uint32_t> gt(tables * 512, 0);
  for (uint64_t g = 0; g < grains; ++g) {
    const uint64_t start = g * kGrain;
    const uint64_t length = std::min(kGrain, disk.size() - start);
    bool zero = true;
    for (uint64_t i = start; i < start + length && zero; ++i) zero = disk[i] == std::byte{0};
    if (zero) continue;
    uLongf out_len = compressBound(length);
    Bytes out(out_len);
    EXPECT_EQ(Z_OK, compress(reinterpret_cast<Bytef*>(out.data()), &out_len,
                             reinterpret_cast<const Bytef*>(disk.data() + start), length));
    s.grain_offsets[g] = s.file.size();
    gt[g] = static_cast<uint32_t>(s.file.size() / 512);
    if (markers) {
      Bytes m(12);
      store_le64(m.data(), g * 128);
      store_le32(m.data() + 8, static_cast<uint32_t>(out_len));
      s.file.insert(s.file.end(), m.begin(), m.end());
    }
    s.file.insert(s.file.end(), out.begin(), out.begin() + out_len);
    pad_to_sector(&s.file);
  }
  std::vector<uint32_t> gd(tables);
  for (uint64_t t = 0; t < tables; ++t) {
    if (markers) put_marker(&s.file, 4, 0, 1);
    if (t == 0) s.first_gt_offset = s.file.size();
    gd[t] = static_cast<uint32_t>(s.file.size() / 512);
    for (uint64_t i = 0; i < 512; ++i) {
      Bytes e(4);
      store_le32(e.data(), gt[t * 512 + i]);
      s.file.insert(s.file.end(), e.begin(), e.end());
    }
  }
  if (markers) put_marker(&s.file, 1, 0, 2);
  s.gd_offset = s.file.size();
  for (uint32_t entry : gd) {
    Bytes e(4);
    store_le32(e.data(), entry);
    s.file.insert(s.file.end(), e.begin(), e.end());
  }
  pad_to_sector(&s.file);
  if (gd_at_end) {
    put_marker(&s.file, 1, 0, 3);
    const Bytes footer = sparse_header(capacity, s.gd_offset / 512, flags, 1);
    s.file.insert(s.file.end(), footer.begin(), footer.end());
    put_marker(&s.file, 0, 0, 0);
  } else {
    store_le64(s.file.data() + 56, s.gd_offset / 512);
    put_marker(&s.file, 0, 0, 0);
  }
  return s;
}

// build_stream_uncached of make_base(), made once per layout (compressing takes a while).
StreamLayout build_stream(bool markers, bool gd_at_end) {
  static std::map<std::pair<bool, bool>, StreamLayout> made;
  auto [it, inserted] = made.try_emplace({markers, gd_at_end});
  if (inserted) it->second = build_stream_uncached(make_base(), markers, gd_at_end);
  return it->second;
}

Fixture stream_fixture(const std::string& name, const Bytes& file, bool qemu_reads = true) {
  Fixture f;
  f.dir = test_root() / name;
  fs::create_directories(f.dir);
  f.image = "disk.vmdk";
  write_file(f.path(), file);
  f.oracle = oracle_of(f.path(), qemu_reads);
  return f;
}

TEST(VmdkSourceTest, StreamOptimizedWithFooterMatchesBaseAndQemu) {
  const Bytes base = make_base();
  for (bool markers : {true, false}) {
    const StreamLayout s = build_stream(markers, /*gd_at_end=*/markers);
    Fixture f = stream_fixture(markers ? "stream_footer" : "stream_nomarker", s.file, markers);
    if (markers) {
      EXPECT_EQ(base, f.oracle) << "qemu disagrees with the test's stream writer";
    } else {
      // qemu hands zlib only one grain of input when there is no marker, so it cannot read
      // grains that compress to more than a grain (this pattern data); compare with base.
      f.oracle = base;
    }
    Result<std::unique_ptr<BlockSource>> opened = f.open();
    ASSERT_TRUE(opened.ok()) << opened.status().to_string();
    EXPECT_EQ("streamOptimized", dynamic_cast<const VmdkSource&>(**opened).create_type());
    check_against_oracle(**opened, f);
    concurrent_reads(**opened, f.oracle);
  }
}

Status read_everything(const BlockSource& source) {
  Bytes out(source.size());
  return source.read_at(0, out);
}

TEST(VmdkSourceTest, CorruptCompressedGrainsAreErrorsNeverBytes) {
  const Bytes base = make_base();
  const StreamLayout s = build_stream(true, true);
  const Fixture f = stream_fixture("stream_corrupt", s.file);
  const auto [grain, offset] = *std::next(s.grain_offsets.begin(), 3);
  const uint64_t disk_offset = grain * kGrain;
  struct Case {
    const char* what;
    uint64_t at;
    Bytes bytes;
  };
  Bytes garbage(64);
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = std::byte(0x5a + i * 7);
  Bytes bad_lba(8), huge_size(4), zero_size(4);
  store_le64(bad_lba.data(), grain * 128 + 128);
  store_le32(huge_size.data(), 0x7fffffff);
  for (const Case& c :
       {Case{"garbage deflate", offset + 12, garbage},
        Case{"zlib header damaged", offset + 12, Bytes{std::byte{0x12}}},
        Case{"wrong marker lba", offset, bad_lba}, Case{"huge marker size", offset + 8, huge_size},
        Case{"zero marker size", offset + 8, zero_size}}) {
    Bytes file = s.file;
    std::memcpy(file.data() + c.at, c.bytes.data(), c.bytes.size());
    Result<std::unique_ptr<BlockSource>> opened = f.open_bytes(file);
    ASSERT_TRUE(opened.ok()) << c.what << ": " << opened.status().to_string();
    Bytes out(100);
    Status st = (*opened)->read_at(disk_offset + 10, out);
    EXPECT_EQ(StatusCode::kCorruption, st.code()) << c.what << ": " << st.to_string();
    EXPECT_NE(std::string::npos, st.message().find("grain " + std::to_string(grain))) << c.what;
    // Other grains still read.
    expect_read(**opened, base, 0, 4096);
  }
  // A grain cut short by the end of the compressed data.
  Bytes file = s.file;
  Bytes short_size(4);
  store_le32(short_size.data(), 20);
  std::memcpy(file.data() + offset + 8, short_size.data(), 4);
  Result<std::unique_ptr<BlockSource>> opened = f.open_bytes(file);
  ASSERT_TRUE(opened.ok());
  Bytes out(100);
  EXPECT_EQ(StatusCode::kCorruption, (*opened)->read_at(disk_offset, out).code());
}

TEST(VmdkSourceTest, FooterErrors) {
  const StreamLayout s = build_stream(true, true);
  const Fixture f = stream_fixture("stream_footer_errors", s.file);
  Bytes truncated(s.file.begin(), s.file.end() - 512);
  Result<std::unique_ptr<BlockSource>> opened = f.open_bytes(truncated);
  EXPECT_EQ(StatusCode::kCorruption, opened.status().code()) << opened.status().to_string();
  truncated.resize(1000);
  EXPECT_EQ(StatusCode::kCorruption, f.open_bytes(truncated).status().code());
  Bytes bad_footer = s.file;
  std::memset(bad_footer.data() + bad_footer.size() - 1024, 0, 4);  // footer magic
  EXPECT_EQ(StatusCode::kCorruption, f.open_bytes(bad_footer).status().code());
  Bytes gd_past_end = s.file;
  store_le64(gd_past_end.data() + gd_past_end.size() - 1024 + 56, 1u << 30);
  opened = f.open_bytes(gd_past_end);
  EXPECT_EQ(StatusCode::kCorruption, opened.status().code());
  EXPECT_NE(std::string::npos, opened.status().message().find("gdOffset"));
}

// ---- Sparse-extent corruption.

TEST(VmdkSourceTest, SparseHeaderAndTableCorruption) {
  const Fixture f = make_fixture("monolithicSparse");
  const Bytes good = read_file(f.path());
  Result<VmdkSparseHeader> header = parse_vmdk_sparse_header(good);
  ASSERT_TRUE(header.ok()) << header.status().to_string();
  EXPECT_EQ(kBaseSize / 512 + 1, header->capacity_sectors + 1 - (kBaseSize % 512 != 0));
  const uint64_t gd_offset = header->gd_offset_sectors * 512;

  Bytes bad = good;
  bad[0] = std::byte{'X'};
  EXPECT_FALSE(f.open_bytes(bad).ok());
  bad = good;
  store_le32(bad.data() + 4, 4);
  EXPECT_EQ(StatusCode::kNotSupported, f.open_bytes(bad).status().code());
  bad = good;
  store_le64(bad.data() + 20, 0);  // grainSize
  EXPECT_EQ(StatusCode::kCorruption, f.open_bytes(bad).status().code());
  bad = good;
  store_le32(bad.data() + 44, 4096);  // numGTEsPerGT
  EXPECT_EQ(StatusCode::kCorruption, f.open_bytes(bad).status().code());
  bad = good;
  store_le64(bad.data() + 12, ~uint64_t{0} / 100);  // capacity
  EXPECT_EQ(StatusCode::kCorruption, f.open_bytes(bad).status().code());
  bad = good;
  bad[74] = std::byte{'\n'};  // newline check bytes, as a text-mode transfer leaves them
  EXPECT_EQ(StatusCode::kCorruption, f.open_bytes(bad).status().code());

  // A grain directory entry past the end of the file.
  bad = good;
  store_le32(bad.data() + gd_offset, 0x7ffffff0);
  Result<std::unique_ptr<BlockSource>> opened = f.open_bytes(bad);
  EXPECT_EQ(StatusCode::kCorruption, opened.status().code());
  EXPECT_NE(std::string::npos, opened.status().message().find("grain directory entry 0"));

  // A grain table entry past the end: that grain fails, others read.
  const uint64_t gt_offset = uint64_t{load_le32(good.data() + gd_offset)} * 512;
  bad = good;
  store_le32(bad.data() + gt_offset + 4 * 3, 0x7ffffff0);  // grain 3 holds data
  opened = f.open_bytes(bad);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  Bytes out(10);
  Status st = (*opened)->read_at(3 * kGrain + 5, out);
  EXPECT_EQ(StatusCode::kCorruption, st.code()) << st.to_string();
  EXPECT_NE(std::string::npos, st.message().find("grain 3"));
  expect_read(**opened, f.oracle, 0, kGrain);

  // A truncated file: open may pass (tables come first) but no read returns wrong bytes.
  for (uint64_t keep : {good.size() / 2, uint64_t{4096}, uint64_t{600}}) {
    opened = f.open_bytes(Bytes(good.begin(), good.begin() + keep));
    if (opened.ok()) {
      EXPECT_FALSE(read_everything(**opened).ok()) << keep;
    }
  }
}

TEST(VmdkSourceTest, LowerIoErrorsPropagate) {
  const Fixture f = make_fixture("monolithicSparse");
  auto faulty = std::make_unique<FaultySource>(std::make_unique<MemorySource>(read_file(f.path())),
                                               1 << 20, 4096);
  Result<std::unique_ptr<BlockSource>> opened = open_vmdk(std::move(faulty), f.options());
  ASSERT_TRUE(opened.ok());
  const Status st = read_everything(**opened);
  EXPECT_EQ(StatusCode::kIOError, st.code());
  EXPECT_NE(std::string::npos, st.message().find("vmdk(")) << st.to_string();
}

// ---- Descriptors written by hand.

TEST(VmdkSourceTest, MultiExtentDescriptorMatchesQemu) {
  const fs::path dir = test_root() / "multi";
  fs::create_directories(dir / "sub");
  const Bytes a = pattern_bytes(3 * 512 * 1000, 21);
  Bytes b(4096 + 2048 * 512);
  const Bytes bp = pattern_bytes(b.size(), 22);
  std::memcpy(b.data(), bp.data(), b.size());
  std::memset(b.data() + 4096 + 300000, 0, 200000);
  write_file(dir / "a-flat.bin", a);
  write_file(dir / "b-flat.bin", b);
  // Whole grains only: qemu maps a partial last grain past the end of its extent, which
  // shifts every extent after it in qemu-img convert (a qemu 7.2 bug, not a format rule).
  const uint64_t s_sectors = 6 * 2048;
  const Bytes base = make_base();
  const Bytes s_raw(base.begin(), base.begin() + s_sectors * 512);
  write_file(dir / "s.raw", s_raw);
  ASSERT_EQ(0, run("qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse '" +
                   (dir / "s.raw").string() + "' '" + (dir / "sub" / "s.vmdk").string() + "'"));
  write_text(dir / "disk.vmdk",
             "# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\nparentCID=ffffffff\r\n"
             "createType=\"twoGbMaxExtentFlat\"\r\n\r\n# Extent description\r\n"
             "RW 3000 FLAT \"a-flat.bin\" 0\r\n"
             "RW 2048 FLAT \"b-flat.bin\" 8\r\n"
             "RDONLY " +
                 std::to_string(s_sectors) +
                 " SPARSE \"sub/s.vmdk\"\r\n"
                 "RW 1000 FLAT \"a-flat.bin\" 1000\r\n"
                 "\r\nddb.adapterType = \"ide\"\r\n");
  Fixture f;
  f.dir = dir;
  f.image = "disk.vmdk";
  Result<std::unique_ptr<BlockSource>> opened = f.open();
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ(4u, dynamic_cast<const VmdkSource&>(**opened).extent_count());
  auto extent_files = vmdk_extent_files(MemorySource(read_file(f.path())));
  ASSERT_TRUE(extent_files.ok()) << extent_files.status().to_string();
  EXPECT_EQ((std::vector<std::string>{"a-flat.bin", "b-flat.bin", "sub/s.vmdk", "a-flat.bin"}),
            *extent_files);
  auto sparse_extents = vmdk_extent_files(MemorySource(read_file(dir / "sub" / "s.vmdk")));
  ASSERT_TRUE(sparse_extents.ok());
  EXPECT_TRUE(sparse_extents->empty());
  // qemu skips RDONLY extents, so compare that part with the expected bytes, and a copy of
  // the descriptor with RW everywhere with qemu.
  Bytes expected(a.begin(), a.begin() + 3000 * 512);
  expected.insert(expected.end(), b.begin() + 4096, b.end());
  expected.insert(expected.end(), s_raw.begin(), s_raw.end());
  expected.insert(expected.end(), a.begin() + 1000 * 512, a.begin() + 2000 * 512);
  EXPECT_EQ(expected, read_all(**opened));

  std::ifstream in(dir / "disk.vmdk");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  text.replace(text.find("RDONLY"), 6, "RW");
  write_text(dir / "rw.vmdk", text);
  f.image = "rw.vmdk";
  f.oracle = oracle_of(f.path());
  ASSERT_EQ(expected, f.oracle);
  opened = f.open();
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  check_against_oracle(**opened, f, /*exact_map=*/false);
  concurrent_reads(**opened, f.oracle);
}

TEST(VmdkSourceTest, ZeroAndVmfsExtents) {
  const fs::path dir = test_root() / "vmfs";
  fs::create_directories(dir);
  const Bytes a = pattern_bytes(4096 * 512, 31);
  write_file(dir / "x-flat.vmdk", a);
  Fixture f;
  f.dir = dir;
  for (const std::string type : {"vmfs", "vmfsThin"}) {
    f.image = type + ".vmdk";
    write_text(f.path(),
               "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
               "createType=\"" +
                   type +
                   "\"\nRW 4096 VMFS \"x-flat.vmdk\"\n"
                   "RW 777 ZERO\nRW 100 VMFS \"x-flat.vmdk\" 4\n");
    Result<std::unique_ptr<BlockSource>> opened = f.open();
    ASSERT_TRUE(opened.ok()) << opened.status().to_string();
    Bytes expected = a;
    expected.resize(expected.size() + 777 * 512);
    expected.insert(expected.end(), a.begin() + 4 * 512, a.begin() + 104 * 512);
    EXPECT_EQ(expected, read_all(**opened)) << type;
    Result<Extent> run = (*opened)->map(4096 * 512 + 5);
    ASSERT_TRUE(run.ok());
    EXPECT_EQ(Extent::Kind::kZero, run->kind);
    EXPECT_EQ(777u * 512 - 5, run->length);
  }
}

TEST(VmdkSourceTest, DescriptorErrors) {
  const fs::path dir = test_root() / "descriptor_errors";
  fs::create_directories(dir);
  write_file(dir / "x-flat.vmdk", pattern_bytes(100 * 512, 3));
  Fixture f;
  f.dir = dir;
  f.image = "d.vmdk";
  const auto open_text = [&](const std::string& extents) {
    return f.open_bytes(
        text_bytes("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
                   "createType=\"monolithicFlat\"\n" +
                   extents));
  };
  ASSERT_TRUE(open_text("RW 100 FLAT \"x-flat.vmdk\" 0\n").ok());
  const std::pair<const char*, StatusCode> cases[] = {
      {"RW 100 FLAT \"../x-flat.vmdk\" 0\n", StatusCode::kCorruption},
      {"RW 100 FLAT \"a/../../x-flat.vmdk\" 0\n", StatusCode::kCorruption},
      {"RW 100 FLAT \"..\\\\x-flat.vmdk\" 0\n", StatusCode::kCorruption},
      {"RW 100 FLAT \"/etc/passwd\" 0\n", StatusCode::kNotSupported},
      {"RW 101 FLAT \"x-flat.vmdk\" 0\n", StatusCode::kCorruption},  // past the file end
      {"RW 100 FLAT \"x-flat.vmdk\" 1\n", StatusCode::kCorruption},
      {"RW 100 FLAT \"x-flat.vmdk\"\n", StatusCode::kCorruption},  // no offset
      {"RW 100 FLAT \"x-flat.vmdk 0\n", StatusCode::kCorruption},  // no closing quote
      {"RW 1x FLAT \"x-flat.vmdk\" 0\n", StatusCode::kCorruption},
      {"RW 100 FLAT \"x-flat.vmdk\" 0 junk\n", StatusCode::kCorruption},
      {"RW 100 FLAT \"missing.vmdk\" 0\n", StatusCode::kNotFound},
      {"RW 100 SPARSE \"x-flat.vmdk\"\n", StatusCode::kCorruption},  // not a sparse extent
      {"RW 100 VMFSSPARSE \"x-flat.vmdk\"\n", StatusCode::kNotSupported},
      {"RW 100 SESPARSE \"x-flat.vmdk\"\n", StatusCode::kNotSupported},
      {"NOACCESS 100 FLAT \"x-flat.vmdk\" 0\n", StatusCode::kNotSupported},
      {"RW 100 WEIRD \"x-flat.vmdk\"\n", StatusCode::kNotSupported},
      {"RW 100 ZERO \"x\"\n", StatusCode::kCorruption},
      {"RW 36028797018963968 ZERO\nRW 36028797018963968 ZERO\n", StatusCode::kCorruption},
      {"", StatusCode::kCorruption},  // no extents
  };
  for (const auto& [extents, code] : cases) {
    Result<std::unique_ptr<BlockSource>> opened = open_text(extents);
    EXPECT_EQ(code, opened.status().code()) << extents << " -> " << opened.status().to_string();
  }
  EXPECT_EQ(StatusCode::kCorruption, f.open_bytes(text_bytes("hello world\n")).status().code());
  EXPECT_EQ(StatusCode::kNotSupported,
            f.open_bytes(text_bytes("createType=\"fullDevice\"\nRW 1 ZERO\n")).status().code());
  EXPECT_EQ(StatusCode::kNotSupported,
            f.open_bytes(text_bytes("COWD and more bytes")).status().code());
  // Without open_sibling, a file it needs is NotSupported and named.
  Result<std::unique_ptr<BlockSource>> opened =
      open_vmdk(std::make_unique<MemorySource>(
                    text_bytes("createType=\"monolithicFlat\"\nRW 100 FLAT \"x-flat.vmdk\" 0\n")),
                VmdkOptions{});
  EXPECT_EQ(StatusCode::kNotSupported, opened.status().code());
  EXPECT_NE(std::string::npos, opened.status().message().find("x-flat.vmdk"));
}

// ---- Delta links (qemu-img create -b).

TEST(VmdkSourceTest, DeltaLinkReadsThroughParent) {
  const fs::path dir = test_root() / "delta";
  fs::create_directories(dir);
  const std::string d = "cd '" + dir.string() + "' && ";
  ASSERT_EQ(0, run(d + "qemu-img convert -f raw -O vmdk ../base.raw base.vmdk"));
  ASSERT_EQ(0, run(d + "qemu-img create -f vmdk -b base.vmdk -F vmdk mid.vmdk"));
  ASSERT_EQ(0, run(d + "qemu-io -f vmdk -c 'write -P 0x5a 1048576 65536' "
                       "-c 'write -P 0x33 100000 5000' mid.vmdk"));
  ASSERT_EQ(0, run(d + "qemu-img create -f vmdk -b mid.vmdk -F vmdk top.vmdk"));
  ASSERT_EQ(0, run(d + "qemu-io -f vmdk -c 'write -P 0x77 3000000 70000' top.vmdk"));
  Fixture f;
  f.dir = dir;
  f.image = "top.vmdk";
  f.oracle = oracle_of(f.path());
  Result<std::unique_ptr<BlockSource>> opened = f.open();
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  EXPECT_EQ(2, dynamic_cast<const VmdkSource&>(**opened).parent_depth());
  check_against_oracle(**opened, f, /*exact_map=*/false);
  concurrent_reads(**opened, f.oracle);

  VmdkOptions shallow = f.options();
  shallow.max_chain_depth = 2;
  EXPECT_EQ(
      StatusCode::kNotSupported,
      open_vmdk(std::make_unique<MemorySource>(read_file(f.path())), shallow).status().code());
  EXPECT_EQ(StatusCode::kNotSupported,
            open_vmdk(std::make_unique<MemorySource>(read_file(f.path())), VmdkOptions{})
                .status()
                .code());
  // A parentCID that no longer matches the parent's CID.
  Bytes top = read_file(f.path());
  std::string text(reinterpret_cast<const char*>(top.data()), top.size());
  const size_t at = text.find("parentCID=");
  ASSERT_NE(std::string::npos, at);
  top[at + 10] = top[at + 10] == std::byte{'1'} ? std::byte{'2'} : std::byte{'1'};
  EXPECT_EQ(StatusCode::kCorruption, f.open_bytes(top).status().code());
}

// ---- Pure parsers.

TEST(VmdkParserTest, Descriptor) {
  Result<VmdkDescriptor> d = parse_vmdk_descriptor(
      "# Disk DescriptorFile\nversion=1\nCID=0a0B0c0d\nparentCID=ffffffff\n"
      "createType = \"twoGbMaxExtentSparse\"\nparentFileNameHint=\"p q.vmdk\"\n"
      "RW 10 SPARSE \"a b.vmdk\"\n  RDONLY 20 FLAT \"c.vmdk\" 7  \nRW 0 ZERO\nRW 5 ZERO\n"
      "ddb.uuid = \"x\"\n\0RW 1 ZERO\n");
  ASSERT_TRUE(d.ok()) << d.status().to_string();
  EXPECT_EQ("twoGbMaxExtentSparse", d->create_type);
  EXPECT_EQ(0x0a0b0c0du, d->cid.value());
  EXPECT_EQ(0xffffffffu, d->parent_cid.value());
  EXPECT_EQ("p q.vmdk", d->parent_file_name);
  ASSERT_EQ(3u, d->extents.size());  // the zero-length one is skipped; text ends at NUL
  EXPECT_EQ("a b.vmdk", d->extents[0].file_name);
  EXPECT_EQ(VmdkExtentLine::Type::kSparse, d->extents[0].type);
  EXPECT_EQ(VmdkExtentLine::Access::kReadOnly, d->extents[1].access);
  EXPECT_EQ(7u, d->extents[1].offset_sectors);
  EXPECT_EQ(VmdkExtentLine::Type::kZero, d->extents[2].type);

  EXPECT_FALSE(parse_vmdk_descriptor("CID=xyz\n").ok());
  EXPECT_FALSE(parse_vmdk_descriptor("createType=\"a\"\ncreateType=\"b\"\n").ok());
  EXPECT_FALSE(parse_vmdk_descriptor("createType=\"a\n").ok());
  EXPECT_FALSE(parse_vmdk_descriptor("RW 99999999999999999999999 ZERO\n").ok());
  EXPECT_FALSE(parse_vmdk_descriptor(std::string(kVmdkMaxDescriptorBytes + 1, '#')).ok());
  std::string many;
  for (size_t i = 0; i <= kVmdkMaxExtents; ++i) many += "RW 1 ZERO\n";
  EXPECT_FALSE(parse_vmdk_descriptor(many).ok());
}

TEST(VmdkParserTest, FileNames) {
  for (const char* ok : {"a.vmdk", "sub/a-flat.vmdk", "a b.vmdk", "..a", "a..b/c"}) {
    EXPECT_TRUE(check_vmdk_file_name(ok).ok()) << ok;
  }
  for (const char* bad :
       {"", "..", "../a", "a/..", "a/../b", "./a", "a//b", "a/", "a\\..\\b", "a\nb"}) {
    EXPECT_EQ(StatusCode::kCorruption, check_vmdk_file_name(bad).code()) << bad;
  }
  for (const char* absolute : {"/a", "\\a", "C:\\a", "c:a"}) {
    EXPECT_EQ(StatusCode::kNotSupported, check_vmdk_file_name(absolute).code()) << absolute;
  }
  EXPECT_FALSE(check_vmdk_file_name(std::string(513, 'a')).ok());
}

TEST(VmdkParserTest, Probe) {
  const auto probe = [](const std::string& s) { return probe_vmdk(text_bytes(s)); };
  EXPECT_EQ(100, probe("KDMV\1\0\0\0"));
  EXPECT_EQ(50, probe("COWD...."));
  EXPECT_EQ(100, probe("# Disk DescriptorFile\nversion=1\n"));
  EXPECT_EQ(100, probe("# comment\n   \r\nversion=2\r\n"));
  EXPECT_EQ(0, probe("version=4\n"));
  EXPECT_EQ(0, probe("QFI\xfb"));
  EXPECT_EQ(0, probe("KD"));
  EXPECT_EQ(0, probe("# only a comment"));
  const Fixture f = make_fixture("streamOptimized");
  Bytes head = read_file(f.path());
  head.resize(4096);
  EXPECT_EQ(100, probe_vmdk(head));
}

TEST(VmdkParserTest, GrainDirectory) {
  Bytes gd(16);
  store_le32(gd.data(), 0);
  store_le32(gd.data() + 4, 2);
  store_le32(gd.data() + 8, 10);
  Result<std::vector<uint32_t>> parsed = parse_vmdk_grain_directory(gd, 3, 512, 10 * 512 + 2048);
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_EQ((std::vector<uint32_t>{0, 2, 10}), *parsed);
  EXPECT_FALSE(parse_vmdk_grain_directory(gd, 3, 512, 10 * 512 + 2047).ok());
  EXPECT_FALSE(parse_vmdk_grain_directory(gd, 5, 512, 1 << 20).ok());
}

TEST(VmdkParserTest, FooterNeedsMarkers) {
  const StreamLayout s = build_stream(true, true);
  const std::span<const std::byte> tail(s.file.data() + s.file.size() - 1536, 1536);
  Result<VmdkSparseHeader> footer = parse_vmdk_footer(tail);
  ASSERT_TRUE(footer.ok()) << footer.status().to_string();
  EXPECT_EQ(s.gd_offset / 512, footer->gd_offset_sectors);
  EXPECT_TRUE(footer->compressed());
  EXPECT_TRUE(footer->has_markers());
  Bytes broken(tail.begin(), tail.end());
  store_le32(broken.data() + 12, 2);
  EXPECT_FALSE(parse_vmdk_footer(broken).ok());
  broken.assign(tail.begin(), tail.end());
  store_le32(broken.data() + 1024 + 12, 1);
  EXPECT_FALSE(parse_vmdk_footer(broken).ok());
  EXPECT_FALSE(parse_vmdk_footer(tail.first(1535)).ok());
}

}  // namespace
}  // namespace imgfs::formats
