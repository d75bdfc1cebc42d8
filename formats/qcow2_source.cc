#include "formats/qcow2_source.h"

#include <zlib.h>

#ifdef IMGFS_HAVE_ZSTD
#include <zstd.h>
#endif

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <list>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>

#include "formats/byte_order.h"
#include "formats/checked_math.h"
#include "formats/scope_exit.h"

namespace imgfs::formats {

namespace {

constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint64_t kV2HeaderBytes = 72;
constexpr uint64_t kV3HeaderBytes = 104;
// Header fields we decode end here (v3 with the compression type byte and its padding).
constexpr uint64_t kHeaderProbeBytes = 112;
constexpr uint32_t kMinClusterBits = 9;
constexpr uint32_t kMaxClusterBits = 21;
// qemu's QCOW_MAX_L1_SIZE: the largest active L1 table it opens.
constexpr uint64_t kMaxL1Bytes = 32 << 20;
constexpr uint64_t kMaxBackingNameBytes = 1023;
constexpr uint64_t kKnownIncompatible = (1u << 5) - 1;

constexpr uint32_t kExtEnd = 0x00000000;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureNames = 0x6803f857;
constexpr uint32_t kExtEncryption = 0x0537be77;
constexpr uint32_t kExtExternalData = 0x44415441;
constexpr uint64_t kFeatureNameEntryBytes = 48;

constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00;
constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00;
constexpr uint64_t kL2Compressed = uint64_t{1} << 62;
constexpr uint64_t kL2Zero = 1;
constexpr uint64_t kCompressedSectorBytes = 512;

// L2 tables are cached and fetched in slices of at most this size (qemu's l2-cache-entry-size
// idea), so a cold read in a 2 MiB-cluster image fetches 64 KiB of L2, not 2 MiB.
constexpr uint64_t kMaxL2SliceBytes = 64 * 1024;
// First read at open: covers the header, its extensions and the backing name of every image qemu
// makes, so opening usually costs this read and the L1 read.
constexpr uint64_t kOpenProbeBytes = 4096;

std::string hex(uint64_t value) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text;
  do {
    text.insert(text.begin(), kDigits[value & 15]);
    value >>= 4;
  } while (value != 0);
  return "0x" + text;
}

std::string str(uint64_t value) { return std::to_string(value); }

// A NUL-terminated or full-length string field.
std::string text_field(std::span<const std::byte> bytes) {
  std::string text;
  for (std::byte b : bytes) {
    if (b == std::byte{0}) break;
    text += static_cast<char>(b);
  }
  return text;
}

Qcow2HeaderScan need_more(uint64_t bytes_needed) {
  Qcow2HeaderScan scan;
  scan.bytes_needed = bytes_needed;
  return scan;
}

Status inflate_cluster(std::span<const std::byte> compressed, std::span<std::byte> out) {
  z_stream strm{};
  // qemu writes raw deflate with a 4 KiB window (qcow2-threads.c: windowBits -12).
  if (inflateInit2(&strm, -12) != Z_OK) return Status::Corruption("inflateInit2 failed");
  strm.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(compressed.data()));
  strm.avail_in = static_cast<uInt>(compressed.size());
  strm.next_out = reinterpret_cast<Bytef*>(out.data());
  strm.avail_out = static_cast<uInt>(out.size());
  const int ret = inflate(&strm, Z_FINISH);
  const std::string message = strm.msg != nullptr ? strm.msg : "zlib error " + str(ret);
  const bool filled = strm.avail_out == 0;
  inflateEnd(&strm);
  // The compressed length is known only to the sector, so input may be left over (Z_BUF_ERROR)
  // once the cluster is full; a cluster that is not filled is damaged.
  if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && filled) return Status::OK();
  if (ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) {
    return Status::Corruption("deflate data ends before the cluster is full");
  }
  return Status::Corruption("bad deflate data: " + message);
}

#ifdef IMGFS_HAVE_ZSTD
Status zstd_cluster(std::span<const std::byte> compressed, std::span<std::byte> out) {
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  if (dctx == nullptr) return Status::Corruption("ZSTD_createDCtx failed");
  ScopeExit free_dctx([dctx] { ZSTD_freeDCtx(dctx); });
  ZSTD_inBuffer input{compressed.data(), compressed.size(), 0};
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  size_t ret = 0;
  // Streaming, as qemu does: the data may be several frames and end in sector padding.
  while (output.pos < output.size) {
    const size_t in_before = input.pos;
    const size_t out_before = output.pos;
    ret = ZSTD_decompressStream(dctx, &output, &input);
    if (ZSTD_isError(ret)) {
      return Status::Corruption(std::string("bad zstd data: ") + ZSTD_getErrorName(ret));
    }
    if (input.pos == in_before && output.pos == out_before) {
      return Status::Corruption("zstd data ends before the cluster is full");
    }
  }
  if (ret > 0) return Status::Corruption("zstd data decodes to more than one cluster");
  return Status::OK();
}
#endif

