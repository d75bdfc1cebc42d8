#include "remote/s3_store.h"

#include <libxml/parser.h>
#include <libxml/tree.h>

#include <algorithm>
#include <ctime>
#include <thread>
#include <utility>

#include "formats/checked_math.h"

namespace imgfs::remote {

namespace {

constexpr size_t kMaxKeyBytes = 1024;
// S3's limit for one PutObject request; larger objects need a multipart upload.
constexpr uint64_t kMaxPutBytes = uint64_t{5} << 30;
constexpr int kListPageKeys = 1000;
// A listing page of 1000 long keys is well under 1 MB; libxml2 refuses more than 10 MB anyway.
constexpr size_t kMaxListPageBytes = 8u << 20;

struct DocFree {
  void operator()(xmlDoc* doc) const { xmlFreeDoc(doc); }
};

std::string to_lower(std::string_view text) {
  std::string lower(text);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return lower;
}

bool is_element(const xmlNode* node, std::string_view local_name) {
  return node->type == XML_ELEMENT_NODE &&
         std::string_view(reinterpret_cast<const char*>(node->name)) == local_name;
}

std::string text_of(const xmlNode* element) {
  std::string out;
  for (const xmlNode* child = element->children; child != nullptr; child = child->next) {
    if ((child->type == XML_TEXT_NODE || child->type == XML_CDATA_SECTION_NODE) &&
        child->content != nullptr) {
      out += reinterpret_cast<const char*>(child->content);
    }
  }
  return out;
}

const xmlNode* child_named(const xmlNode* parent, std::string_view name) {
  for (const xmlNode* child = parent->children; child != nullptr; child = child->next) {
    if (is_element(child, name)) return child;
  }
  return nullptr;
}

std::string_view trim_space(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\n' || text.front() == '\r' ||
                           text.front() == '\t')) {
    text.remove_prefix(1);
  }
  while (!text.empty() && (text.back() == ' ' || text.back() == '\n' || text.back() == '\r' ||
                           text.back() == '\t')) {
    text.remove_suffix(1);
  }
  return text;
}

std::optional<uint64_t> parse_u64(std::string_view text) {
  text = trim_space(text);
  if (text.empty() || text.size() > 20) return std::nullopt;
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    std::optional<uint64_t> times_ten = checked_mul(value, 10);
    if (!times_ten) return std::nullopt;
    std::optional<uint64_t> next = checked_add(*times_ten, static_cast<uint64_t>(c - '0'));
    if (!next) return std::nullopt;
    value = *next;
  }
  return value;
}

// Parses well-formed XML without DTDs, entities or network access; nullptr if it is not.
std::unique_ptr<xmlDoc, DocFree> parse_xml(std::string_view xml) {
  if (xml.size() > kMaxListPageBytes || xml.find("<!DOCTYPE") != std::string_view::npos ||
      xml.find('\0') != std::string_view::npos) {
    return nullptr;
  }
  return std::unique_ptr<xmlDoc, DocFree>(
      xmlReadMemory(xml.data(), static_cast<int>(xml.size()), "s3.xml", nullptr,
                    XML_PARSE_NONET | XML_PARSE_NOWARNING | XML_PARSE_NOERROR));
}

Status check_key(std::string_view key) {
  if (key.empty()) return Status::InvalidArgument("empty object key");
  if (key.size() > kMaxKeyBytes) {
    return Status::InvalidArgument("object key longer than 1024 bytes");
  }
  if (key.find('\0') != std::string_view::npos) {
    return Status::InvalidArgument("object key contains NUL");
  }
  return Status::OK();
}

// A presigned URL without its query (which holds the signature and maybe a session token).
std::string redact_url(std::string_view url) { return std::string(url.substr(0, url.find('?'))); }

std::string range_text(uint64_t offset, size_t length) {
  return "bytes " + std::to_string(offset) + "-" + std::to_string(offset + length - 1);
}

bool contains_ignore_case(std::string_view haystack, std::string_view needle) {
  return to_lower(haystack).find(to_lower(needle)) != std::string::npos;
}

}  // namespace

std::string S3Endpoint::text() const { return scheme + "://" + host + ":" + std::to_string(port); }

std::string S3Endpoint::host_port() const {
  const bool default_port = (scheme == "http" && port == 80) || (scheme == "https" && port == 443);
  return default_port ? host : host + ":" + std::to_string(port);
}

