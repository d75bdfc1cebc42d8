// Index sidecar: a serialized gzip index (gzip_index.h) turned into a signed file that can be
// published beside a bundle's manifest (K.manifest.xml.imgfs-index) and back. A mount uses a
// sidecar only when a key it trusts signed it, because the index decides which bytes a read
// returns; and only for the bundle version named by its binding (the caller's string, e.g. the
// manifest's SHA-256 and the parts' ETags), so a signed index of one image cannot be replayed
// for another. Pure functions: no I/O, no locks.
//
// Layout (little-endian):
//   0   8  magic "IMGFSIXS"
//   8   4  version (1)
//   12  4  binding length B (1 .. kMaxIndexBindingBytes)
//   16  8  index length N (1 .. kMaxSidecarIndexBytes)
//   24  B  binding
//   +   N  the serialized index, unchanged
//   +   S  signature: lowercase hex of RSA PKCS#1 v1.5 with SHA-256 (SHA256withRSA) over every
//          byte before it, so magic, version, both lengths, binding and index are all signed
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "formats/bundle_keys.h"
#include "formats/status.h"

namespace imgfs::formats {

// What the sidecar object's key adds to the manifest's key.
inline constexpr std::string_view kIndexSidecarSuffix = ".imgfs-index";

// Bounds on untrusted lengths. A binding is a digest and some ETags; an index is a few MiB for
// a large image.
inline constexpr size_t kMaxIndexBindingBytes = 1u << 20;
inline constexpr uint64_t kMaxSidecarIndexBytes = uint64_t{1} << 30;

// The sidecar of `serialized_index` for the bundle version `bound_to`, signed with `key`.
// Thread-safe (the key is immutable).
// Errors: InvalidArgument (empty or too long binding or index), IOError or NotSupported from
// signing (sign_sha256_rsa_text).
Result<std::vector<std::byte>> sign_index_sidecar(std::span<const std::byte> serialized_index,
                                                  const PrivateKey& key, std::string_view bound_to);

// Checks an untrusted sidecar: layout and bounds, then that one of `trusted` signed it, then
// that it is bound to `bound_to`; returns the serialized index it carries (still to be parsed
// with parse_gzip_index, which checks it against the stream). Null entries of `trusted` are
// skipped. Thread-safe.
// Errors: InvalidArgument (no trusted certificate, empty bound_to), Corruption (not a sidecar,
// truncated or overlong, a signature that no trusted key made, or bound to another version:
// the message says which), NotSupported (a newer sidecar version, or SHA-256 RSA unavailable).
Result<std::vector<std::byte>> verify_index_sidecar(std::span<const std::byte> sidecar,
                                                    std::span<const Certificate* const> trusted,
                                                    std::string_view bound_to);

}  // namespace imgfs::formats
