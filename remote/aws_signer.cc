#include "remote/aws_signer.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <iterator>
#include <string>

namespace imgfs::remote {

namespace {

constexpr char kHexUpper[] = "0123456789ABCDEF";
constexpr char kHexLower[] = "0123456789abcdef";

// The V2 resource's sub-resources (AWS "Signing and Authenticating REST Requests",
// CanonicalizedResource element) and the response header overrides.
constexpr std::string_view kV2Subresources[] = {"accelerate",
                                                "acl",
                                                "analytics",
                                                "cors",
                                                "delete",
                                                "inventory",
                                                "lifecycle",
                                                "location",
                                                "logging",
                                                "metrics",
                                                "notification",
                                                "partNumber",
                                                "policy",
                                                "replication",
                                                "requestPayment",
                                                "restore",
                                                "tagging",
                                                "torrent",
                                                "uploadId",
                                                "uploads",
                                                "versionId",
                                                "versioning",
                                                "versions",
                                                "website",
                                                "response-cache-control",
                                                "response-content-disposition",
                                                "response-content-encoding",
                                                "response-content-language",
                                                "response-content-type",
                                                "response-expires"};

bool is_unreserved(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '_' || c == '.' || c == '~';
}

std::string to_lower(std::string_view text) {
  std::string lower(text);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return lower;
}

// SigV4 canonical header values: surrounding spaces trimmed, inner runs of spaces made one.
std::string canonical_header_value(std::string_view value) {
  std::string out;
  bool in_space = false;
  for (char c : value) {
    const bool space = c == ' ' || c == '\t';
    if (space) {
      in_space = true;
      continue;
    }
    if (in_space && !out.empty()) out.push_back(' ');
    in_space = false;
    out.push_back(c);
  }
  return out;
}

std::string hex_lower(const unsigned char* bytes, size_t length) {
  std::string out(length * 2, '0');
  for (size_t i = 0; i < length; ++i) {
    out[2 * i] = kHexLower[bytes[i] >> 4];
    out[2 * i + 1] = kHexLower[bytes[i] & 0xf];
  }
  return out;
}

Result<std::string> sha256_hex(std::string_view data) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest;
  unsigned int length = 0;
  if (EVP_Digest(data.data(), data.size(), digest.data(), &length, EVP_sha256(), nullptr) != 1) {
    return Status::IOError("OpenSSL SHA-256 failed");
  }
  return hex_lower(digest.data(), length);
}

// HMAC with `digest` ("SHA256" or "SHA1") through EVP_Q_mac, the one-shot EVP_MAC API.
Result<std::string> hmac(std::string_view digest, std::string_view key, std::string_view data) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> out;
  size_t length = 0;
  const unsigned char* mac =
      EVP_Q_mac(nullptr, "HMAC", nullptr, std::string(digest).c_str(), nullptr, key.data(),
                key.size(), reinterpret_cast<const unsigned char*>(data.data()), data.size(),
                out.data(), out.size(), &length);
  if (mac == nullptr) return Status::IOError("OpenSSL HMAC-" + std::string(digest) + " failed");
  return std::string(reinterpret_cast<const char*>(out.data()), length);
}

bool time_to_utc(std::time_t when, std::tm* out) { return ::gmtime_r(&when, out) != nullptr; }

}  // namespace

Result<std::string> payload_sha256_hex(std::span<const std::byte> payload) {
  return sha256_hex(
      std::string_view(reinterpret_cast<const char*>(payload.data()), payload.size()));
}

std::string uri_encode(std::string_view text, bool keep_slash) {
  std::string out;
  out.reserve(text.size());
  for (char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (is_unreserved(c) || (keep_slash && c == '/')) {
      out.push_back(ch);
    } else {
      out.push_back('%');
      out.push_back(kHexUpper[c >> 4]);
      out.push_back(kHexUpper[c & 0xf]);
    }
  }
  return out;
}

std::string format_amz_date(std::time_t when) {
  std::tm tm{};
  if (!time_to_utc(when, &tm)) return "19700101T000000Z";
  char buffer[32];
  const size_t n = std::strftime(buffer, sizeof buffer, "%Y%m%dT%H%M%SZ", &tm);
  return std::string(buffer, n);
}

