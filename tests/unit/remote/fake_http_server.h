// FakeHttpServer: a tiny HTTP/1.1 server on 127.0.0.1 for the remote/ unit tests. It turns
// each request (with a Content-Length body, as a PUT sends; no chunked bodies) into the Reply a
// test handler chooses, including faults: a reset instead of an answer, a body cut short of its
// Content-Length, a delay. Keep-alive is honoured so connection reuse can be counted. Everything it
// starts is stopped and joined by its destructor.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace imgfs::remote::testing {

struct FakeRequest {
  std::string method;
  std::string target;                          // path and query as sent
  std::map<std::string, std::string> headers;  // lower-cased names
  std::string body;                            // Content-Length bytes after the head

  std::string path() const { return target.substr(0, target.find('?')); }
  std::string query() const {
    const size_t q = target.find('?');
    return q == std::string::npos ? "" : target.substr(q + 1);
  }
  std::string header(const std::string& name) const {
    const auto it = headers.find(name);
    return it == headers.end() ? "" : it->second;
  }
};

struct FakeReply {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  enum class Fault { kNone, kReset, kCutBody } fault = Fault::kNone;
  int delay_ms = 0;
  // For HEAD: the Content-Length to announce (the body is never sent).
  long long head_length = -1;
};

class FakeHttpServer {
 public:
  using Handler = std::function<FakeReply(const FakeRequest&)>;

  explicit FakeHttpServer(Handler handler) : handler_(std::move(handler)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = 0;
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&address), sizeof address);
    ::listen(listen_fd_, 64);
    socklen_t length = sizeof address;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&address), &length);
    port_ = ntohs(address.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }

  ~FakeHttpServer() {
    stop_ = true;
    acceptor_.join();
    std::vector<std::thread> connections;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      connections.swap(connections_);
    }
    for (std::thread& connection : connections) connection.join();
    ::close(listen_fd_);
  }

  int port() const { return port_; }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  int connections_accepted() const { return accepted_.load(); }
  int requests() const { return requests_.load(); }
  std::vector<FakeRequest> seen() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return seen_;
  }

  // A port on which nothing listens (connection refused).
  static int dead_port() {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
    socklen_t length = sizeof address;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
    ::close(fd);
    return ntohs(address.sin_port);
  }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      ++accepted_;
      std::lock_guard<std::mutex> lock(mutex_);
      connections_.emplace_back([this, fd] { serve(fd); });
    }
  }

  // Reads one request head; false when the peer closed or the server stops.
  bool read_request(int fd, std::string* buffer, FakeRequest* request) {
    while (buffer->find("\r\n\r\n") == std::string::npos) {
      if (stop_) return false;
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      char chunk[4096];
      const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
      if (n <= 0) return false;
      buffer->append(chunk, static_cast<size_t>(n));
    }
    const size_t end = buffer->find("\r\n\r\n");
    const std::string head = buffer->substr(0, end);
    buffer->erase(0, end + 4);
    size_t line_end = head.find("\r\n");
    const std::string request_line = head.substr(0, line_end);
    const size_t space1 = request_line.find(' ');
    const size_t space2 = request_line.find(' ', space1 + 1);
    request->method = request_line.substr(0, space1);
    request->target = request_line.substr(space1 + 1, space2 - space1 - 1);
    request->headers.clear();
    while (line_end != std::string::npos && line_end < head.size()) {
      const size_t start = line_end + 2;
      line_end = head.find("\r\n", start);
      const std::string line =
          head.substr(start, line_end == std::string::npos ? std::string::npos : line_end - start);
      const size_t colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::string name = line.substr(0, colon);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      size_t value_start = colon + 1;
      while (value_start < line.size() && line[value_start] == ' ') ++value_start;
      request->headers[name] = line.substr(value_start);
    }
    const size_t body_length = request->headers.count("content-length") != 0
                                   ? std::stoul(request->headers["content-length"])
                                   : 0;
    while (buffer->size() < body_length) {
      if (stop_) return false;
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      char chunk[4096];
      const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
      if (n <= 0) return false;
      buffer->append(chunk, static_cast<size_t>(n));
    }
    request->body = buffer->substr(0, body_length);
    buffer->erase(0, body_length);
    return true;
  }

  static void send_all(int fd, const std::string& data) {
    size_t sent = 0;
    while (sent < data.size()) {
      const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) return;
      sent += static_cast<size_t>(n);
    }
  }

  void serve(int fd) {
    std::string buffer;
    FakeRequest request;
    while (read_request(fd, &buffer, &request)) {
      ++requests_;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen_.push_back(request);
      }
      const FakeReply reply = handler_(request);
      if (reply.delay_ms > 0) {
        const auto until =
            std::chrono::steady_clock::now() + std::chrono::milliseconds(reply.delay_ms);
        while (!stop_ && std::chrono::steady_clock::now() < until) {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
      }
      if (reply.fault == FakeReply::Fault::kReset) {
        linger hard{1, 0};  // close with RST
        ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
        break;
      }
      const bool head = request.method == "HEAD";
      const long long length = head && reply.head_length >= 0
                                   ? reply.head_length
                                   : static_cast<long long>(reply.body.size());
      std::string out = "HTTP/1.1 " + std::to_string(reply.status) +
                        " X\r\nContent-Length: " + std::to_string(length) + "\r\n";
      for (const auto& [name, value] : reply.headers) out += name + ": " + value + "\r\n";
      out += "\r\n";
      if (!head) {
        out += reply.fault == FakeReply::Fault::kCutBody
                   ? reply.body.substr(0, reply.body.size() / 2)
                   : reply.body;
      }
      send_all(fd, out);
      if (reply.fault == FakeReply::Fault::kCutBody) break;
    }
    ::close(fd);
  }

  Handler handler_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::atomic<int> requests_{0};
  std::thread acceptor_;
  mutable std::mutex mutex_;
  std::vector<std::thread> connections_;
  std::vector<FakeRequest> seen_;
};

}  // namespace imgfs::remote::testing
