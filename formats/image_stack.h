// image_stack: turns a bundle manifest (or a Eucalyptus 4 download manifest of a bundle) into
// the chain of layers that serves its image (parts -> sha1 -> concat -> cbc -> gzip -> tar
// member), per FORMATS.md (a) and (c). Parts come through a PartOpener callback, so formats/
// never includes remote/.
#pragma once

#include <functional>
#include <optional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "formats/block_source.h"
#include "formats/bundle_keys.h"
#include "formats/bundle_manifest.h"
#include "formats/download_manifest.h"
#include "formats/gzip_source.h"
#include "formats/verified_part_source.h"

namespace imgfs::formats {

// Opens a part with its size known: by its file name relative to the manifest's folder (bundle
// manifests) or by its get-url (download manifests).
using PartOpener =
    std::function<Result<std::unique_ptr<BlockSource>>(std::string_view filename)>;

// What any bundle manifest says, once its key and IV are unwrapped.
struct BundleLayout {
  struct Part {
    std::string name;                             // passed to the PartOpener
    std::optional<std::array<uint8_t, 20>> sha1;  // the part is verified when present
  };
  std::array<uint8_t, 16> key{};
  std::array<uint8_t, 16> iv{};
  std::vector<Part> parts;
  uint64_t bundled_size = 0;  // the sum of the part sizes
  uint64_t image_size = 0;    // the tar member's size
  std::optional<std::array<uint8_t, 20>> tar_sha1;  // SHA1 of the tar stream, when known
};

struct BundleStackOptions {
  std::vector<const PrivateKey*> keys;          // tried in order, ec2 then user key paths
  const Certificate* verify_cert = nullptr;     // when set, the signature must verify at open
  VerifiedPartPool* part_pool = nullptr;        // required: holds verified ciphertext
  // False only to peek at the first bytes of an image cheaply (a few small range reads instead
  // of whole parts): those bytes are unverified, a hint to check again on a verified chain.
  bool verify_parts = true;
  uint64_t span_bytes = 1 << 20;                // gzip checkpoint spacing
  // Inflated gzip spans, shared by the images of a mount; null: 16 MiB of spans per image.
  GzipSpanPool* span_pool = nullptr;
  // The bytes of a saved gzip index of this bundle, if one was kept (may be empty). Parsed as
  // untrusted: a bad, stale or foreign index is ignored and the index is built again.
  std::function<std::optional<std::vector<std::byte>>()> load_index;
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

// Opens the chain of a bundle whose layout is known. Errors as open_bundle_stack.
Result<OpenedBundle> open_bundle_layout(const BundleLayout& layout, const PartOpener& open_part,
                                        const BundleStackOptions& options);

// The same for a Eucalyptus 4 download manifest of a bundle (key and IV wrapped for the node's
// key, parts by get-url). With options.verify_cert the RSA-SHA256 signature must verify.
// Errors: NotSupported (a download manifest of an import), and as open_bundle_stack.
Result<OpenedBundle> open_download_stack(const DownloadManifest& manifest,
                                         const PartOpener& open_part,
                                         const BundleStackOptions& options);

// The virtual file name of a manifest key: "K.manifest.xml" or "Kmanifest.xml" -> "K";
// empty when `manifest_key` is not a manifest name.
std::string image_key_for_manifest(std::string_view manifest_key);

}  // namespace imgfs::formats
