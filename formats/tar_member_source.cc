#include "formats/tar_member_source.h"

#include <algorithm>
#include <cstring>
#include <string_view>
#include <utility>

#include "formats/checked_math.h"

namespace imgfs::formats {

namespace {

// Header layout (POSIX ustar; GNU reuses the prefix area for its own fields).
constexpr size_t kNameOffset = 0;
constexpr size_t kNameLength = 100;
constexpr size_t kSizeOffset = 124;
constexpr size_t kNumberLength = 12;
constexpr size_t kChecksumOffset = 148;
constexpr size_t kChecksumLength = 8;
constexpr size_t kTypeflagOffset = 156;
constexpr size_t kMagicOffset = 257;
constexpr size_t kPrefixOffset = 345;
constexpr size_t kPrefixLength = 155;
// Old GNU sparse map: 4 entries in the header, 21 per extension block, 24 bytes each.
constexpr size_t kSparseEntryLength = 24;
constexpr size_t kHeaderSparseOffset = 386;
constexpr size_t kHeaderSparseCount = 4;
constexpr size_t kHeaderIsExtendedOffset = 482;
constexpr size_t kHeaderRealSizeOffset = 483;
constexpr size_t kExtensionSparseCount = 21;
constexpr size_t kExtensionIsExtendedOffset = 504;

// Long names and pax headers are read whole; bigger ones are not what bundle tools write.
constexpr uint64_t kMaxMetadataBytes = uint64_t{1} << 20;
// Bounds the memory of a sparse map (each entry needs an extension-block slot in the stream).
constexpr size_t kMaxSparseEntries = size_t{1} << 22;

constexpr std::string_view kUstarMagic("ustar\0", 6);
constexpr std::string_view kGnuMagic("ustar  \0", 8);

using Block = std::span<const std::byte, kTarBlockSize>;

std::string_view field_view(std::span<const std::byte> field) {
  return std::string_view(reinterpret_cast<const char*>(field.data()), field.size());
}

// The text of a NUL-terminated (or full-width) string field.
std::string c_string_field(std::span<const std::byte> field) {
  std::string_view text = field_view(field);
  return std::string(text.substr(0, text.find('\0')));
}

// A numeric field: octal digits after optional spaces, ended by a space, a NUL or the field end
// (as GNU tar reads them; an empty field is 0, as in Python's tarfile), or GNU base-256 when
// bit 7 of the first byte is set (bit 6 is the sign; the other bits start the big-endian value).
Result<uint64_t> parse_tar_number(std::span<const std::byte> field, std::string_view what) {
  const uint8_t first = std::to_integer<uint8_t>(field[0]);
  if ((first & 0x80) != 0) {
    if ((first & 0x40) != 0) {
      return Status::Corruption("tar: negative base-256 " + std::string(what));
    }
    uint64_t value = first & 0x3F;
    for (size_t i = 1; i < field.size(); ++i) {
      if (value > (UINT64_MAX >> 8)) {
        return Status::Corruption("tar: base-256 " + std::string(what) + " overflows 64 bits");
      }
      value = (value << 8) | std::to_integer<uint8_t>(field[i]);
    }
    return value;
  }
  std::string_view text = field_view(field);
  size_t i = 0;
  while (i < text.size() && text[i] == ' ') ++i;
  uint64_t value = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '7'; ++i) {
    if (value > (UINT64_MAX >> 3)) {
      return Status::Corruption("tar: octal " + std::string(what) + " overflows 64 bits");
    }
    value = (value << 3) | static_cast<uint64_t>(text[i] - '0');
  }
  if (i < text.size() && text[i] != ' ' && text[i] != '\0') {
    return Status::Corruption("tar: bad character in octal " + std::string(what) + " field");
  }
  return value;
}

// Entries of a sparse map, ending at the first entry whose numbytes field is empty (as GNU tar
// reads them). Appends to `entries`; returns whether the map was ended by an empty entry.
Result<bool> parse_sparse_entries(std::span<const std::byte> area, size_t count,
                                  std::vector<TarSparseEntry>* entries) {
  for (size_t i = 0; i < count; ++i) {
    std::span<const std::byte> entry = area.subspan(i * kSparseEntryLength, kSparseEntryLength);
    if (entry[kNumberLength] == std::byte{0}) return true;
    Result<uint64_t> offset = parse_tar_number(entry.first(kNumberLength), "sparse offset");
    if (!offset.ok()) return offset.status();
    Result<uint64_t> length = parse_tar_number(entry.subspan(kNumberLength), "sparse numbytes");
    if (!length.ok()) return length.status();
    entries->push_back(TarSparseEntry{*offset, *length});
  }
  return false;
}

// Offset of the header after an entry whose data of `data_size` bytes starts at `data_offset`.
Result<uint64_t> next_header_offset(uint64_t data_offset, uint64_t data_size) {
  std::optional<uint64_t> padded = checked_add(data_size, kTarBlockSize - 1);
  std::optional<uint64_t> next;
  if (padded) next = checked_add(data_offset, *padded / kTarBlockSize * kTarBlockSize);
  if (!next) return Status::Corruption("tar: entry size overflows");
  return *next;
}

std::string at_offset(uint64_t offset) { return "tar header at offset " + std::to_string(offset); }

// Reads the whole data of a metadata entry (long name, pax header).
Result<std::vector<std::byte>> read_metadata(const BlockSource& lower, uint64_t data_offset,
                                             uint64_t data_size, std::string_view what) {
  if (data_size > kMaxMetadataBytes) {
    return Status::NotSupported("tar: " + std::string(what) + " of " + std::to_string(data_size) +
                                " bytes is over the 1 MiB limit");
  }
  if (data_offset > lower.size() || data_size > lower.size() - data_offset) {
    return Status::Corruption("tar: truncated " + std::string(what) + " at offset " +
                              std::to_string(data_offset));
  }
  std::vector<std::byte> data(data_size);
  if (Status s = lower.read_at(data_offset, data); !s.ok()) return s;
  return data;
}

// Turns a checked old-GNU sparse map into merged data segments. `stored_size` is the number of
// bytes stored after the map, which must be exactly the sum of the entries.
Result<std::vector<TarMemberSource::Segment>> build_segments(
    const std::vector<TarSparseEntry>& entries, uint64_t real_size, uint64_t stored_size) {
  std::vector<TarMemberSource::Segment> segments;
  uint64_t previous_end = 0;
  uint64_t stored = 0;
  for (const TarSparseEntry& entry : entries) {
    std::optional<uint64_t> end = checked_add(entry.offset, entry.length);
    if (!end || *end > real_size) {
      return Status::Corruption("tar: sparse entry at " + std::to_string(entry.offset) +
                                " runs past the real size " + std::to_string(real_size));
    }
    if (entry.offset < previous_end) {
      return Status::Corruption("tar: sparse map entries overlap or are out of order");
    }
    previous_end = *end;
    if (entry.length == 0) continue;
    if (!segments.empty() && segments.back().offset + segments.back().length == entry.offset) {
      segments.back().length += entry.length;
    } else {
      segments.push_back({entry.offset, entry.length, stored});
    }
    stored += entry.length;  // Cannot overflow: the entries are disjoint within real_size.
  }
  if (stored != stored_size) {
    return Status::Corruption("tar: sparse map holds " + std::to_string(stored) +
                              " bytes but the header stores " + std::to_string(stored_size));
  }
  return segments;
}

}  // namespace

