// BufferPool: a byte-budgeted LRU of immutable buffers shared by every image of a mount, so the
// decoded data a mount keeps in memory (verified part ciphertext, inflated gzip spans) has one
// bound however many images are open. Each user takes keys from the pool and drops its entries
// when it goes away; an evicted buffer stays alive for the readers still holding it.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace imgfs::formats {

// Buffers of T, least recently used evicted first, holding at most `budget_bytes` as counted by
// the callers of insert(). Built in main (or by a source for itself) and passed by reference; it
// must outlive every source that uses it.
// Thread-safe: every method locks mu_, which is a leaf lock (nothing is called while holding it).
template <class T>
class BufferPool {
 public:
  using Buffer = std::shared_ptr<const T>;

  explicit BufferPool(uint64_t budget_bytes) : budget_bytes_(budget_bytes) {}
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A key no other user of this pool has.
  uint64_t new_key() {
    std::lock_guard lock(mu_);
    return next_key_++;
  }

  // The buffer under `key` (now the most recently used), or null.
  Buffer find(uint64_t key) {
    std::lock_guard lock(mu_);
    auto it = entries_.find(key);
    if (it == entries_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second.lru_position);
    return it->second.buffer;
  }

  // Stores `buffer`, which holds `bytes`, under `key` (replacing what was there), evicting least
  // recently used buffers to stay within the budget. A buffer larger than the whole budget is
  // not retained.
  void insert(uint64_t key, Buffer buffer, uint64_t bytes) {
    std::lock_guard lock(mu_);
    erase_locked(key);
    if (bytes > budget_bytes_) return;
    while (resident_bytes_ + bytes > budget_bytes_) erase_locked(lru_.back());
    lru_.push_front(key);
    entries_.emplace(key, Entry{std::move(buffer), bytes, lru_.begin()});
    resident_bytes_ += bytes;
  }

  // Drops the buffer under `key`, if any.
  void erase(uint64_t key) {
    std::lock_guard lock(mu_);
    erase_locked(key);
  }

  uint64_t budget_bytes() const { return budget_bytes_; }

  uint64_t resident_bytes() const {
    std::lock_guard lock(mu_);
    return resident_bytes_;
  }

 private:
  struct Entry {
    Buffer buffer;
    uint64_t bytes = 0;
    std::list<uint64_t>::iterator lru_position;
  };

  void erase_locked(uint64_t key) {
    auto it = entries_.find(key);
    if (it == entries_.end()) return;
    resident_bytes_ -= it->second.bytes;
    lru_.erase(it->second.lru_position);
    entries_.erase(it);
  }

  const uint64_t budget_bytes_;
  mutable std::mutex mu_;
  uint64_t next_key_ = 0;                        // Guarded by mu_.
  uint64_t resident_bytes_ = 0;                  // Guarded by mu_.
  std::list<uint64_t> lru_;                      // Guarded by mu_; most recently used first.
  std::unordered_map<uint64_t, Entry> entries_;  // Guarded by mu_.
};

}  // namespace imgfs::formats