// Joins a backing name to the folder of the image that names it (qemu resolves relative backing
// names against the overlay's directory).
std::string resolve_name(std::string_view image_name, std::string_view backing_name) {
  if (backing_name.starts_with('/')) return std::string(backing_name);
  const size_t slash = image_name.rfind('/');
  if (slash == std::string_view::npos) return std::string(backing_name);
  return std::string(image_name.substr(0, slash + 1)) + std::string(backing_name);
}

}  // namespace

uint64_t Qcow2Header::l1_entries_needed() const {
  // cluster_bits <= 21 and l2_entries <= 2^18, so one L1 entry covers at most 2^39 bytes.
  const uint64_t reach = cluster_bytes() * l2_entries();
  return size / reach + (size % reach != 0 ? 1 : 0);
}

Result<Qcow2HeaderScan> scan_qcow2_header(std::span<const std::byte> bytes, uint64_t file_size) {
  if (file_size < kV2HeaderBytes) {
    return Status::Corruption("qcow2 file of " + str(file_size) +
                              " bytes is shorter than a header");
  }
  const uint64_t probe = std::min(file_size, kHeaderProbeBytes);
  if (bytes.size() < probe) return need_more(probe);
  const std::byte* p = bytes.data();
  if (load_be32(p) != kMagic) return Status::Corruption("bad qcow2 magic");
  Qcow2Header h;
  h.version = load_be32(p + 4);
  if (h.version != 2 && h.version != 3) {
    return Status::NotSupported("qcow2 version " + str(h.version) +
                                (h.version == 1 ? " (the old qcow format)" : "") +
                                "; only versions 2 and 3 are supported");
  }
  h.backing_file_offset = load_be64(p + 8);
  h.backing_file_size = load_be32(p + 16);
  h.cluster_bits = load_be32(p + 20);
  h.size = load_be64(p + 24);
  h.crypt_method = load_be32(p + 32);
  h.l1_size = load_be32(p + 36);
  h.l1_table_offset = load_be64(p + 40);
  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return Status::Corruption("qcow2 cluster_bits " + str(h.cluster_bits) + " is outside " +
                              str(kMinClusterBits) + ".." + str(kMaxClusterBits));
  }
  const uint64_t cluster = h.cluster_bytes();
  h.header_length = kV2HeaderBytes;
  if (h.version == 3) {
    if (file_size < kV3HeaderBytes) {
      return Status::Corruption("qcow2 v3 file of " + str(file_size) +
                                " bytes is shorter than a header");
    }
    h.incompatible_features = load_be64(p + 72);
    h.compatible_features = load_be64(p + 80);
    h.autoclear_features = load_be64(p + 88);
    h.header_length = load_be32(p + 100);
    if (h.header_length < kV3HeaderBytes || h.header_length > cluster ||
        h.header_length > file_size) {
      return Status::Corruption("qcow2 header_length " + str(h.header_length) +
                                " is outside 104..min(cluster size, file size)");
    }
    const bool type_bit = (h.incompatible_features & Qcow2Header::kIncompatibleCompressionType);
    const uint8_t type = h.header_length > kV3HeaderBytes ? std::to_integer<uint8_t>(p[104]) : 0;
    if (type_bit != (type != 0)) {
      return Status::Corruption("qcow2 compression_type " + str(type) +
                                " disagrees with the compression type feature bit");
    }
    if (type > 1) {
      return Status::NotSupported("qcow2 compression_type " + str(type) + " is unknown");
    }
    h.compression_type = static_cast<Qcow2CompressionType>(type);
  }
  if (h.extended_l2() && h.cluster_bits < kMinClusterBits + 5) {
    return Status::Corruption("qcow2 cluster_bits " + str(h.cluster_bits) +
                              " is too small for extended L2 (subclusters under 512 bytes)");
  }

  // The header area: extensions run to the backing name (or the cluster end), all in cluster 0.
  if (h.backing_file_offset > cluster) {
    return Status::Corruption("qcow2 backing_file_offset " + str(h.backing_file_offset) +
                              " is past the first cluster");
  }
  const uint64_t area_end = std::min(cluster, file_size);
  const uint64_t ext_end = h.backing_file_offset != 0 ? h.backing_file_offset : cluster;
  uint64_t pos = h.header_length;
  while (pos < ext_end) {
    if (ext_end - pos < 8) {
      return Status::Corruption("qcow2 header extension at offset " + str(pos) +
                                " runs past the header area");
    }
    if (pos + 8 > file_size) {
      return Status::Corruption("qcow2 header extensions run past the end of the file");
    }
    if (pos + 8 > bytes.size()) return need_more(area_end);
    const uint32_t type = load_be32(p + pos);
    const uint64_t length = load_be32(p + pos + 4);
    if (type == kExtEnd) break;
    if (length > ext_end - pos - 8 || pos + 8 + length > file_size) {
      return Status::Corruption("qcow2 header extension " + hex(type) + " at offset " + str(pos) +
                                " has length " + str(length) + " past the header area");
    }
    if (pos + 8 + length > bytes.size()) return need_more(area_end);
    const std::span<const std::byte> data = bytes.subspan(pos + 8, length);
    switch (type) {
      case kExtBackingFormat:
        h.backing_format = text_field(data);
        break;
      case kExtExternalData:
        h.external_data_file = text_field(data);
        break;
      case kExtEncryption:
        h.has_encryption_extension = true;
        break;
      case kExtFeatureNames:
        for (uint64_t i = 0; i + kFeatureNameEntryBytes <= length; i += kFeatureNameEntryBytes) {
          h.feature_names.push_back({std::to_integer<uint8_t>(data[i]),
                                     std::to_integer<uint8_t>(data[i + 1]),
                                     text_field(data.subspan(i + 2, kFeatureNameEntryBytes - 2))});
        }
        break;
      default:
        break;  // bitmaps and unknown extensions do not change what the guest reads
    }
    pos += 8 + (length + 7) / 8 * 8;  // length < 2^21: no overflow
  }

  if (h.backing_file_offset != 0 && h.backing_file_size != 0) {
    if (h.backing_file_size > std::min(kMaxBackingNameBytes, cluster - h.backing_file_offset)) {
      return Status::Corruption("qcow2 backing_file_size " + str(h.backing_file_size) +
                                " is too long");
    }
    const uint64_t name_end = h.backing_file_offset + h.backing_file_size;
    if (name_end > file_size) {
      return Status::Corruption("qcow2 backing file name runs past the end of the file");
    }
    if (name_end > bytes.size()) return need_more(area_end);
    h.backing_file = text_field(bytes.subspan(h.backing_file_offset, h.backing_file_size));
  }

  if (h.l1_size > kMaxL1Bytes / 8) {
    return Status::Corruption("qcow2 l1_size " + str(h.l1_size) + " is too large");
  }
  const uint64_t needed = h.l1_entries_needed();
  if (h.l1_size < needed) {
    return Status::Corruption("qcow2 l1_size " + str(h.l1_size) + " is too small for size " +
                              str(h.size) + " (needs " + str(needed) + ")");
  }
  if (needed > 0) {
    if (h.l1_table_offset % cluster != 0) {
      return Status::Corruption("qcow2 l1_table_offset " + hex(h.l1_table_offset) +
                                " is not cluster-aligned");
    }
    const std::optional<uint64_t> l1_end = checked_add(h.l1_table_offset, needed * 8);
    if (!l1_end || *l1_end > file_size) {
      return Status::Corruption("qcow2 L1 table at " + hex(h.l1_table_offset) +
                                " runs past the end of the file (" + str(file_size) + " bytes)");
    }
  }
  Qcow2HeaderScan scan;
  scan.complete = true;
  scan.bytes_needed = 0;
  scan.header = std::move(h);
  return scan;
}

