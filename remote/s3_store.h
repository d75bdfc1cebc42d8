// S3Store: an S3-compatible bucket (AWS S3, Ceph RGW, Eucalyptus Walrus/OSG, s3rver) as an
// ObjectStore. It turns keys into signed HTTP requests over a pooled HttpClient: ListObjectsV2
// (falling back to ListObjects v1 with marker for servers without v2), HEAD, and ranged GETs
// pinned to an ETag. Transient failures are retried with jittered exponential backoff inside a
// per-operation budget, and unreachable endpoints are failed over. The pure helpers (endpoint
// parsing, URL building, listing and error XML) are declared here for the tests.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "remote/aws_signer.h"
#include "remote/credentials.h"
#include "remote/http_client.h"
#include "remote/object_store.h"

namespace imgfs::remote {

struct S3Config {
  // "http(s)://host[:port]", tried in order; the next takes over when one is unreachable.
  std::vector<std::string> endpoints;
  std::string bucket;
  std::string region = "us-east-1";
  enum class Signing { kV4, kV2, kNone } signing = Signing::kV4;
  // Default: virtual-host style for *.amazonaws.com (when the bucket name allows it), path
  // style for anything else (IP addresses, localhost, private clouds).
  std::optional<bool> path_style;
  Credentials credentials;
  std::optional<std::string> ca_file;
  bool insecure = false;
  int max_connections = 8;
  int retries = 5;                   // retries after the first attempt
  uint32_t timeout_ms = 30000;       // per request
  uint32_t retry_budget_ms = 60000;  // total per operation, all attempts and pauses
  uint32_t low_speed_bytes_per_s = 1024;
  uint32_t low_speed_seconds = 10;
  uint32_t endpoint_cooloff_ms = 30000;  // how long an unreachable endpoint is skipped
  uint32_t backoff_base_ms = 100;
  uint32_t backoff_cap_ms = 5000;
};

// A parsed endpoint.
struct S3Endpoint {
  std::string scheme;  // "http" or "https"
  std::string host;    // lower-cased; an IPv6 address keeps its brackets
  int port = 0;        // explicit or the scheme's default
  // "http://host:port" as shown in logs and stats.
  std::string text() const;
  // host[:port], the port omitted when it is the scheme's default (as curl sends Host).
  std::string host_port() const;
};

// Errors: InvalidArgument (no scheme, unknown scheme, credentials, a path, query or bad port).
Result<S3Endpoint> parse_endpoint(std::string_view text);

// True unless the endpoint is AWS (*.amazonaws.com[.cn]) and the bucket is a DNS label
// without dots (a dotted bucket breaks TLS host matching in virtual-host style).
bool default_path_style(const S3Endpoint& endpoint, std::string_view bucket);

// Everything needed to send and sign one request.
struct S3RequestTarget {
  std::string url;           // scheme://host[:port]/path?query, fully encoded
  std::string host;          // the Host header value
  std::string encoded_path;  // the path as sent (SigV4 canonical URI)
  std::string v2_resource;   // "/bucket" + key path, for SigV2
};

// `key` empty addresses the bucket itself. `query` is raw (unencoded) and is sent sorted and
// encoded exactly as SigV4 canonicalizes it.
S3RequestTarget build_s3_target(const S3Endpoint& endpoint, std::string_view bucket,
                                std::string_view key, bool path_style, const HeaderList& query);

// One page of a ListObjects (v1) or ListObjectsV2 answer.
struct ListPage {
  std::vector<ObjectInfo> objects;  // etags without quotes
  bool is_truncated = false;
  std::string next_continuation_token;  // v2
  std::string next_marker;              // v1 (may be absent even when truncated)
  bool v1_shaped = false;  // no KeyCount/ContinuationToken/NextContinuationToken/StartAfter
};

// Parses a ListBucketResult by element local names (s3rver's namespace is not AWS's).
// Refuses DTDs (no entities), never touches the network. Thread-safe.
// Errors: Corruption (not well-formed, not a ListBucketResult, a Contents without Key or with a
// bad Size).
Result<ListPage> parse_list_page(std::string_view xml);

// <Error><Code>..</Code><Message>..</Message></Error>; empty fields when absent or unparsable.
struct S3ErrorBody {
  std::string code;
  std::string message;
};
S3ErrorBody parse_error_body(std::string_view xml);

// True when a server answered ListObjectsV2 in a way that says it does not implement it
// (501, or a NotImplemented / list-type complaint).
bool list_v2_unsupported(long http_status, const S3ErrorBody& error);

// "\"abc\"" -> "abc"; also accepts a weak W/"abc".
std::string strip_etag_quotes(std::string_view etag);

// "bytes FIRST-LAST/TOTAL" (TOTAL may be "*"), or "bytes */TOTAL" (first/last absent).
struct ContentRange {
  std::optional<uint64_t> first;
  std::optional<uint64_t> last;
  std::optional<uint64_t> total;
};
std::optional<ContentRange> parse_content_range(std::string_view value);

class S3Store final : public ObjectStore {
 public:
  // Checks the configuration (endpoints, bucket name, credentials for the signing chosen) and
  // builds the connection pool; sends nothing. Errors: InvalidArgument.
  static Result<std::unique_ptr<S3Store>> open(S3Config config);

