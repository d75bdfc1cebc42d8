#include "formats/partitioned_disk_source.h"

#include <openssl/evp.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string_view>
#include <utility>

#include "formats/byte_order.h"
#include "formats/checked_math.h"

namespace imgfs::formats {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kPartitionFirstLba = kPartitionOffsetBytes / kDiskSectorBytes;
// The largest sector count (and LBA + 1) MBR's 32-bit fields can hold.
constexpr uint64_t kMbrMaxSectors = 0xFFFFFFFF;

constexpr uint64_t kGptEntryCount = 128;
constexpr uint64_t kGptEntryBytes = 128;
constexpr uint64_t kGptEntryArraySectors = kGptEntryCount * kGptEntryBytes / kDiskSectorBytes;
constexpr uint64_t kGptHeaderBytes = 92;
// Protective MBR + header + entries at the start; entries + header at the end.
constexpr uint64_t kGptPrimarySectors = 2 + kGptEntryArraySectors;
constexpr uint64_t kGptBackupSectors = kGptEntryArraySectors + 1;

constexpr uint8_t kMbrTypeLinux = 0x83;
constexpr uint8_t kMbrTypeGptProtective = 0xEE;
constexpr uint8_t kMbrActive = 0x80;
constexpr uint64_t kGptAttributeLegacyBiosBootable = uint64_t{1} << 2;
constexpr std::string_view kGptPartitionName = "Linux filesystem";

// Linux filesystem data, 0FC63DAF-8483-4772-8E79-3D69D8477DE4 (RFC byte order).
constexpr Guid kLinuxFilesystemType = {
    std::byte{0x0F}, std::byte{0xC6}, std::byte{0x3D}, std::byte{0xAF},
    std::byte{0x84}, std::byte{0x83}, std::byte{0x47}, std::byte{0x72},
    std::byte{0x8E}, std::byte{0x79}, std::byte{0x3D}, std::byte{0x69},
    std::byte{0xD8}, std::byte{0x47}, std::byte{0x7D}, std::byte{0xE4}};

// The namespace of imgfs's name-based UUIDs, e8df9f13-cf65-4d71-91cb-f3f88350dcc1 (random, fixed
// forever: changing it would change the identity of every synthesized disk).
constexpr Guid kImgfsNamespace = {
    std::byte{0xE8}, std::byte{0xDF}, std::byte{0x9F}, std::byte{0x13},
    std::byte{0xCF}, std::byte{0x65}, std::byte{0x4D}, std::byte{0x71},
    std::byte{0x91}, std::byte{0xCB}, std::byte{0xF3}, std::byte{0xF8},
    std::byte{0x83}, std::byte{0x50}, std::byte{0xDC}, std::byte{0xC1}};

// x rounded up to a multiple of `unit` (a power of two), or nullopt on overflow.
std::optional<uint64_t> checked_round_up(uint64_t x, uint64_t unit) {
  const std::optional<uint64_t> sum = checked_add(x, unit - 1);
  if (!sum) return std::nullopt;
  return *sum & ~(unit - 1);
}

// RFC 4122 section 4.3 version 5: SHA-1 of the namespace and the name, with version and variant.
Result<Guid> name_based_guid(std::string_view name) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_length = 0;
  std::string input(reinterpret_cast<const char*>(kImgfsNamespace.data()), kImgfsNamespace.size());
  input.append(name);
  if (EVP_Digest(input.data(), input.size(), digest, &digest_length, EVP_sha1(), nullptr) != 1 ||
      digest_length < 16) {
    return Status::NotSupported("partitioned disk: SHA-1 is not available from OpenSSL");
  }
  Guid guid;
  for (size_t i = 0; i < guid.size(); ++i) guid[i] = std::byte{digest[i]};
  guid[6] = (guid[6] & std::byte{0x0F}) | std::byte{0x50};
  guid[8] = (guid[8] & std::byte{0x3F}) | std::byte{0x80};
  return guid;
}

// GPT keeps the first three GUID fields little-endian (UEFI spec appendix A).
void store_gpt_guid(std::byte* p, const Guid& guid) {
  const int order[16] = {3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int i = 0; i < 16; ++i) p[i] = guid[order[i]];
}

void store_le16(std::byte* p, uint16_t v) {
  p[0] = static_cast<std::byte>(v);
  p[1] = static_cast<std::byte>(v >> 8);
}

