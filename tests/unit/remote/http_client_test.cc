#include "remote/http_client.h"

#include <gtest/gtest.h>

#include <thread>

#include "tests/unit/remote/fake_http_server.h"

namespace imgfs::remote {
namespace {

using testing::FakeHttpServer;
using testing::FakeReply;
using testing::FakeRequest;

std::unique_ptr<HttpClient> make_client(int max_connections = 4) {
  EXPECT_TRUE(HttpClient::init_globally().ok());
  HttpOptions options;
  options.max_connections = max_connections;
  options.max_body_bytes = 1000;
  Result<std::unique_ptr<HttpClient>> client = HttpClient::open(options);
  EXPECT_TRUE(client.ok());
  return std::move(client).value();
}

FakeReply route(const FakeRequest& request) {
  FakeReply reply;
  const std::string path = request.path();
  if (path == "/hello") {
    reply.body = "hello world";
    reply.headers = {{"ETag", "\"abc\""}, {"X-Echo", request.header("x-test")}};
  } else if (path == "/big") {
    reply.body = std::string(5000, 'x');
  } else if (path == "/cut") {
    reply.body = std::string(100, 'c');
    reply.fault = FakeReply::Fault::kCutBody;
  } else if (path == "/reset") {
    reply.fault = FakeReply::Fault::kReset;
  } else if (path == "/slow") {
    reply.body = "late";
    reply.delay_ms = 400;
  } else if (path == "/missing") {
    reply.status = 404;
    reply.body = "<Error><Code>NoSuchKey</Code></Error>";
  } else if (path == "/head") {
    reply.head_length = 12345;
  }
  return reply;
}

TEST(HttpClientTest, OpenValidates) {
  HttpOptions options;
  options.max_connections = 0;
  EXPECT_EQ(HttpClient::open(options).status().code(), StatusCode::kInvalidArgument);
  options.max_connections = 1;
  options.ca_file = "/nonexistent/ca.pem";
  EXPECT_EQ(HttpClient::open(options).status().code(), StatusCode::kInvalidArgument);
}

TEST(HttpClientTest, GetIntoStringAndBuffer) {
  FakeHttpServer server(route);
  auto client = make_client();
  HttpRequest request;
  request.url = server.endpoint() + "/hello";
  request.headers = {{"X-Test", "42"}};
  HttpResponse response = client->perform(request);
  EXPECT_EQ(response.error, TransportError::kNone) << response.error_text;
  EXPECT_EQ(response.status, 200);
  EXPECT_EQ(response.body, "hello world");
  EXPECT_EQ(response.header("etag"), "\"abc\"");
  EXPECT_EQ(response.header("x-echo"), "42");
  EXPECT_EQ(response.header("nope"), std::nullopt);

  std::vector<std::byte> buffer(11);
  request.body_buffer = buffer;
  response = client->perform(request);
  EXPECT_EQ(response.error, TransportError::kNone);
  EXPECT_EQ(response.buffer_bytes, 11u);
  EXPECT_TRUE(response.body.empty());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(buffer.data()), buffer.size()),
            "hello world");
  // curl must send the path as is, and no Accept header.
  const std::vector<FakeRequest> seen = server.seen();
  EXPECT_EQ(seen.front().header("accept"), "");
  EXPECT_EQ(seen.front().header("user-agent"), "imgfs/0.1");
}

TEST(HttpClientTest, PathIsSentAsIs) {
  FakeHttpServer server(route);
  auto client = make_client();
  HttpRequest request;
  request.url = server.endpoint() + "/a/../b/./c%20d";
  (void)client->perform(request);
  ASSERT_EQ(server.seen().size(), 1u);
  EXPECT_EQ(server.seen()[0].target, "/a/../b/./c%20d");
}

TEST(HttpClientTest, ErrorBodiesGoToTheStringNotTheBuffer) {
  FakeHttpServer server(route);
  auto client = make_client();
  std::vector<std::byte> buffer(4);
  HttpRequest request;
  request.url = server.endpoint() + "/missing";
  request.body_buffer = buffer;
  HttpResponse response = client->perform(request);
  EXPECT_EQ(response.error, TransportError::kNone);
  EXPECT_EQ(response.status, 404);
  EXPECT_EQ(response.body, "<Error><Code>NoSuchKey</Code></Error>");
  EXPECT_EQ(response.buffer_bytes, 0u);
}

TEST(HttpClientTest, HeadHasHeadersOnly) {
  FakeHttpServer server(route);
  auto client = make_client();
  HttpRequest request;
  request.method = "HEAD";
  request.url = server.endpoint() + "/head";
  HttpResponse response = client->perform(request);
  EXPECT_EQ(response.error, TransportError::kNone) << response.error_text;
  EXPECT_EQ(response.header("content-length"), "12345");
  EXPECT_TRUE(response.body.empty());
}

TEST(HttpClientTest, TransportFailuresAreClassified) {
  FakeHttpServer server(route);
  auto client = make_client();
  std::vector<std::byte> small(10);
  HttpRequest request;
  request.url = server.endpoint() + "/big";
  request.body_buffer = small;
  EXPECT_EQ(client->perform(request).error, TransportError::kLongBody);
  request.body_buffer = {};
  EXPECT_EQ(client->perform(request).error, TransportError::kLongBody);  // over max_body_bytes

  request.url = server.endpoint() + "/cut";
  HttpResponse response = client->perform(request);
  EXPECT_EQ(response.error, TransportError::kPartialBody) << response.error_text;

  request.url = server.endpoint() + "/reset";
  response = client->perform(request);
  EXPECT_EQ(response.error, TransportError::kReset) << response.error_text;

  request.url = server.endpoint() + "/slow";
  request.timeout_ms = 100;
  response = client->perform(request);
  EXPECT_EQ(response.error, TransportError::kTimeout) << response.error_text;

  request.url = "http://127.0.0.1:" + std::to_string(FakeHttpServer::dead_port()) + "/x";
  response = client->perform(request);
  EXPECT_EQ(response.error, TransportError::kConnect) << response.error_text;
  EXPECT_EQ(response.status, 0);
}

TEST(HttpClientTest, ConnectionsAreReused) {
  FakeHttpServer server(route);
  auto client = make_client();
  HttpRequest request;
  request.url = server.endpoint() + "/hello";
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(client->perform(request).status, 200);
  }
  EXPECT_EQ(server.requests(), 20);
  EXPECT_EQ(server.connections_accepted(), 1);
  EXPECT_EQ(client->handles_created(), 1);
}

TEST(HttpClientTest, ConcurrentRequestsStayWithinMaxConnections) {
  FakeHttpServer server([](const FakeRequest& request) {
    FakeReply reply;
    reply.body = request.path();
    reply.delay_ms = 10;
    return reply;
  });
  auto client = make_client(3);
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 5; ++i) {
        HttpRequest request;
        request.url = server.endpoint() + "/t" + std::to_string(t) + "/" + std::to_string(i);
        const HttpResponse response = client->perform(request);
        if (response.status == 200 &&
            response.body == "/t" + std::to_string(t) + "/" + std::to_string(i)) {
          ++good;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(good.load(), 40);
  EXPECT_LE(client->handles_created(), 3);
  EXPECT_LE(server.connections_accepted(), 3);
}

}  // namespace
}  // namespace imgfs::remote
