#include "formats/verified_part_source.h"

#include <openssl/evp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace imgfs::formats {

namespace {

// Lower reads while fetching a part: large enough for efficient requests, small enough that a
// failed request wastes little.
constexpr uint64_t kFetchChunkBytes = uint64_t{4} << 20;
// A part's chunks are fetched by up to this many threads at once, so a remote part arrives in
// overlapping range requests rather than one round trip after another.
constexpr uint64_t kFetchThreads = 4;

using Sha1 = std::array<uint8_t, 20>;

std::string to_hex(const Sha1& digest) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string hex;
  for (uint8_t byte : digest) {
    hex += kDigits[byte >> 4];
    hex += kDigits[byte & 0xF];
  }
  return hex;
}

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

// SHA1 of `data`, fed in chunks as it would be while streaming.
Result<Sha1> sha1_of(std::span<const std::byte> data) {
  std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> ctx(EVP_MD_CTX_new());
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha1(), nullptr) != 1) {
    return Status::IOError("sha1: EVP_DigestInit_ex failed");
  }
  for (uint64_t done = 0; done < data.size(); done += kFetchChunkBytes) {
    const uint64_t length = std::min<uint64_t>(kFetchChunkBytes, data.size() - done);
    if (EVP_DigestUpdate(ctx.get(), data.data() + done, length) != 1) {
      return Status::IOError("sha1: EVP_DigestUpdate failed");
    }
  }
  Sha1 digest{};
  unsigned int length = 0;
  if (EVP_DigestFinal_ex(ctx.get(), digest.data(), &length) != 1 || length != digest.size()) {
    return Status::IOError("sha1: EVP_DigestFinal_ex failed");
  }
  return digest;
}

Status check_digest(const std::string& part_name, const Sha1& expected,
                    std::span<const std::byte> data) {
  Result<Sha1> actual = sha1_of(data);
  if (!actual.ok()) return actual.status();
  if (*actual != expected) {
    return Status::Corruption(part_name + ": SHA1 mismatch: manifest says " + to_hex(expected) +
                              ", data is " + to_hex(*actual));
  }
  return Status::OK();
}

}  // namespace

Result<std::unique_ptr<BlockSource>> open_verified_part(std::unique_ptr<BlockSource> lower,
                                                        std::array<uint8_t, 20> expected_sha1,
                                                        std::string part_name,
                                                        VerifiedPartPool& pool) {
  if (lower == nullptr) return Status::InvalidArgument(part_name + ": null lower source");
  // An empty part is never read (a read of it is empty), so its digest is checked here.
  if (lower->size() == 0) {
    if (Status s = check_digest(part_name, expected_sha1, {}); !s.ok()) return s;
  }
  return std::unique_ptr<BlockSource>(std::make_unique<VerifiedPartSource>(
      std::move(lower), expected_sha1, std::move(part_name), pool));
}

VerifiedPartSource::VerifiedPartSource(std::unique_ptr<BlockSource> lower,
                                       std::array<uint8_t, 20> expected_sha1, std::string part_name,
                                       VerifiedPartPool& pool)
    : lower_(std::move(lower)),
      expected_sha1_(expected_sha1),
      part_name_(std::move(part_name)),
      pool_(pool),
      pool_key_(pool.new_key()) {}

VerifiedPartSource::~VerifiedPartSource() { pool_.erase(pool_key_); }

Status VerifiedPartSource::read_at(uint64_t offset, std::span<std::byte> out) const {
  if (Status s = check_read_range(*this, offset, out.size()); !s.ok()) return s;
  if (out.empty()) return Status::OK();
  VerifiedPartPool::Buffer buffer = pool_.find(pool_key_);
  if (buffer == nullptr) {
    std::unique_lock lock(mu_);
    // Checked again under mu_: a fetch may have finished since the lookup above.
    buffer = pool_.find(pool_key_);
    if (buffer == nullptr && in_flight_ != nullptr) {
      std::shared_ptr<Fill> fill = in_flight_;
      fill_done_.wait(lock, [&] { return fill->done; });
      if (!fill->status.ok()) return fill->status;
      buffer = fill->buffer;
    } else if (buffer == nullptr) {
      auto fill = std::make_shared<Fill>();
      in_flight_ = fill;
      lock.unlock();
      Result<VerifiedPartPool::Buffer> fetched = fetch_and_verify();
      if (fetched.ok()) pool_.insert(pool_key_, *fetched, (*fetched)->size());
      lock.lock();
      fill->done = true;
      fill->status = fetched.status();
      if (fetched.ok()) fill->buffer = *fetched;
      in_flight_.reset();
      fill_done_.notify_all();
      if (!fetched.ok()) return fetched.status();
      buffer = std::move(*fetched);
    }
  }
  std::memcpy(out.data(), buffer->data() + offset, out.size());
  return Status::OK();
}

Result<VerifiedPartPool::Buffer> VerifiedPartSource::fetch_and_verify() const {
  auto bytes = std::make_shared<std::vector<std::byte>>(lower_->size());
  const uint64_t chunks = (bytes->size() + kFetchChunkBytes - 1) / kFetchChunkBytes;
  std::atomic<uint64_t> next_chunk{0};
  std::mutex error_mutex;
  Status first_error;
  auto fetch_chunks = [&] {
    for (uint64_t chunk = next_chunk++; chunk < chunks; chunk = next_chunk++) {
      const uint64_t done = chunk * kFetchChunkBytes;
      const uint64_t length = std::min<uint64_t>(kFetchChunkBytes, bytes->size() - done);
      Status s = lower_->read_at(done, std::span<std::byte>(bytes->data() + done, length));
      if (!s.ok()) {
        std::lock_guard lock(error_mutex);
        if (first_error.ok()) first_error = s;
        next_chunk = chunks;  // stop the others early
      }
    }
  };
  std::vector<std::thread> helpers;
  for (uint64_t i = 1; i < std::min(chunks, kFetchThreads); ++i) helpers.emplace_back(fetch_chunks);
  fetch_chunks();
  for (std::thread& helper : helpers) helper.join();
  if (!first_error.ok()) return first_error.with_context(part_name_);
  if (Status s = check_digest(part_name_, expected_sha1_, *bytes); !s.ok()) return s;
  return VerifiedPartPool::Buffer(std::move(bytes));
}

std::string VerifiedPartSource::describe() const { return "sha1(" + lower_->describe() + ")"; }

}  // namespace imgfs::formats
