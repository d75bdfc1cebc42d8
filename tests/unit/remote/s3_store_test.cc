#include "remote/s3_store.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <map>
#include <random>
#include <thread>

#include "tests/support/test_sources.h"
#include "tests/unit/remote/fake_http_server.h"

namespace imgfs::remote {
namespace {

using testing::FakeHttpServer;
using testing::FakeReply;
using testing::FakeRequest;

// ---- Pure helpers -------------------------------------------------------------------------

TEST(S3StoreHelpersTest, ParseEndpoint) {
  Result<S3Endpoint> e = parse_endpoint("http://127.0.0.1:4599");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->scheme, "http");
  EXPECT_EQ(e->host, "127.0.0.1");
  EXPECT_EQ(e->port, 4599);
  EXPECT_EQ(e->host_port(), "127.0.0.1:4599");
  EXPECT_EQ(e->text(), "http://127.0.0.1:4599");

  e = parse_endpoint("HTTPS://S3.Amazonaws.com/");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->host, "s3.amazonaws.com");
  EXPECT_EQ(e->port, 443);
  EXPECT_EQ(e->host_port(), "s3.amazonaws.com");

  e = parse_endpoint("http://[::1]:8773");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->host, "[::1]");
  EXPECT_EQ(e->port, 8773);

  for (const char* bad : {"127.0.0.1:4599", "ftp://h", "http://", "http://h:0", "http://h:70000",
                          "http://h:x", "http://h/path", "http://u@h", "http://h?x", "http://h:"}) {
    EXPECT_EQ(parse_endpoint(bad).status().code(), StatusCode::kInvalidArgument) << bad;
  }
}

TEST(S3StoreHelpersTest, DefaultAddressingStyle) {
  const S3Endpoint aws = *parse_endpoint("https://s3.us-east-1.amazonaws.com");
  EXPECT_FALSE(default_path_style(aws, "my-bucket"));
  EXPECT_TRUE(default_path_style(aws, "my.dotted.bucket"));
  EXPECT_TRUE(default_path_style(aws, "Upper"));
  EXPECT_TRUE(default_path_style(*parse_endpoint("http://127.0.0.1:4599"), "bucket"));
  EXPECT_TRUE(default_path_style(*parse_endpoint("http://localhost:4599"), "bucket"));
  EXPECT_TRUE(default_path_style(*parse_endpoint("https://osg.cloud.example:8773"), "bucket"));
}

TEST(S3StoreHelpersTest, BuildTargets) {
  const S3Endpoint local = *parse_endpoint("http://127.0.0.1:4599");
  S3RequestTarget t = build_s3_target(local, "images", "dir/a b+c.img", true, {});
  EXPECT_EQ(t.url, "http://127.0.0.1:4599/images/dir/a%20b%2Bc.img");
  EXPECT_EQ(t.host, "127.0.0.1:4599");
  EXPECT_EQ(t.encoded_path, "/images/dir/a%20b%2Bc.img");
  EXPECT_EQ(t.v2_resource, "/images/dir/a%20b%2Bc.img");

  t = build_s3_target(local, "images", "", true,
                      {{"prefix", "a b/"}, {"list-type", "2"}, {"max-keys", "1000"}});
  EXPECT_EQ(t.url, "http://127.0.0.1:4599/images?list-type=2&max-keys=1000&prefix=a%20b%2F");
  EXPECT_EQ(t.encoded_path, "/images");
  EXPECT_EQ(t.v2_resource, "/images");

  const S3Endpoint aws = *parse_endpoint("https://s3.amazonaws.com");
  t = build_s3_target(aws, "examplebucket", "test.txt", false, {});
  EXPECT_EQ(t.url, "https://examplebucket.s3.amazonaws.com:443/test.txt");
  EXPECT_EQ(t.host, "examplebucket.s3.amazonaws.com");
  EXPECT_EQ(t.encoded_path, "/test.txt");
  EXPECT_EQ(t.v2_resource, "/examplebucket/test.txt");
  t = build_s3_target(aws, "examplebucket", "", false, {});
  EXPECT_EQ(t.encoded_path, "/");
  EXPECT_EQ(t.v2_resource, "/examplebucket/");
}

constexpr char kV2Page[] = R"(<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>img/</Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
  <Contents><Key>img/a b+c.part.0</Key><LastModified>2009-10-12T17:50:30.000Z</LastModified>
    <ETag>&quot;fba9dede5f27731c9771645a39863328&quot;</ETag><Size>10485760</Size>
    <StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>img/x.manifest.xml</Key><ETag>"3858f62230ac3c915f300c664312c11f-9"</ETag>
    <Size>0</Size></Contents>
</ListBucketResult>)";

// s3rver's namespace and a v1 (Walrus-like) page.
constexpr char kV1Page[] = R"(<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://doc.s3.amazonaws.com/2006-03-01/">
  <Name>b</Name><Prefix></Prefix><Marker></Marker><MaxKeys>1000</MaxKeys>
  <IsTruncated>false</IsTruncated>
  <Contents><Key>k1</Key><ETag>"e1"</ETag><Size>18446744073709551615</Size></Contents>
</ListBucketResult>)";

TEST(S3StoreHelpersTest, ParseListPages) {
  Result<ListPage> page = parse_list_page(kV2Page);
  ASSERT_TRUE(page.ok()) << page.status().to_string();
  EXPECT_FALSE(page->v1_shaped);
  EXPECT_TRUE(page->is_truncated);
  EXPECT_EQ(page->next_continuation_token, "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=");
  ASSERT_EQ(page->objects.size(), 2u);
  EXPECT_EQ(page->objects[0].key, "img/a b+c.part.0");
  EXPECT_EQ(page->objects[0].size, 10485760u);
  EXPECT_EQ(page->objects[0].etag, "fba9dede5f27731c9771645a39863328");
  EXPECT_EQ(page->objects[1].etag, "3858f62230ac3c915f300c664312c11f-9");
  EXPECT_EQ(page->objects[1].size, 0u);

  page = parse_list_page(kV1Page);
  ASSERT_TRUE(page.ok());
  EXPECT_TRUE(page->v1_shaped);
  EXPECT_FALSE(page->is_truncated);
  ASSERT_EQ(page->objects.size(), 1u);
  EXPECT_EQ(page->objects[0].size, 18446744073709551615u);

  page = parse_list_page(
      "<ListBucketResult><IsTruncated>true</IsTruncated><NextMarker>k9</NextMarker>"
      "</ListBucketResult>");
  ASSERT_TRUE(page.ok());
  EXPECT_TRUE(page->v1_shaped);
  EXPECT_EQ(page->next_marker, "k9");
}