  // ListObjectsV2 paged by continuation token (1000 keys a page); after a server shows it does
  // not implement v2, ListObjects v1 paged by marker from then on. Sorted by key.
  // Thread-safe. Errors: IOError (transport, HTTP status, malformed page), NotFound (no bucket).
  Result<std::vector<ObjectInfo>> list(std::string_view prefix) const override;

  // HEAD: Content-Length and ETag. Thread-safe.
  // Errors: NotFound (404), InvalidArgument (empty key, NUL, longer than 1024 bytes), IOError.
  Result<ObjectInfo> head(std::string_view key) const override;

  // Ranged GET with If-Match; the answer's ETag and Content-Range are checked too, because
  // some servers ignore If-Match. A short or long body is retried. Thread-safe.
  // Errors: InvalidArgument (range past object.size, bad key), NotFound, IOError (including
  // "object K changed since it was opened (ETag X, now Y)").
  Status read_range(const ObjectInfo& object, uint64_t offset,
                    std::span<std::byte> out) const override;

  // One PutObject request (no multipart) of `bytes` with its Content-Length. SigV4 signs the
  // body's SHA-256 as x-amz-content-sha256, so the server refuses a body changed on the way;
  // SigV2 signs an empty Content-MD5 and Content-Type (neither is sent); unsigned sends no
  // authentication. Retried like a read (a PUT of the same bytes is idempotent). Thread-safe.
  // Errors: InvalidArgument (bad key, more than 5 GiB, S3's single-PUT limit), NotFound (no
  // bucket), IOError (transport, "access denied" for 403, other HTTP statuses).
  Status put(const std::string& key, std::span<const std::byte> bytes) const override;

  // Unsigned ranged GET of a presigned URL (import-manifest parts reachable only by get-url).
  // Retries as read_range; no endpoint failover (the URL names its host). Thread-safe.
  // Errors: IOError ("presigned URL expired: ..." for a 403 that says so), NotFound,
  // InvalidArgument (empty out is fine; a malformed URL is not).
  Status read_url_range(const std::string& presigned_url, uint64_t offset,
                        std::span<std::byte> out) const override;

  // The size of the object behind a presigned URL. Sent as "GET Range: bytes=0-0" rather than
  // HEAD, because a presigned URL is signed for one method. Thread-safe.
  // Errors: as read_url_range.
  Result<uint64_t> head_url_size(const std::string& url) const override;

  // "s3://bucket via http://host:port".
  std::string describe() const override;

  // The endpoint requests go to now, and how many times requests moved off a failed one.
  std::string current_endpoint() const;
  uint64_t failovers() const { return failovers_.load(std::memory_order_relaxed); }
  // True once listing has fallen back to ListObjects v1.
  bool uses_list_v1() const { return list_v1_.load(std::memory_order_relaxed); }

 private:
  struct Target {
    S3Endpoint endpoint;
    bool path_style = true;
  };
  // Builds the request for one attempt; `target` is null for a presigned URL.
  using RequestMaker = std::function<Result<HttpRequest>(const Target* target)>;
  // Judges a 2xx answer: OK, or an error that is retried when *retryable is set.
  using ResponseCheck = std::function<Status(const HttpResponse&, bool* retryable)>;

  S3Store(S3Config config, std::vector<Target> targets, std::unique_ptr<HttpClient> http);

  // The retry loop: attempts until success, a permanent failure, `retries` or the budget runs
  // out. `last` receives the final answer. Errors are "WHAT: DETAIL after N attempts".
  Status run(std::string_view what, bool use_endpoints, const RequestMaker& make,
             const ResponseCheck& check, HttpResponse* last) const;

  // A signed request to `key` (empty: the bucket) on `target`, signed now. `payload_hash` is
  // the SigV4 x-amz-content-sha256 of the body.
  Result<HttpRequest> signed_request(const Target& target, std::string_view method,
                                     std::string_view key, const HeaderList& query,
                                     const HeaderList& headers,
                                     std::string_view payload_hash = kEmptyPayloadSha256) const;

  // Maps a final non-2xx answer to a Status.
  Status http_failure(std::string_view what, const HttpResponse& response, int attempts) const;

  Result<std::vector<ObjectInfo>> list_with(std::string_view prefix, bool v1,
                                            bool* v2_unsupported) const;

  size_t pick_target() const;
  void mark_down(size_t index) const;
  uint64_t random_u64() const;

  const S3Config config_;
  const std::vector<Target> targets_;
  const std::unique_ptr<HttpClient> http_;

  // Lock order: mutex_ is a leaf, never held across I/O or a sleep.
  mutable std::mutex mutex_;
  mutable std::vector<std::chrono::steady_clock::time_point> down_until_;  // GUARDED_BY(mutex_)
  mutable size_t current_ = 0;                                             // GUARDED_BY(mutex_)
  mutable std::mt19937_64 rng_;                                            // GUARDED_BY(mutex_)
  mutable std::atomic<uint64_t> failovers_{0};
  mutable std::atomic<bool> list_v1_{false};
};

}  // namespace imgfs::remote
