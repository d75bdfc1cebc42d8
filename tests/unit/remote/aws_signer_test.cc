#include "remote/aws_signer.h"

#include <gtest/gtest.h>

namespace imgfs::remote {
namespace {

// The examples of the S3 API reference, "Signature Calculations for the Authorization Header:
// Transferring Payload in a Single Chunk (AWS Signature Version 4)".
constexpr std::time_t kExampleTime = 1369353600;  // 2013-05-24T00:00:00Z
constexpr char kExampleHost[] = "examplebucket.s3.amazonaws.com";

Credentials example_credentials() {
  Credentials credentials;
  credentials.access_key_id = "AKIAIOSFODNN7EXAMPLE";
  credentials.secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
  return credentials;
}

std::string header_value(const HeaderList& headers, std::string_view name) {
  for (const auto& [key, value] : headers) {
    if (key == name) return value;
  }
  return "";
}

TEST(AwsSignerTest, UriEncodeFollowsSigV4Rules) {
  EXPECT_EQ(uri_encode("a-b_c.d~e", false), "a-b_c.d~e");
  EXPECT_EQ(uri_encode("a b+c", true), "a%20b%2Bc");
  EXPECT_EQ(uri_encode("dir/sub/file name.img", true), "dir/sub/file%20name.img");
  EXPECT_EQ(uri_encode("dir/sub", false), "dir%2Fsub");
  EXPECT_EQ(uri_encode("=&?*!'()$", true), "%3D%26%3F%2A%21%27%28%29%24");
  EXPECT_EQ(uri_encode("\xc3\xa9", true), "%C3%A9");
  EXPECT_EQ(uri_encode("", true), "");
}

TEST(AwsSignerTest, Dates) {
  EXPECT_EQ(format_amz_date(kExampleTime), "20130524T000000Z");
  EXPECT_EQ(format_http_date(kExampleTime), "Fri, 24 May 2013 00:00:00 GMT");
  EXPECT_EQ(format_http_date(1175024202), "Tue, 27 Mar 2007 19:36:42 GMT");
}

TEST(AwsSignerTest, CanonicalQueryIsSortedAndEncoded) {
  EXPECT_EQ(canonical_query_string({{"prefix", "J"}, {"max-keys", "2"}}), "max-keys=2&prefix=J");
  EXPECT_EQ(canonical_query_string({{"lifecycle", ""}}), "lifecycle=");
  EXPECT_EQ(canonical_query_string({{"prefix", "a b/c+d"}, {"list-type", "2"}}),
            "list-type=2&prefix=a%20b%2Fc%2Bd");
  EXPECT_EQ(canonical_query_string({}), "");
}

// "Example: GET Object": the first 10 bytes of test.txt.
TEST(AwsSignerTest, V4GetObjectExample) {
  SignableRequest request;
  request.method = "GET";
  request.host = kExampleHost;
  request.encoded_path = "/test.txt";
  request.headers = {{"Range", "bytes=0-9"}};
  Result<SigV4Result> signed_request =
      sign_v4(request, example_credentials(), "us-east-1", "s3", kExampleTime);
  ASSERT_TRUE(signed_request.ok()) << signed_request.status().to_string();
  EXPECT_EQ(
      signed_request->canonical_request,
      "GET\n/test.txt\n\n"
      "host:examplebucket.s3.amazonaws.com\n"
      "range:bytes=0-9\n"
      "x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n"
      "x-amz-date:20130524T000000Z\n\n"
      "host;range;x-amz-content-sha256;x-amz-date\n"
      "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(signed_request->string_to_sign,
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
            "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972");
  EXPECT_EQ(signed_request->signature,
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
  EXPECT_EQ(header_value(signed_request->headers, "Authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
            "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
  EXPECT_EQ(header_value(signed_request->headers, "x-amz-date"), "20130524T000000Z");
  EXPECT_EQ(header_value(signed_request->headers, "x-amz-content-sha256"), kEmptyPayloadSha256);
}

// "Example: GET Bucket (List Objects)": the query is given unsorted and must be sorted.
TEST(AwsSignerTest, V4ListObjectsExample) {
  SignableRequest request;
  request.method = "GET";
  request.host = kExampleHost;
  request.encoded_path = "/";
  request.query = {{"prefix", "J"}, {"max-keys", "2"}};
  Result<SigV4Result> signed_request =
      sign_v4(request, example_credentials(), "us-east-1", "s3", kExampleTime);
  ASSERT_TRUE(signed_request.ok());
  EXPECT_TRUE(signed_request->canonical_request.starts_with("GET\n/\nmax-keys=2&prefix=J\n"));
  EXPECT_EQ(signed_request->signature,
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7");
}

// "Example: GET Bucket Lifecycle": a sub-resource without a value.
TEST(AwsSignerTest, V4GetBucketLifecycleExample) {
  SignableRequest request;
  request.method = "GET";
  request.host = kExampleHost;
  request.encoded_path = "/";
  request.query = {{"lifecycle", ""}};
  Result<SigV4Result> signed_request =
      sign_v4(request, example_credentials(), "us-east-1", "s3", kExampleTime);
  ASSERT_TRUE(signed_request.ok());
  EXPECT_TRUE(signed_request->canonical_request.starts_with("GET\n/\nlifecycle=\n"));
  EXPECT_EQ(signed_request->signature,
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543");
}

// "Example: PUT Object": extra signed headers (Date, x-amz-storage-class), an encoded '$' in
// the path and a real payload hash.
TEST(AwsSignerTest, V4PutObjectExample) {
  SignableRequest request;
  request.method = "PUT";
  request.host = kExampleHost;
  request.encoded_path = "/" + uri_encode("test$file.text", true);
  request.headers = {{"Date", "Fri, 24 May 2013 00:00:00 GMT"},
                     {"x-amz-storage-class", "REDUCED_REDUNDANCY"}};
  request.payload_hash = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072";
  Result<SigV4Result> signed_request =
      sign_v4(request, example_credentials(), "us-east-1", "s3", kExampleTime);
  ASSERT_TRUE(signed_request.ok());
  EXPECT_NE(
      header_value(signed_request->headers, "Authorization")
          .find("SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,"),
      std::string::npos);
  EXPECT_EQ(signed_request->signature,
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd");
}

// The payload of that example is "Welcome to Amazon S3."; its hash is the one signed above.
TEST(AwsSignerTest, PayloadSha256) {
  const std::string payload = "Welcome to Amazon S3.";
  Result<std::string> hash =
      payload_sha256_hex(std::as_bytes(std::span<const char>(payload.data(), payload.size())));
  ASSERT_TRUE(hash.ok());
  EXPECT_EQ(*hash, "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072");
  EXPECT_EQ(*payload_sha256_hex({}), kEmptyPayloadSha256);
}

TEST(AwsSignerTest, V4SessionTokenIsSentAndSigned) {
  Credentials credentials = example_credentials();
  credentials.session_token = "token/with+chars";
  SignableRequest request;
  request.method = "HEAD";
  request.host = "127.0.0.1:4599";
  request.encoded_path = "/bucket/key";
  request.payload_hash = std::string(kUnsignedPayload);
  Result<SigV4Result> signed_request =
      sign_v4(request, credentials, "eu-west-1", "s3", kExampleTime);
  ASSERT_TRUE(signed_request.ok());
  EXPECT_EQ(header_value(signed_request->headers, "x-amz-security-token"), "token/with+chars");
  EXPECT_EQ(header_value(signed_request->headers, "x-amz-content-sha256"), "UNSIGNED-PAYLOAD");
  EXPECT_NE(signed_request->canonical_request.find("x-amz-security-token:token/with+chars\n"),
            std::string::npos);
  EXPECT_NE(header_value(signed_request->headers, "Authorization")
                .find("/20130524/eu-west-1/s3/aws4_request,SignedHeaders=host;x-amz-content-"
                      "sha256;x-amz-date;x-amz-security-token,"),
            std::string::npos);
  // Another token changes the signature.
  credentials.session_token = "other";
  Result<SigV4Result> other = sign_v4(request, credentials, "eu-west-1", "s3", kExampleTime);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->signature, signed_request->signature);
}

TEST(AwsSignerTest, V4RefusesMissingCredentialsWithoutLeakingSecrets) {
  Credentials credentials;
  credentials.secret_access_key = "SECRETSECRET";
  Result<SigV4Result> signed_request =
      sign_v4(SignableRequest{}, credentials, "us-east-1", "s3", kExampleTime);
  ASSERT_FALSE(signed_request.ok());
  EXPECT_EQ(signed_request.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(signed_request.status().message().find("SECRETSECRET"), std::string::npos);
  EXPECT_FALSE(sign_v4(SignableRequest{}, example_credentials(), "", "s3", kExampleTime).ok());
}

// The examples of "Signing and Authenticating REST Requests" (Signature Version 2).
TEST(AwsSignerTest, V2PublishedExamples) {
  const std::string secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
  // Object GET.
  std::string to_sign = v2_string_to_sign("GET", "", "", "Tue, 27 Mar 2007 19:36:42 +0000", {},
                                          "/johnsmith/photos/puppy.jpg", {});
  EXPECT_EQ(to_sign, "GET\n\n\nTue, 27 Mar 2007 19:36:42 +0000\n/johnsmith/photos/puppy.jpg");
  EXPECT_EQ(*v2_signature(secret, to_sign), "bWq2s1WEIj+Ydj0vQ697zp+IXMU=");
  // Object PUT with a content type.
  to_sign = v2_string_to_sign("PUT", "", "image/jpeg", "Tue, 27 Mar 2007 21:15:45 +0000", {},
                              "/johnsmith/photos/puppy.jpg", {});
  EXPECT_EQ(*v2_signature(secret, to_sign), "MyyxeRY7whkBe+bq8fHCL/2kKUg=");
  // List: prefix, max-keys and marker are not part of the resource.
  to_sign = v2_string_to_sign("GET", "", "", "Tue, 27 Mar 2007 19:42:41 +0000", {}, "/johnsmith/",
                              {{"prefix", "photos"}, {"max-keys", "50"}, {"marker", "puppy"}});
  EXPECT_EQ(to_sign, "GET\n\n\nTue, 27 Mar 2007 19:42:41 +0000\n/johnsmith/");
  EXPECT_EQ(*v2_signature(secret, to_sign), "htDYFYduRNen8P9ZfE/s9SuKy0U=");
  // Fetch: the acl sub-resource is.
  to_sign = v2_string_to_sign("GET", "", "", "Tue, 27 Mar 2007 19:44:46 +0000", {}, "/johnsmith/",
                              {{"acl", ""}});
  EXPECT_EQ(to_sign, "GET\n\n\nTue, 27 Mar 2007 19:44:46 +0000\n/johnsmith/?acl");
  EXPECT_EQ(*v2_signature(secret, to_sign), "c2WLPFtWHVgbEmeEG93a4cG37dM=");
}

TEST(AwsSignerTest, V2SubresourcesAndAmzHeaders) {
  EXPECT_TRUE(is_v2_subresource("acl"));
  EXPECT_TRUE(is_v2_subresource("versionId"));
  EXPECT_TRUE(is_v2_subresource("response-content-type"));
  EXPECT_FALSE(is_v2_subresource("list-type"));
  EXPECT_FALSE(is_v2_subresource("continuation-token"));
  EXPECT_FALSE(is_v2_subresource("prefix"));
  EXPECT_EQ(
      v2_string_to_sign("GET", "", "", "", {{"X-Amz-Meta-B", "two  spaces"}, {"x-amz-date", "D"}},
                        "/b/k", {{"versionId", "3"}, {"list-type", "2"}, {"acl", ""}}),
      "GET\n\n\n\nx-amz-date:D\nx-amz-meta-b:two spaces\n/b/k?acl&versionId=3");
}

TEST(AwsSignerTest, SignV2UsesXAmzDateAndAnEmptyDateLine) {
  Credentials credentials;
  credentials.access_key_id = "S3RVER";
  credentials.secret_access_key = "S3RVER";
  Result<HeaderList> headers =
      sign_v2("GET", "/bucket/dir/a%20b", {{"list-type", "2"}}, credentials, kExampleTime);
  ASSERT_TRUE(headers.ok());
  EXPECT_EQ(header_value(*headers, "x-amz-date"), "Fri, 24 May 2013 00:00:00 GMT");
  const std::string expected_to_sign =
      "GET\n\n\n\nx-amz-date:Fri, 24 May 2013 00:00:00 GMT\n/bucket/dir/a%20b";
  EXPECT_EQ(header_value(*headers, "Authorization"),
            "AWS S3RVER:" + *v2_signature("S3RVER", expected_to_sign));
  EXPECT_EQ(header_value(*headers, "x-amz-security-token"), "");

  credentials.session_token = "TOKEN";
  headers = sign_v2("GET", "/bucket", {}, credentials, kExampleTime);
  ASSERT_TRUE(headers.ok());
  EXPECT_EQ(header_value(*headers, "x-amz-security-token"), "TOKEN");
  EXPECT_EQ(header_value(*headers, "Authorization"),
            "AWS S3RVER:" + *v2_signature("S3RVER",
                                          "GET\n\n\n\nx-amz-date:Fri, 24 May 2013 00:00:00 GMT\n"
                                          "x-amz-security-token:TOKEN\n/bucket"));
  EXPECT_FALSE(sign_v2("GET", "/b", {}, Credentials{}, kExampleTime).ok());
}

// A PUT (an uploaded index sidecar) is signed with empty Content-MD5 and Content-Type lines,
// since neither header is sent.
TEST(AwsSignerTest, SignV2Put) {
  Credentials credentials;
  credentials.access_key_id = "S3RVER";
  credentials.secret_access_key = "S3RVER";
  Result<HeaderList> headers =
      sign_v2("PUT", "/bucket/img/x.manifest.xml.imgfs-index", {}, credentials, kExampleTime);
  ASSERT_TRUE(headers.ok());
  EXPECT_EQ(header_value(*headers, "Authorization"),
            "AWS S3RVER:" + *v2_signature("S3RVER",
                                          "PUT\n\n\n\nx-amz-date:Fri, 24 May 2013 00:00:00 GMT\n"
                                          "/bucket/img/x.manifest.xml.imgfs-index"));
  Result<HeaderList> get =
      sign_v2("GET", "/bucket/img/x.manifest.xml.imgfs-index", {}, credentials, kExampleTime);
  ASSERT_TRUE(get.ok());
  EXPECT_NE(header_value(*get, "Authorization"), header_value(*headers, "Authorization"));
}

}  // namespace
}  // namespace imgfs::remote