Result<S3Endpoint> parse_endpoint(std::string_view text) {
  const std::string shown(text);
  S3Endpoint endpoint;
  const size_t scheme_end = text.find("://");
  if (scheme_end == std::string_view::npos) {
    return Status::InvalidArgument("endpoint " + shown + " needs http:// or https://");
  }
  endpoint.scheme = to_lower(text.substr(0, scheme_end));
  if (endpoint.scheme != "http" && endpoint.scheme != "https") {
    return Status::InvalidArgument("endpoint " + shown + ": scheme must be http or https");
  }
  std::string_view rest = text.substr(scheme_end + 3);
  if (rest.ends_with("/")) rest.remove_suffix(1);
  if (rest.empty() || rest.find_first_of("/?#@ ") != std::string_view::npos) {
    return Status::InvalidArgument("endpoint " + shown +
                                   " must be scheme://host[:port] with no path or user");
  }
  std::string_view host = rest;
  std::string_view port_text;
  if (rest.front() == '[') {
    const size_t close = rest.find(']');
    if (close == std::string_view::npos) {
      return Status::InvalidArgument("endpoint " + shown + ": unterminated IPv6 address");
    }
    host = rest.substr(0, close + 1);
    std::string_view after = rest.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return Status::InvalidArgument("endpoint " + shown + ": bad port");
      port_text = after.substr(1);
    }
  } else if (const size_t colon = rest.rfind(':'); colon != std::string_view::npos) {
    host = rest.substr(0, colon);
    port_text = rest.substr(colon + 1);
  }
  if (host.empty()) return Status::InvalidArgument("endpoint " + shown + " has no host");
  endpoint.host = to_lower(host);
  endpoint.port = endpoint.scheme == "https" ? 443 : 80;
  if (!port_text.empty() || rest.back() == ':') {
    std::optional<uint64_t> port = parse_u64(port_text);
    if (!port || *port == 0 || *port > 65535) {
      return Status::InvalidArgument("endpoint " + shown + ": bad port");
    }
    endpoint.port = static_cast<int>(*port);
  }
  return endpoint;
}

bool default_path_style(const S3Endpoint& endpoint, std::string_view bucket) {
  const bool aws =
      endpoint.host.ends_with(".amazonaws.com") || endpoint.host.ends_with(".amazonaws.com.cn");
  if (!aws) return true;
  if (bucket.size() < 3 || bucket.size() > 63) return true;
  for (char c : bucket) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
    if (!ok) return true;
  }
  return bucket.front() == '-' || bucket.back() == '-';
}

S3RequestTarget build_s3_target(const S3Endpoint& endpoint, std::string_view bucket,
                                std::string_view key, bool path_style, const HeaderList& query) {
  S3RequestTarget target;
  const std::string encoded_bucket = uri_encode(bucket, false);
  const std::string encoded_key = uri_encode(key, true);
  if (path_style) {
    target.host = endpoint.host_port();
    // The bucket itself is "/bucket" (no trailing '/'): the V2 resource is then the same under
    // AWS's rule and s3rver's.
    target.encoded_path = "/" + encoded_bucket + (key.empty() ? "" : "/" + encoded_key);
    target.v2_resource = target.encoded_path;
  } else {
    target.host = std::string(bucket) + "." + endpoint.host_port();
    target.encoded_path = "/" + encoded_key;
    target.v2_resource = "/" + encoded_bucket + target.encoded_path;
  }
  const std::string query_text = canonical_query_string(query);
  target.url = endpoint.scheme + "://" +
               (path_style ? endpoint.host : std::string(bucket) + "." + endpoint.host) + ":" +
               std::to_string(endpoint.port) + target.encoded_path +
               (query_text.empty() ? "" : "?" + query_text);
  return target;
}

