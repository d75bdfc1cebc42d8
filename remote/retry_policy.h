// RetryPolicy: turns the outcome of one HTTP attempt (transport error, HTTP status) into what
// to do next (done, retry here, retry on another endpoint, give up) and the jittered exponential
// backoff before the next attempt. Pure functions, so the decisions are unit-tested without a
// network; the loop that applies them is in S3Store.
#pragma once

#include <cstdint>
#include <string_view>

namespace imgfs::remote {

// How an attempt ended below HTTP (set by HttpClient from curl's result).
enum class TransportError {
  kNone,         // a complete HTTP response arrived
  kConnect,      // could not resolve or connect
  kTimeout,      // request timeout, or a stall below the low-speed limit
  kReset,        // connection reset or closed before or while answering
  kPartialBody,  // the body ended before its Content-Length
  kLongBody,     // the body was longer than the buffer it was read into
  kTls,          // certificate or TLS failure: retrying cannot help
  kOther,        // anything else curl reports
};

std::string_view transport_error_name(TransportError error);

enum class RetryDecision {
  kSuccess,             // 2xx (the caller still checks the body)
  kRetry,               // transient: retry on the same endpoint
  kRetryOtherEndpoint,  // the endpoint is unreachable: mark it down, retry elsewhere
  kFail,                // permanent: 4xx, TLS, or an unknown transport failure
};

// 2xx → success; 408, 429, 500-599 except 501 → retry; other statuses (400, 403, 404, 412,
// 416, 501, 3xx...) → fail. Connect failures and timeouts → retry on another endpoint;
// resets, short and long bodies → retry; TLS and other curl errors → fail.
RetryDecision classify_attempt(TransportError error, long http_status);

struct BackoffOptions {
  uint32_t base_ms = 100;
  uint32_t cap_ms = 5000;
};

// The pause before retry number `retry` (0 for the first retry): an "equal jitter" draw in
// [d/2, d] where d = min(cap, base * 2^retry), picked by `random` (any 64-bit value).
uint32_t backoff_delay_ms(uint32_t retry, const BackoffOptions& options, uint64_t random);

}  // namespace imgfs::remote
