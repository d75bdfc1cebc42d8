#include "fusefs/mount_options.h"

#include <gtest/gtest.h>

namespace imgfs::fusefs {
namespace {

TEST(ParseByteSize, PlainAndSuffixes) {
  EXPECT_EQ(*parse_byte_size("4096"), 4096u);
  EXPECT_EQ(*parse_byte_size("64K"), 64u << 10);
  EXPECT_EQ(*parse_byte_size("2M"), 2u << 20);
  EXPECT_EQ(*parse_byte_size("2G"), 2ull << 30);
  EXPECT_EQ(*parse_byte_size("1T"), 1ull << 40);
  EXPECT_EQ(*parse_byte_size("3GB"), 3ull << 30);
  EXPECT_EQ(*parse_byte_size("5k"), 5u << 10);
}

TEST(ParseByteSize, RejectsBadInput) {
  for (const char* bad : {"", "G", "-1", "12X", "1.5G", "99999999999999999999", "16777216T"}) {
    EXPECT_FALSE(parse_byte_size(bad).ok()) << bad;
  }
}

TEST(ParseMountOptions, FullCommandLine) {
  auto options = parse_mount_options({"./bucket", "/mnt/images", "--key", "a.pem", "--key",
                                      "b.pem", "--cache-dir", "/var/cache/x", "--cache-size",
                                      "2G", "--foreground", "--verify-cert", "c.pem",
                                      "--log-file", "/tmp/l"});
  ASSERT_TRUE(options.ok()) << options.status().to_string();
  EXPECT_EQ(options->source, "./bucket");
  EXPECT_EQ(options->mountpoint, "/mnt/images");
  EXPECT_EQ(options->key_paths, (std::vector<std::string>{"a.pem", "b.pem"}));
  EXPECT_EQ(options->cache_dir, "/var/cache/x");
  EXPECT_EQ(options->cache_size_bytes, 2ull << 30);
  EXPECT_TRUE(options->foreground);
  EXPECT_EQ(*options->verify_cert, "c.pem");
  EXPECT_EQ(*options->log_file, "/tmp/l");
}

TEST(ParseMountOptions, Defaults) {
  auto options = parse_mount_options({"src", "mnt"});
  ASSERT_TRUE(options.ok());
  EXPECT_EQ(options->cache_size_bytes, 1ull << 30);
  EXPECT_EQ(options->cache_block_bytes, 256u << 10);
  EXPECT_FALSE(options->foreground);
  EXPECT_FALSE(options->cache_dir.empty());
  EXPECT_EQ(options->memory_limit_bytes, 256ull << 20);
  EXPECT_EQ(options->part_memory_bytes, 64ull << 20);
  EXPECT_EQ(options->span_memory_bytes, 16ull << 20);
  EXPECT_EQ(options->prefetch_window_bytes, 16ull << 20);
  EXPECT_TRUE(options->prefetch);
  EXPECT_TRUE(options->background_index);
  EXPECT_FALSE(options->publish_index_key);
  EXPECT_TRUE(options->index_cert_paths.empty());
}

TEST(ParseMountOptions, SpeedAndIndexOptions) {
  auto options = parse_mount_options(
      {"src", "mnt", "--memory-limit", "64M", "--prefetch-window", "32M", "--no-prefetch",
       "--no-background-index", "--publish-index", "signer.pem", "--index-key", "a.pem",
       "--index-key", "b.pem"});
  ASSERT_TRUE(options.ok()) << options.status().to_string();
  EXPECT_EQ(options->memory_limit_bytes, 64ull << 20);
  EXPECT_EQ(options->prefetch_window_bytes, 32ull << 20);
  EXPECT_FALSE(options->prefetch);
  EXPECT_FALSE(options->background_index);
  EXPECT_EQ(*options->publish_index_key, "signer.pem");
  EXPECT_EQ(options->index_cert_paths, (std::vector<std::string>{"a.pem", "b.pem"}));
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "--memory-limit", "1M"}).ok());
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "--prefetch-window", "2G"}).ok());
}

// --memory-limit bounds parts, spans and read-ahead together: the part and span shares default
// to a quarter and a sixteenth of it and must leave 4M for read-ahead.
TEST(ParseMountOptions, MemoryShares) {
  auto scaled = parse_mount_options({"src", "mnt", "--memory-limit", "64M"});
  ASSERT_TRUE(scaled.ok());
  EXPECT_EQ(scaled->part_memory_bytes, 16ull << 20);
  EXPECT_EQ(scaled->span_memory_bytes, 4ull << 20);
  auto set = parse_mount_options(
      {"src", "mnt", "--part-memory", "100M", "--span-memory", "10M", "--memory-limit", "1G"});
  ASSERT_TRUE(set.ok());
  EXPECT_EQ(set->part_memory_bytes, 100ull << 20);
  EXPECT_EQ(set->span_memory_bytes, 10ull << 20);
  EXPECT_TRUE(parse_mount_options({"src", "mnt", "--part-memory", "200M", "--span-memory", "52M"})
                  .ok());
  EXPECT_FALSE(
      parse_mount_options({"src", "mnt", "--part-memory", "200M", "--span-memory", "53M"}).ok());
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "--part-memory", "300M"}).ok());
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "--memory-limit", "4M"}).ok());
}

TEST(ParseMountOptions, Errors) {
  EXPECT_FALSE(parse_mount_options({"src"}).ok());
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "extra"}).ok());
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "--key"}).ok());
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "--bogus"}).ok());
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "--cache-size", "lots"}).ok());
  EXPECT_FALSE(parse_mount_options({"src", "mnt", "--cache-block", "3000"}).ok());
}

}  // namespace
}  // namespace imgfs::fusefs