Status check_qcow2_supported(const Qcow2Header& header) {
  if (header.crypt_method != 0) {
    return Status::NotSupported("encrypted qcow2 (crypt_method " + str(header.crypt_method) +
                                ") is not supported");
  }
  if (header.incompatible_features & Qcow2Header::kIncompatibleExternalData) {
    return Status::NotSupported("qcow2 with an external data file" +
                                (header.external_data_file.empty()
                                     ? std::string()
                                     : " ('" + header.external_data_file + "')") +
                                " is not supported");
  }
  const uint64_t unknown = header.incompatible_features & ~kKnownIncompatible;
  if (unknown != 0) {
    std::string names;
    for (const Qcow2FeatureName& feature : header.feature_names) {
      if (feature.type == 0 && feature.bit < 64 && (unknown >> feature.bit) & 1) {
        names += (names.empty() ? " (" : ", ") + feature.name;
      }
    }
    if (!names.empty()) names += ")";
    return Status::NotSupported("qcow2 has unknown incompatible features " + hex(unknown) + names);
  }
#ifndef IMGFS_HAVE_ZSTD
  if (header.compression_type == Qcow2CompressionType::kZstd) {
    return Status::NotSupported("qcow2 zstd-compressed clusters need libzstd; this build has none");
  }
#endif
  return Status::OK();
}