Result<ListPage> parse_list_page(std::string_view xml) {
  std::unique_ptr<xmlDoc, DocFree> doc = parse_xml(xml);
  if (doc == nullptr) return Status::Corruption("listing is not well-formed XML (or has a DTD)");
  const xmlNode* root = xmlDocGetRootElement(doc.get());
  if (root == nullptr || !is_element(root, "ListBucketResult")) {
    return Status::Corruption("listing's root element is not <ListBucketResult>");
  }
  ListPage page;
  bool v2_marks = false;
  for (const xmlNode* node = root->children; node != nullptr; node = node->next) {
    if (node->type != XML_ELEMENT_NODE) continue;
    if (is_element(node, "Contents")) {
      const xmlNode* key = child_named(node, "Key");
      const xmlNode* size = child_named(node, "Size");
      const xmlNode* etag = child_named(node, "ETag");
      if (key == nullptr) return Status::Corruption("listing has a <Contents> without <Key>");
      ObjectInfo object;
      object.key = text_of(key);
      if (object.key.empty()) return Status::Corruption("listing has an empty <Key>");
      std::optional<uint64_t> bytes = size == nullptr ? std::nullopt : parse_u64(text_of(size));
      if (!bytes) return Status::Corruption("listing entry " + object.key + " has a bad <Size>");
      object.size = *bytes;
      if (etag != nullptr) object.etag = strip_etag_quotes(trim_space(text_of(etag)));
      page.objects.push_back(std::move(object));
    } else if (is_element(node, "IsTruncated")) {
      page.is_truncated = to_lower(trim_space(text_of(node))) == "true";
    } else if (is_element(node, "NextContinuationToken")) {
      page.next_continuation_token = text_of(node);
      v2_marks = true;
    } else if (is_element(node, "NextMarker")) {
      page.next_marker = text_of(node);
    } else if (is_element(node, "KeyCount") || is_element(node, "ContinuationToken") ||
               is_element(node, "StartAfter")) {
      v2_marks = true;
    }
  }
  page.v1_shaped = !v2_marks;
  return page;
}

S3ErrorBody parse_error_body(std::string_view xml) {
  S3ErrorBody error;
  std::unique_ptr<xmlDoc, DocFree> doc = parse_xml(xml);
  if (doc == nullptr) return error;
  const xmlNode* root = xmlDocGetRootElement(doc.get());
  if (root == nullptr || !is_element(root, "Error")) return error;
  if (const xmlNode* code = child_named(root, "Code")) error.code = trim_space(text_of(code));
  if (const xmlNode* message = child_named(root, "Message")) {
    error.message = trim_space(text_of(message));
  }
  return error;
}

bool list_v2_unsupported(long http_status, const S3ErrorBody& error) {
  if (http_status == 501) return true;
  if (error.code == "NotImplemented") return true;
  return (http_status == 400 || http_status == 405) &&
         (contains_ignore_case(error.message, "list-type") ||
          contains_ignore_case(error.message, "not implemented") ||
          contains_ignore_case(error.message, "not supported"));
}

std::string strip_etag_quotes(std::string_view etag) {
  if (etag.starts_with("W/")) etag.remove_prefix(2);
  if (etag.size() >= 2 && etag.front() == '"' && etag.back() == '"') {
    etag = etag.substr(1, etag.size() - 2);
  }
  return std::string(etag);
}

std::optional<ContentRange> parse_content_range(std::string_view value) {
  value = trim_space(value);
  if (!value.starts_with("bytes ")) return std::nullopt;
  value.remove_prefix(6);
  value = trim_space(value);
  const size_t slash = value.find('/');
  if (slash == std::string_view::npos) return std::nullopt;
  const std::string_view span = value.substr(0, slash);
  const std::string_view total = value.substr(slash + 1);
  ContentRange range;
  if (total != "*") {
    range.total = parse_u64(total);
    if (!range.total) return std::nullopt;
  }
  if (span != "*") {
    const size_t dash = span.find('-');
    if (dash == std::string_view::npos) return std::nullopt;
    range.first = parse_u64(span.substr(0, dash));
    range.last = parse_u64(span.substr(dash + 1));
    if (!range.first || !range.last || *range.first > *range.last) return std::nullopt;
  } else if (!range.total) {
    return std::nullopt;
  }
  return range;
}