// The 3-byte CHS address of `lba` in a 255-head, 63-sector geometry; 0xFE 0xFF 0xFF (the largest
// address, which tools read as "use the LBA fields") past cylinder 1023.
void store_chs(std::byte* p, uint64_t lba) {
  constexpr uint64_t kHeads = 255;
  constexpr uint64_t kSectorsPerTrack = 63;
  const uint64_t cylinder = lba / (kHeads * kSectorsPerTrack);
  if (cylinder > 1023) {
    p[0] = std::byte{0xFE};
    p[1] = std::byte{0xFF};
    p[2] = std::byte{0xFF};
    return;
  }
  const uint64_t head = (lba / kSectorsPerTrack) % kHeads;
  const uint64_t sector = lba % kSectorsPerTrack + 1;
  p[0] = static_cast<std::byte>(head);
  p[1] = static_cast<std::byte>(sector | ((cylinder >> 2) & 0xC0));
  p[2] = static_cast<std::byte>(cylinder & 0xFF);
}

// One MBR partition entry (16 bytes at `p`).
void store_mbr_entry(std::byte* p, uint8_t status, uint8_t type, uint64_t first_lba,
                     uint64_t sectors) {
  p[0] = std::byte{status};
  store_chs(p + 1, first_lba);
  p[4] = std::byte{type};
  store_chs(p + 5, first_lba + sectors - 1);
  store_le32(p + 8, static_cast<uint32_t>(first_lba));
  store_le32(p + 12, static_cast<uint32_t>(sectors));
}

uint32_t crc32_of(const std::byte* p, uint64_t length) {
  return static_cast<uint32_t>(
      crc32(crc32(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(p), static_cast<uInt>(length)));
}

uint64_t last_lba(const PartitionedDiskPlan& plan) {
  return plan.disk_bytes / kDiskSectorBytes - 1;
}

// The entry array: partition 1, then 127 unused (all-zero) entries.
void store_gpt_entries(std::byte* p, const PartitionedDiskPlan& plan) {
  store_gpt_guid(p, kLinuxFilesystemType);
  store_gpt_guid(p + 16, plan.partition_guid);
  store_le64(p + 32, plan.partition_first_lba);
  store_le64(p + 40, plan.partition_first_lba + plan.partition_sectors - 1);
  store_le64(p + 48, plan.bootable ? kGptAttributeLegacyBiosBootable : 0);
  for (size_t i = 0; i < kGptPartitionName.size(); ++i) {
    store_le16(p + 56 + 2 * i, static_cast<uint16_t>(kGptPartitionName[i]));
  }
}

// A GPT header at `p` for the copy at `my_lba` whose entries start at `entries_lba`; `entries`
// points at the entry array it covers (for its CRC32).
void store_gpt_header(std::byte* p, const PartitionedDiskPlan& plan, uint64_t my_lba,
                      uint64_t alternate_lba, uint64_t entries_lba, const std::byte* entries) {
  const uint64_t last = last_lba(plan);
  std::memcpy(p, "EFI PART", 8);
  store_le32(p + 8, 0x00010000);  // revision 1.0
  store_le32(p + 12, kGptHeaderBytes);
  store_le64(p + 24, my_lba);
  store_le64(p + 32, alternate_lba);
  store_le64(p + 40, kGptPrimarySectors);        // first usable LBA
  store_le64(p + 48, last - kGptBackupSectors);  // last usable LBA
  store_gpt_guid(p + 56, plan.disk_guid);
  store_le64(p + 72, entries_lba);
  store_le32(p + 80, kGptEntryCount);
  store_le32(p + 84, kGptEntryBytes);
  store_le32(p + 88, crc32_of(entries, kGptEntryCount * kGptEntryBytes));
  // The header CRC32 covers the header with its own CRC field zero, which it still is here.
  store_le32(p + 16, crc32_of(p, kGptHeaderBytes));
}

void store_boot_signature(std::byte* sector) {
  sector[510] = std::byte{0x55};
  sector[511] = std::byte{0xAA};
}

}  // namespace

std::string guid_string(const Guid& guid) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string text;
  for (size_t i = 0; i < guid.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) text.push_back('-');
    const uint8_t b = std::to_integer<uint8_t>(guid[i]);
    text.push_back(kHex[b >> 4]);
    text.push_back(kHex[b & 0xF]);
  }
  return text;
}