Result<std::vector<uint64_t>> parse_qcow2_l1_table(std::span<const std::byte> bytes,
                                                   const Qcow2Header& header, uint64_t file_size) {
  const uint64_t needed = header.l1_entries_needed();
  if (bytes.size() / 8 < needed) {
    return Status::Corruption("qcow2 L1 table has " + str(bytes.size() / 8) + " entries; needs " +
                              str(needed));
  }
  const uint64_t cluster = header.cluster_bytes();
  std::vector<uint64_t> l2_offsets(needed);
  for (uint64_t i = 0; i < needed; ++i) {
    const uint64_t offset = load_be64(bytes.data() + i * 8) & kL1OffsetMask;
    if (offset == 0) continue;
    if (offset % cluster != 0) {
      return Status::Corruption("qcow2 L1 entry " + str(i) + ": L2 table offset " + hex(offset) +
                                " is not cluster-aligned");
    }
    if (offset > file_size || cluster > file_size - offset) {
      return Status::Corruption("qcow2 L1 entry " + str(i) + ": L2 table at " + hex(offset) +
                                " is past the end of the file (" + str(file_size) + " bytes)");
    }
    l2_offsets[i] = offset;
  }
  return l2_offsets;
}

Result<Qcow2Mapping> decode_qcow2_l2_entry(const Qcow2Header& header, uint64_t entry,
                                           uint64_t bitmap, uint32_t subcluster,
                                           uint64_t file_size) {
  Qcow2Mapping m;
  if (entry & kL2Compressed) {
    // The split between offset and sector count moves with the cluster size (qcow2.txt,
    // "Compressed Clusters Descriptor").
    const uint32_t shift = 62 - (header.cluster_bits - 8);
    const uint64_t offset = entry & ((uint64_t{1} << shift) - 1);
    const uint64_t sectors =
        ((entry >> shift) & ((uint64_t{1} << (header.cluster_bits - 8)) - 1)) + 1;
    if (offset >= file_size) {
      return Status::Corruption("compressed cluster at " + hex(offset) +
                                " is past the end of the file (" + str(file_size) + " bytes)");
    }
    m.kind = Qcow2Mapping::Kind::kCompressed;
    m.host_offset = offset;
    m.compressed_bytes = std::min(
        sectors * kCompressedSectorBytes - offset % kCompressedSectorBytes, file_size - offset);
    return m;
  }
  const uint64_t host = entry & kL2OffsetMask;
  if (host % header.cluster_bytes() != 0) {
    return Status::Corruption("data cluster offset " + hex(host) + " is not cluster-aligned");
  }
  uint64_t host_offset = host;
  if (!header.extended_l2()) {
    // qemu honours the zero flag in v2 images too.
    if (entry & kL2Zero) {
      m.kind = Qcow2Mapping::Kind::kZero;
      return m;
    }
    if (host == 0) return m;
  } else {
    const uint64_t alloc = bitmap & 0xffffffff;
    const uint64_t zero = bitmap >> 32;
    if (host == 0 && alloc != 0) {
      return Status::Corruption("subcluster bitmap " + hex(bitmap) +
                                " allocates subclusters of an unallocated cluster");
    }
    if ((alloc & zero) != 0) {
      return Status::Corruption("subcluster bitmap " + hex(bitmap) +
                                " marks subclusters both allocated and zero");
    }
    if ((zero >> subcluster) & 1) {
      m.kind = Qcow2Mapping::Kind::kZero;
      return m;
    }
    if (((alloc >> subcluster) & 1) == 0) return m;
    host_offset = host + uint64_t{subcluster} * (header.cluster_bytes() / 32);
  }
  if (host_offset >= file_size) {
    return Status::Corruption("data cluster at " + hex(host_offset) +
                              " is past the end of the file (" + str(file_size) + " bytes)");
  }
  m.kind = Qcow2Mapping::Kind::kData;
  m.host_offset = host_offset;
  return m;
}

Status decompress_qcow2_cluster(Qcow2CompressionType type, std::span<const std::byte> compressed,
                                std::span<std::byte> out) {
  if (type == Qcow2CompressionType::kDeflate) return inflate_cluster(compressed, out);
#ifdef IMGFS_HAVE_ZSTD
  return zstd_cluster(compressed, out);
#else
  return Status::NotSupported("qcow2 zstd-compressed clusters need libzstd; this build has none");
#endif
}

