// BlockStore: a bounded, durable on-disk store of cached blocks. It turns (source id, etag,
// index) keys into files under `dir`/blocks, each a self-describing header {magic, version,
// crc32c, length, index, source id, etag, header crc32c} followed by the data (as mountpoint's
// disk data cache does), and evicts least-recently-used blocks to stay within a byte capacity.
//
// Blocks survive unmount, restart and kill -9. The directory itself is the index: a block is
// written to a temp file and renamed into place (atomic), so after a kill the folder holds
// whole block files plus temp files, which open() removes. Nothing is fsync-ed: after a power
// loss a file may be short or hold zeros, and the checksums turn it into a miss. open()
// rebuilds the index from one directory listing and one fstatat per file (name -> size, mtime
// as the LRU order) and reads no file contents: 10k blocks took 0.15-0.2 s (Debug build, warm
// inode cache, a loaded 2-core machine). A file is checked (header and data crc32c) only when
// get() reads it; one that does not check out is a miss and removed. There is no journal, so
// nothing on disk can disagree with the directory; the only metadata is each file's header,
// counted in its size. Capacity counts file sizes, not the filesystem's allocation rounding.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "cache/lru.h"
#include "formats/io_counters.h"
#include "formats/status.h"

namespace imgfs::cache {

// Names one cached block. `source_id` identifies the image chain (e.g. bucket key plus manifest
// etag) and `etag` the object version it was read from; `index` counts blocks from 0.
struct BlockKey {
  std::string source_id;
  std::string etag;
  uint64_t index = 0;
};

class BlockStore {
 public:
  // Longest source_id or etag a block header holds.
  static constexpr size_t kMaxIdBytes = 65536;

  // Creates `dir` (mkdir -p, mode 0700; an existing dir with looser mode is chmod-ed to 0700)
  // and its "blocks" subfolder, removes temp files left there by an earlier run, and indexes the
  // block files found there (by size, least recently used = oldest mtime) without reading them.
  // `capacity_bytes` (> 0) is a hard bound on the bytes of the files in the folder, headers
  // included: if the blocks found exceed it (a smaller capacity than last time), the oldest are
  // removed down to the low watermark. Files whose names are not ours are left alone and not
  // counted. One store per folder at a time: two processes sharing a folder keep separate
  // accounts, so the folder may then exceed either cap.
  // `mount_counters` is accepted for the mount's totals but IoCounters has no store-level field
  // yet, so nothing is counted here (CachedSource counts hits and misses).
  // Errors: InvalidArgument (empty dir, zero capacity, a non-directory in the way), IOError.
  static Result<std::unique_ptr<BlockStore>> open(std::string dir, uint64_t capacity_bytes,
                                                  IoCounters* mount_counters);

  // True, with `out` filled, when the block is stored and its header matches `key` exactly, its
  // length equals out.size() and its data checksum is right. Otherwise false: a missing,
  // unreadable, short or corrupt file is a miss, and a bad file is removed. A hit sets the
  // file's mtime to now, so the LRU order survives a restart. On false the contents of `out`
  // are unspecified. Thread-safe; file reads run outside the lock.
  // Errors: none today (every problem with a block file is a miss).
  Result<bool> get(const BlockKey& key, std::span<std::byte> out);

  // Stores `data` as block `key` (replacing any older copy). When the indexed files, the temp
  // files of puts in flight and this block's file would together exceed the capacity (the high
  // watermark), least-recently-used blocks are removed first, down to the low watermark
  // (low_watermark_bytes() minus the bytes in flight), so a full cache evicts in batches
  // rather than one block per put. A block whose file would exceed the capacity, or the room
  // left by puts in flight, is not stored (OK is returned). Thread-safe; the data is written to
  // a temp file outside the lock and renamed into place under it.
  // Errors: InvalidArgument (source_id or etag longer than kMaxIdBytes), IOError (the block is
  // then not stored; the store stays consistent).
  Status put(const BlockKey& key, std::span<const std::byte> data);

  // Bytes of the block files currently indexed (headers included). Thread-safe.
  uint64_t bytes_used() const;

  // Bytes of the indexed block files of one (source_id, etag), headers included. Walks the
  // index (a few thousand entries for a typical cap), so it is for stats, not a hot path.
  uint64_t bytes_used_by(const std::string& source_id, const std::string& etag) const;

  uint64_t capacity_bytes() const { return capacity_bytes_; }

  // Where eviction stops: 90% of the capacity (rounded down).
  uint64_t low_watermark_bytes() const { return capacity_bytes_ - capacity_bytes_ / 10; }

  // The absolute path of the folder holding the block files.
  const std::string& blocks_dir() const { return blocks_dir_; }

  // Size on disk of the file for block `key` holding `data_bytes` bytes.
  static uint64_t file_bytes(const BlockKey& key, uint64_t data_bytes);

 private:
  BlockStore(std::string blocks_dir, uint64_t capacity_bytes)
      : blocks_dir_(std::move(blocks_dir)), capacity_bytes_(capacity_bytes) {}

  // Lists blocks_dir_: removes temp files, indexes block files oldest mtime first, then evicts
  // down to the low watermark if they exceed the capacity. Called once, before the store is
  // shared. Errors: IOError.
  Status load_index();

  // Under mu_: removes least-recently-used blocks until the indexed bytes are <= limit_bytes.
  void evict_locked(uint64_t limit_bytes);

  // Under mu_: unlinks the file `name` and forgets it, unless the file there now is another
  // one than (dev, ino) (a concurrent put replaced it). ino == 0 means "expected missing":
  // the entry is forgotten only if no file is there.
  void drop_locked(const std::string& name, uint64_t dev, uint64_t ino);

  const std::string blocks_dir_;
  const uint64_t capacity_bytes_;

  // Guards everything below. A leaf lock: nothing else is locked while it is held. Renames and
  // unlinks of block files happen under it, so the files on disk are exactly the indexed ones
  // plus in-flight temp files (at most reserved_bytes_), and index_.total_bytes() +
  // reserved_bytes_ <= capacity_bytes_ always holds.
  mutable std::mutex mu_;
  LruIndex<std::string> index_;  // file name -> file bytes
  uint64_t reserved_bytes_ = 0;  // temp files being written by put
  uint64_t next_temp_id_ = 0;
};

}  // namespace imgfs::cache