TEST(S3StoreHelpersTest, ParseListPagesRejectsBadInput) {
  for (const char* bad :
       {"", "not xml", "<Error><Code>x</Code></Error>",
        "<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>k</Key><Size>18446744073709551616</Size></Contents>"
        "</ListBucketResult>",
        "<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>",
        "<!DOCTYPE x [<!ENTITY e \"boom\">]><ListBucketResult><Contents><Key>&e;</Key>"
        "<Size>1</Size></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>k</Key><Size>1</Size></Contents>"}) {
    EXPECT_EQ(parse_list_page(bad).status().code(), StatusCode::kCorruption) << bad;
  }
}

TEST(S3StoreHelpersTest, ErrorBodiesAndV2Support) {
  S3ErrorBody error = parse_error_body(
      "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request "
      "rate.</Message><RequestId>1</RequestId></Error>");
  EXPECT_EQ(error.code, "SlowDown");
  EXPECT_EQ(error.message, "Please reduce your request rate.");
  EXPECT_EQ(parse_error_body("garbage").code, "");
  EXPECT_EQ(parse_error_body("").code, "");

  EXPECT_TRUE(list_v2_unsupported(501, {}));
  EXPECT_TRUE(list_v2_unsupported(400, {"NotImplemented", ""}));
  EXPECT_TRUE(list_v2_unsupported(400, {"InvalidArgument", "Unknown parameter list-type"}));
  EXPECT_FALSE(list_v2_unsupported(400, {"InvalidArgument", "bad prefix"}));
  EXPECT_FALSE(list_v2_unsupported(403, {"AccessDenied", "Access Denied"}));
  EXPECT_FALSE(list_v2_unsupported(503, {"SlowDown", ""}));
}

TEST(S3StoreHelpersTest, EtagsAndContentRanges) {
  EXPECT_EQ(strip_etag_quotes("\"abc\""), "abc");
  EXPECT_EQ(strip_etag_quotes("W/\"abc\""), "abc");
  EXPECT_EQ(strip_etag_quotes("abc"), "abc");
  EXPECT_EQ(strip_etag_quotes("\""), "\"");

  std::optional<ContentRange> r = parse_content_range("bytes 0-9/100");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->first, 0u);
  EXPECT_EQ(r->last, 9u);
  EXPECT_EQ(r->total, 100u);
  r = parse_content_range("bytes 5-5/*");
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->total);
  r = parse_content_range("bytes */0");
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->first);
  EXPECT_EQ(r->total, 0u);
  for (const char* bad :
       {"", "bytes", "bytes 9-0/10", "items 0-1/2", "bytes 0-1", "bytes */*", "bytes a-b/3"}) {
    EXPECT_FALSE(parse_content_range(bad)) << bad;
  }
}

// ---- The store against a fake S3 server ----------------------------------------------------

