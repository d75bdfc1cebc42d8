#include "formats/index_signature.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>

#include "formats/byte_order.h"
#include "formats/checked_math.h"

namespace imgfs::formats {

namespace {

constexpr char kMagic[8] = {'I', 'M', 'G', 'F', 'S', 'I', 'X', 'S'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 24;
// Hex of a 16384-bit RSA signature: larger than any key anyone uses.
constexpr size_t kMaxSignatureHexChars = 4096;
// Bindings are shown in errors, shortened: they may be long and, before checking, untrusted.
constexpr size_t kShownBindingChars = 120;

std::string_view as_text(std::span<const std::byte> bytes) {
  return std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// `text` for an error message: printable ASCII kept, anything else '?', long text cut.
std::string shown(std::string_view text) {
  std::string out;
  for (char c : text.substr(0, kShownBindingChars)) {
    out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  }
  if (text.size() > kShownBindingChars) out += "...";
  return "'" + out + "'";
}

}  // namespace

Result<std::vector<std::byte>> sign_index_sidecar(std::span<const std::byte> serialized_index,
                                                  const PrivateKey& key,
                                                  std::string_view bound_to) {
  if (bound_to.empty() || bound_to.size() > kMaxIndexBindingBytes) {
    return Status::InvalidArgument("index sidecar binding must be 1 to " +
                                   std::to_string(kMaxIndexBindingBytes) + " bytes, not " +
                                   std::to_string(bound_to.size()));
  }
  if (serialized_index.empty() || serialized_index.size() > kMaxSidecarIndexBytes) {
    return Status::InvalidArgument("index for a sidecar must be 1 to " +
                                   std::to_string(kMaxSidecarIndexBytes) + " bytes, not " +
                                   std::to_string(serialized_index.size()));
  }
  std::vector<std::byte> out(kHeaderBytes);
  std::memcpy(out.data(), kMagic, sizeof kMagic);
  store_le32(out.data() + 8, kVersion);
  store_le32(out.data() + 12, static_cast<uint32_t>(bound_to.size()));
  store_le64(out.data() + 16, serialized_index.size());
  const auto* binding = reinterpret_cast<const std::byte*>(bound_to.data());
  out.insert(out.end(), binding, binding + bound_to.size());
  out.insert(out.end(), serialized_index.begin(), serialized_index.end());

  Result<std::string> signature = sign_sha256_rsa_text(key, as_text(out));
  if (!signature.ok()) return signature.status().with_context("signing the index sidecar");
  const auto* hex = reinterpret_cast<const std::byte*>(signature->data());
  out.insert(out.end(), hex, hex + signature->size());
  return out;
}

Result<std::vector<std::byte>> verify_index_sidecar(std::span<const std::byte> sidecar,
                                                    std::span<const Certificate* const> trusted,
                                                    std::string_view bound_to) {
  if (bound_to.empty()) {
    return Status::InvalidArgument("an index sidecar must be checked against a binding");
  }
  if (std::none_of(trusted.begin(), trusted.end(),
                   [](const Certificate* certificate) { return certificate != nullptr; })) {
    return Status::InvalidArgument("no trusted certificate to check the index sidecar with");
  }

  if (sidecar.size() < kHeaderBytes) {
    return Status::Corruption("index sidecar is " + std::to_string(sidecar.size()) +
                              " bytes, shorter than its " + std::to_string(kHeaderBytes) +
                              "-byte header");
  }
  if (std::memcmp(sidecar.data(), kMagic, sizeof kMagic) != 0) {
    return Status::Corruption("not an imgfs index sidecar (bad magic)");
  }
  const uint32_t version = load_le32(sidecar.data() + 8);
  if (version != kVersion) {
    return Status::NotSupported("index sidecar version " + std::to_string(version) +
                                " (this imgfs reads version " + std::to_string(kVersion) + ")");
  }
  const uint32_t binding_bytes = load_le32(sidecar.data() + 12);
  const uint64_t index_bytes = load_le64(sidecar.data() + 16);
  if (binding_bytes == 0 || binding_bytes > kMaxIndexBindingBytes) {
    return Status::Corruption("index sidecar binding length " + std::to_string(binding_bytes) +
                              " is out of range");
  }
  if (index_bytes == 0 || index_bytes > kMaxSidecarIndexBytes) {
    return Status::Corruption("index sidecar index length " + std::to_string(index_bytes) +
                              " is out of range");
  }
  // Both lengths are bounded above, so this sum cannot overflow; checked anyway.
  const std::optional<uint64_t> signed_bytes =
      checked_add(uint64_t{kHeaderBytes} + binding_bytes, index_bytes);
  if (!signed_bytes || *signed_bytes >= sidecar.size()) {
    return Status::Corruption("index sidecar is truncated: " + std::to_string(sidecar.size()) +
                              " bytes cannot hold a " + std::to_string(binding_bytes) +
                              "-byte binding, a " + std::to_string(index_bytes) +
                              "-byte index and a signature");
  }
  const size_t signature_chars = sidecar.size() - static_cast<size_t>(*signed_bytes);
  if (signature_chars > kMaxSignatureHexChars) {
    return Status::Corruption("index sidecar has " + std::to_string(signature_chars) +
                              " bytes after its index, more than any signature");
  }
  const std::span<const std::byte> signed_part = sidecar.first(static_cast<size_t>(*signed_bytes));
  const std::string_view signature_hex = as_text(sidecar.subspan(signed_part.size()));
  // Exactly what sign_index_sidecar writes: one spelling per signature, so a changed byte is
  // always a different file rather than the same signature in upper case.
  if (signature_hex.size() % 2 != 0 ||
      !std::all_of(signature_hex.begin(), signature_hex.end(),
                   [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); })) {
    return Status::Corruption("index sidecar signature is not lowercase hex");
  }

  std::string tried;
  std::optional<Status> unsupported;
  bool signed_by_trusted = false;
  for (const Certificate* certificate : trusted) {
    if (certificate == nullptr) continue;
    const Status s = verify_sha256_rsa_signature(*certificate, as_text(signed_part), signature_hex);
    if (s.ok()) {
      signed_by_trusted = true;
      break;
    }
    if (s.code() == StatusCode::kNotSupported) unsupported = s;
    tried += (tried.empty() ? "" : ", ") + certificate->describe();
  }
  if (!signed_by_trusted) {
    if (unsupported) return unsupported->with_context("index sidecar");
    return Status::Corruption("index sidecar is not signed by a trusted key (checked with " +
                              tried + ")");
  }

  const std::string_view binding = as_text(signed_part.subspan(kHeaderBytes, binding_bytes));
  if (binding != bound_to) {
    return Status::Corruption("index sidecar is signed for another bundle version: bound to " +
                              shown(binding) + ", expected " + shown(bound_to));
  }
  const std::span<const std::byte> index = signed_part.subspan(kHeaderBytes + binding_bytes);
  return std::vector<std::byte>(index.begin(), index.end());
}

}  // namespace imgfs::formats