bool is_zero_tar_block(Block block) {
  return std::all_of(block.begin(), block.end(), [](std::byte b) { return b == std::byte{0}; });
}

Result<TarHeader> parse_tar_header(Block block) {
  Result<uint64_t> stored_checksum =
      parse_tar_number(block.subspan(kChecksumOffset, kChecksumLength), "checksum");
  if (!stored_checksum.ok()) return stored_checksum.status();
  // The checksum is the sum of all bytes with the checksum field read as spaces. Some old tars
  // summed signed chars, so either sum is accepted.
  uint64_t unsigned_sum = 0;
  int64_t signed_sum = 0;
  for (size_t i = 0; i < kTarBlockSize; ++i) {
    const bool in_checksum = i >= kChecksumOffset && i < kChecksumOffset + kChecksumLength;
    const uint8_t byte = in_checksum ? ' ' : std::to_integer<uint8_t>(block[i]);
    unsigned_sum += byte;
    signed_sum += static_cast<int8_t>(byte);
  }
  if (*stored_checksum != unsigned_sum && static_cast<int64_t>(*stored_checksum) != signed_sum) {
    return Status::Corruption("tar: header checksum mismatch: header says " +
                              std::to_string(*stored_checksum) + ", bytes sum to " +
                              std::to_string(unsigned_sum));
  }

  TarHeader header;
  const std::string_view magic = field_view(block.subspan(kMagicOffset, kGnuMagic.size()));
  if (magic == kGnuMagic) {
    header.format = TarFormat::kGnu;
  } else if (magic.substr(0, kUstarMagic.size()) == kUstarMagic) {
    header.format = TarFormat::kUstar;
  } else {
    header.format = TarFormat::kV7;
  }
  header.name = c_string_field(block.subspan(kNameOffset, kNameLength));
  if (header.format == TarFormat::kUstar) {
    std::string prefix = c_string_field(block.subspan(kPrefixOffset, kPrefixLength));
    if (!prefix.empty()) header.name = prefix + "/" + header.name;
  }
  header.typeflag = static_cast<char>(block[kTypeflagOffset]);
  Result<uint64_t> size = parse_tar_number(block.subspan(kSizeOffset, kNumberLength), "size");
  if (!size.ok()) return size.status();
  header.size = *size;

  if (header.typeflag == 'S') {
    if (header.format != TarFormat::kGnu) {
      return Status::Corruption("tar: sparse ('S') header without GNU magic");
    }
    Result<bool> ended = parse_sparse_entries(block.subspan(kHeaderSparseOffset),
                                              kHeaderSparseCount, &header.sparse_entries);
    if (!ended.ok()) return ended.status();
    header.sparse_extended = block[kHeaderIsExtendedOffset] != std::byte{0};
    if (*ended && header.sparse_extended) {
      return Status::Corruption("tar: sparse map ends in the header but says more follows");
    }
    Result<uint64_t> real_size =
        parse_tar_number(block.subspan(kHeaderRealSizeOffset, kNumberLength), "realsize");
    if (!real_size.ok()) return real_size.status();
    header.sparse_real_size = *real_size;
  }
  return header;
}

