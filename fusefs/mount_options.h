// mount_options: the command line of `imgfs mount`, parsed into a plain struct (no I/O).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "formats/status.h"

namespace imgfs::fusefs {

struct MountOptions {
  std::string source;      // a directory path or file:///path
  std::string mountpoint;
  std::vector<std::string> key_paths;       // --key, repeatable
  std::optional<std::string> verify_cert;   // --verify-cert
  std::string cache_dir;                    // --cache-dir
  uint64_t cache_size_bytes = 1ull << 30;   // --cache-size
  uint64_t part_memory_bytes = 64ull << 20; // --part-memory: verified ciphertext kept in memory
  uint32_t cache_block_bytes = 256u << 10;  // --cache-block
  std::optional<std::string> log_file;      // --log-file
  bool foreground = false;                  // --foreground / -f
  bool allow_other = false;                 // --allow-other
  bool debug = false;                       // --debug: libfuse request trace
};

// "4096", "64K", "2M", "1G", "1T" (powers of 1024) -> bytes. InvalidArgument on anything else.
Result<uint64_t> parse_byte_size(const std::string& text);

// Parses the arguments after `imgfs mount`. InvalidArgument names the bad option.
Result<MountOptions> parse_mount_options(const std::vector<std::string>& args);

// The cache directory used when --cache-dir is not given: /var/cache/imgfs for root,
// else $XDG_CACHE_HOME/imgfs or ~/.cache/imgfs.
std::string default_cache_dir();

}  // namespace imgfs::fusefs