Result<PartitionedDiskPlan> plan_partitioned_disk(uint64_t image_bytes,
                                                  const PartitionedDiskOptions& options) {
  const std::string what =
      "partitioned disk around an image of " + std::to_string(image_bytes) + " bytes: ";
  if (image_bytes == 0) return Status::InvalidArgument(what + "the partition image is empty");
  const std::optional<uint64_t> image_sector_bytes =
      checked_round_up(image_bytes, kDiskSectorBytes);
  const std::optional<uint64_t> image_end =
      image_sector_bytes ? checked_add(kPartitionOffsetBytes, *image_sector_bytes) : std::nullopt;
  const std::optional<uint64_t> mbr_disk_bytes =
      image_end ? checked_round_up(*image_end, kMiB) : std::nullopt;
  const std::optional<uint64_t> gpt_end =
      image_end ? checked_add(*image_end, kGptBackupSectors * kDiskSectorBytes) : std::nullopt;
  const std::optional<uint64_t> gpt_disk_bytes =
      gpt_end ? checked_round_up(*gpt_end, kMiB) : std::nullopt;
  if (!mbr_disk_bytes || !gpt_disk_bytes) {
    return Status::InvalidArgument(what + "the disk size overflows 64 bits");
  }
  const bool mbr_fits = *mbr_disk_bytes / kDiskSectorBytes <= kMbrMaxSectors;

  PartitionedDiskPlan plan;
  switch (options.table) {
    case PartitionTable::kMbr:
      if (!mbr_fits) {
        return Status::InvalidArgument(what + "an MBR cannot address a disk of " +
                                       std::to_string(*mbr_disk_bytes) + " bytes; use GPT");
      }
      plan.table = PartitionTable::kMbr;
      break;
    case PartitionTable::kGpt:
      plan.table = PartitionTable::kGpt;
      break;
    case PartitionTable::kAuto:
      plan.table = mbr_fits ? PartitionTable::kMbr : PartitionTable::kGpt;
      break;
  }
  plan.image_bytes = image_bytes;
  plan.partition_first_lba = kPartitionFirstLba;
  plan.partition_sectors = *image_sector_bytes / kDiskSectorBytes;
  plan.disk_bytes = plan.table == PartitionTable::kMbr ? *mbr_disk_bytes : *gpt_disk_bytes;
  plan.bootable = options.bootable;

  // Distinct names per field, so the disk and the partition never share a GUID.
  Result<Guid> disk_guid = name_based_guid("disk:" + options.name);
  if (!disk_guid.ok()) return disk_guid.status();
  Result<Guid> partition_guid = name_based_guid("partition 1:" + options.name);
  if (!partition_guid.ok()) return partition_guid.status();
  plan.disk_guid = *disk_guid;
  plan.partition_guid = *partition_guid;
  // An MBR signature of 0 means "none" to Windows, which would then write one.
  plan.mbr_signature = std::max<uint32_t>(load_le32(plan.disk_guid.data() + 12), 1);
  return plan;
}

std::vector<std::byte> build_primary_table(const PartitionedDiskPlan& plan) {
  if (plan.table == PartitionTable::kMbr) {
    std::vector<std::byte> mbr(kDiskSectorBytes);
    store_le32(mbr.data() + 440, plan.mbr_signature);
    store_mbr_entry(mbr.data() + 446, plan.bootable ? kMbrActive : 0, kMbrTypeLinux,
                    plan.partition_first_lba, plan.partition_sectors);
    store_boot_signature(mbr.data());
    return mbr;
  }
  std::vector<std::byte> table(kGptPrimarySectors * kDiskSectorBytes);
  // The protective MBR covers the whole disk after sector 0, clipped to what 32 bits can say
  // (UEFI spec 2.10 section 5.2.3). It is never active: UEFI ignores the flag, BIOSes differ.
  const uint64_t last = last_lba(plan);
  store_mbr_entry(table.data() + 446, 0, kMbrTypeGptProtective, 1,
                  std::min<uint64_t>(last, kMbrMaxSectors));
  store_boot_signature(table.data());
  std::byte* entries = table.data() + 2 * kDiskSectorBytes;
  store_gpt_entries(entries, plan);
  store_gpt_header(table.data() + kDiskSectorBytes, plan, 1, last, 2, entries);
  return table;
}

