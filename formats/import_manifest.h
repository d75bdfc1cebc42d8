// Import manifest: the text of an EC2 VM Import manifest (version 2010-11-15, written by
// ec2-upload-disk-image and euca2ools' euca-import-*) turned into a checked ImportManifest whose
// parts tile the disk file with inclusive byte ranges. Follows FORMATS.md (b).
// A pure parser: no I/O. The caller fetches each part by its key (or get-url) and checks the
// part sizes with fit_to_object_sizes() before exposing the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/status.h"

namespace imgfs::formats {

// Manifests with more parts are refused (10 MiB parts make that a 1 TB disk).
inline constexpr uint64_t kMaxImportParts = 100000;
// Longest part key accepted, in bytes (S3's own limit).
inline constexpr size_t kMaxImportKeyBytes = 1024;

enum class ImportFileFormat { kRaw, kVmdk, kVhd };

struct ImportPart {
  uint64_t index = 0;
  // Offsets of the part's first and last byte in the disk file (inclusive; start <= end).
  uint64_t start = 0;
  uint64_t end = 0;
  // S3 key of the part object, in the manifest's bucket (not relative to the manifest's folder).
  // Non-empty, relative, no ".." component, no NUL.
  std::string key;
  // Pre-signed URLs; empty when the manifest has none. They expire, so `key` comes first.
  std::string head_url;
  std::string get_url;
  std::string delete_url;

  // Bytes the part holds: end - start + 1 (never 0; at most 2^64 - 1 since end < 2^64 - 1).
  uint64_t length() const { return end - start + 1; }
};

struct ImportManifest {
  struct Importer {
    std::string name;
    std::string version;
    std::string release;
  };

  std::string version;
  ImportFileFormat file_format = ImportFileFormat::kRaw;
  // Empty fields when the manifest has no <importer>.
  Importer importer;
  // Pre-signed DELETE (euca2ools) URL of the manifest object itself; empty when absent.
  std::string self_destruct_url;
  // import/size as written. Informational only: euca2ools writes the VMDK's virtual capacity
  // there, so it is not the file size (FORMATS.md b). Use file_size().
  std::optional<uint64_t> declared_size;
  // import/volume-size: the target volume in GiB.
  std::optional<uint64_t> volume_size_gib;
  // Sorted by index; indexes are exactly 0..parts.size()-1; parts[0].start is 0 and each next
  // part starts right after the previous one ends. Never empty.
  std::vector<ImportPart> parts;

  // Size of the disk file the parts tile: the last part's end + 1 (no overflow: end < 2^64 - 1).
  // 0 for a default-constructed manifest, which has no parts.
  uint64_t file_size() const { return parts.empty() ? 0 : parts.back().end + 1; }

  // Fits the last part's range to the size of the object that holds it. Equal: OK, unchanged.
  // One byte short, the documented AWS example quirk where a single part's end equals the file
  // size: the end is pulled in by one and file_size() shrinks by one. Anything else is
  // Corruption (a truncated or replaced upload), and the manifest is left unchanged;
  // InvalidArgument when there are no parts. Not thread-safe: call before sharing the manifest.
  Status clamp_last_part_to(uint64_t object_size);

  // Checks every part against the size of its object (object_sizes[i] for parts[i], e.g. from
  // HEAD or a listing): each must equal the part's length, except that the last one goes
  // through clamp_last_part_to(). InvalidArgument when the span's length differs from the part
  // count; Corruption naming the first part whose object does not fit. Not thread-safe.
  Status fit_to_object_sizes(std::span<const uint64_t> object_sizes);
};

// "RAW", "VMDK" or "VHD".
std::string_view import_file_format_name(ImportFileFormat format);

// Parses and checks an import manifest. Pure and thread-safe (libxml2 parses separate documents
// concurrently; no global handler is touched; libxml2 < 2.11 wants xmlInitParser() once in main
// before threads parse).
// Errors: Corruption with a precise message for malformed XML, a DTD (refused before parsing),
// a root other than <manifest>, a version other than 2010-11-15, a missing element, a number
// that is not decimal or does not fit 64 bits, parts@count unequal to the number of <part>
// elements, no parts or more than kMaxImportParts, part indexes that are not exactly 0..n-1,
// start > end, an end of 2^64 - 1, ranges that do not start at 0 or are not contiguous, or a
// key that is empty, too long, absolute, has a ".." component or a NUL. NotSupported for a
// file-format other than RAW, VMDK or VHD (named in the message). Unknown elements are ignored.
Result<ImportManifest> parse_import_manifest(std::string_view xml_text);

// True when the text looks like an import manifest and not a bundle or download manifest: an
// <import> start tag and "2010-11-15" appear in its first 64 KiB. A cheap sniff for routing, not
// a check: parse_import_manifest() decides. Pure and thread-safe.
bool looks_like_import_manifest(std::string_view xml_text);

}  // namespace imgfs::formats