std::string percent_decode(std::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size()) {
      out.push_back(
          static_cast<char>(std::strtol(std::string(text.substr(i + 1, 2)).c_str(), nullptr, 16)));
      i += 2;
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

std::map<std::string, std::string> parse_query(const std::string& query) {
  std::map<std::string, std::string> out;
  size_t start = 0;
  while (start < query.size()) {
    size_t end = query.find('&', start);
    if (end == std::string::npos) end = query.size();
    const std::string pair = query.substr(start, end - start);
    const size_t equals = pair.find('=');
    out[percent_decode(pair.substr(0, equals))] =
        equals == std::string::npos ? "" : percent_decode(pair.substr(equals + 1));
    start = end + 1;
  }
  return out;
}

// A bucket "bkt" in memory, with switches for the faults and quirks under test.
class FakeS3 {
 public:
  std::map<std::string, std::string> objects;
  std::map<std::string, std::string> etags;
  std::atomic<int> page_keys{1000};
  std::atomic<bool> walrus{false};  // ignores list-type=2 and answers v1
  std::atomic<bool> v2_not_implemented{false};
  std::atomic<bool> ignore_range{false};
  std::atomic<int> fail_next{0};  // this many requests get `fail_status`
  std::atomic<int> fail_status{503};
  std::atomic<FakeReply::Fault> fail_fault{FakeReply::Fault::kNone};
  std::atomic<int> lists{0};
  int puts = 0;  // GUARDED_BY(data_mutex)
  std::vector<std::string> list_queries;
  std::mutex mutex;       // list_queries
  std::mutex data_mutex;  // objects and etags, once the server runs

  void put(const std::string& key, std::string body, std::string etag) {
    std::lock_guard<std::mutex> lock(data_mutex);
    objects[key] = std::move(body);
    etags[key] = std::move(etag);
  }

  FakeReply operator()(const FakeRequest& request) {
    std::lock_guard<std::mutex> data_lock(data_mutex);
    FakeReply reply;
    if (fail_next.load() > 0) {
      --fail_next;
      if (fail_fault == FakeReply::Fault::kCutBody) {
        FakeReply cut = serve(request);
        cut.fault = fail_fault;
        return cut;
      }
      reply.status = fail_status;
      reply.fault = fail_fault;
      reply.body =
          "<Error><Code>SlowDown</Code><Message>Please reduce your request rate."
          "</Message></Error>";
      return reply;
    }
    return serve(request);
  }

 private:
  FakeReply serve(const FakeRequest& request) {
    FakeReply reply;
    const std::string path = percent_decode(request.path());
    if (!path.starts_with("/bkt")) return {404, {}, "<Error><Code>NoSuchBucket</Code></Error>"};
    if (path == "/bkt") return list(request);
    const std::string key = path.substr(5);
    if (request.method == "PUT") {
      objects[key] = request.body;
      etags[key] = "put" + std::to_string(++puts);
      reply.headers = {{"ETag", "\"" + etags[key] + "\""}};
      return reply;
    }
    const auto it = objects.find(key);
    if (it == objects.end()) {
      return {404, {}, "<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>"};
    }
    const std::string& body = it->second;
    reply.headers = {{"ETag", "\"" + etags[key] + "\""}};
    if (request.method == "HEAD") {
      reply.head_length = static_cast<long long>(body.size());
      return reply;
    }
    const std::string range = request.header("range");
    if (range.empty() || ignore_range) {
      reply.body = body;
      return reply;
    }
    const size_t dash = range.find('-');
    const uint64_t first = std::stoull(range.substr(6, dash - 6));
    uint64_t last = std::stoull(range.substr(dash + 1));
    if (first >= body.size()) {
      reply.status = 416;
      reply.headers.emplace_back("Content-Range", "bytes */" + std::to_string(body.size()));
      return reply;
    }
    last = std::min<uint64_t>(last, body.size() - 1);
    reply.status = 206;
    reply.headers.emplace_back("Content-Range", "bytes " + std::to_string(first) + "-" +
                                                    std::to_string(last) + "/" +
                                                    std::to_string(body.size()));
    reply.body = body.substr(first, last - first + 1);
    return reply;
  }

  FakeReply list(const FakeRequest& request) {
    ++lists;
    std::map<std::string, std::string> query = parse_query(request.query());
    {
      std::lock_guard<std::mutex> lock(mutex);
      list_queries.push_back(request.query());
    }
    const bool v2 = query.contains("list-type") && !walrus;
    if (query.contains("list-type") && v2_not_implemented) {
      return {501, {}, "<Error><Code>NotImplemented</Code><Message>nope</Message></Error>"};
    }
    const std::string prefix = query["prefix"];
    std::string after = v2 ? query["continuation-token"] : query["marker"];
    std::string xml =
        "<?xml version=\"1.0\"?><ListBucketResult xmlns=\"urn:fake\"><Name>bkt</Name>";
    xml += v2 ? "<KeyCount>0</KeyCount>" : "<Marker>" + after + "</Marker>";
    int count = 0;
    bool truncated = false;
    std::string last;
    for (const auto& [key, body] : objects) {
      if (!key.starts_with(prefix) || (!after.empty() && key <= after)) continue;
      if (count == page_keys) {
        truncated = true;
        break;
      }
      xml += "<Contents><Key>" + key + "</Key><Size>" + std::to_string(body.size()) +
             "</Size><ETag>&quot;" + etags[key] + "&quot;</ETag></Contents>";
      last = key;
      ++count;
    }
    xml += std::string("<IsTruncated>") + (truncated ? "true" : "false") + "</IsTruncated>";
    if (truncated && v2) xml += "<NextContinuationToken>" + last + "</NextContinuationToken>";
    xml += "</ListBucketResult>";
    return {200, {}, xml};
  }
};

std::string as_string(const std::vector<std::byte>& bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

std::string pattern_text(size_t size, uint32_t seed) {
  return as_string(imgfs::testing::pattern_bytes(size, seed));
}

class S3StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(HttpClient::init_globally().ok());
    fake_.put("img/disk.part.0", pattern_text(100000, 1), "etag0");
    fake_.put("img/a b+c", "spaces and plus", "etag1");
    fake_.put("other", "x", "etag2");
    server_ = std::make_unique<FakeHttpServer>([this](const FakeRequest& r) { return fake_(r); });
  }

  S3Config config() const {
    S3Config c;
    c.endpoints = {server_->endpoint()};
    c.bucket = "bkt";
    c.credentials.access_key_id = "AKTEST";
    c.credentials.secret_access_key = "SECRETKEY-NEVER-SHOWN";
    c.backoff_base_ms = 1;
    c.backoff_cap_ms = 4;
    c.timeout_ms = 2000;
    return c;
  }

  std::unique_ptr<S3Store> open(S3Config c) {
    Result<std::unique_ptr<S3Store>> store = S3Store::open(std::move(c));
    EXPECT_TRUE(store.ok()) << store.status().to_string();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  FakeS3 fake_;
  std::unique_ptr<FakeHttpServer> server_;
};

TEST_F(S3StoreTest, OpenValidates) {
  S3Config c = config();
  c.endpoints.clear();
  EXPECT_EQ(S3Store::open(c).status().code(), StatusCode::kInvalidArgument);
  c = config();
  c.bucket = "";
  EXPECT_EQ(S3Store::open(c).status().code(), StatusCode::kInvalidArgument);
  c = config();
  c.endpoints = {"127.0.0.1:9"};
  EXPECT_EQ(S3Store::open(c).status().code(), StatusCode::kInvalidArgument);
  c = config();
  c.credentials = {};
  Result<std::unique_ptr<S3Store>> store = S3Store::open(c);
  EXPECT_EQ(store.status().code(), StatusCode::kInvalidArgument);
  c.signing = S3Config::Signing::kNone;
  EXPECT_TRUE(S3Store::open(c).ok());
}

TEST_F(S3StoreTest, HeadAndDescribe) {
  auto store = open(config());
  Result<ObjectInfo> info = store->head("img/disk.part.0");
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->key, "img/disk.part.0");
  EXPECT_EQ(info->size, 100000u);
  EXPECT_EQ(info->etag, "etag0");
  EXPECT_EQ(store->describe(), "s3://bkt via " + server_->endpoint());
  EXPECT_EQ(store->describe().find("SECRETKEY"), std::string::npos);

  Result<ObjectInfo> missing = store->head("nope");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(server_->requests(), 2);  // 404 is not retried
  EXPECT_EQ(store->head("").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store->head(std::string(1025, 'k')).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(S3StoreTest, KeysAreEncodedAndRequestsSignedWithV4) {
  auto store = open(config());
  Result<ObjectInfo> info = store->head("img/a b+c");
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  const FakeRequest request = server_->seen().back();
  EXPECT_EQ(request.target, "/bkt/img/a%20b%2Bc");
  EXPECT_EQ(request.header("host"), "127.0.0.1:" + std::to_string(server_->port()));
  EXPECT_TRUE(request.header("authorization").starts_with("AWS4-HMAC-SHA256 Credential=AKTEST/"))
      << request.header("authorization");
  EXPECT_NE(request.header("authorization").find("/us-east-1/s3/aws4_request"), std::string::npos);
  EXPECT_EQ(request.header("x-amz-content-sha256"), kEmptyPayloadSha256);
  EXPECT_EQ(request.header("x-amz-date").size(), 16u);
}

TEST_F(S3StoreTest, V2AndUnsignedRequests) {
  S3Config c = config();
  c.signing = S3Config::Signing::kV2;
  auto store = open(c);
  ASSERT_TRUE(store->head("other").ok());
  FakeRequest request = server_->seen().back();
  EXPECT_TRUE(request.header("authorization").starts_with("AWS AKTEST:"));
  // The signature verifies against the string the V2 spec (and s3rver) builds.
  const std::string to_sign = v2_string_to_sign(
      "HEAD", "", "", "", {{"x-amz-date", request.header("x-amz-date")}}, "/bkt/other", {});
  EXPECT_EQ(request.header("authorization"),
            "AWS AKTEST:" + *v2_signature("SECRETKEY-NEVER-SHOWN", to_sign));

  c.signing = S3Config::Signing::kNone;
  store = open(c);
  ASSERT_TRUE(store->head("other").ok());
  request = server_->seen().back();
  EXPECT_EQ(request.header("authorization"), "");
}

TEST_F(S3StoreTest, ReadRangesMatchTheObject) {
  auto store = open(config());
  const ObjectInfo object = *store->head("img/disk.part.0");
  const std::string& reference = fake_.objects["img/disk.part.0"];
  std::mt19937 rng(7);
  std::vector<std::pair<uint64_t, size_t>> reads = {{0, 1},     {0, 4096},   {99999, 1},
                                                    {65535, 2}, {0, 100000}, {50000, 50000}};
  for (int i = 0; i < 20; ++i) {
    const uint64_t offset = rng() % 100000;
    reads.emplace_back(offset, 1 + rng() % (100000 - offset));
  }
  for (const auto& [offset, length] : reads) {
    std::vector<std::byte> out(length);
    Status s = store->read_range(object, offset, out);
    ASSERT_TRUE(s.ok()) << s.to_string();
    EXPECT_EQ(as_string(out), reference.substr(offset, length)) << offset << "+" << length;
  }
  const FakeRequest request = server_->seen().back();
  EXPECT_EQ(request.header("if-match"), "\"etag0\"");
  EXPECT_TRUE(request.header("range").starts_with("bytes="));
  // All over one kept-alive connection.
  EXPECT_EQ(server_->connections_accepted(), 1);
}

TEST_F(S3StoreTest, ReadRangeValidatesArguments) {
  auto store = open(config());
  const ObjectInfo object = *store->head("img/disk.part.0");
  std::vector<std::byte> out(10);
  EXPECT_EQ(store->read_range(object, 99991, out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store->read_range(object, ~uint64_t{0} - 2, out).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(store->read_range(object, 100000, std::span<std::byte>()).ok());
  ObjectInfo bad = object;
  bad.key = "";
  EXPECT_EQ(store->read_range(bad, 0, out).code(), StatusCode::kInvalidArgument);
}

TEST_F(S3StoreTest, ChangedObjectIsDetectedEvenWhenIfMatchIsIgnored) {
  auto store = open(config());
  const ObjectInfo object = *store->head("img/disk.part.0");
  {
    std::lock_guard<std::mutex> lock(fake_.data_mutex);
    fake_.etags["img/disk.part.0"] = "etag-new";
  }
  std::vector<std::byte> out(100);
  const int before = server_->requests();
  Status s = store->read_range(object, 0, out);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("object img/disk.part.0 changed since it was opened (ETag etag0, now "
                             "etag-new)"),
            std::string::npos)
      << s.message();
  EXPECT_EQ(server_->requests(), before + 1);  // not retried

  {
    std::lock_guard<std::mutex> lock(fake_.data_mutex);
    fake_.etags["img/disk.part.0"] = "etag0";
    fake_.objects["img/disk.part.0"].resize(50);
  }
  s = store->read_range(object, 1000, out);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("changed since it was opened"), std::string::npos) << s.message();
}

TEST_F(S3StoreTest, TransientFailuresAreRetried) {
  auto store = open(config());
  const ObjectInfo object = *store->head("img/disk.part.0");
  std::vector<std::byte> out(1000);
  const std::string expected = fake_.objects["img/disk.part.0"].substr(500, 1000);

  for (auto [status, fault] :
       std::vector<std::pair<int, FakeReply::Fault>>{{503, FakeReply::Fault::kNone},
                                                     {500, FakeReply::Fault::kNone},
                                                     {429, FakeReply::Fault::kNone},
                                                     {0, FakeReply::Fault::kReset},
                                                     {206, FakeReply::Fault::kCutBody}}) {
    fake_.fail_status = status;
    fake_.fail_fault = fault;
    fake_.fail_next = 3;
    const int before = server_->requests();
    Status s = store->read_range(object, 500, out);
    ASSERT_TRUE(s.ok()) << status << ": " << s.to_string();
    EXPECT_EQ(as_string(out), expected);
    EXPECT_EQ(server_->requests(), before + 4) << status;
  }
}

TEST_F(S3StoreTest, PersistentFailureGivesUpWithAClearMessage) {
  S3Config c = config();
  c.retries = 4;
  auto store = open(c);
  const ObjectInfo object = *store->head("img/disk.part.0");
  fake_.fail_status = 503;
  fake_.fail_next = 1000;
  std::vector<std::byte> out(65536);
  const int before = server_->requests();
  Status s = store->read_range(object, 0, out);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_EQ(s.message(),
            "GET bkt/img/disk.part.0 bytes 0-65535: HTTP 503 (SlowDown: Please reduce your "
            "request rate.) after 5 attempts");
  EXPECT_EQ(server_->requests(), before + 5);

  // 403 is not retried.
  fake_.fail_status = 403;
  fake_.fail_next = 1000;
  const int before403 = server_->requests();
  s = store->head("other").status();
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("access denied (HTTP 403"), std::string::npos) << s.message();
  EXPECT_EQ(server_->requests(), before403 + 1);
  EXPECT_EQ(s.message().find("SECRETKEY"), std::string::npos);
}

TEST_F(S3StoreTest, RetryBudgetBoundsTheTime) {
  S3Config c = config();
  c.retries = 1000;
  c.backoff_base_ms = 20;
  c.backoff_cap_ms = 20;
  c.retry_budget_ms = 300;
  auto store = open(c);
  fake_.fail_status = 500;
  fake_.fail_next = 100000;
  const auto start = std::chrono::steady_clock::now();
  Result<ObjectInfo> info = store->head("other");
  const auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.status().message().find("retry budget of 300 ms spent"), std::string::npos)
      << info.status().message();
  EXPECT_LT(elapsed, std::chrono::milliseconds(2000));
}