Result<TarSparseExtension> parse_tar_sparse_extension(Block block) {
  TarSparseExtension extension;
  Result<bool> ended = parse_sparse_entries(block, kExtensionSparseCount, &extension.entries);
  if (!ended.ok()) return ended.status();
  extension.extended = block[kExtensionIsExtendedOffset] != std::byte{0};
  if (*ended && extension.extended) {
    return Status::Corruption("tar: sparse map ends in an extension block but says more follows");
  }
  return extension;
}

Result<PaxRecords> parse_pax_records(std::span<const std::byte> data) {
  const std::string_view text = field_view(data);
  PaxRecords records;
  size_t position = 0;
  while (position < text.size()) {
    if (text[position] == '\0') {
      if (text.find_first_not_of('\0', position) != std::string_view::npos) {
        return Status::Corruption("tar: pax header has data after its NUL padding");
      }
      break;
    }
    // "LEN key=value\n", where LEN counts the whole record.
    uint64_t length = 0;
    size_t i = position;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
      if (length > kMaxMetadataBytes) return Status::Corruption("tar: pax record too long");
      length = length * 10 + static_cast<uint64_t>(text[i] - '0');
    }
    if (i == position || i >= text.size() || text[i] != ' ') {
      return Status::Corruption("tar: malformed pax record length");
    }
    if (length > text.size() - position || position + length <= i + 1) {
      return Status::Corruption("tar: pax record length out of range");
    }
    const std::string_view record = text.substr(i + 1, position + length - (i + 1));
    if (record.back() != '\n') return Status::Corruption("tar: pax record not ended by newline");
    const size_t equals = record.find('=');
    if (equals == std::string_view::npos || equals == 0) {
      return Status::Corruption("tar: pax record without key=value");
    }
    const std::string_view key = record.substr(0, equals);
    const std::string_view value = record.substr(equals + 1, record.size() - equals - 2);
    // An empty value removes the key, per POSIX pax.
    if (key == "path") {
      records.path = value.empty() ? std::nullopt : std::optional<std::string>(value);
    } else if (key == "size") {
      if (value.empty()) {
        records.size.reset();
      } else {
        uint64_t size = 0;
        for (char c : value) {
          if (c < '0' || c > '9' || size > UINT64_MAX / 10 ||
              size * 10 > UINT64_MAX - static_cast<uint64_t>(c - '0')) {
            return Status::Corruption("tar: bad pax size value");
          }
          size = size * 10 + static_cast<uint64_t>(c - '0');
        }
        records.size = size;
      }
    } else if (key.substr(0, 11) == "GNU.sparse.") {
      records.gnu_sparse = true;
    }
    position += length;
  }
  return records;
}

