#include "remote/http_client.h"

#include <curl/curl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace imgfs::remote {

namespace {

constexpr char kUserAgent[] = "imgfs/0.1";

struct CurlSlistFree {
  void operator()(curl_slist* list) const { curl_slist_free_all(list); }
};

// State shared with the curl callbacks of one transfer.
struct Transfer {
  CURL* handle;
  const HttpRequest* request;
  HttpResponse* response;
  size_t max_body_bytes;
  bool overflowed = false;
  size_t uploaded = 0;  // bytes of request->upload_body handed to curl so far
};

std::string to_lower(std::string_view text) {
  std::string lower(text);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return lower;
}

std::string_view trim(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t' || text.back() == '\r' ||
                           text.back() == '\n')) {
    text.remove_suffix(1);
  }
  return text;
}

size_t on_header(char* data, size_t size, size_t count, void* user) {
  auto* transfer = static_cast<Transfer*>(user);
  const size_t length = size * count;
  const std::string_view line(data, length);
  // A new status line (after a 100 Continue) starts a new header block.
  if (line.starts_with("HTTP/")) {
    transfer->response->headers.clear();
    return length;
  }
  const size_t colon = line.find(':');
  if (colon != std::string_view::npos) {
    transfer->response->headers.emplace_back(to_lower(trim(line.substr(0, colon))),
                                             std::string(trim(line.substr(colon + 1))));
  }
  return length;
}

size_t on_body(char* data, size_t size, size_t count, void* user) {
  auto* transfer = static_cast<Transfer*>(user);
  const size_t length = size * count;
  long status = 0;
  curl_easy_getinfo(transfer->handle, CURLINFO_RESPONSE_CODE, &status);
  HttpResponse& response = *transfer->response;
  const std::span<std::byte> buffer = transfer->request->body_buffer;
  if (status >= 200 && status < 300 && !buffer.empty()) {
    if (length > buffer.size() - response.buffer_bytes) {
      transfer->overflowed = true;
      return CURL_WRITEFUNC_ERROR;
    }
    std::memcpy(buffer.data() + response.buffer_bytes, data, length);
    response.buffer_bytes += length;
    return length;
  }
  if (length >
      transfer->max_body_bytes - std::min(transfer->max_body_bytes, response.body.size())) {
    transfer->overflowed = true;
    return CURL_WRITEFUNC_ERROR;
  }
  response.body.append(data, length);
  return length;
}

size_t on_upload(char* data, size_t size, size_t count, void* user) {
  auto* transfer = static_cast<Transfer*>(user);
  const std::span<const std::byte> body = transfer->request->upload_body;
  const size_t length = std::min(size * count, body.size() - transfer->uploaded);
  if (length > 0) std::memcpy(data, body.data() + transfer->uploaded, length);
  transfer->uploaded += length;
  return length;
}

// curl rewinds the body when it must send the request again on a new connection (a reused
// keep-alive connection that the server had closed).
int on_upload_seek(void* user, curl_off_t offset, int origin) {
  auto* transfer = static_cast<Transfer*>(user);
  if (origin != SEEK_SET || offset < 0 ||
      static_cast<uint64_t>(offset) > transfer->request->upload_body.size()) {
    return CURL_SEEKFUNC_FAIL;
  }
  transfer->uploaded = static_cast<size_t>(offset);
  return CURL_SEEKFUNC_OK;
}

TransportError classify_curl(CURLcode code) {
  switch (code) {
    case CURLE_OK:
      return TransportError::kNone;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_CONNECT:
      return TransportError::kConnect;
    case CURLE_OPERATION_TIMEDOUT:
      return TransportError::kTimeout;
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return TransportError::kReset;
    case CURLE_PARTIAL_FILE:
      return TransportError::kPartialBody;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
      return TransportError::kTls;
    default:
      return TransportError::kOther;
  }
}

}  // namespace

std::optional<std::string_view> HttpResponse::header(std::string_view lower_name) const {
  for (auto it = headers.rbegin(); it != headers.rend(); ++it) {
    if (it->first == lower_name) return std::string_view(it->second);
  }
  return std::nullopt;
}

Status HttpClient::init_globally() {
  const CURLcode code = curl_global_init(CURL_GLOBAL_DEFAULT);
  if (code != CURLE_OK) {
    return Status::IOError(std::string("curl_global_init failed: ") + curl_easy_strerror(code));
  }
  return Status::OK();
}

Result<std::unique_ptr<HttpClient>> HttpClient::open(HttpOptions options) {
  if (options.max_connections < 1) {
    return Status::InvalidArgument("max_connections must be at least 1, not " +
                                   std::to_string(options.max_connections));
  }
  if (options.ca_file) {
    struct stat st;
    if (::stat(options.ca_file->c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      return Status::InvalidArgument("CA file " + *options.ca_file + " is not a readable file");
    }
  }
  return std::unique_ptr<HttpClient>(new HttpClient(std::move(options)));
}

HttpClient::~HttpClient() {
  for (void* handle : idle_handles_) curl_easy_cleanup(static_cast<CURL*>(handle));
}

int HttpClient::handles_created() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return handles_created_;
}

