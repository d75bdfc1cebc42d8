// image_stack: turns a bundle manifest into the chain of layers that serves its image
// (parts -> sha1 -> concat -> cbc -> gzip -> tar member), per FORMATS.md (a) and (c).
// Parts come through a PartOpener callback, so formats/ never includes remote/.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "formats/block_source.h"
#include "formats/bundle_keys.h"
#include "formats/bundle_manifest.h"
#include "formats/gzip_source.h"
#include "formats/verified_part_source.h"

namespace imgfs::formats {

// Opens the part named `filename` (relative to the manifest's folder) with its size known.
using PartOpener =
    std::function<Result<std::unique_ptr<BlockSource>>(std::string_view filename)>;

struct BundleStackOptions {
  std::vector<const PrivateKey*> keys;          // tried in order, ec2 then user key paths
  const Certificate* verify_cert = nullptr;     // when set, the signature must verify at open
  VerifiedPartPool* part_pool = nullptr;        // required: holds verified ciphertext
  uint64_t span_bytes = 1 << 20;                // gzip checkpoint spacing
  uint64_t span_cache_bytes = 16 << 20;         // decoded spans kept in memory per image
};

struct OpenedBundle {
  std::unique_ptr<BlockSource> image;  // the raw image, sized to <image><size>
  const GzipSource* gzip = nullptr;    // inside `image`; for progress counters
};

// Checks the signature (if asked), unwraps the AES key, opens every part and every layer,
// and checks that the sizes agree with the manifest. Errors: InvalidArgument (no key fits),
// Corruption (sizes or signature disagree), NotFound (a part is missing), IOError.
Result<OpenedBundle> open_bundle_stack(const BundleManifest& manifest, const PartOpener& open_part,
                                       const BundleStackOptions& options);

// The virtual file name of a manifest key: "K.manifest.xml" or "Kmanifest.xml" -> "K";
// empty when `manifest_key` is not a manifest name.
std::string image_key_for_manifest(std::string_view manifest_key);

}  // namespace imgfs::formats