TEST_F(S3StoreTest, ServerIgnoringRangeIsRefusedUnlessWholeObject) {
  auto store = open(config());
  const ObjectInfo object = *store->head("img/a b+c");
  fake_.ignore_range = true;
  std::vector<std::byte> whole(object.size);
  ASSERT_TRUE(store->read_range(object, 0, whole).ok());
  EXPECT_EQ(as_string(whole), "spaces and plus");
  std::vector<std::byte> part(3);
  Status s = store->read_range(object, 2, part);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("ignored the Range header"), std::string::npos) << s.message();
}

TEST_F(S3StoreTest, ConcurrentReaders) {
  S3Config c = config();
  c.max_connections = 4;
  auto store = open(c);
  const ObjectInfo object = *store->head("img/disk.part.0");
  const std::string& reference = fake_.objects["img/disk.part.0"];
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 25; ++i) {
        const uint64_t offset = rng() % 100000;
        const size_t length = 1 + rng() % std::min<uint64_t>(20000, 100000 - offset);
        std::vector<std::byte> out(length);
        if (!store->read_range(object, offset, out).ok() ||
            as_string(out) != reference.substr(offset, length)) {
          ++bad;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_LE(server_->connections_accepted(), 4);
}

TEST_F(S3StoreTest, ListPagesWithContinuationTokens) {
  for (int i = 0; i < 25; ++i) fake_.put("many/" + std::to_string(100 + i), "v", "e");
  fake_.page_keys = 10;
  auto store = open(config());
  Result<std::vector<ObjectInfo>> listed = store->list("many/");
  ASSERT_TRUE(listed.ok()) << listed.status().to_string();
  ASSERT_EQ(listed->size(), 25u);
  EXPECT_EQ(listed->front().key, "many/100");
  EXPECT_EQ(listed->back().key, "many/124");
  EXPECT_EQ(listed->front().etag, "e");
  EXPECT_EQ(fake_.lists.load(), 3);
  EXPECT_FALSE(store->uses_list_v1());
  EXPECT_NE(fake_.list_queries[0].find("list-type=2"), std::string::npos);
  EXPECT_NE(fake_.list_queries[0].find("max-keys=1000"), std::string::npos);
  EXPECT_NE(fake_.list_queries[1].find("continuation-token=many%2F109"), std::string::npos);

  listed = store->list("");
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 28u);
  EXPECT_TRUE(
      std::is_sorted(listed->begin(), listed->end(),
                     [](const ObjectInfo& a, const ObjectInfo& b) { return a.key < b.key; }));
}

