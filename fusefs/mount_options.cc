#include "fusefs/mount_options.h"

#include <unistd.h>

#include <cstdlib>

#include "formats/checked_math.h"

namespace imgfs::fusefs {

Result<uint64_t> parse_byte_size(const std::string& text) {
  if (text.empty()) return Status::InvalidArgument("empty size");
  size_t digits = 0;
  uint64_t value = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') {
    auto next = checked_mul(value, 10);
    if (next) next = checked_add(*next, static_cast<uint64_t>(text[digits] - '0'));
    if (!next) return Status::InvalidArgument("size '" + text + "' is too large");
    value = *next;
    ++digits;
  }
  if (digits == 0) return Status::InvalidArgument("size '" + text + "' does not start with digits");
  std::string suffix = text.substr(digits);
  if (suffix.size() == 2 && (suffix[1] == 'B' || suffix[1] == 'b')) suffix.pop_back();
  uint64_t unit = 1;
  if (suffix.empty()) {
    unit = 1;
  } else if (suffix.size() == 1) {
    switch (suffix[0]) {
      case 'K': case 'k': unit = 1ull << 10; break;
      case 'M': case 'm': unit = 1ull << 20; break;
      case 'G': case 'g': unit = 1ull << 30; break;
      case 'T': case 't': unit = 1ull << 40; break;
      default: return Status::InvalidArgument("size '" + text + "' has an unknown suffix");
    }
  } else {
    return Status::InvalidArgument("size '" + text + "' has an unknown suffix");
  }
  auto bytes = checked_mul(value, unit);
  if (!bytes) return Status::InvalidArgument("size '" + text + "' is too large");
  return *bytes;
}

std::string default_cache_dir() {
  if (geteuid() == 0) return "/var/cache/imgfs";
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg == '/') {
    return std::string(xdg) + "/imgfs";
  }
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    return std::string(home) + "/.cache/imgfs";
  }
  return "/tmp/imgfs-cache-" + std::to_string(geteuid());
}

Result<std::optional<S3Location>> parse_s3_location(const std::string& source) {
  constexpr std::string_view kScheme = "s3://";
  if (source.rfind(kScheme, 0) != 0) return std::optional<S3Location>();
  const std::string rest = source.substr(kScheme.size());
  const size_t slash = rest.find('/');
  S3Location location;
  location.bucket = rest.substr(0, slash);
  if (location.bucket.empty()) return Status::InvalidArgument("s3:// needs a bucket: " + source);
  if (slash != std::string::npos) {
    location.prefix = rest.substr(slash + 1);
    while (!location.prefix.empty() && location.prefix.back() == '/') location.prefix.pop_back();
    if (!location.prefix.empty()) location.prefix += '/';
  }
  return std::optional<S3Location>(location);
}