std::vector<std::byte> build_backup_table(const PartitionedDiskPlan& plan) {
  if (plan.table == PartitionTable::kMbr) return {};
  std::vector<std::byte> table(kGptBackupSectors * kDiskSectorBytes);
  const uint64_t last = last_lba(plan);
  store_gpt_entries(table.data(), plan);
  store_gpt_header(table.data() + kGptEntryArraySectors * kDiskSectorBytes, plan, last, 1,
                   last - kGptEntryArraySectors, table.data());
  return table;
}

Result<std::unique_ptr<BlockSource>> open_partitioned_disk(std::unique_ptr<BlockSource> partition,
                                                           const PartitionedDiskOptions& options) {
  if (!partition) return Status::InvalidArgument("partitioned disk: no partition image");
  Result<PartitionedDiskPlan> plan = plan_partitioned_disk(partition->size(), options);
  if (!plan.ok()) return plan.status().with_context(partition->describe());
  return std::unique_ptr<BlockSource>(
      std::make_unique<PartitionedDiskSource>(std::move(partition), *plan));
}

PartitionedDiskSource::PartitionedDiskSource(std::unique_ptr<BlockSource> partition,
                                             const PartitionedDiskPlan& plan)
    : partition_(std::move(partition)),
      plan_(plan),
      primary_table_(build_primary_table(plan_)),
      backup_table_(build_backup_table(plan_)) {
  regions_.push_back({0, primary_table_.size(), primary_table_});
  regions_.push_back({kPartitionOffsetBytes, plan_.image_bytes, {}});
  if (!backup_table_.empty()) {
    regions_.push_back(
        {plan_.disk_bytes - backup_table_.size(), backup_table_.size(), backup_table_});
  }
}

Status PartitionedDiskSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  size_t done = 0;
  while (done < out.size()) {
    const uint64_t position = offset + done;
    const uint64_t remaining = out.size() - done;
    const Region* region = region_after(position);
    if (region == nullptr || region->offset > position) {
      // Zeros up to the next region (or the end of the read).
      const uint64_t zeros =
          region == nullptr ? remaining : std::min(remaining, region->offset - position);
      std::memset(out.data() + done, 0, zeros);
      done += zeros;
      continue;
    }
    const uint64_t inside = position - region->offset;
    const uint64_t length = std::min(remaining, region->length - inside);
    if (region->table.empty()) {
      if (Status s = partition_->read_at(inside, out.subspan(done, length)); !s.ok()) {
        return s.with_context(describe() + ": partition bytes at " + std::to_string(inside));
      }
    } else {
      std::memcpy(out.data() + done, region->table.data() + inside, length);
    }
    done += length;
  }
  return Status::OK();
}

std::string PartitionedDiskSource::describe() const {
  return std::string(plan_.table == PartitionTable::kMbr ? "mbr_disk(" : "gpt_disk(") +
         partition_->describe() + ")";
}

uint32_t PartitionedDiskSource::block_size() const {
  const uint32_t lower = partition_->block_size();
  return lower != 0 && kPartitionOffsetBytes % lower == 0 ? lower : kDiskSectorBytes;
}

Result<Extent> PartitionedDiskSource::map(uint64_t offset) const {
  if (offset >= size()) {
    return Status::InvalidArgument(describe() + ": map at " + std::to_string(offset) +
                                   " is past size " + std::to_string(size()));
  }
  const Region* region = region_after(offset);
  if (region == nullptr) return Extent{Extent::Kind::kZero, size() - offset};
  if (region->offset > offset) return Extent{Extent::Kind::kZero, region->offset - offset};
  const uint64_t inside = offset - region->offset;
  const uint64_t left = region->length - inside;
  if (!region->table.empty()) return Extent{Extent::Kind::kData, left};
  Result<Extent> lower = partition_->map(inside);
  if (!lower.ok()) return lower.status().with_context(describe());
  if (lower->length == 0) {
    return Status::Corruption(describe() + ": the partition image mapped an empty run at " +
                              std::to_string(inside));
  }
  return Extent{lower->kind, std::min(lower->length, left)};
}

const PartitionedDiskSource::Region* PartitionedDiskSource::region_after(uint64_t offset) const {
  for (const Region& region : regions_) {
    if (region.offset + region.length > offset) return &region;
  }
  return nullptr;
}

}  // namespace imgfs::formats
