// HttpClient: a small libcurl wrapper. It turns one HTTP request (method, URL, headers, a PUT's
// body) into a status, response headers and a body written either into a caller's buffer
// (ranged GETs, no copy) or into a bounded string (listings, error documents). Easy handles are
// pooled, one per request in flight up to max_connections, so connections stay open between
// requests (keep-alive). One attempt per call: retries belong to the caller (S3Store).
//
// Process set-up: main calls HttpClient::init_globally() once, before starting threads;
// nothing here relies on a global constructor.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "formats/status.h"
#include "remote/retry_policy.h"

namespace imgfs::remote {

struct HttpOptions {
  std::optional<std::string> ca_file;  // PEM bundle; default: the system's
  bool insecure = false;               // skip TLS verification (only when the user asks)
  int max_connections = 8;             // requests in flight at once; more callers wait
  uint32_t connect_timeout_ms = 10000;
  uint32_t low_speed_bytes_per_s = 1024;  // a transfer slower than this ...
  uint32_t low_speed_seconds = 10;        // ... for this long is a timeout (a stall)
  size_t max_body_bytes = 64u << 20;      // bound on a body read into HttpResponse::body
};

struct HttpRequest {
  std::string method = "GET";  // "GET", "HEAD" or "PUT"
  std::string url;             // fully encoded; sent as is (no dot-segment squashing)
  std::vector<std::pair<std::string, std::string>> headers;
  // The body of a PUT, sent with its Content-Length (no Content-Type, no Expect); it must stay
  // alive until perform returns. Ignored by other methods.
  std::span<const std::byte> upload_body;
  // Where a 2xx body goes. Empty: into HttpResponse::body. A body that would overflow it
  // aborts the transfer with TransportError::kLongBody.
  std::span<std::byte> body_buffer;
  uint32_t timeout_ms = 30000;  // whole request
};

struct HttpResponse {
  TransportError error = TransportError::kNone;
  std::string error_text;                                    // curl's message when error != kNone
  long status = 0;                                           // 0 when no response arrived
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;           // non-2xx bodies, and 2xx bodies when no body_buffer was given
  uint64_t buffer_bytes = 0;  // bytes written into HttpRequest::body_buffer

  // The last value of header `lower_name`, or nullopt.
  std::optional<std::string_view> header(std::string_view lower_name) const;
};

class HttpClient {
 public:
  // curl_global_init for the whole process. Call once from main before any thread starts
  // (and before the first HttpClient). Errors: IOError when curl cannot initialize.
  static Status init_globally();

  // Errors: InvalidArgument (max_connections < 1, a CA file that does not exist).
  static Result<std::unique_ptr<HttpClient>> open(HttpOptions options);

  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // Performs one attempt. Blocks while max_connections requests are in flight. Never fails
  // as a call: a transport failure is HttpResponse::error. Thread-safe.
  HttpResponse perform(const HttpRequest& request) const;

  // Easy handles created so far (each keeps its own connection); for tests and stats.
  int handles_created() const;

 private:
  explicit HttpClient(HttpOptions options) : options_(std::move(options)) {}

  void* acquire_handle() const;
  void release_handle(void* handle) const;

  const HttpOptions options_;
  // Lock order: mutex_ is a leaf; it is never held across curl_easy_perform.
  mutable std::mutex mutex_;
  mutable std::condition_variable handle_freed_;
  mutable std::vector<void*> idle_handles_;  // CURL*, GUARDED_BY(mutex_)
  mutable int handles_created_ = 0;          // GUARDED_BY(mutex_)
};

}  // namespace imgfs::remote
