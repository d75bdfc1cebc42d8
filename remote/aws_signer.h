// AWS request signing: turns one HTTP request (method, host, encoded path, query, headers to
// sign) plus credentials and a time into the headers that authenticate it. Signature V4
// (AWS4-HMAC-SHA256, "Authenticating Requests: Using the Authorization Header" in the S3 API
// reference) and Signature V2 (HMAC-SHA1, "Signing and Authenticating REST Requests", for
// Walrus and older Eucalyptus). Pure functions: no I/O and no clock, so the published examples
// are unit tests.
#pragma once

#include <cstddef>
#include <ctime>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "formats/status.h"
#include "remote/credentials.h"

namespace imgfs::remote {

using HeaderList = std::vector<std::pair<std::string, std::string>>;

// SHA-256 of the empty body, the x-amz-content-sha256 of a GET or HEAD.
inline constexpr std::string_view kEmptyPayloadSha256 =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
inline constexpr std::string_view kUnsignedPayload = "UNSIGNED-PAYLOAD";

// The lower-case hex SHA-256 of a request body: the x-amz-content-sha256 (and SigV4 payload
// hash) of a PUT, which lets the server refuse a body changed in transit. Thread-safe.
// Errors: IOError if OpenSSL fails.
Result<std::string> payload_sha256_hex(std::span<const std::byte> payload);

// Percent-encodes every byte except the unreserved A-Z a-z 0-9 - _ . ~ with upper-case hex,
// as SigV4 requires; '/' is kept when `keep_slash` (an object key in a path). A space becomes
// %20 and '+' becomes %2B. Thread-safe.
std::string uri_encode(std::string_view text, bool keep_slash);

// "20130524T000000Z" (x-amz-date of SigV4) and "Fri, 24 May 2013 00:00:00 GMT" (RFC 1123,
// the x-amz-date of SigV2) for a UTC time.
std::string format_amz_date(std::time_t when);
std::string format_http_date(std::time_t when);

// One request as the signer sees it.
struct SignableRequest {
  std::string method;        // "GET", "HEAD", "PUT"
  std::string host;          // the Host header value: "bucket.s3.amazonaws.com", "h:4599"
  std::string encoded_path;  // the path exactly as sent, already uri_encode'd: "/b/a%20b"
  HeaderList query;          // raw (unencoded) name/value pairs; a bare name has value ""
  HeaderList headers;        // further headers to sign (e.g. range), any case
  std::string payload_hash = std::string(kEmptyPayloadSha256);  // or kUnsignedPayload
};

// The intermediate strings of SigV4, kept for tests and for diagnosing a rejected request.
struct SigV4Result {
  std::string canonical_request;
  std::string string_to_sign;
  std::string signature;  // lower-case hex
  HeaderList headers;     // to add: x-amz-date, x-amz-content-sha256,
                          // [x-amz-security-token], Authorization
};

// The canonical query string of SigV4: names and values encoded, sorted by name then value,
// a bare name as "name=". Thread-safe.
std::string canonical_query_string(const HeaderList& query);

// Signs for `service` ("s3") in `region` at `when`. Signs host, x-amz-date,
// x-amz-content-sha256, x-amz-security-token (when credentials carry a session token) and
// every header in request.headers. Thread-safe.
// Errors: InvalidArgument for empty credentials or region; IOError if OpenSSL fails.
Result<SigV4Result> sign_v4(const SignableRequest& request, const Credentials& credentials,
                            std::string_view region, std::string_view service, std::time_t when);

// The query parameters that are part of the V2 resource (AWS's list of sub-resources plus
// the response-* overrides); list-type, prefix, marker, max-keys and the like are not.
bool is_v2_subresource(std::string_view name);

// The V2 string to sign: VERB, Content-MD5, Content-Type, Date (empty when x-amz-date is sent,
// which is how we sign), the x-amz-* headers lower-cased, sorted and each on its own line,
// then the resource: "/bucket/encoded-key" plus "?sub[=value]&..." for the sub-resources of
// `query`, sorted. Thread-safe.
std::string v2_string_to_sign(std::string_view method, std::string_view content_md5,
                              std::string_view content_type, std::string_view date,
                              const HeaderList& amz_headers, std::string_view bucket_resource,
                              const HeaderList& query);

// Signs with SigV2 at `when`: x-amz-date (RFC 1123), [x-amz-security-token] and
// "Authorization: AWS ACCESS:BASE64(HMAC-SHA1)". `bucket_resource` is "/bucket/encoded-key"
// (or "/bucket/" for the bucket itself) whatever the addressing style. Thread-safe.
// Errors: InvalidArgument for empty credentials; IOError if OpenSSL fails.
Result<HeaderList> sign_v2(std::string_view method, std::string_view bucket_resource,
                           const HeaderList& query, const Credentials& credentials,
                           std::time_t when);

// The base64 HMAC-SHA1 of `string_to_sign` under `secret` (V2's signature). Thread-safe.
Result<std::string> v2_signature(std::string_view secret, std::string_view string_to_sign);

}  // namespace imgfs::remote