TEST_F(S3StoreTest, ListFallsBackToV1ForWalrusAndRemembers) {
  for (int i = 0; i < 25; ++i) fake_.put("many/" + std::to_string(100 + i), "v", "e");
  fake_.page_keys = 10;
  fake_.walrus = true;
  auto store = open(config());
  Result<std::vector<ObjectInfo>> listed = store->list("many/");
  ASSERT_TRUE(listed.ok()) << listed.status().to_string();
  EXPECT_EQ(listed->size(), 25u);
  EXPECT_TRUE(store->uses_list_v1());
  // The v1 pages page by marker (the last key, as the server gave no NextMarker).
  EXPECT_NE(fake_.list_queries.back().find("marker=many%2F119"), std::string::npos);
  const size_t queries = fake_.list_queries.size();
  ASSERT_TRUE(store->list("img/").ok());
  EXPECT_EQ(fake_.list_queries[queries].find("list-type"), std::string::npos);
}

TEST_F(S3StoreTest, ListFallsBackToV1OnNotImplemented) {
  fake_.v2_not_implemented = true;
  auto store = open(config());
  Result<std::vector<ObjectInfo>> listed = store->list("img/");
  ASSERT_TRUE(listed.ok()) << listed.status().to_string();
  ASSERT_EQ(listed->size(), 2u);
  EXPECT_EQ(listed->at(0).key, "img/a b+c");
  EXPECT_TRUE(store->uses_list_v1());
  EXPECT_EQ(fake_.lists.load(), 2);  // the 501 was not retried
}

