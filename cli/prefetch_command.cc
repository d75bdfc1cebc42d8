#include "cli/prefetch_command.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

namespace imgfs::cli {

namespace {

namespace fs = std::filesystem;

constexpr size_t kReadChunkBytes = 1 << 20;
constexpr auto kPollInterval = std::chrono::milliseconds(250);

// The mount's root above `file`: the nearest folder holding .imgfs/stats.json.
std::optional<fs::path> mount_root_of(const fs::path& file) {
  std::error_code ec;
  for (fs::path dir = file.parent_path(); !dir.empty(); dir = dir.parent_path()) {
    if (fs::is_regular_file(dir / ".imgfs" / "stats.json", ec)) return dir;
    if (dir == dir.root_path()) break;
  }
  return std::nullopt;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The JSON object stats.json keeps for the image at `relative` (flat: no nested objects), or
// "" when there is none.
std::string image_stats(const std::string& stats, const std::string& relative) {
  const std::string key = "\"" + relative + "\":{";
  const size_t start = stats.find(key);
  if (start == std::string::npos) return "";
  bool in_string = false;
  for (size_t i = start + key.size(); i < stats.size(); ++i) {
    if (in_string && stats[i] == '\\') {
      ++i;
    } else if (stats[i] == '"') {
      in_string = !in_string;
    } else if (!in_string && stats[i] == '}') {
      return stats.substr(start, i - start);
    }
  }
  return "";
}

std::string string_field(const std::string& object, const std::string& name) {
  const std::string key = "\"" + name + "\":\"";
  const size_t start = object.find(key);
  if (start == std::string::npos) return "";
  const size_t end = object.find('"', start + key.size());
  return object.substr(start + key.size(), end - start - key.size());
}

std::string number_field(const std::string& object, const std::string& name) {
  const std::string key = "\"" + name + "\":";
  const size_t start = object.find(key);
  if (start == std::string::npos) return "";
  size_t end = start + key.size();
  while (end < object.size() && std::isdigit(static_cast<unsigned char>(object[end]))) ++end;
  return object.substr(start + key.size(), end - start - key.size());
}

// Reads `fd` from start to end; false (with errno's text in `error`) on a failed read.
bool read_through(int fd, const std::string& name, uint64_t size, bool quiet,
                  std::string& error) {
  std::vector<char> buffer(kReadChunkBytes);
  uint64_t done = 0;
  int shown = -1;
  for (;;) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      error = std::strerror(errno);
      return false;
    }
    if (n == 0) break;
    done += static_cast<uint64_t>(n);
    const int percent = size == 0 ? 100 : static_cast<int>(done * 100 / size);
    if (!quiet && percent != shown) {
      std::cerr << "\r" << name << ": " << percent << "% read" << std::flush;
      shown = percent;
    }
  }
  if (!quiet) std::cerr << "\n";
  return true;
}

// Prefetches one file; prints what happened. Returns an exit code.
int prefetch_one(const std::string& path, bool quiet) {
  std::error_code ec;
  const fs::path file = fs::absolute(path, ec).lexically_normal();
  const auto root = mount_root_of(file);
  if (!root) {
    std::cerr << "imgfs prefetch: " << path << " is not inside an imgfs mount\n";
    return 1;
  }
  const std::string relative = file.lexically_relative(*root).string();
  // Opening the image opens its chain, which queues the mount's background pass.
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    std::cerr << "imgfs prefetch: " << path << ": " << std::strerror(errno) << "\n";
    return 1;
  }
  const fs::path stats_path = *root / ".imgfs" / "stats.json";
  std::string stats = image_stats(read_text(stats_path), relative);
  int code = 0;
  if (string_field(stats, "background_index").empty()) {
    std::string error;
    const uint64_t size = fs::file_size(file, ec);
    if (!read_through(fd, relative, ec ? 0 : size, quiet, error)) {
      std::cerr << "imgfs prefetch: " << path << ": " << error << "\n";
      code = 1;
    }
  } else {
    std::string shown;
    for (;;) {
      const std::string state = string_field(stats, "background_index");
      const std::string percent = number_field(stats, "indexed_percent");
      if (!quiet && percent != shown) {
        std::cerr << "\r" << relative << ": " << percent << "% indexed" << std::flush;
        shown = percent;
      }
      if (state == "done" || state == "failed") {
        if (!quiet) std::cerr << "\n";
        if (state == "failed") {
          std::cerr << "imgfs prefetch: " << path << ": indexing failed"
                    << (string_field(stats, "error").empty()
                            ? std::string(" (see the mount's log)")
                            : ": " + string_field(stats, "error"))
                    << "\n";
          code = 1;
        }
        break;
      }
      std::this_thread::sleep_for(kPollInterval);
      stats = image_stats(read_text(stats_path), relative);
    }
  }
  ::close(fd);
  if (code == 0 && !quiet) std::cout << relative << ": ready\n";
  return code;
}

}  // namespace

int run_prefetch_command(const std::vector<std::string>& args) {
  bool quiet = false;
  std::vector<std::string> files;
  for (const std::string& arg : args) {
    if (arg == "--quiet" || arg == "-q") {
      quiet = true;
    } else if (!arg.empty() && arg[0] == '-') {
      std::cerr << "imgfs prefetch: unknown option " << arg << "\n";
      return 2;
    } else {
      files.push_back(arg);
    }
  }
  if (files.empty()) {
    std::cerr << "imgfs prefetch: usage: imgfs prefetch FILE... [--quiet]\n";
    return 2;
  }
  int code = 0;
  for (const std::string& file : files) code = std::max(code, prefetch_one(file, quiet));
  return code;
}

}  // namespace imgfs::cli