void* HttpClient::acquire_handle() const {
  std::unique_lock<std::mutex> lock(mutex_);
  handle_freed_.wait(lock, [this] {
    return !idle_handles_.empty() || handles_created_ < options_.max_connections;
  });
  if (!idle_handles_.empty()) {
    void* handle = idle_handles_.back();
    idle_handles_.pop_back();
    return handle;
  }
  CURL* handle = curl_easy_init();
  if (handle != nullptr) ++handles_created_;
  return handle;
}

void HttpClient::release_handle(void* handle) const {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_handles_.push_back(handle);
  }
  handle_freed_.notify_one();
}

HttpResponse HttpClient::perform(const HttpRequest& request) const {
  HttpResponse response;
  CURL* handle = static_cast<CURL*>(acquire_handle());
  if (handle == nullptr) {
    response.error = TransportError::kOther;
    response.error_text = "curl_easy_init failed";
    return response;
  }
  // Reset keeps the handle's open connections, DNS and TLS session caches: that is the reuse.
  curl_easy_reset(handle);

  std::unique_ptr<curl_slist, CurlSlistFree> headers;
  for (const auto& [name, value] : request.headers) {
    const std::string line = name + ": " + value;
    curl_slist* appended = curl_slist_append(headers.get(), line.c_str());
    if (appended == nullptr) {
      release_handle(handle);
      response.error = TransportError::kOther;
      response.error_text = "out of memory building headers";
      return response;
    }
    headers.release();
    headers.reset(appended);
  }
  // curl would otherwise add "Expect:" and "Accept: */*"; neither is wanted or signed.
  for (const char* suppressed : {"Expect:", "Accept:"}) {
    curl_slist* appended = curl_slist_append(headers.get(), suppressed);
    if (appended != nullptr) {
      headers.release();
      headers.reset(appended);
    }
  }

  Transfer transfer{handle, &request, &response, options_.max_body_bytes};
  char error_buffer[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(handle, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(handle, CURLOPT_PATH_AS_IS, 1L);
  curl_easy_setopt(handle, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(handle, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(handle, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(handle, CURLOPT_USERAGENT, kUserAgent);
  curl_easy_setopt(handle, CURLOPT_HTTPHEADER, headers.get());
  curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, error_buffer);
  curl_easy_setopt(handle, CURLOPT_HEADERFUNCTION, &on_header);
  curl_easy_setopt(handle, CURLOPT_HEADERDATA, &transfer);
  curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, &on_body);
  curl_easy_setopt(handle, CURLOPT_WRITEDATA, &transfer);
  curl_easy_setopt(handle, CURLOPT_TIMEOUT_MS, static_cast<long>(request.timeout_ms));
  curl_easy_setopt(handle, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(std::min(options_.connect_timeout_ms, request.timeout_ms)));
  curl_easy_setopt(handle, CURLOPT_LOW_SPEED_LIMIT,
                   static_cast<long>(options_.low_speed_bytes_per_s));
  curl_easy_setopt(handle, CURLOPT_LOW_SPEED_TIME, static_cast<long>(options_.low_speed_seconds));
  curl_easy_setopt(handle, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(handle, CURLOPT_SSL_VERIFYPEER, options_.insecure ? 0L : 1L);
  curl_easy_setopt(handle, CURLOPT_SSL_VERIFYHOST, options_.insecure ? 0L : 2L);
  if (options_.ca_file) curl_easy_setopt(handle, CURLOPT_CAINFO, options_.ca_file->c_str());
  if (request.method == "HEAD") {
    curl_easy_setopt(handle, CURLOPT_NOBODY, 1L);
  } else if (request.method == "PUT") {
    // CURLOPT_UPLOAD makes a PUT with a Content-Length and no Content-Type (which SigV2 would
    // otherwise have to sign); the "Expect:" line above keeps curl from waiting for a 100.
    curl_easy_setopt(handle, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(handle, CURLOPT_READFUNCTION, &on_upload);
    curl_easy_setopt(handle, CURLOPT_READDATA, &transfer);
    curl_easy_setopt(handle, CURLOPT_SEEKFUNCTION, &on_upload_seek);
    curl_easy_setopt(handle, CURLOPT_SEEKDATA, &transfer);
    curl_easy_setopt(handle, CURLOPT_INFILESIZE_LARGE,
                     static_cast<curl_off_t>(request.upload_body.size()));
  } else if (request.method != "GET") {
    curl_easy_setopt(handle, CURLOPT_CUSTOMREQUEST, request.method.c_str());
  }

  const CURLcode code = curl_easy_perform(handle);
  curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &response.status);
  // The handle keeps pointers to our header list and callbacks; clear them before reuse.
  curl_easy_setopt(handle, CURLOPT_HTTPHEADER, nullptr);
  curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, nullptr);
  curl_easy_setopt(handle, CURLOPT_READDATA, nullptr);
  curl_easy_setopt(handle, CURLOPT_SEEKDATA, nullptr);
  release_handle(handle);

  if (code != CURLE_OK) {
    response.error = transfer.overflowed ? TransportError::kLongBody : classify_curl(code);
    response.error_text = error_buffer[0] != '\0' ? error_buffer : curl_easy_strerror(code);
  }
  return response;
}

}  // namespace imgfs::remote
