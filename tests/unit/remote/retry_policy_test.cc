#include "remote/retry_policy.h"

#include <gtest/gtest.h>

namespace imgfs::remote {
namespace {

TEST(RetryPolicyTest, HttpStatuses) {
  EXPECT_EQ(classify_attempt(TransportError::kNone, 200), RetryDecision::kSuccess);
  EXPECT_EQ(classify_attempt(TransportError::kNone, 206), RetryDecision::kSuccess);
  for (long status : {408L, 429L, 500L, 502L, 503L, 504L, 599L}) {
    EXPECT_EQ(classify_attempt(TransportError::kNone, status), RetryDecision::kRetry) << status;
  }
  for (long status : {301L, 307L, 400L, 401L, 403L, 404L, 405L, 412L, 416L, 501L}) {
    EXPECT_EQ(classify_attempt(TransportError::kNone, status), RetryDecision::kFail) << status;
  }
}

TEST(RetryPolicyTest, TransportErrors) {
  EXPECT_EQ(classify_attempt(TransportError::kConnect, 0), RetryDecision::kRetryOtherEndpoint);
  EXPECT_EQ(classify_attempt(TransportError::kTimeout, 0), RetryDecision::kRetryOtherEndpoint);
  EXPECT_EQ(classify_attempt(TransportError::kTimeout, 200), RetryDecision::kRetryOtherEndpoint);
  EXPECT_EQ(classify_attempt(TransportError::kReset, 0), RetryDecision::kRetry);
  EXPECT_EQ(classify_attempt(TransportError::kPartialBody, 206), RetryDecision::kRetry);
  EXPECT_EQ(classify_attempt(TransportError::kLongBody, 206), RetryDecision::kRetry);
  EXPECT_EQ(classify_attempt(TransportError::kTls, 0), RetryDecision::kFail);
  EXPECT_EQ(classify_attempt(TransportError::kOther, 0), RetryDecision::kFail);
  EXPECT_EQ(transport_error_name(TransportError::kPartialBody), "body cut short");
}

TEST(RetryPolicyTest, BackoffGrowsWithJitterUpToTheCap) {
  const BackoffOptions options{100, 5000};
  // The lowest and highest draws bound each step: [d/2, d], d = min(5000, 100 * 2^retry).
  EXPECT_EQ(backoff_delay_ms(0, options, 0), 50u);
  EXPECT_EQ(backoff_delay_ms(0, options, 50), 100u);
  EXPECT_EQ(backoff_delay_ms(1, options, 0), 100u);
  EXPECT_EQ(backoff_delay_ms(3, options, 0), 400u);
  EXPECT_EQ(backoff_delay_ms(3, options, 400), 800u);
  EXPECT_EQ(backoff_delay_ms(6, options, 0), 2500u);
  EXPECT_EQ(backoff_delay_ms(60, options, 2500), 5000u);
  EXPECT_EQ(backoff_delay_ms(4000000000u, options, ~uint64_t{0}) <= 5000u, true);
  for (uint64_t random = 0; random < 1000; ++random) {
    const uint32_t delay = backoff_delay_ms(2, options, random * 7919);
    EXPECT_GE(delay, 200u);
    EXPECT_LE(delay, 400u);
  }
}

}  // namespace
}  // namespace imgfs::remote
