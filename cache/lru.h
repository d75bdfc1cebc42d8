// LruIndex: turns a stream of insert/touch events on keys, each with a size in bytes, into the
// least-recently-used keys to drop to stay under a byte limit. Header-only; no I/O.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace imgfs::cache {

// Not thread-safe: callers hold their own lock around every call.
template <typename Key, typename Hash = std::hash<Key>>
class LruIndex {
 public:
  // Adds `key` with `bytes`, or updates its size; either way it becomes the most recent.
  void insert(const Key& key, uint64_t bytes) {
    auto it = entries_.find(key);
    if (it != entries_.end()) {
      total_bytes_ -= it->second.bytes;
      it->second.bytes = bytes;
      order_.splice(order_.begin(), order_, it->second.position);
    } else {
      order_.push_front(key);
      entries_.emplace(key, Entry{bytes, order_.begin()});
    }
    total_bytes_ += bytes;
  }

  // Makes `key` the most recent. False (and nothing changes) when it is absent.
  bool touch(const Key& key) {
    auto it = entries_.find(key);
    if (it == entries_.end()) return false;
    order_.splice(order_.begin(), order_, it->second.position);
    return true;
  }

  // Removes `key`. False when it was absent.
  bool erase(const Key& key) {
    auto it = entries_.find(key);
    if (it == entries_.end()) return false;
    total_bytes_ -= it->second.bytes;
    order_.erase(it->second.position);
    entries_.erase(it);
    return true;
  }

  bool contains(const Key& key) const { return entries_.contains(key); }

  // The size recorded for `key`, or nullopt when absent.
  std::optional<uint64_t> bytes_of(const Key& key) const {
    auto it = entries_.find(key);
    if (it == entries_.end()) return std::nullopt;
    return it->second.bytes;
  }

  uint64_t total_bytes() const { return total_bytes_; }
  size_t size() const { return entries_.size(); }

  // Calls fn(key, bytes) for every key, in no particular order.
  template <typename Fn>
  void for_each(Fn&& fn) const {
    for (const auto& [key, entry] : entries_) fn(key, entry.bytes);
  }

  // Removes least-recently-used keys until total_bytes() <= limit_bytes, and returns them,
  // oldest first.
  std::vector<Key> evict_until(uint64_t limit_bytes) {
    std::vector<Key> evicted;
    while (total_bytes_ > limit_bytes && !order_.empty()) {
      Key victim = std::move(order_.back());
      auto it = entries_.find(victim);
      total_bytes_ -= it->second.bytes;
      entries_.erase(it);
      order_.pop_back();
      evicted.push_back(std::move(victim));
    }
    return evicted;
  }

 private:
  struct Entry {
    uint64_t bytes;
    typename std::list<Key>::iterator position;
  };

  // Most recent first.
  std::list<Key> order_;
  std::unordered_map<Key, Entry, Hash> entries_;
  uint64_t total_bytes_ = 0;
};

}  // namespace imgfs::cache