int probe_qcow2(std::span<const std::byte> first_bytes) {
  if (first_bytes.size() < 8 || load_be32(first_bytes.data()) != kMagic) return 0;
  const uint32_t version = load_be32(first_bytes.data() + 4);
  return version == 2 || version == 3 ? 100 : 0;
}

// A byte-bounded LRU of immutable byte buffers by key, filled single-flight: the first reader of
// a missing key fills it without the lock while later readers of that key wait. A failed fill is
// not cached; a waiter then tries itself.
class Qcow2Source::BytesCache {
 public:
  using Bytes = std::shared_ptr<const std::vector<std::byte>>;

  explicit BytesCache(uint64_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}

  template <typename Fill>
  Result<Bytes> get(uint64_t key, const Fill& fill) {
    std::unique_lock lock(mu_);
    for (;;) {
      if (auto it = entries_.find(key); it != entries_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second.lru_position);
        return it->second.bytes;
      }
      if (!filling_.contains(key)) break;
      cv_.wait(lock);
    }
    filling_.insert(key);
    lock.unlock();
    std::optional<Result<Bytes>> filled;
    {
      ScopeExit finish([&] {
        std::lock_guard relock(mu_);
        filling_.erase(key);
        // Insert before waking the waiters, so they find the entry instead of filling again.
        if (filled && filled->ok()) insert_locked(key, **filled);
        cv_.notify_all();
      });
      filled = fill();
    }
    return std::move(*filled);
  }

 private:
  struct Entry {
    Bytes bytes;
    std::list<uint64_t>::iterator lru_position;
  };

  void insert_locked(uint64_t key, const Bytes& bytes) {
    lru_.push_front(key);
    entries_[key] = Entry{bytes, lru_.begin()};
    bytes_ += bytes->size();
    while (bytes_ > capacity_bytes_ && lru_.size() > 1) {
      const uint64_t oldest = lru_.back();
      lru_.pop_back();
      bytes_ -= entries_[oldest].bytes->size();
      entries_.erase(oldest);
    }
  }

  const uint64_t capacity_bytes_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::set<uint64_t> filling_;                   // GUARDED_BY(mu_)
  std::list<uint64_t> lru_;                      // GUARDED_BY(mu_); front = newest
  std::unordered_map<uint64_t, Entry> entries_;  // GUARDED_BY(mu_)
  uint64_t bytes_ = 0;                           // GUARDED_BY(mu_)
};

// The L2 slice a lookup loop used last.
struct Qcow2Source::SliceRef {
  uint64_t host_offset = 0;  // 0: none yet
  BytesCache::Bytes bytes;
};

// Opens images and their backing chains; `chain` holds the resolved names of the backing files
// opened above this image (the top image's own name is not known here).
class Qcow2Opener {
 public:
  static Result<std::unique_ptr<BlockSource>> open(std::unique_ptr<BlockSource> lower,
                                                   const Qcow2Options& options,
                                                   const std::vector<std::string>& chain);

 private:
  static Result<std::unique_ptr<BlockSource>> open_backing(const std::string& image,
                                                           const Qcow2Header& header,
                                                           const Qcow2Options& options,
                                                           const std::vector<std::string>& chain);
};

Result<std::unique_ptr<BlockSource>> open_qcow2(std::unique_ptr<BlockSource> lower,
                                                const Qcow2Options& options) {
  return Qcow2Opener::open(std::move(lower), options, {});
}