Result<std::unique_ptr<S3Store>> S3Store::open(S3Config config) {
  if (config.endpoints.empty()) return Status::InvalidArgument("S3 needs at least one endpoint");
  if (config.bucket.empty() || config.bucket.size() > 255 ||
      config.bucket.find_first_of("/\0 ?#", 0, 5) != std::string::npos) {
    return Status::InvalidArgument("bad S3 bucket name '" + config.bucket + "'");
  }
  if (config.retries < 0) return Status::InvalidArgument("retries must not be negative");
  if (config.timeout_ms == 0) return Status::InvalidArgument("timeout must be positive");
  if (config.signing != S3Config::Signing::kNone) {
    if (config.credentials.empty() || config.credentials.secret_access_key.empty()) {
      return Status::InvalidArgument(
          "signed S3 requests need credentials (an access key and a secret); use unsigned "
          "requests for a public bucket");
    }
    if (config.signing == S3Config::Signing::kV4 && config.region.empty()) {
      return Status::InvalidArgument("SigV4 needs a region");
    }
  }
  std::vector<Target> targets;
  for (const std::string& text : config.endpoints) {
    Result<S3Endpoint> endpoint = parse_endpoint(text);
    if (!endpoint.ok()) return endpoint.status();
    Target target;
    target.path_style = config.path_style.value_or(default_path_style(*endpoint, config.bucket));
    target.endpoint = std::move(*endpoint);
    targets.push_back(std::move(target));
  }
  HttpOptions http_options;
  http_options.ca_file = config.ca_file;
  http_options.insecure = config.insecure;
  http_options.max_connections = config.max_connections;
  http_options.connect_timeout_ms = std::min<uint32_t>(10000, config.timeout_ms);
  http_options.low_speed_bytes_per_s = config.low_speed_bytes_per_s;
  http_options.low_speed_seconds = config.low_speed_seconds;
  http_options.max_body_bytes = kMaxListPageBytes;
  Result<std::unique_ptr<HttpClient>> http = HttpClient::open(std::move(http_options));
  if (!http.ok()) return http.status();
  return std::unique_ptr<S3Store>(
      new S3Store(std::move(config), std::move(targets), std::move(*http)));
}

S3Store::S3Store(S3Config config, std::vector<Target> targets, std::unique_ptr<HttpClient> http)
    : config_(std::move(config)),
      targets_(std::move(targets)),
      http_(std::move(http)),
      down_until_(targets_.size()),
      rng_(std::random_device{}()) {}

std::string S3Store::describe() const {
  return "s3://" + config_.bucket + " via " + current_endpoint();
}

std::string S3Store::current_endpoint() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return targets_[current_].endpoint.text();
}

size_t S3Store::pick_target() const {
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  if (down_until_[current_] <= now) return current_;
  // Sticky: the next endpoint that is up takes over; with all down, the first to come back.
  size_t soonest = current_;
  for (size_t step = 1; step <= targets_.size(); ++step) {
    const size_t index = (current_ + step) % targets_.size();
    if (down_until_[index] <= now) {
      current_ = index;
      return current_;
    }
    if (down_until_[index] < down_until_[soonest]) soonest = index;
  }
  current_ = soonest;
  return current_;
}

void S3Store::mark_down(size_t index) const {
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  if (down_until_[index] > now) return;  // another request already reported it
  down_until_[index] = now + std::chrono::milliseconds(config_.endpoint_cooloff_ms);
  if (index == current_ && targets_.size() > 1) {
    failovers_.fetch_add(1, std::memory_order_relaxed);
  }
}

uint64_t S3Store::random_u64() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return rng_();
}

Result<HttpRequest> S3Store::signed_request(const Target& target, std::string_view method,
                                            std::string_view key, const HeaderList& query,
                                            const HeaderList& headers,
                                            std::string_view payload_hash) const {
  const S3RequestTarget where =
      build_s3_target(target.endpoint, config_.bucket, key, target.path_style, query);
  HttpRequest request;
  request.method = std::string(method);
  request.url = where.url;
  request.headers = headers;
  request.headers.emplace_back("Host", where.host);
  const std::time_t now = std::time(nullptr);
  switch (config_.signing) {
    case S3Config::Signing::kNone:
      break;
    case S3Config::Signing::kV2: {
      Result<HeaderList> auth = sign_v2(method, where.v2_resource, query, config_.credentials, now);
      if (!auth.ok()) return auth.status();
      request.headers.insert(request.headers.end(), auth->begin(), auth->end());
      break;
    }
    case S3Config::Signing::kV4: {
      SignableRequest signable;
      signable.method = std::string(method);
      signable.host = where.host;
      signable.encoded_path = where.encoded_path;
      signable.query = query;
      signable.headers = headers;
      signable.payload_hash = std::string(payload_hash);
      Result<SigV4Result> auth = sign_v4(signable, config_.credentials, config_.region, "s3", now);
      if (!auth.ok()) return auth.status();
      request.headers.insert(request.headers.end(), auth->headers.begin(), auth->headers.end());
      break;
    }
  }
  return request;
}