Result<MountOptions> parse_mount_options(const std::vector<std::string>& args) {
  // Read-ahead gets what the part and span shares leave; a smaller rest would starve it.
  constexpr uint64_t kMinReadAheadMemory = 4u << 20;
  constexpr uint64_t kMinMemoryLimit = 8u << 20;
  MountOptions options;
  options.cache_dir = default_cache_dir();
  std::optional<uint64_t> part_memory;  // unset: a share of --memory-limit
  std::optional<uint64_t> span_memory;
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    auto value = [&]() -> Result<std::string> {
      if (i + 1 >= args.size()) return Status::InvalidArgument(arg + " needs a value");
      return args[++i];
    };
    auto size_value = [&](auto& field) -> Status {
      auto text = value();
      if (!text.ok()) return text.status();
      auto bytes = parse_byte_size(*text);
      if (!bytes.ok()) return bytes.status().with_context(arg);
      field = *bytes;
      return Status::OK();
    };
    Status status;
    if (arg == "--key") {
      auto text = value();
      if (!text.ok()) return text.status();
      options.key_paths.push_back(*text);
    } else if (arg == "--verify-cert") {
      auto text = value();
      if (!text.ok()) return text.status();
      options.verify_cert = *text;
    } else if (arg == "--cache-dir") {
      auto text = value();
      if (!text.ok()) return text.status();
      options.cache_dir = *text;
    } else if (arg == "--log-file") {
      auto text = value();
      if (!text.ok()) return text.status();
      options.log_file = *text;
    } else if (arg == "--publish-index") {
      auto text = value();
      if (!text.ok()) return text.status();
      options.publish_index_key = *text;
    } else if (arg == "--index-key") {
      auto text = value();
      if (!text.ok()) return text.status();
      options.index_cert_paths.push_back(*text);
    } else if (arg == "--memory-limit") {
      status = size_value(options.memory_limit_bytes);
      if (status.ok() && options.memory_limit_bytes < kMinMemoryLimit) {
        status = Status::InvalidArgument("--memory-limit must be at least 8M");
      }
    } else if (arg == "--prefetch-window") {
      status = size_value(options.prefetch_window_bytes);
      if (status.ok() && (options.prefetch_window_bytes < (1u << 20) ||
                          options.prefetch_window_bytes > (1ull << 30))) {
        status = Status::InvalidArgument("--prefetch-window must be from 1M to 1G");
      }
    } else if (arg == "--no-prefetch") {
      options.prefetch = false;
    } else if (arg == "--no-background-index") {
      options.background_index = false;
    } else if (arg == "--cache-size") {
      status = size_value(options.cache_size_bytes);
    } else if (arg == "--part-memory") {
      uint64_t bytes = 0;
      status = size_value(bytes);
      part_memory = bytes;
    } else if (arg == "--span-memory") {
      uint64_t bytes = 0;
      status = size_value(bytes);
      span_memory = bytes;
    } else if (arg == "--cache-block") {
      uint64_t bytes = 0;
      status = size_value(bytes);
      if (status.ok() && (bytes < 4096 || bytes > (64u << 20) || (bytes & (bytes - 1)) != 0)) {
        status = Status::InvalidArgument("--cache-block must be a power of two from 4K to 64M");
      }
      options.cache_block_bytes = static_cast<uint32_t>(bytes);
    } else if (arg == "--endpoint") {
      auto text = value();
      if (!text.ok()) return text.status();
      options.endpoints.push_back(*text);
    } else if (arg == "--region" || arg == "--credentials" || arg == "--profile" ||
               arg == "--ca-file") {
      auto text = value();
      if (!text.ok()) return text.status();
      if (arg == "--region") options.region = *text;
      if (arg == "--credentials") options.credentials_file = *text;
      if (arg == "--profile") options.profile = *text;
      if (arg == "--ca-file") options.ca_file = *text;
    } else if (arg == "--readahead") {
      uint64_t bytes = 0;
      status = size_value(bytes);
      if (status.ok() && (bytes < 4096 || bytes > (256u << 20))) {
        status = Status::InvalidArgument("--readahead must be from 4K to 256M");
      }
      options.readahead_kib = static_cast<uint32_t>(bytes >> 10);
    } else if (arg == "--list-ttl" || arg == "--timeout" || arg == "--retries" ||
               arg == "--max-connections") {
      auto text = value();
      if (!text.ok()) return text.status();
      auto number = parse_byte_size(*text);
      if (!number.ok() || *number > 86400 || (arg == "--max-connections" && *number == 0) ||
          (arg == "--timeout" && *number == 0)) {
        return Status::InvalidArgument(arg + " takes a whole number (at most 86400), not '" +
                                       *text + "'");
      }
      const auto n = static_cast<uint32_t>(*number);
      if (arg == "--list-ttl") options.list_ttl_seconds = n;
      if (arg == "--timeout") options.timeout_seconds = n;
      if (arg == "--retries") options.retries = static_cast<int>(n);
      if (arg == "--max-connections") options.max_connections = static_cast<int>(n);
    } else if (arg == "--sigv2") {
      options.sigv2 = true;
    } else if (arg == "--no-sign") {
      options.no_sign = true;
    } else if (arg == "--path-style") {
      options.path_style = true;
    } else if (arg == "--virtual-host") {
      options.path_style = false;
    } else if (arg == "--insecure") {
      options.insecure = true;
    } else if (arg == "--foreground" || arg == "-f") {
      options.foreground = true;
    } else if (arg == "--allow-other") {
      options.allow_other = true;
    } else if (arg == "--debug") {
      options.debug = true;
    } else if (!arg.empty() && arg[0] == '-') {
      return Status::InvalidArgument("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
    if (!status.ok()) return status;
  }
  if (positional.size() != 2) {
    return Status::InvalidArgument("usage: imgfs mount SOURCE MOUNTPOINT [options]");
  }
  options.source = positional[0];
  options.mountpoint = positional[1];
  options.part_memory_bytes = part_memory.value_or(options.memory_limit_bytes / 4);
  options.span_memory_bytes = span_memory.value_or(options.memory_limit_bytes / 16);
  if (options.part_memory_bytes > options.memory_limit_bytes ||
      options.span_memory_bytes > options.memory_limit_bytes - options.part_memory_bytes ||
      options.memory_limit_bytes - options.part_memory_bytes - options.span_memory_bytes <
          kMinReadAheadMemory) {
    return Status::InvalidArgument(
        "--part-memory and --span-memory must leave at least 4M of --memory-limit for read-ahead");
  }
  if (options.sigv2 && options.no_sign) {
    return Status::InvalidArgument("--sigv2 and --no-sign exclude each other");
  }
  auto s3 = parse_s3_location(options.source);
  if (!s3.ok()) return s3.status();
  return options;
}

}  // namespace imgfs::fusefs
