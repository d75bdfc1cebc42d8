// Live I/O counters of one image (and, through `parent`, of the whole mount).
// Layers bump them; stats.json and the benchmarks read them to prove laziness.
#pragma once

#include <atomic>
#include <cstdint>

namespace imgfs {

struct IoCounters {
  enum Field { kBytesFetched, kRequests, kCacheHits, kCacheMisses, kBytesServed, kFieldCount };

  // Totals every add is also counted in (the mount's, for an image); outlives this object.
  IoCounters* parent = nullptr;
  std::atomic<uint64_t> values[kFieldCount] = {};

  void add(Field field, uint64_t amount) {
    for (IoCounters* c = this; c != nullptr; c = c->parent) {
      c->values[field].fetch_add(amount, std::memory_order_relaxed);
    }
  }
  uint64_t get(Field field) const { return values[field].load(std::memory_order_relaxed); }
};

}  // namespace imgfs