Status S3Store::http_failure(std::string_view what, const HttpResponse& response,
                             int attempts) const {
  const S3ErrorBody error = parse_error_body(response.body);
  std::string detail = "HTTP " + std::to_string(response.status);
  if (!error.code.empty()) {
    detail += " (" + error.code + (error.message.empty() ? "" : ": " + error.message) + ")";
  }
  if (attempts > 1) detail += " after " + std::to_string(attempts) + " attempts";
  const std::string message = std::string(what) + ": " + detail;
  if (response.status == 404) return Status::NotFound(message);
  if (response.status == 403) {
    return Status::IOError(std::string(what) + ": access denied (" + detail + ")");
  }
  return Status::IOError(message);
}

Status S3Store::run(std::string_view what, bool use_endpoints, const RequestMaker& make,
                    const ResponseCheck& check, HttpResponse* last) const {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(config_.retry_budget_ms);
  const BackoffOptions backoff{config_.backoff_base_ms, config_.backoff_cap_ms};
  const int max_attempts = 1 + config_.retries;
  std::string last_problem;
  int attempt = 0;
  while (true) {
    ++attempt;
    const auto remaining =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    const size_t index = use_endpoints ? pick_target() : 0;
    Result<HttpRequest> request = make(use_endpoints ? &targets_[index] : nullptr);
    if (!request.ok()) return request.status().with_context(what);
    request->timeout_ms = static_cast<uint32_t>(
        std::clamp<int64_t>(remaining, 1, static_cast<int64_t>(config_.timeout_ms)));
    *last = http_->perform(*request);

    RetryDecision decision = classify_attempt(last->error, last->status);
    const bool body_problem =
        last->error == TransportError::kLongBody || last->error == TransportError::kPartialBody;
    if (last->status >= 200 && last->status < 300 &&
        (last->error == TransportError::kNone || body_problem)) {
      bool retryable = false;
      if (check) {
        // The check also judges a body that ended early or ran long.
        Status judged = check(*last, &retryable);
        if (judged.ok()) return judged;
        if (!retryable) return judged;
        last_problem = judged.message();
      } else if (last->error == TransportError::kNone) {
        return Status::OK();
      } else {
        last_problem =
            std::string(transport_error_name(last->error)) + " (" + last->error_text + ")";
      }
      decision = RetryDecision::kRetry;
    } else if (last->error != TransportError::kNone) {
      last_problem = std::string(transport_error_name(last->error)) + " (" + last->error_text + ")";
    }

    if (decision == RetryDecision::kFail || decision == RetryDecision::kSuccess) {
      if (last->error != TransportError::kNone) {
        return Status::IOError(std::string(what) + ": " + last_problem);
      }
      return http_failure(what, *last, attempt);
    }
    bool try_elsewhere_now = false;
    if (decision == RetryDecision::kRetryOtherEndpoint && use_endpoints) {
      mark_down(index);
      try_elsewhere_now = pick_target() != index;
    }
    auto give_up = [&](const std::string& why) {
      if (last->error == TransportError::kNone && !(last->status >= 200 && last->status < 300)) {
        return Status::IOError(http_failure(what, *last, attempt).message() + why);
      }
      return Status::IOError(std::string(what) + ": " + last_problem + " after " +
                             std::to_string(attempt) + " attempts" + why);
    };
    if (attempt >= max_attempts) return give_up("");
    const uint32_t delay = try_elsewhere_now ? 0
                                             : backoff_delay_ms(static_cast<uint32_t>(attempt - 1),
                                                                backoff, random_u64());
    if (Clock::now() + std::chrono::milliseconds(delay) >= deadline) {
      return give_up(" (retry budget of " + std::to_string(config_.retry_budget_ms) + " ms spent)");
    }
    if (delay > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay));
  }
}

