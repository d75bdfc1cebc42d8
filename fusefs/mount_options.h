// mount_options: the command line of `imgfs mount`, parsed into a plain struct (no I/O).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "formats/status.h"

namespace imgfs::fusefs {

struct MountOptions {
  std::string source;      // a directory path, file:///path or s3://BUCKET[/PREFIX]
  std::string mountpoint;
  uint32_t list_ttl_seconds = 60;           // --list-ttl: how long a listing is kept
  uint32_t readahead_kib = 4096;            // --readahead: the mount's page-cache readahead

  // S3 (for s3:// sources).
  std::vector<std::string> endpoints;       // --endpoint, repeatable: failover order
  std::optional<std::string> region;        // --region
  bool sigv2 = false;                       // --sigv2
  bool no_sign = false;                     // --no-sign
  std::optional<bool> path_style;           // --path-style / --virtual-host
  std::optional<std::string> credentials_file;  // --credentials
  std::optional<std::string> profile;       // --profile
  std::optional<std::string> ca_file;       // --ca-file
  bool insecure = false;                    // --insecure
  int max_connections = 8;                  // --max-connections
  int retries = 5;                          // --retries
  uint32_t timeout_seconds = 30;            // --timeout: per request

  std::vector<std::string> key_paths;       // --key, repeatable
  std::optional<std::string> verify_cert;   // --verify-cert
  std::string cache_dir;                    // --cache-dir
  uint64_t cache_size_bytes = 1ull << 30;   // --cache-size
  // --memory-limit bounds the decoded data a mount keeps in memory: verified part ciphertext
  // (--part-memory, default a quarter of it), inflated gzip spans (--span-memory, default a
  // sixteenth) and read-ahead buffers (the rest, at least 4 MiB).
  uint64_t part_memory_bytes = 64ull << 20;  // --part-memory
  uint64_t span_memory_bytes = 16ull << 20;  // --span-memory
  uint32_t cache_block_bytes = 256u << 10;  // --cache-block
  uint64_t memory_limit_bytes = 256ull << 20;  // --memory-limit
  uint64_t prefetch_window_bytes = 16ull << 20;  // --prefetch-window: largest read-ahead
  bool prefetch = true;                     // --no-prefetch turns read-ahead off
  bool background_index = true;             // --no-background-index
  std::optional<std::string> publish_index_key;  // --publish-index: signs uploaded indexes
  std::vector<std::string> index_cert_paths;     // --index-key, repeatable: trusted signers
  std::optional<std::string> log_file;      // --log-file
  bool foreground = false;                  // --foreground / -f
  bool allow_other = false;                 // --allow-other
  bool debug = false;                       // --debug: libfuse request trace
};

// "4096", "64K", "2M", "1G", "1T" (powers of 1024) -> bytes. InvalidArgument on anything else.
Result<uint64_t> parse_byte_size(const std::string& text);

// Parses the arguments after `imgfs mount`. InvalidArgument names the bad option.
Result<MountOptions> parse_mount_options(const std::vector<std::string>& args);

// s3://BUCKET[/PREFIX] -> {bucket, prefix ending in '/' or ""}; nullopt for other sources.
struct S3Location {
  std::string bucket;
  std::string prefix;
};
Result<std::optional<S3Location>> parse_s3_location(const std::string& source);

// The cache directory used when --cache-dir is not given: /var/cache/imgfs for root,
// else $XDG_CACHE_HOME/imgfs or ~/.cache/imgfs.
std::string default_cache_dir();

}  // namespace imgfs::fusefs
