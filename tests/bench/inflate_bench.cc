// Inflate micro benchmark: one thread, one gzip file, output MB/s of
//   - each inflate engine over the whole deflate stream (no CRC, no copies),
//   - GzipSource's frontier with each engine (first sequential read, no index: CRC32, windows,
//     finding block boundaries),
//   - GzipSource re-inflating every span from a loaded index with each engine (CRC32 checked).
// Times are CPU seconds of the one thread, so a busy machine does not skew them much.
// Built as build/tests/inflate_bench.
// Usage: inflate_bench FILE.gz [span_bytes]
#include <time.h>
#include <zlib.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "formats/gzip_source.h"
#include "formats/inflater.h"
#include "formats/memory_source.h"

namespace imgfs::formats {
namespace {

// CPU time of this thread: the machine may be shared, and all the work here is on one thread.
struct Clock {
  static double now() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
  }
};

double seconds_since(double start) { return Clock::now() - start; }

void report(const char* what, uint64_t bytes, double seconds) {
  std::printf("%-44s %8.0f MB/s  (%.2f s)\n", what, static_cast<double>(bytes) / seconds / 1e6,
              seconds);
}

// Reads the whole source front to back in 1 MiB reads; returns false on an error.
bool read_through(const BlockSource& source) {
  std::vector<std::byte> buffer(1 << 20);
  for (uint64_t pos = 0; pos < source.size(); pos += buffer.size()) {
    const uint64_t n = std::min<uint64_t>(buffer.size(), source.size() - pos);
    if (Status s = source.read_at(pos, std::span(buffer).first(n)); !s.ok()) {
      std::fprintf(stderr, "read at %llu: %s\n", static_cast<unsigned long long>(pos),
                   s.to_string().c_str());
      return false;
    }
  }
  return true;
}

int run(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FILE.gz [span_bytes]\n", argv[0]);
    return 2;
  }
  std::ifstream file(argv[1], std::ios::binary);
  std::vector<std::byte> gz;
  for (auto it = std::istreambuf_iterator<char>(file); it != std::istreambuf_iterator<char>();
       ++it) {
    gz.push_back(static_cast<std::byte>(*it));
  }
  const uint64_t span_bytes = argc > 2 ? std::stoull(argv[2]) : 1 << 20;
  Result<GzipHeaderScan> header = scan_gzip_header(gz);
  if (!header.ok() || !header->complete) return 1;
  const std::span<const std::byte> deflate_data = std::span(gz).subspan(header->length);

  // Raw engines over the whole stream.
  uint64_t out_size = 0;
  for (InflateEngine engine : {InflateEngine::kZlib, InflateEngine::kIsal}) {
    Result<std::unique_ptr<Inflater>> inflater = make_inflater(engine);
    if (!inflater.ok()) continue;
    if (!(*inflater)->reset({}, 0, 0).ok()) return 1;
    std::vector<std::byte> out(1 << 20);
    uint64_t produced = 0;
    size_t in_pos = 0;
    const auto start = Clock::now();
    for (;;) {
      const size_t n = std::min<size_t>(64 * 1024, deflate_data.size() - in_pos);
      Result<InflateProgress> p = (*inflater)->inflate(deflate_data.subspan(in_pos, n), out);
      if (!p.ok()) return 1;
      in_pos += p->consumed;
      produced += p->produced;
      if (p->stream_end || (p->consumed == 0 && p->produced == 0)) break;
    }
    out_size = produced;
    report((std::string("engine ") + (*inflater)->name() + ", whole stream").c_str(), produced,
           seconds_since(start));
  }
  {
    std::vector<std::byte> buffer(1 << 20);
    uint32_t z = 0;
    uint32_t ours = 0;
    auto start = Clock::now();
    for (int i = 0; i < 256; ++i) {
      z = static_cast<uint32_t>(crc32(z, reinterpret_cast<const Bytef*>(buffer.data()),
                                      static_cast<uInt>(buffer.size())));
    }
    report("crc32, zlib", 256ull << 20, seconds_since(start));
    start = Clock::now();
    for (int i = 0; i < 256; ++i) ours = crc32_update(ours, buffer);
    report("crc32, crc32_update", 256ull << 20, seconds_since(start));
    if (z != ours) std::printf("CRC MISMATCH\n");
  }

  // The frontier: first sequential read, no index. The index kept is the default engine's.
  GzipOptions options;
  options.span_bytes = span_bytes;
  std::shared_ptr<const GzipIndexSnapshot> index;
  for (InflateEngine engine : {InflateEngine::kZlib, InflateEngine::kIsal}) {
    if (!inflate_engine_available(engine)) continue;
    GzipOptions frontier = options;
    frontier.frontier_engine = engine;
    Result<std::unique_ptr<GzipSource>> first =
        open_gzip(std::make_unique<MemorySource>(gz), frontier);
    if (!first.ok()) return 1;
    auto start = Clock::now();
    if (!read_through(**first)) return 1;
    report(engine == InflateEngine::kZlib ? "GzipSource frontier, zlib"
                                          : "GzipSource frontier, isal",
           (*first)->size(), seconds_since(start));
    std::printf("  %zu checkpoints, %llu output bytes (engines saw %llu)\n",
                (*first)->checkpoint_count(), static_cast<unsigned long long>((*first)->size()),
                static_cast<unsigned long long>(out_size));
    index = std::make_shared<const GzipIndexSnapshot>((*first)->snapshot_index());
  }

  // Every span re-inflated from the index.
  for (InflateEngine engine : {InflateEngine::kZlib, InflateEngine::kIsal}) {
    if (!inflate_engine_available(engine)) continue;
    GzipOptions indexed = options;
    indexed.initial_index = index;
    indexed.span_engine = engine;
    indexed.span_cache_bytes = 1;
    Result<std::unique_ptr<GzipSource>> again =
        open_gzip(std::make_unique<MemorySource>(gz), indexed);
    if (!again.ok() || !(*again)->fully_indexed()) return 1;
    const auto start = Clock::now();
    if (!read_through(**again)) return 1;
    report(engine == InflateEngine::kZlib ? "GzipSource span decode, zlib"
                                          : "GzipSource span decode, isal",
           (*again)->size(), seconds_since(start));
  }
  return 0;
}

}  // namespace
}  // namespace imgfs::formats

int main(int argc, char** argv) { return imgfs::formats::run(argc, argv); }