Result<std::unique_ptr<BlockSource>> Qcow2Opener::open(std::unique_ptr<BlockSource> lower,
                                                       const Qcow2Options& options,
                                                       const std::vector<std::string>& chain) {
  if (lower == nullptr) return Status::InvalidArgument("open_qcow2: no lower source");
  const std::string name = "qcow2(" + lower->describe() + ")";
  if (options.max_chain_depth < 1) {
    return Status::InvalidArgument(name + ": max_chain_depth must be at least 1");
  }
  const uint64_t file_size = lower->size();
  std::vector<std::byte> prefix(std::min(file_size, kOpenProbeBytes));
  Qcow2Header header;
  for (;;) {
    if (Status s = lower->read_at(0, prefix); !s.ok()) return s.with_context(name + ": header");
    Result<Qcow2HeaderScan> scan = scan_qcow2_header(prefix, file_size);
    if (!scan.ok()) return scan.status().with_context(name);
    if (scan->complete) {
      header = std::move(scan->header);
      break;
    }
    if (scan->bytes_needed <= prefix.size()) {
      return Status::Corruption(name + ": qcow2 header scan made no progress");
    }
    prefix.resize(scan->bytes_needed);
  }
  if (Status s = check_qcow2_supported(header); !s.ok()) return s.with_context(name);

  std::vector<std::byte> l1_bytes(header.l1_entries_needed() * 8);  // <= 32 MiB, checked
  if (!l1_bytes.empty()) {
    if (Status s = lower->read_at(header.l1_table_offset, l1_bytes); !s.ok()) {
      return s.with_context(name + ": L1 table");
    }
  }
  Result<std::vector<uint64_t>> l2_offsets = parse_qcow2_l1_table(l1_bytes, header, file_size);
  if (!l2_offsets.ok()) return l2_offsets.status().with_context(name);

  std::unique_ptr<BlockSource> backing;
  if (!header.backing_file.empty()) {
    Result<std::unique_ptr<BlockSource>> opened = open_backing(name, header, options, chain);
    if (!opened.ok()) return opened.status();
    backing = std::move(*opened);
  }
  return std::unique_ptr<BlockSource>(new Qcow2Source(std::move(lower), options, std::move(header),
                                                      std::move(*l2_offsets), std::move(backing)));
}

Result<std::unique_ptr<BlockSource>> Qcow2Opener::open_backing(
    const std::string& image, const Qcow2Header& header, const Qcow2Options& options,
    const std::vector<std::string>& chain) {
  const std::string context = image + ": backing file '" + header.backing_file + "'";
  const std::string resolved =
      chain.empty() ? header.backing_file : resolve_name(chain.back(), header.backing_file);
  if (std::find(chain.begin(), chain.end(), resolved) != chain.end()) {
    return Status::Corruption(context + ": qcow2 backing chain has a cycle");
  }
  // This image is at depth chain.size() + 1; its backing file would be one deeper.
  if (chain.size() + 2 > static_cast<size_t>(options.max_chain_depth)) {
    return Status::NotSupported(context + ": qcow2 backing chain is deeper than " +
                                str(options.max_chain_depth) + " images");
  }
  if (!options.open_sibling) {
    return Status::NotSupported(context + ": no way to open files next to the image");
  }
  Result<std::unique_ptr<BlockSource>> file = options.open_sibling(resolved);
  if (!file.ok()) return file.status().with_context(context);
  std::string format = header.backing_format;
  if (format.empty()) {
    std::byte magic[8] = {};
    const uint64_t length = std::min<uint64_t>((*file)->size(), sizeof(magic));
    if (Status s = (*file)->read_at(0, std::span(magic, length)); !s.ok()) {
      return s.with_context(context);
    }
    if (probe_qcow2(std::span(magic, length)) > 0) format = "qcow2";
  }
  if (format == "qcow2") {
    std::vector<std::string> deeper = chain;
    deeper.push_back(resolved);
    Result<std::unique_ptr<BlockSource>> opened = open(std::move(*file), options, deeper);
    if (!opened.ok()) return opened.status().with_context(context);
    return opened;
  }
  if (format == "raw") return std::move(*file);
  if (options.open_backing_format) {
    Result<std::unique_ptr<BlockSource>> opened =
        options.open_backing_format(std::move(*file), format);
    if (!opened.ok()) return opened.status().with_context(context);
    return opened;
  }
  if (format.empty()) return std::move(*file);  // no format named and not qcow2: raw, as qemu
  return Status::NotSupported(context + ": backing format '" + format + "' is not supported");
}

Qcow2Source::Qcow2Source(std::unique_ptr<BlockSource> lower, const Qcow2Options& options,
                         Qcow2Header header, std::vector<uint64_t> l2_offsets,
                         std::unique_ptr<BlockSource> backing)
    : lower_(std::move(lower)),
      header_(std::move(header)),
      l2_offsets_(std::move(l2_offsets)),
      backing_(std::move(backing)),
      lower_size_(lower_->size()),
      subcluster_bytes_(header_.cluster_bytes() / header_.subclusters()),
      l2_slice_bytes_(std::min(header_.cluster_bytes(), kMaxL2SliceBytes)),
      l2_cache_(std::make_unique<BytesCache>(options.l2_cache_bytes)),
      cluster_cache_(std::make_unique<BytesCache>(options.cluster_cache_bytes)) {}

Qcow2Source::~Qcow2Source() = default;

uint32_t Qcow2Source::block_size() const { return static_cast<uint32_t>(header_.cluster_bytes()); }