std::string format_http_date(std::time_t when) {
  static constexpr std::array<std::string_view, 7> kDays = {"Sun", "Mon", "Tue", "Wed",
                                                            "Thu", "Fri", "Sat"};
  static constexpr std::array<std::string_view, 12> kMonths = {
      "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  std::tm tm{};
  if (!time_to_utc(when, &tm)) return "Thu, 01 Jan 1970 00:00:00 GMT";
  // Built by hand: strftime's %a and %b follow the locale, HTTP dates must be English.
  char buffer[64];
  const int n = std::snprintf(buffer, sizeof buffer, "%s, %02d %s %04d %02d:%02d:%02d GMT",
                              std::string(kDays[tm.tm_wday % 7]).c_str(), tm.tm_mday,
                              std::string(kMonths[tm.tm_mon % 12]).c_str(), tm.tm_year + 1900,
                              tm.tm_hour, tm.tm_min, tm.tm_sec);
  return std::string(buffer, n > 0 ? static_cast<size_t>(n) : 0);
}

std::string canonical_query_string(const HeaderList& query) {
  std::vector<std::pair<std::string, std::string>> encoded;
  encoded.reserve(query.size());
  for (const auto& [name, value] : query) {
    encoded.emplace_back(uri_encode(name, false), uri_encode(value, false));
  }
  std::sort(encoded.begin(), encoded.end());
  std::string out;
  for (const auto& [name, value] : encoded) {
    if (!out.empty()) out.push_back('&');
    out += name;
    out.push_back('=');
    out += value;
  }
  return out;
}

Result<SigV4Result> sign_v4(const SignableRequest& request, const Credentials& credentials,
                            std::string_view region, std::string_view service, std::time_t when) {
  if (credentials.empty() || credentials.secret_access_key.empty()) {
    return Status::InvalidArgument("SigV4 signing needs an access key and a secret");
  }
  if (region.empty()) return Status::InvalidArgument("SigV4 signing needs a region");
  const std::string amz_date = format_amz_date(when);
  const std::string date = amz_date.substr(0, 8);

  // Lower-cased name -> canonical value; a header given twice joins its values with ','.
  std::vector<std::pair<std::string, std::string>> signed_headers;
  auto add = [&signed_headers](std::string_view name, std::string_view value) {
    const std::string lower = to_lower(name);
    const std::string canonical = canonical_header_value(value);
    for (auto& [existing, existing_value] : signed_headers) {
      if (existing == lower) {
        existing_value += "," + canonical;
        return;
      }
    }
    signed_headers.emplace_back(lower, canonical);
  };
  add("host", request.host);
  add("x-amz-date", amz_date);
  add("x-amz-content-sha256", request.payload_hash);
  if (!credentials.session_token.empty()) {
    add("x-amz-security-token", credentials.session_token);
  }
  for (const auto& [name, value] : request.headers) add(name, value);
  std::sort(signed_headers.begin(), signed_headers.end());

  std::string canonical_headers;
  std::string signed_names;
  for (const auto& [name, value] : signed_headers) {
    canonical_headers += name + ":" + value + "\n";
    if (!signed_names.empty()) signed_names.push_back(';');
    signed_names += name;
  }

  SigV4Result result;
  result.canonical_request = request.method + "\n" +
                             (request.encoded_path.empty() ? "/" : request.encoded_path) + "\n" +
                             canonical_query_string(request.query) + "\n" + canonical_headers +
                             "\n" + signed_names + "\n" + request.payload_hash;
  Result<std::string> request_hash = sha256_hex(result.canonical_request);
  if (!request_hash.ok()) return request_hash.status();
  const std::string scope =
      date + "/" + std::string(region) + "/" + std::string(service) + "/aws4_request";
  result.string_to_sign = "AWS4-HMAC-SHA256\n" + amz_date + "\n" + scope + "\n" + *request_hash;

  // kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request").
  std::string key = "AWS4" + credentials.secret_access_key;
  for (std::string_view part :
       {std::string_view(date), region, service, std::string_view("aws4_request")}) {
    Result<std::string> next = hmac("SHA256", key, part);
    OPENSSL_cleanse(key.data(), key.size());
    if (!next.ok()) return next.status();
    key = std::move(*next);
  }
  Result<std::string> signature = hmac("SHA256", key, result.string_to_sign);
  OPENSSL_cleanse(key.data(), key.size());
  if (!signature.ok()) return signature.status();
  result.signature =
      hex_lower(reinterpret_cast<const unsigned char*>(signature->data()), signature->size());

  result.headers.emplace_back("x-amz-date", amz_date);
  result.headers.emplace_back("x-amz-content-sha256", request.payload_hash);
  if (!credentials.session_token.empty()) {
    result.headers.emplace_back("x-amz-security-token", credentials.session_token);
  }
  result.headers.emplace_back(
      "Authorization", "AWS4-HMAC-SHA256 Credential=" + credentials.access_key_id + "/" + scope +
                           ",SignedHeaders=" + signed_names + ",Signature=" + result.signature);
  return result;
}

bool is_v2_subresource(std::string_view name) {
  return std::find(std::begin(kV2Subresources), std::end(kV2Subresources), name) !=
         std::end(kV2Subresources);
}

std::string v2_string_to_sign(std::string_view method, std::string_view content_md5,
                              std::string_view content_type, std::string_view date,
                              const HeaderList& amz_headers, std::string_view bucket_resource,
                              const HeaderList& query) {
  std::string out = std::string(method) + "\n" + std::string(content_md5) + "\n" +
                    std::string(content_type) + "\n" + std::string(date) + "\n";
  std::vector<std::pair<std::string, std::string>> amz;
  for (const auto& [name, value] : amz_headers) {
    amz.emplace_back(to_lower(name), canonical_header_value(value));
  }
  std::sort(amz.begin(), amz.end());
  for (const auto& [name, value] : amz) out += name + ":" + value + "\n";

  // Sub-resource values are not encoded in V2 (the spec and s3rver agree).
  std::vector<std::string> subresources;
  for (const auto& [name, value] : query) {
    if (is_v2_subresource(name)) subresources.push_back(value.empty() ? name : name + "=" + value);
  }
  std::sort(subresources.begin(), subresources.end());
  out += bucket_resource;
  for (size_t i = 0; i < subresources.size(); ++i) {
    out.push_back(i == 0 ? '?' : '&');
    out += subresources[i];
  }
  return out;
}

Result<std::string> v2_signature(std::string_view secret, std::string_view string_to_sign) {
  Result<std::string> mac = hmac("SHA1", secret, string_to_sign);
  if (!mac.ok()) return mac.status();
  std::string base64(4 * ((mac->size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(base64.data()),
                                reinterpret_cast<const unsigned char*>(mac->data()),
                                static_cast<int>(mac->size()));
  if (n < 0) return Status::IOError("OpenSSL base64 encoding failed");
  base64.resize(static_cast<size_t>(n));
  return base64;
}

Result<HeaderList> sign_v2(std::string_view method, std::string_view bucket_resource,
                           const HeaderList& query, const Credentials& credentials,
                           std::time_t when) {
  if (credentials.empty() || credentials.secret_access_key.empty()) {
    return Status::InvalidArgument("SigV2 signing needs an access key and a secret");
  }
  // Signed with x-amz-date rather than Date: curl may rewrite Date, and s3rver verifies V2
  // only in this form (it leaves the Date line empty).
  HeaderList headers;
  headers.emplace_back("x-amz-date", format_http_date(when));
  if (!credentials.session_token.empty()) {
    headers.emplace_back("x-amz-security-token", credentials.session_token);
  }
  const std::string to_sign =
      v2_string_to_sign(method, "", "", "", headers, bucket_resource, query);
  Result<std::string> signature = v2_signature(credentials.secret_access_key, to_sign);
  if (!signature.ok()) return signature.status();
  headers.emplace_back("Authorization", "AWS " + credentials.access_key_id + ":" + *signature);
  return headers;
}

}  // namespace imgfs::remote
