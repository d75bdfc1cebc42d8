#include "remote/retry_policy.h"

#include <algorithm>

namespace imgfs::remote {

std::string_view transport_error_name(TransportError error) {
  switch (error) {
    case TransportError::kNone:
      return "no error";
    case TransportError::kConnect:
      return "connection failed";
    case TransportError::kTimeout:
      return "timed out";
    case TransportError::kReset:
      return "connection reset";
    case TransportError::kPartialBody:
      return "body cut short";
    case TransportError::kLongBody:
      return "body longer than asked";
    case TransportError::kTls:
      return "TLS failure";
    case TransportError::kOther:
      return "transfer failed";
  }
  return "transfer failed";
}

RetryDecision classify_attempt(TransportError error, long http_status) {
  switch (error) {
    case TransportError::kNone:
      break;
    case TransportError::kConnect:
    case TransportError::kTimeout:
      return RetryDecision::kRetryOtherEndpoint;
    case TransportError::kReset:
    case TransportError::kPartialBody:
    case TransportError::kLongBody:
      return RetryDecision::kRetry;
    case TransportError::kTls:
    case TransportError::kOther:
      return RetryDecision::kFail;
  }
  if (http_status >= 200 && http_status < 300) return RetryDecision::kSuccess;
  // 501 Not Implemented is permanent (a server without ListObjectsV2 answers it).
  if (http_status == 501) return RetryDecision::kFail;
  if (http_status == 408 || http_status == 429 || (http_status >= 500 && http_status < 600)) {
    return RetryDecision::kRetry;
  }
  return RetryDecision::kFail;
}

uint32_t backoff_delay_ms(uint32_t retry, const BackoffOptions& options, uint64_t random) {
  uint64_t ceiling = options.base_ms;
  for (uint32_t i = 0; i < retry && ceiling < options.cap_ms; ++i) ceiling *= 2;
  ceiling = std::min<uint64_t>(ceiling, options.cap_ms);
  const uint64_t half = ceiling / 2;
  return static_cast<uint32_t>(half + random % (ceiling - half + 1));
}

}  // namespace imgfs::remote
