#include "formats/disk_format.h"

#include <algorithm>
#include <vector>

#include "formats/qcow2_source.h"
#include "formats/vdi_source.h"
#include "formats/vhd_source.h"
#include "formats/vhdx_source.h"
#include "formats/vmdk_source.h"

namespace imgfs::formats {

namespace {

constexpr uint64_t kHeadBytes = 4096;
constexpr uint64_t kTailBytes = 512;
// A probe must be at least this sure; weaker hints (a file that merely could be one) stay raw.
constexpr int kMinimumScore = 50;

}  // namespace

std::string_view disk_format_name(DiskFormat format) {
  switch (format) {
    case DiskFormat::kRaw: return "raw";
    case DiskFormat::kQcow2: return "qcow2";
    case DiskFormat::kVmdk: return "vmdk";
    case DiskFormat::kVhd: return "vhd";
    case DiskFormat::kVhdx: return "vhdx";
    case DiskFormat::kVdi: return "vdi";
  }
  return "unknown";
}

namespace {

// The format whose probe scores highest on `head` and `tail` (tail may be empty).
DiskFormat best_format(std::span<const std::byte> head, std::span<const std::byte> tail) {
  const std::pair<DiskFormat, int> scores[] = {
      {DiskFormat::kQcow2, probe_qcow2(head)}, {DiskFormat::kVmdk, probe_vmdk(head)},
      {DiskFormat::kVhdx, probe_vhdx(head)},   {DiskFormat::kVdi, probe_vdi(head)},
      {DiskFormat::kVhd, probe_vhd(head, tail)},
  };
  DiskFormat best = DiskFormat::kRaw;
  int best_score = kMinimumScore - 1;
  for (const auto& [format, score] : scores) {
    if (score > best_score) {
      best = format;
      best_score = score;
    }
  }
  return best;
}

}  // namespace

Result<DiskFormat> detect_disk_format(const BlockSource& source) {
  const uint64_t size = source.size();
  std::vector<std::byte> head(std::min(size, kHeadBytes));
  if (Status s = source.read_at(0, head); !s.ok()) return s;
  std::vector<std::byte> tail(std::min(size, kTailBytes));
  if (Status s = source.read_at(size - tail.size(), tail); !s.ok()) return s;
  return best_format(head, tail);
}

Result<DiskFormat> detect_disk_format_by_head(const BlockSource& source) {
  std::vector<std::byte> head(std::min(source.size(), kHeadBytes));
  if (Status s = source.read_at(0, head); !s.ok()) return s;
  return best_format(head, {});
}

Result<std::unique_ptr<BlockSource>> open_disk_format(DiskFormat format,
                                                      std::unique_ptr<BlockSource> image,
                                                      const SiblingOpener& open_sibling) {
  switch (format) {
    case DiskFormat::kRaw:
      return image;
    case DiskFormat::kQcow2: {
      Qcow2Options options;
      options.open_sibling = open_sibling;
      return open_qcow2(std::move(image), options);
    }
    case DiskFormat::kVmdk: {
      VmdkOptions options;
      options.open_sibling = open_sibling;
      return open_vmdk(std::move(image), options);
    }
    case DiskFormat::kVhd: {
      VhdOptions options;
      options.open_sibling = open_sibling;
      return open_vhd(std::move(image), options);
    }
    case DiskFormat::kVhdx: {
      VhdxOptions options;
      options.open_sibling = open_sibling;
      return open_vhdx(std::move(image), options);
    }
    case DiskFormat::kVdi: {
      VdiOptions options;
      options.open_sibling = open_sibling;
      return open_vdi(std::move(image), options);
    }
  }
  return Status::InvalidArgument("unknown disk format");
}

}  // namespace imgfs::formats