Result<ObjectInfo> S3Store::head(std::string_view key) const {
  Status s = check_key(key);
  if (!s.ok()) return s;
  const std::string what = "HEAD " + config_.bucket + "/" + std::string(key);
  HttpResponse response;
  s = run(
      what, true,
      [&](const Target* target) { return signed_request(*target, "HEAD", key, {}, {}); }, nullptr,
      &response);
  if (!s.ok()) return s;
  ObjectInfo info;
  info.key = std::string(key);
  const std::optional<std::string_view> length = response.header("content-length");
  std::optional<uint64_t> size = length ? parse_u64(*length) : std::nullopt;
  if (!size) return Status::IOError(what + ": answer has no valid Content-Length");
  info.size = *size;
  const std::optional<std::string_view> etag = response.header("etag");
  if (!etag || strip_etag_quotes(*etag).empty()) {
    return Status::IOError(what + ": answer has no ETag, so reads could not be pinned to it");
  }
  info.etag = strip_etag_quotes(*etag);
  return info;
}

Status S3Store::read_range(const ObjectInfo& object, uint64_t offset,
                           std::span<std::byte> out) const {
  Status s = check_key(object.key);
  if (!s.ok()) return s;
  const std::optional<uint64_t> end = checked_add(offset, out.size());
  if (!end || *end > object.size) {
    return Status::InvalidArgument("read of " + std::to_string(out.size()) + " bytes at " +
                                   std::to_string(offset) + " is past the end of " + object.key +
                                   " (" + std::to_string(object.size) + " bytes)");
  }
  if (out.empty()) return Status::OK();
  const std::string what =
      "GET " + config_.bucket + "/" + object.key + " " + range_text(offset, out.size());
  const std::string changed_prefix = "object " + object.key + " changed since it was opened";
  HeaderList headers = {
      {"Range", "bytes=" + std::to_string(offset) + "-" + std::to_string(*end - 1)}};
  if (!object.etag.empty()) headers.emplace_back("If-Match", "\"" + object.etag + "\"");
  const bool whole_object = offset == 0 && out.size() == object.size;

  auto check = [&](const HttpResponse& response, bool* retryable) -> Status {
    if (response.status != 206 && !(response.status == 200 && whole_object)) {
      return Status::IOError(what + ": server ignored the Range header (HTTP " +
                             std::to_string(response.status) + ")");
    }
    const std::optional<std::string_view> etag = response.header("etag");
    const std::string now_etag = etag ? strip_etag_quotes(*etag) : std::string();
    if (now_etag != object.etag) {
      return Status::IOError(changed_prefix + " (ETag " + object.etag + ", now " +
                             (now_etag.empty() ? "none" : now_etag) + ")");
    }
    if (response.status == 206) {
      const std::optional<std::string_view> header = response.header("content-range");
      const std::optional<ContentRange> range =
          header ? parse_content_range(*header) : std::nullopt;
      if (!range || !range->first || *range->first != offset || *range->last != *end - 1) {
        return Status::IOError(what + ": answer has Content-Range '" +
                               std::string(header.value_or("")) + "'");
      }
      if (range->total && *range->total != object.size) {
        return Status::IOError(changed_prefix + " (size " + std::to_string(object.size) + ", now " +
                               std::to_string(*range->total) + ")");
      }
    }
    if (response.error != TransportError::kNone || response.buffer_bytes != out.size()) {
      *retryable = true;
      return Status::IOError("got " + std::to_string(response.buffer_bytes) + " bytes of " +
                             std::to_string(out.size()));
    }
    return Status::OK();
  };
  HttpResponse response;
  s = run(
      what, true,
      [&](const Target* target) -> Result<HttpRequest> {
        Result<HttpRequest> request = signed_request(*target, "GET", object.key, {}, headers);
        if (request.ok()) request->body_buffer = out;
        return request;
      },
      check, &response);
  if (s.ok()) return s;
  if (response.status == 412 || response.status == 416) {
    return Status::IOError(changed_prefix + " (ETag " + object.etag + "; server answered HTTP " +
                           std::to_string(response.status) + " to " + what + ")");
  }
  return s;
}