Status Qcow2Source::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  // Pieces adjacent in `out` that come from contiguous lower (or backing) bytes are read in one
  // call.
  enum class Pending { kNone, kLower, kBacking };
  Pending pending = Pending::kNone;
  uint64_t pending_from = 0;  // host offset (kLower) or guest offset (kBacking)
  uint64_t pending_out = 0;   // where in `out` it goes
  uint64_t pending_length = 0;
  auto flush = [&]() -> Status {
    const std::span<std::byte> dst = out.subspan(pending_out, pending_length);
    Status s;
    if (pending == Pending::kLower) {
      s = lower_->read_at(pending_from, dst);
      if (!s.ok()) s = s.with_context(describe() + ": data at host offset " + hex(pending_from));
    } else if (pending == Pending::kBacking) {
      s = read_backing(pending_from, dst);
    }
    pending = Pending::kNone;
    pending_length = 0;
    return s;
  };
  auto add = [&](Pending kind, uint64_t from, uint64_t at, uint64_t length) -> Status {
    if (pending == kind && pending_from + pending_length == from &&
        pending_out + pending_length == at) {
      pending_length += length;
      return Status::OK();
    }
    if (Status s = flush(); !s.ok()) return s;
    pending = kind;
    pending_from = from;
    pending_out = at;
    pending_length = length;
    return Status::OK();
  };

  SliceRef slice;
  const uint64_t end = offset + out.size();
  uint64_t pos = offset;
  while (pos < end) {
    Result<Qcow2Mapping> mapping = lookup(pos, slice);
    if (!mapping.ok()) return mapping.status();
    const uint64_t within = pos % subcluster_bytes_;
    const uint64_t n = std::min(end - pos, subcluster_bytes_ - within);
    const uint64_t at = pos - offset;
    Status s;
    switch (mapping->kind) {
      case Qcow2Mapping::Kind::kData: {
        const uint64_t host = mapping->host_offset + within;
        if (host > lower_size_ || n > lower_size_ - host) {
          return Status::Corruption(describe() + ": data cluster for guest offset " + str(pos) +
                                    " at host offset " + hex(mapping->host_offset) +
                                    " runs past the end of the file (" + str(lower_size_) +
                                    " bytes)");
        }
        s = add(Pending::kLower, host, at, n);
        break;
      }
      case Qcow2Mapping::Kind::kUnallocated:
        if (backing_ != nullptr) {
          s = add(Pending::kBacking, pos, at, n);
          break;
        }
        [[fallthrough]];
      case Qcow2Mapping::Kind::kZero:
        std::memset(out.data() + at, 0, n);
        break;
      case Qcow2Mapping::Kind::kCompressed:
        s = read_compressed(*mapping, pos % header_.cluster_bytes(), out.subspan(at, n));
        break;
    }
    if (!s.ok()) return s;
    pos += n;
  }
  return flush();
}

Result<Qcow2Mapping> Qcow2Source::lookup(uint64_t offset, SliceRef& slice) const {
  const uint64_t cluster_index = offset >> header_.cluster_bits;
  const uint64_t l2_entries = header_.l2_entries();
  const uint64_t l2_table = l2_offsets_[cluster_index / l2_entries];
  if (l2_table == 0) return Qcow2Mapping{};
  const uint64_t entry_offset = (cluster_index % l2_entries) * header_.l2_entry_bytes();
  const uint64_t slice_host = l2_table + entry_offset / l2_slice_bytes_ * l2_slice_bytes_;
  if (slice.host_offset != slice_host) {
    Result<BytesCache::Bytes> bytes =
        l2_cache_->get(slice_host, [&]() -> Result<BytesCache::Bytes> {
          auto fetched = std::make_shared<std::vector<std::byte>>(l2_slice_bytes_);
          if (Status s = lower_->read_at(slice_host, *fetched); !s.ok()) {
            return s.with_context(describe() + ": L2 table slice at " + hex(slice_host));
          }
          return BytesCache::Bytes(std::move(fetched));
        });
    if (!bytes.ok()) return bytes.status();
    slice.host_offset = slice_host;
    slice.bytes = std::move(*bytes);
  }
  const std::byte* entry = slice.bytes->data() + entry_offset % l2_slice_bytes_;
  const uint64_t bitmap = header_.extended_l2() ? load_be64(entry + 8) : 0;
  const uint32_t subcluster =
      static_cast<uint32_t>((offset % header_.cluster_bytes()) / subcluster_bytes_);
  Result<Qcow2Mapping> mapping =
      decode_qcow2_l2_entry(header_, load_be64(entry), bitmap, subcluster, lower_size_);
  if (!mapping.ok()) {
    return mapping.status().with_context(describe() + ": L2 entry for guest offset " + str(offset) +
                                         " (L2 table at " + hex(l2_table) + ")");
  }
  return mapping;
}

