#include "formats/cbc_source.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace imgfs::formats {

namespace {

constexpr uint64_t kAesBlock = 16;
// Ciphertext decrypted per lower read: bounds memory for huge reads while keeping each lower
// request large enough to be efficient.
constexpr uint64_t kMaxChunkBytes = uint64_t{1} << 20;

struct CipherCtxDeleter {
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;

// Decrypts whole blocks of `data` in place with raw CBC (no padding handling), chaining from
// `iv` (the ciphertext block before data[0], or the stream's IV).
Status decrypt_blocks(const CbcOptions& options, const uint8_t* iv, std::span<std::byte> data) {
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  if (ctx == nullptr) return Status::IOError("cbc: EVP_CIPHER_CTX_new failed");
  if (EVP_DecryptInit_ex(ctx.get(), EVP_aes_128_cbc(), nullptr, options.key.data(), iv) != 1 ||
      EVP_CIPHER_CTX_set_padding(ctx.get(), 0) != 1) {
    return Status::IOError("cbc: EVP_DecryptInit_ex failed");
  }
  auto* bytes = reinterpret_cast<unsigned char*>(data.data());
  // EVP lengths are int: decrypt in pieces no larger than the chunk size, which fits.
  uint64_t done = 0;
  while (done < data.size()) {
    const int length = static_cast<int>(std::min<uint64_t>(data.size() - done, kMaxChunkBytes));
    int written = 0;
    // In-place is allowed because every call passes whole blocks.
    if (EVP_DecryptUpdate(ctx.get(), bytes + done, &written, bytes + done, length) != 1 ||
        written != length) {
      return Status::IOError("cbc: EVP_DecryptUpdate failed");
    }
    done += static_cast<uint64_t>(length);
  }
  return Status::OK();
}

std::string range_context(uint64_t begin, uint64_t end) {
  return "cbc: ciphertext bytes " + std::to_string(begin) + "-" + std::to_string(end);
}

}  // namespace

Result<std::unique_ptr<BlockSource>> open_cbc(std::unique_ptr<BlockSource> lower,
                                              const CbcOptions& options) {
  if (lower == nullptr) return Status::InvalidArgument("cbc: null lower source");
  const uint64_t lower_size = lower->size();
  if (lower_size == 0 || lower_size % kAesBlock != 0) {
    return Status::Corruption("cbc(" + lower->describe() + "): ciphertext size " +
                              std::to_string(lower_size) + " is not a non-zero multiple of 16");
  }
  // The last block, and the one before it as its chaining value (the IV for a one-block stream).
  std::array<std::byte, 2 * kAesBlock> tail{};
  const uint64_t tail_offset = lower_size >= 2 * kAesBlock ? lower_size - 2 * kAesBlock : 0;
  const uint64_t tail_length = lower_size - tail_offset;
  std::span<std::byte> tail_bytes(tail.data() + (2 * kAesBlock - tail_length), tail_length);
  if (Status s = lower->read_at(tail_offset, tail_bytes); !s.ok()) {
    return s.with_context(range_context(tail_offset, lower_size));
  }
  std::array<uint8_t, kAesBlock> chain{};
  if (tail_length == 2 * kAesBlock) {
    std::memcpy(chain.data(), tail.data(), kAesBlock);
  } else {
    chain = options.iv;
  }
  std::span<std::byte> last(tail.data() + kAesBlock, kAesBlock);
  if (Status s = decrypt_blocks(options, chain.data(), last); !s.ok()) return s;
  const uint8_t pad = std::to_integer<uint8_t>(last[kAesBlock - 1]);
  bool pad_ok = pad >= 1 && pad <= kAesBlock;
  for (uint64_t i = kAesBlock - (pad_ok ? pad : 0); i < kAesBlock; ++i) {
    pad_ok = pad_ok && std::to_integer<uint8_t>(last[i]) == pad;
  }
  if (!pad_ok) {
    return Status::Corruption("cbc(" + lower->describe() +
                              "): bad PKCS#7 padding: wrong key or corrupt data");
  }
  const uint64_t plaintext_size = lower_size - pad;
  return std::unique_ptr<BlockSource>(
      std::make_unique<CbcSource>(std::move(lower), options, plaintext_size));
}

CbcSource::CbcSource(std::unique_ptr<BlockSource> lower, const CbcOptions& options,
                     uint64_t plaintext_size)
    : lower_(std::move(lower)), options_(options), size_(plaintext_size) {}

CbcSource::~CbcSource() { OPENSSL_cleanse(&options_, sizeof(options_)); }

Status CbcSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  if (out.empty()) return Status::OK();
  const uint64_t end = offset + out.size();
  const uint64_t first_block = offset / kAesBlock;
  const uint64_t end_block = (end + kAesBlock - 1) / kAesBlock;
  // One extra block in front holds the chaining value for the first block of each chunk.
  const uint64_t max_blocks = kMaxChunkBytes / kAesBlock;
  std::vector<std::byte> buffer((std::min(end_block - first_block, max_blocks) + 1) * kAesBlock);
  for (uint64_t block = first_block; block < end_block;) {
    const uint64_t blocks = std::min(end_block - block, max_blocks);
    const uint64_t cipher_begin = block * kAesBlock;
    const uint64_t cipher_end = cipher_begin + blocks * kAesBlock;
    std::array<uint8_t, kAesBlock> chain = options_.iv;
    std::span<std::byte> data(buffer.data() + kAesBlock, blocks * kAesBlock);
    Status s;
    if (block == 0) {
      s = lower_->read_at(cipher_begin, data);
    } else {
      s = lower_->read_at(cipher_begin - kAesBlock,
                          std::span<std::byte>(buffer.data(), (blocks + 1) * kAesBlock));
      std::memcpy(chain.data(), buffer.data(), kAesBlock);
    }
    if (!s.ok()) return s.with_context(range_context(cipher_begin, cipher_end));
    if (s = decrypt_blocks(options_, chain.data(), data); !s.ok()) return s;
    // Copy the part of these blocks that overlaps [offset, end).
    const uint64_t copy_begin = std::max(offset, cipher_begin);
    const uint64_t copy_end = std::min(end, cipher_end);
    std::memcpy(out.data() + (copy_begin - offset), data.data() + (copy_begin - cipher_begin),
                copy_end - copy_begin);
    block += blocks;
  }
  return Status::OK();
}

std::string CbcSource::describe() const { return "cbc(" + lower_->describe() + ")"; }

}  // namespace imgfs::formats