TEST_F(S3StoreTest, FailoverToTheNextEndpoint) {
  S3Config c = config();
  const std::string dead = "http://127.0.0.1:" + std::to_string(FakeHttpServer::dead_port());
  c.endpoints = {dead, server_->endpoint()};
  auto store = open(c);
  EXPECT_EQ(store->current_endpoint(), dead);
  Result<ObjectInfo> info = store->head("other");
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(store->failovers(), 1u);
  EXPECT_EQ(store->current_endpoint(), server_->endpoint());
  EXPECT_EQ(store->describe(), "s3://bkt via " + server_->endpoint());
  // Stays on the live endpoint.
  ASSERT_TRUE(store->head("other").ok());
  EXPECT_EQ(store->failovers(), 1u);
}

TEST_F(S3StoreTest, AllEndpointsDownFailsWithTheTransportError) {
  S3Config c = config();
  c.endpoints = {"http://127.0.0.1:" + std::to_string(FakeHttpServer::dead_port())};
  c.retries = 2;
  auto store = open(c);
  Result<ObjectInfo> info = store->head("other");
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.status().message().find("HEAD bkt/other: connection failed"), std::string::npos)
      << info.status().message();
  EXPECT_NE(info.status().message().find("after 3 attempts"), std::string::npos);
}

TEST_F(S3StoreTest, TimeoutFailsOverAndCoolOffExpires) {
  FakeHttpServer slow([](const FakeRequest&) {
    FakeReply reply;
    reply.delay_ms = 500;
    return reply;
  });
  S3Config c = config();
  c.endpoints = {slow.endpoint(), server_->endpoint()};
  c.timeout_ms = 100;
  c.endpoint_cooloff_ms = 50;
  auto store = open(c);
  ASSERT_TRUE(store->head("other").ok());
  EXPECT_EQ(store->failovers(), 1u);
  EXPECT_EQ(store->current_endpoint(), server_->endpoint());
}

TEST_F(S3StoreTest, PresignedUrls) {
  auto store = open(config());
  const std::string url = server_->endpoint() + "/bkt/img/disk.part.0?X-Amz-Signature=abc";
  Result<uint64_t> size = store->head_url_size(url);
  ASSERT_TRUE(size.ok()) << size.status().to_string();
  EXPECT_EQ(*size, 100000u);
  std::vector<std::byte> out(300);
  ASSERT_TRUE(store->read_url_range(url, 99700, out).ok());
  EXPECT_EQ(as_string(out), fake_.objects["img/disk.part.0"].substr(99700));
  const FakeRequest request = server_->seen().back();
  EXPECT_EQ(request.header("authorization"), "");
  EXPECT_EQ(request.target, "/bkt/img/disk.part.0?X-Amz-Signature=abc");

  fake_.fail_status = 403;
  fake_.fail_next = 1;
  Status s = store->read_url_range(url, 0, out);
  // The fake's 403 body says SlowDown, not expired: a plain access-denied error.
  EXPECT_NE(s.message().find("access denied"), std::string::npos) << s.message();
  EXPECT_EQ(s.message().find("X-Amz-Signature"), std::string::npos);
}

TEST_F(S3StoreTest, ExpiredPresignedUrlSaysSo) {
  FakeHttpServer expired([](const FakeRequest&) {
    return FakeReply{403,
                     {},
                     "<Error><Code>AccessDenied</Code><Message>Request has expired"
                     "</Message></Error>"};
  });
  auto store = open(config());
  const std::string url = expired.endpoint() + "/b/k?Signature=SECRET&Expires=1";
  std::vector<std::byte> out(10);
  Status s = store->read_url_range(url, 0, out);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_EQ(s.message(), "presigned URL expired: " + expired.endpoint() + "/b/k (HTTP 403)");
  Result<uint64_t> size = store->head_url_size(url);
  ASSERT_FALSE(size.ok());
  EXPECT_NE(size.status().message().find("presigned URL expired"), std::string::npos);
  EXPECT_EQ(store->read_url_range("ftp://x/y", 0, out).code(), StatusCode::kInvalidArgument);
}

// ---- put ----------------------------------------------------------------------------------

std::time_t parse_amz_date(const std::string& text) {
  std::tm tm{};
  EXPECT_NE(::strptime(text.c_str(), "%Y%m%dT%H%M%SZ", &tm), nullptr) << text;
  return ::timegm(&tm);
}

TEST_F(S3StoreTest, PutSendsTheBodySignedWithItsSha256) {
  auto store = open(config());
  const std::vector<std::byte> bytes = imgfs::testing::pattern_bytes(70001, 5);
  const std::string key = "img/disk.manifest.xml.imgfs-index";
  Status s = store->put(key, bytes);
  ASSERT_TRUE(s.ok()) << s.to_string();
  {
    std::lock_guard<std::mutex> lock(fake_.data_mutex);
    EXPECT_EQ(fake_.objects[key], as_string(bytes));
  }
  const FakeRequest request = server_->seen().back();
  EXPECT_EQ(request.method, "PUT");
  EXPECT_EQ(request.target, "/bkt/img/disk.manifest.xml.imgfs-index");
  EXPECT_EQ(request.header("content-length"), "70001");
  EXPECT_EQ(request.header("content-type"), "");
  EXPECT_EQ(request.header("expect"), "");
  const std::string hash = *payload_sha256_hex(bytes);
  EXPECT_EQ(request.header("x-amz-content-sha256"), hash);
  // The Authorization header is exactly what the signer makes of this request and body hash.
  SignableRequest signable;
  signable.method = "PUT";
  signable.host = request.header("host");
  signable.encoded_path = request.target;
  signable.payload_hash = hash;
  Result<SigV4Result> expected = sign_v4(signable, config().credentials, "us-east-1", "s3",
                                         parse_amz_date(request.header("x-amz-date")));
  ASSERT_TRUE(expected.ok());
  EXPECT_NE(expected->canonical_request.find("x-amz-content-sha256:" + hash), std::string::npos);
  EXPECT_EQ(request.header("authorization"), expected->headers.back().second);

  // What was put reads back through the store.
  Result<ObjectInfo> info = store->head(key);
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->size, bytes.size());
  std::vector<std::byte> back(bytes.size());
  ASSERT_TRUE(store->read_range(*info, 0, back).ok());
  EXPECT_EQ(back, bytes);

  // An empty object, and a key that needs encoding.
  ASSERT_TRUE(store->put("img/empty one+", {}).ok());
  EXPECT_EQ(server_->seen().back().target, "/bkt/img/empty%20one%2B");
  EXPECT_EQ(server_->seen().back().header("content-length"), "0");
  EXPECT_EQ(server_->seen().back().header("x-amz-content-sha256"), kEmptyPayloadSha256);
  // All over one kept-alive connection.
  EXPECT_EQ(server_->connections_accepted(), 1);
}

