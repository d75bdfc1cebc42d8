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

Result<MountOptions> parse_mount_options(const std::vector<std::string>& args) {
  MountOptions options;
  options.cache_dir = default_cache_dir();
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
    } else if (arg == "--cache-size") {
      status = size_value(options.cache_size_bytes);
    } else if (arg == "--part-memory") {
      status = size_value(options.part_memory_bytes);
    } else if (arg == "--cache-block") {
      uint64_t bytes = 0;
      status = size_value(bytes);
      if (status.ok() && (bytes < 4096 || bytes > (64u << 20) || (bytes & (bytes - 1)) != 0)) {
        status = Status::InvalidArgument("--cache-block must be a power of two from 4K to 64M");
      }
      options.cache_block_bytes = static_cast<uint32_t>(bytes);
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
  return options;
}

}  // namespace imgfs::fusefs