Status S3Store::put(const std::string& key, std::span<const std::byte> bytes) const {
  Status s = check_key(key);
  if (!s.ok()) return s;
  if (bytes.size() > kMaxPutBytes) {
    return Status::InvalidArgument("cannot PUT " + key + ": " + std::to_string(bytes.size()) +
                                   " bytes is more than one S3 PUT takes (5 GiB)");
  }
  const std::string what =
      "PUT " + config_.bucket + "/" + key + " (" + std::to_string(bytes.size()) + " bytes)";
  std::string payload_hash(kEmptyPayloadSha256);
  if (config_.signing == S3Config::Signing::kV4) {
    Result<std::string> hash = payload_sha256_hex(bytes);
    if (!hash.ok()) return hash.status().with_context(what);
    payload_hash = std::move(*hash);
  }
  HttpResponse response;
  return run(
      what, true,
      [&](const Target* target) -> Result<HttpRequest> {
        Result<HttpRequest> request = signed_request(*target, "PUT", key, {}, {}, payload_hash);
        if (request.ok()) request->upload_body = bytes;
        return request;
      },
      nullptr, &response);
}

Status S3Store::read_url_range(const std::string& presigned_url, uint64_t offset,
                               std::span<std::byte> out) const {
  if (!presigned_url.starts_with("http://") && !presigned_url.starts_with("https://")) {
    return Status::InvalidArgument("presigned URL must be http(s): " + redact_url(presigned_url));
  }
  if (out.empty()) return Status::OK();
  const std::optional<uint64_t> end = checked_add(offset, out.size());
  if (!end) return Status::InvalidArgument("range overflows");
  const std::string shown = redact_url(presigned_url);
  const std::string what = "GET " + shown + " " + range_text(offset, out.size());
  HttpRequest request;
  request.url = presigned_url;
  request.body_buffer = out;
  request.headers = {{"Range", "bytes=" + std::to_string(offset) + "-" + std::to_string(*end - 1)}};
  auto check = [&](const HttpResponse& response, bool* retryable) -> Status {
    if (response.status != 206 && !(response.status == 200 && offset == 0)) {
      return Status::IOError(what + ": server ignored the Range header (HTTP " +
                             std::to_string(response.status) + ")");
    }
    if (response.status == 200 && response.error == TransportError::kLongBody) {
      return Status::IOError(what + ": server ignored the Range header (HTTP 200)");
    }
    if (response.status == 206) {
      const std::optional<std::string_view> header = response.header("content-range");
      const std::optional<ContentRange> range =
          header ? parse_content_range(*header) : std::nullopt;
      if (!range || !range->first || *range->first != offset || *range->last != *end - 1) {
        return Status::IOError(what + ": answer has Content-Range '" +
                               std::string(header.value_or("")) + "'");
      }
    }
    if (response.error != TransportError::kNone || response.buffer_bytes != out.size()) {
      *retryable = true;
      return Status::IOError("got " + std::to_string(response.buffer_bytes) + " bytes of " +
                             std::to_string(out.size()));
    }
    return Status::OK();
  };
  HttpResponse response;
  Status s = run(
      what, false, [&](const Target*) -> Result<HttpRequest> { return request; }, check, &response);
  if (!s.ok() && response.status == 403 && contains_ignore_case(response.body, "expired")) {
    return Status::IOError("presigned URL expired: " + shown + " (HTTP 403)");
  }
  return s;
}

Result<uint64_t> S3Store::head_url_size(const std::string& url) const {
  if (!url.starts_with("http://") && !url.starts_with("https://")) {
    return Status::InvalidArgument("presigned URL must be http(s): " + redact_url(url));
  }
  const std::string shown = redact_url(url);
  const std::string what = "GET " + shown + " (size)";
  std::byte first_byte[1];
  HttpRequest request;
  request.url = url;
  request.body_buffer = first_byte;
  request.headers = {{"Range", "bytes=0-0"}};
  std::optional<uint64_t> size;
  auto check = [&](const HttpResponse& response, bool* retryable) -> Status {
    if (response.status == 206) {
      const std::optional<std::string_view> header = response.header("content-range");
      const std::optional<ContentRange> range =
          header ? parse_content_range(*header) : std::nullopt;
      if (!range || !range->total) {
        return Status::IOError(what + ": answer has Content-Range '" +
                               std::string(header.value_or("")) + "'");
      }
      size = range->total;
      return Status::OK();
    }
    // A server that ignores Range sends the whole object; its length is all we need.
    const std::optional<std::string_view> length = response.header("content-length");
    size = length ? parse_u64(*length) : std::nullopt;
    if (!size) return Status::IOError(what + ": answer has no valid Content-Length");
    return Status::OK();
  };
  HttpResponse response;
  Status s = run(
      what, false, [&](const Target*) -> Result<HttpRequest> { return request; }, check, &response);
  if (s.ok() || (size && response.status == 200)) return *size;
  if (response.status == 416) {
    // Nothing to read: "Content-Range: bytes */0" says the object is empty.
    const std::optional<std::string_view> header = response.header("content-range");
    const std::optional<ContentRange> range = header ? parse_content_range(*header) : std::nullopt;
    if (range && range->total && *range->total == 0) return uint64_t{0};
  }
  if (response.status == 403 && contains_ignore_case(response.body, "expired")) {
    return Status::IOError("presigned URL expired: " + shown + " (HTTP 403)");
  }
  return s;
}