TEST_F(S3StoreTest, PutWithV2AndUnsigned) {
  S3Config c = config();
  c.signing = S3Config::Signing::kV2;
  auto store = open(c);
  const std::vector<std::byte> bytes = imgfs::testing::pattern_bytes(1000, 6);
  ASSERT_TRUE(store->put("k", bytes).ok());
  FakeRequest request = server_->seen().back();
  // V2: empty Content-MD5 and Content-Type lines, neither header sent.
  const std::string to_sign = v2_string_to_sign(
      "PUT", "", "", "", {{"x-amz-date", request.header("x-amz-date")}}, "/bkt/k", {});
  EXPECT_TRUE(to_sign.starts_with("PUT\n\n\n\nx-amz-date:"));
  EXPECT_EQ(request.header("authorization"),
            "AWS AKTEST:" + *v2_signature("SECRETKEY-NEVER-SHOWN", to_sign));
  EXPECT_EQ(request.header("content-md5"), "");
  EXPECT_EQ(request.header("content-type"), "");
  EXPECT_EQ(request.body, as_string(bytes));

  c.signing = S3Config::Signing::kNone;
  store = open(c);
  ASSERT_TRUE(store->put("k2", bytes).ok());
  request = server_->seen().back();
  EXPECT_EQ(request.header("authorization"), "");
  EXPECT_EQ(request.body, as_string(bytes));
}

TEST_F(S3StoreTest, PutIsRetriedAndResendsTheWholeBody) {
  auto store = open(config());
  const std::vector<std::byte> bytes = imgfs::testing::pattern_bytes(300000, 7);
  for (auto [status, fault] :
       std::vector<std::pair<int, FakeReply::Fault>>{{503, FakeReply::Fault::kNone},
                                                     {500, FakeReply::Fault::kNone},
                                                     {0, FakeReply::Fault::kReset}}) {
    {
      std::lock_guard<std::mutex> lock(fake_.data_mutex);
      fake_.objects.erase("retried");
    }
    fake_.fail_status = status;
    fake_.fail_fault = fault;
    fake_.fail_next = 2;
    const int before = server_->requests();
    Status s = store->put("retried", bytes);
    ASSERT_TRUE(s.ok()) << status << ": " << s.to_string();
    EXPECT_EQ(server_->requests(), before + 3) << status;
    std::lock_guard<std::mutex> lock(fake_.data_mutex);
    EXPECT_EQ(fake_.objects["retried"], as_string(bytes)) << status;
  }
}

TEST_F(S3StoreTest, PutFailuresAreClear) {
  auto store = open(config());
  const std::vector<std::byte> bytes = imgfs::testing::pattern_bytes(10, 8);
  fake_.fail_status = 403;
  fake_.fail_next = 1000;
  const int before = server_->requests();
  Status s = store->put("denied", bytes);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_NE(s.message().find("PUT bkt/denied (10 bytes): access denied (HTTP 403"),
            std::string::npos)
      << s.message();
  EXPECT_EQ(server_->requests(), before + 1);  // not retried
  EXPECT_EQ(s.message().find("SECRETKEY"), std::string::npos);
  fake_.fail_next = 0;

  S3Config c = config();
  c.bucket = "nobucket";
  store = open(c);
  EXPECT_EQ(store->put("k", bytes).code(), StatusCode::kNotFound);
  EXPECT_EQ(store->put("", bytes).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store->put(std::string(1025, 'k'), bytes).code(), StatusCode::kInvalidArgument);
}