Status Qcow2Source::read_backing(uint64_t offset, std::span<std::byte> out) const {
  // A backing file smaller than this image reads as zeros past its end.
  const uint64_t backing_size = backing_->size();
  const uint64_t n =
      offset < backing_size ? std::min<uint64_t>(out.size(), backing_size - offset) : 0;
  if (n > 0) {
    if (Status s = backing_->read_at(offset, out.first(n)); !s.ok()) {
      return s.with_context(describe() + ": backing file");
    }
  }
  std::memset(out.data() + n, 0, out.size() - n);
  return Status::OK();
}

Status Qcow2Source::read_compressed(const Qcow2Mapping& mapping, uint64_t within_cluster,
                                    std::span<std::byte> out) const {
  Result<BytesCache::Bytes> cluster =
      cluster_cache_->get(mapping.host_offset, [&]() -> Result<BytesCache::Bytes> {
        std::vector<std::byte> compressed(mapping.compressed_bytes);
        if (Status s = lower_->read_at(mapping.host_offset, compressed); !s.ok()) {
          return s.with_context(describe() + ": compressed cluster at " + hex(mapping.host_offset));
        }
        auto decoded = std::make_shared<std::vector<std::byte>>(header_.cluster_bytes());
        if (Status s = decompress_qcow2_cluster(header_.compression_type, compressed, *decoded);
            !s.ok()) {
          return s.with_context(describe() + ": compressed cluster at " + hex(mapping.host_offset));
        }
        return BytesCache::Bytes(std::move(decoded));
      });
  if (!cluster.ok()) return cluster.status();
  std::memcpy(out.data(), (*cluster)->data() + within_cluster, out.size());
  return Status::OK();
}

Result<Extent> Qcow2Source::map(uint64_t offset) const {
  if (offset >= size()) {
    return Status::InvalidArgument(describe() + ": map at " + str(offset) + " is past size " +
                                   str(size()));
  }
  // Runs cover subclusters of one kind: data (stored or compressed), zero, or unallocated (zero
  // without a backing file). They stop at the end of the L2 slice, so a map costs at most one
  // slice fetch; runs of L1 entries without an L2 table extend freely.
  enum class Run { kData, kZero, kUnallocated };
  auto run_of = [&](Qcow2Mapping::Kind kind) {
    switch (kind) {
      case Qcow2Mapping::Kind::kData:
      case Qcow2Mapping::Kind::kCompressed:
        return Run::kData;
      case Qcow2Mapping::Kind::kZero:
        return Run::kZero;
      case Qcow2Mapping::Kind::kUnallocated:
        break;
    }
    return backing_ != nullptr ? Run::kUnallocated : Run::kZero;
  };
  const uint64_t l1_reach = header_.cluster_bytes() * header_.l2_entries();
  const uint64_t slice_reach = l2_slice_bytes_ / header_.l2_entry_bytes() * header_.cluster_bytes();
  SliceRef slice;
  Result<Qcow2Mapping> first = lookup(offset, slice);
  if (!first.ok()) return first.status();
  const Run kind = run_of(first->kind);
  uint64_t pos = offset - offset % subcluster_bytes_ + subcluster_bytes_;
  std::optional<uint64_t> slice_end;
  if (l2_offsets_[offset / l1_reach] != 0) slice_end = offset - offset % slice_reach + slice_reach;
  while (pos < size() && (!slice_end || pos < *slice_end)) {
    if (l2_offsets_[pos / l1_reach] == 0) {
      if (run_of(Qcow2Mapping::Kind::kUnallocated) != kind) break;
      pos = pos - pos % l1_reach + l1_reach;
      continue;
    }
    if (!slice_end) slice_end = pos - pos % slice_reach + slice_reach;
    Result<Qcow2Mapping> next = lookup(pos, slice);
    if (!next.ok()) return next.status();
    if (run_of(next->kind) != kind) break;
    pos += subcluster_bytes_;
  }
  uint64_t length = std::min(pos, size()) - offset;
  if (kind == Run::kData) return Extent{Extent::Kind::kData, length};
  if (kind == Run::kZero) return Extent{Extent::Kind::kZero, length};
  const uint64_t backing_size = backing_->size();
  if (offset >= backing_size) return Extent{Extent::Kind::kZero, length};
  length = std::min(length, backing_size - offset);
  Result<Extent> below = backing_->map(offset);
  if (!below.ok()) return below.status().with_context(describe() + ": backing file");
  return Extent{below->kind, std::min(length, below->length)};
}

}  // namespace imgfs::formats