Result<std::vector<ObjectInfo>> S3Store::list(std::string_view prefix) const {
  bool v1 = list_v1_.load(std::memory_order_relaxed);
  bool v2_unsupported = false;
  Result<std::vector<ObjectInfo>> listed = list_with(prefix, v1, &v2_unsupported);
  if (!v1 && v2_unsupported) {
    list_v1_.store(true, std::memory_order_relaxed);
    listed = list_with(prefix, true, &v2_unsupported);
  }
  return listed;
}

Result<std::vector<ObjectInfo>> S3Store::list_with(std::string_view prefix, bool v1,
                                                   bool* v2_unsupported) const {
  std::vector<ObjectInfo> objects;
  std::string continuation;  // v2 token, or v1 marker
  int page_number = 0;
  while (true) {
    ++page_number;
    HeaderList query = {{"max-keys", std::to_string(kListPageKeys)},
                        {"prefix", std::string(prefix)}};
    if (!v1) query.emplace_back("list-type", "2");
    if (!continuation.empty())
      query.emplace_back(v1 ? "marker" : "continuation-token", continuation);
    const std::string what = std::string(v1 ? "ListObjects" : "ListObjectsV2") + " " +
                             config_.bucket + " prefix '" + std::string(prefix) + "' page " +
                             std::to_string(page_number);
    HttpResponse response;
    Status s = run(
        what, true,
        [&](const Target* target) { return signed_request(*target, "GET", "", query, {}); },
        nullptr, &response);
    if (!s.ok()) {
      if (!v1 && response.error == TransportError::kNone &&
          list_v2_unsupported(response.status, parse_error_body(response.body))) {
        *v2_unsupported = true;
      }
      return s;
    }
    Result<ListPage> page = parse_list_page(response.body);
    if (!page.ok()) return page.status().with_context(what);
    if (!v1 && page->v1_shaped) {
      // The server ignored list-type=2 (Walrus). Without a token this is a valid first v1
      // page; with one, the token was ignored too, so start over in v1.
      *v2_unsupported = true;
      if (!continuation.empty()) return Status::IOError(what + ": server does not page v2");
      v1 = true;
      list_v1_.store(true, std::memory_order_relaxed);
    }
    // v1 pages without NextMarker continue after their last key.
    std::string next = v1 && page->next_marker.empty() && !page->objects.empty()
                           ? page->objects.back().key
                           : std::string();
    for (ObjectInfo& object : page->objects) {
      if (object.key.starts_with(prefix)) objects.push_back(std::move(object));
    }
    if (!page->is_truncated) break;
    if (v1) {
      if (!page->next_marker.empty()) next = page->next_marker;
    } else {
      next = page->next_continuation_token;
    }
    if (next.empty() || (v1 && next <= continuation) || (!v1 && next == continuation)) {
      return Status::IOError(what + ": truncated listing without a usable " +
                             (v1 ? "NextMarker" : "NextContinuationToken"));
    }
    continuation = std::move(next);
  }
  std::sort(objects.begin(), objects.end(),
            [](const ObjectInfo& a, const ObjectInfo& b) { return a.key < b.key; });
  objects.erase(
      std::unique(objects.begin(), objects.end(),
                  [](const ObjectInfo& a, const ObjectInfo& b) { return a.key == b.key; }),
      objects.end());
  return objects;
}

}  // namespace imgfs::remote