TEST_F(S3StoreTest, ConcurrentPuts) {
  auto store = open(config());
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 5; ++i) {
        const std::vector<std::byte> bytes =
            imgfs::testing::pattern_bytes(1000 + 100 * t + i, static_cast<uint32_t>(t * 10 + i));
        if (!store->put("c/" + std::to_string(t) + "/" + std::to_string(i), bytes).ok()) {
          ++failures;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  std::lock_guard<std::mutex> lock(fake_.data_mutex);
  for (int t = 0; t < 6; ++t) {
    for (int i = 0; i < 5; ++i) {
      EXPECT_EQ(fake_.objects["c/" + std::to_string(t) + "/" + std::to_string(i)],
                as_string(imgfs::testing::pattern_bytes(1000 + 100 * t + i,
                                                        static_cast<uint32_t>(t * 10 + i))));
    }
  }
}

// ---- Against a real s3rver, when one is given ---------------------------------------------

// Runs only with IMGFS_S3_ENDPOINT (e.g. http://127.0.0.1:4599) and IMGFS_S3_BUCKET set, the
// bucket holding IMGFS_S3_KEY (default "s3rver-test/a b+c.bin"); its bytes must equal
// pattern_bytes(size, 3), as uploaded by the harness. Credentials: S3RVER/S3RVER.
TEST(S3rverTest, ListHeadAndReadWithEachSigning) {
  const char* endpoint = std::getenv("IMGFS_S3_ENDPOINT");
  const char* bucket = std::getenv("IMGFS_S3_BUCKET");
  if (endpoint == nullptr || bucket == nullptr) {
    GTEST_SKIP() << "set IMGFS_S3_ENDPOINT and IMGFS_S3_BUCKET to run against s3rver";
  }
  const char* key_env = std::getenv("IMGFS_S3_KEY");
  const std::string key = key_env != nullptr ? key_env : "s3rver-test/a b+c.bin";
  ASSERT_TRUE(HttpClient::init_globally().ok());
  for (S3Config::Signing signing :
       {S3Config::Signing::kV4, S3Config::Signing::kV2, S3Config::Signing::kNone}) {
    SCOPED_TRACE(static_cast<int>(signing));
    S3Config c;
    c.endpoints = {endpoint};
    c.bucket = bucket;
    c.signing = signing;
    c.credentials.access_key_id = "S3RVER";
    c.credentials.secret_access_key = "S3RVER";
    Result<std::unique_ptr<S3Store>> store = S3Store::open(c);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    Result<ObjectInfo> info = (*store)->head(key);
    ASSERT_TRUE(info.ok()) << info.status().to_string();
    const std::vector<std::byte> reference = imgfs::testing::pattern_bytes(info->size, 3);

    Result<std::vector<ObjectInfo>> listed = (*store)->list(key.substr(0, key.rfind('/') + 1));
    ASSERT_TRUE(listed.ok()) << listed.status().to_string();
    bool found = false;
    for (const ObjectInfo& object : *listed) {
      if (object.key == key) {
        found = true;
        EXPECT_EQ(object.size, info->size);
        EXPECT_EQ(object.etag, info->etag);
      }
    }
    EXPECT_TRUE(found);

    std::mt19937 rng(11);
    for (int i = 0; i < 10; ++i) {
      const uint64_t offset = rng() % info->size;
      const size_t length = 1 + rng() % std::min<uint64_t>(1 << 20, info->size - offset);
      std::vector<std::byte> out(length);
      Status s = (*store)->read_range(*info, offset, out);
      ASSERT_TRUE(s.ok()) << s.to_string();
      EXPECT_TRUE(std::equal(out.begin(), out.end(), reference.begin() + offset));
    }
    std::vector<std::byte> whole(info->size);
    ASSERT_TRUE((*store)->read_range(*info, 0, whole).ok());
    EXPECT_EQ(whole, reference);
  }
  // A wrong secret is refused by s3rver's V2 check (403), and not retried.
  S3Config c;
  c.endpoints = {endpoint};
  c.bucket = bucket;
  c.signing = S3Config::Signing::kV2;
  c.credentials.access_key_id = "S3RVER";
  c.credentials.secret_access_key = "WRONG";
  Result<std::unique_ptr<S3Store>> store = S3Store::open(c);
  ASSERT_TRUE(store.ok());
  Result<ObjectInfo> info = (*store)->head(key);
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.status().message().find("403"), std::string::npos) << info.status().message();
}

// Runs with IMGFS_S3_ENDPOINT and IMGFS_S3_BUCKET set (tests/integration/s3_put_test.sh does
// that): puts objects with each signing and reads them back, byte for byte; a SigV2 PUT signed
// with a wrong secret is refused.
TEST(S3rverTest, PutAndReadBackWithEachSigning) {
  const char* endpoint = std::getenv("IMGFS_S3_ENDPOINT");
  const char* bucket = std::getenv("IMGFS_S3_BUCKET");
  if (endpoint == nullptr || bucket == nullptr) {
    GTEST_SKIP() << "set IMGFS_S3_ENDPOINT and IMGFS_S3_BUCKET to run against s3rver";
  }
  ASSERT_TRUE(HttpClient::init_globally().ok());
  const std::pair<S3Config::Signing, const char*> signings[] = {
      {S3Config::Signing::kV4, "v4"},
      {S3Config::Signing::kV2, "v2"},
      {S3Config::Signing::kNone, "unsigned"}};
  uint32_t seed = 40;
  for (const auto& [signing, name] : signings) {
    SCOPED_TRACE(name);
    S3Config c;
    c.endpoints = {endpoint};
    c.bucket = bucket;
    c.signing = signing;
    c.credentials.access_key_id = "S3RVER";
    c.credentials.secret_access_key = "S3RVER";
    Result<std::unique_ptr<S3Store>> store = S3Store::open(c);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    for (uint64_t size : {uint64_t{0}, uint64_t{1}, uint64_t{65537}, uint64_t{3} << 20}) {
      const std::string key =
          std::string("put-test/") + name + "/a b+c " + std::to_string(size) + ".imgfs-index";
      const std::vector<std::byte> bytes = imgfs::testing::pattern_bytes(size, ++seed);
      Status s = (*store)->put(key, bytes);
      ASSERT_TRUE(s.ok()) << s.to_string();
      Result<ObjectInfo> info = (*store)->head(key);
      ASSERT_TRUE(info.ok()) << info.status().to_string();
      ASSERT_EQ(info->size, size);
      std::vector<std::byte> back(size);
      ASSERT_TRUE((*store)->read_range(*info, 0, back).ok());
      EXPECT_TRUE(back == bytes) << key;
      // A second put replaces the object with a new version.
      const std::vector<std::byte> again = imgfs::testing::pattern_bytes(size + 7, ++seed);
      ASSERT_TRUE((*store)->put(key, again).ok());
      Result<ObjectInfo> replaced = (*store)->head(key);
      ASSERT_TRUE(replaced.ok());
      EXPECT_EQ(replaced->size, size + 7);
      EXPECT_NE(replaced->etag, info->etag);
      std::vector<std::byte> back_again(size + 7);
      ASSERT_TRUE((*store)->read_range(*replaced, 0, back_again).ok());
      EXPECT_TRUE(back_again == again) << key;
    }
  }
  // s3rver checks V2 signatures only (it accepts any V4 one), so that is where a wrong secret
  // shows; the V4 signing of a PUT is checked against AWS's published example instead.
  S3Config c;
  c.endpoints = {endpoint};
  c.bucket = bucket;
  c.signing = S3Config::Signing::kV2;
  c.credentials.access_key_id = "S3RVER";
  c.credentials.secret_access_key = "WRONG";
  Result<std::unique_ptr<S3Store>> store = S3Store::open(c);
  ASSERT_TRUE(store.ok());
  Status s = (*store)->put("put-test/refused", imgfs::testing::pattern_bytes(10, 1));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("403"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace imgfs::remote
