// CbcSource: turns AES-128-CBC ciphertext with PKCS#7 padding (what `openssl enc -aes-128-cbc
// -K <hex> -iv <hex>` writes, FORMATS.md a.4) into its plaintext, with random access: plaintext
// block i is AES-Dec(C[i]) XOR C[i-1], where C[-1] is the IV, so any block decrypts from two
// ciphertext blocks.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "formats/block_source.h"

namespace imgfs::formats {

struct CbcOptions {
  std::array<uint8_t, 16> key{};
  std::array<uint8_t, 16> iv{};
};

class CbcSource final : public BlockSource {
 public:
  // Use open_cbc(), which checks the ciphertext size and the padding. `plaintext_size` is the
  // lower size minus the checked pad length.
  CbcSource(std::unique_ptr<BlockSource> lower, const CbcOptions& options, uint64_t plaintext_size);
  // Wipes the key from memory.
  ~CbcSource() override;

  uint64_t size() const override { return size_; }

  // Decrypts the CBC blocks covering the range, reading at most 1 MiB of ciphertext at a time
  // (so memory stays bounded however large the read), and copies out the slice.
  // Thread-safe (no mutable state; each call has its own cipher context).
  // Errors: InvalidArgument (range past size()); IOError (OpenSSL failure); any error of lower,
  // with the ciphertext range as context.
  Status read_at(uint64_t offset, std::span<std::byte> out) const override;

  // "cbc(" + lower->describe() + ")".
  std::string describe() const override;

  uint32_t block_size() const override { return 16; }

 private:
  const std::unique_ptr<BlockSource> lower_;
  CbcOptions options_;
  const uint64_t size_;
};

// Opens the plaintext of `lower`. Reads and decrypts the last ciphertext block to learn and check
// the padding. Errors: InvalidArgument (null lower); Corruption (lower size is zero or not a
// multiple of 16; bad PKCS#7 padding, which almost always means a wrong key or IV, though a wrong
// key passes the check with probability about 1/256); IOError (OpenSSL failure); any error of
// lower.
Result<std::unique_ptr<BlockSource>> open_cbc(std::unique_ptr<BlockSource> lower,
                                              const CbcOptions& options);

}  // namespace imgfs::formats
