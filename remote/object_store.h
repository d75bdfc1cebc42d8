// ObjectStore: the bucket interface. It turns keys into listings, {size, etag} and byte ranges
// of one pinned object version. DirStore (a local directory) and the S3 store implement it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/status.h"

namespace imgfs::remote {

// One object version: reads made with it fail once the object no longer has this etag.
struct ObjectInfo {
  std::string key;
  uint64_t size = 0;
  std::string etag;
};

class ObjectStore {
 public:
  virtual ~ObjectStore() = default;

  // Every object whose key starts with `prefix` (recursive, no delimiter), sorted by key.
  // Thread-safe. Errors: IOError when the store cannot be listed.
  virtual Result<std::vector<ObjectInfo>> list(std::string_view prefix) const = 0;

  // The current version of `key`. Thread-safe.
  // Errors: NotFound if missing, InvalidArgument for a malformed key, IOError.
  virtual Result<ObjectInfo> head(std::string_view key) const = 0;

  // Fills all of `out` from [offset, offset + out.size()) of `object`, which must still have
  // object.etag (else IOError "object K changed since it was opened (ETag ...)"). Thread-safe.
  // Errors: IOError (I/O, changed object, short object), NotFound, InvalidArgument (bad key or
  // a range past object.size).
  virtual Status read_range(const ObjectInfo& object, uint64_t offset,
                            std::span<std::byte> out) const = 0;

  // Stores `bytes` as the whole object `key`, replacing any current version. Readers see the
  // old object or the new one, never a part. Meant for small objects that imgfs publishes (a
  // signed gzip index next to a manifest), so one request, no multipart. Thread-safe.
  // Errors: NotSupported (a read-only store), InvalidArgument (bad key, too large), NotFound
  // (no bucket), IOError (I/O, transport, refused by the server).
  virtual Status put(const std::string& key, std::span<const std::byte> bytes) const {
    return Status::NotSupported(describe() + " cannot store objects");
  }

  // One-line identity for logs: "dir:/path" or "s3://bucket/prefix".
  virtual std::string describe() const = 0;

  // True when objects are files on this machine: copying their bytes into the local block
  // cache would only double the I/O.
  virtual bool is_local() const { return false; }

  // Unsigned reads of a pre-signed URL (an import manifest's get-url), for stores that speak
  // HTTP. Thread-safe. Errors: NotSupported (this store has no HTTP), IOError (expired URL,
  // transport), NotFound.
  virtual Result<uint64_t> head_url_size(const std::string& url) const {
    return Status::NotSupported(describe() + " cannot fetch URLs");
  }
  virtual Status read_url_range(const std::string& url, uint64_t offset,
                                std::span<std::byte> out) const {
    return Status::NotSupported(describe() + " cannot fetch URLs");
  }
};

}  // namespace imgfs::remote