Result<std::unique_ptr<TarMemberSource>> open_tar_member(std::unique_ptr<BlockSource> lower) {
  if (lower == nullptr) return Status::InvalidArgument("tar: null lower source");
  const uint64_t lower_size = lower->size();
  const std::string where = "tar(" + lower->describe() + ")";
  std::optional<std::string> long_name;
  PaxRecords pax;
  std::array<std::byte, kTarBlockSize> block;
  uint64_t offset = 0;
  while (true) {
    if (offset == lower_size) {
      return Status::NotFound(where + ": tar stream has no regular file member");
    }
    if (offset > lower_size || lower_size - offset < kTarBlockSize) {
      return Status::Corruption(where + ": truncated " + at_offset(offset));
    }
    if (Status s = lower->read_at(offset, block); !s.ok()) return s.with_context(at_offset(offset));
    if (is_zero_tar_block(block)) {
      return Status::NotFound(where + ": tar stream has no regular file member");
    }
    Result<TarHeader> header = parse_tar_header(block);
    if (!header.ok()) return header.status().with_context(where + ": " + at_offset(offset));
    const char type = header->typeflag;
    const bool metadata = type == 'L' || type == 'K' || type == 'x' || type == 'g';
    const uint64_t data_offset = offset + kTarBlockSize;
    // pax records describe the next file entry, not the metadata entries before it.
    const uint64_t data_size = metadata ? header->size : pax.size.value_or(header->size);
    Result<uint64_t> next = next_header_offset(data_offset, data_size);
    if (!next.ok()) return next.status().with_context(where + ": " + at_offset(offset));
    std::string name = pax.path ? *pax.path : long_name ? *long_name : header->name;

    if (type == 'L' || type == 'x') {
      Result<std::vector<std::byte>> data = read_metadata(
          *lower, data_offset, data_size, type == 'L' ? "GNU long name" : "pax header");
      if (!data.ok()) return data.status().with_context(where + ": " + at_offset(offset));
      if (type == 'L') {
        long_name = c_string_field(*data);
      } else {
        // A pax header applies to the next entry only; its records override earlier ones.
        Result<PaxRecords> records = parse_pax_records(*data);
        if (!records.ok()) return records.status().with_context(where + ": " + at_offset(offset));
        if (records->path) pax.path = records->path;
        if (records->size) pax.size = records->size;
        pax.gnu_sparse = pax.gnu_sparse || records->gnu_sparse;
      }
      offset = *next;
      continue;
    }
    if (type == 'K' || type == 'g') {
      offset = *next;
      continue;
    }
    const bool regular = type == '0' || type == '7' || (type == '\0' && !name.ends_with('/'));
    if (!regular && type != 'S') {
      // Links, devices, FIFOs and directories store no data (a pre-POSIX directory is a '\0'
      // entry whose name ends in '/'); other types store `size` bytes, as Python's tarfile reads.
      const bool has_data = !(type >= '1' && type <= '6') && type != '\0';
      offset = has_data ? *next : data_offset;
      long_name.reset();
      pax = PaxRecords();
      continue;
    }
    if (pax.gnu_sparse) {
      return Status::NotSupported(where + ": member " + name +
                                  " is a pax GNU.sparse.* member (GNU sparse format 0.x/1.0), "
                                  "which imgfs does not read");
    }

    uint64_t member_data_offset = data_offset;
    uint64_t member_size = data_size;
    std::vector<TarMemberSource::Segment> segments;
    if (type == 'S') {
      std::vector<TarSparseEntry> entries = header->sparse_entries;
      bool extended = header->sparse_extended;
      while (extended) {
        if (lower_size - member_data_offset < kTarBlockSize) {
          return Status::Corruption(where + ": truncated sparse extension block at offset " +
                                    std::to_string(member_data_offset));
        }
        if (Status s = lower->read_at(member_data_offset, block); !s.ok()) {
          return s.with_context(where + ": sparse extension block at offset " +
                                std::to_string(member_data_offset));
        }
        Result<TarSparseExtension> extension = parse_tar_sparse_extension(block);
        if (!extension.ok()) {
          return extension.status().with_context(where + ": sparse extension block at offset " +
                                                 std::to_string(member_data_offset));
        }
        entries.insert(entries.end(), extension->entries.begin(), extension->entries.end());
        if (entries.size() > kMaxSparseEntries) {
          return Status::NotSupported(where + ": sparse map of more than " +
                                      std::to_string(kMaxSparseEntries) + " entries");
        }
        extended = extension->extended;
        member_data_offset += kTarBlockSize;
      }
      Result<std::vector<TarMemberSource::Segment>> built =
          build_segments(entries, header->sparse_real_size, data_size);
      if (!built.ok()) return built.status().with_context(where + ": member " + name);
      segments = std::move(*built);
      member_size = header->sparse_real_size;
    }
    if (member_data_offset > lower_size || data_size > lower_size - member_data_offset) {
      return Status::Corruption(where + ": truncated tar member " + name + ": its " +
                                std::to_string(data_size) + " bytes at offset " +
                                std::to_string(member_data_offset) + " run past the stream's " +
                                std::to_string(lower_size) + " bytes");
    }
    return std::make_unique<TarMemberSource>(std::move(lower), std::move(name), member_data_offset,
                                             member_size, type == 'S', std::move(segments));
  }
}

TarMemberSource::TarMemberSource(std::unique_ptr<BlockSource> lower, std::string member_name,
                                 uint64_t data_offset, uint64_t size, bool sparse,
                                 std::vector<Segment> segments)
    : lower_(std::move(lower)),
      member_name_(std::move(member_name)),
      data_offset_(data_offset),
      size_(size),
      sparse_(sparse),
      segments_(std::move(segments)) {}

Status TarMemberSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  if (out.empty()) return Status::OK();
  if (!sparse_) {
    Status s = lower_->read_at(data_offset_ + offset, out);
    return s.ok() ? s : s.with_context("tar member " + member_name_);
  }
  const uint64_t end = offset + out.size();
  auto segment = std::partition_point(segments_.begin(), segments_.end(), [&](const Segment& s) {
    return s.offset + s.length <= offset;
  });
  uint64_t position = offset;
  while (position < end) {
    std::span<std::byte> rest = out.subspan(position - offset);
    if (segment == segments_.end() || position < segment->offset) {
      const uint64_t hole_end = segment == segments_.end() ? end : std::min(end, segment->offset);
      std::memset(rest.data(), 0, hole_end - position);
      position = hole_end;
      continue;
    }
    const uint64_t run_end = std::min(end, segment->offset + segment->length);
    Status s = lower_->read_at(data_offset_ + segment->stored_offset + (position - segment->offset),
                               rest.first(run_end - position));
    if (!s.ok()) return s.with_context("tar member " + member_name_);
    position = run_end;
    ++segment;
  }
  return Status::OK();
}

std::string TarMemberSource::describe() const { return "tar(" + lower_->describe() + ")"; }

Result<Extent> TarMemberSource::map(uint64_t offset) const {
  if (offset >= size_) {
    return Status::InvalidArgument(describe() + ": map at " + std::to_string(offset) +
                                   " is past size " + std::to_string(size_));
  }
  if (!sparse_) return Extent{Extent::Kind::kData, size_ - offset};
  auto segment = std::partition_point(segments_.begin(), segments_.end(), [&](const Segment& s) {
    return s.offset + s.length <= offset;
  });
  if (segment == segments_.end()) return Extent{Extent::Kind::kZero, size_ - offset};
  if (offset < segment->offset) return Extent{Extent::Kind::kZero, segment->offset - offset};
  return Extent{Extent::Kind::kData, segment->offset + segment->length - offset};
}

}  // namespace imgfs::formats
