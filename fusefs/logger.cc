#include "fusefs/logger.h"

#include <fcntl.h>
#include <syslog.h>
#include <unistd.h>

#include <ctime>

namespace imgfs::fusefs {

namespace {
constexpr size_t kMaxRememberedLines = 10000;
}  // namespace

Logger::~Logger() {
  if (file_ != nullptr) std::fclose(file_);
}

bool Logger::open_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  FILE* file = fdopen(fd, "a");
  if (file == nullptr) {
    ::close(fd);
    return false;
  }
  std::lock_guard lock(mutex_);
  if (file_ != nullptr) std::fclose(file_);
  file_ = file;
  return true;
}

void Logger::use_syslog() {
  std::lock_guard lock(mutex_);
  if (file_ != nullptr) return;
  openlog("imgfs", LOG_PID, LOG_DAEMON);
  syslog_ = true;
}

void Logger::info(std::string_view line) { write("info", line); }
void Logger::error(std::string_view line) { write("error", line); }

void Logger::error_once(std::string_view line) {
  {
    std::lock_guard lock(mutex_);
    if (seen_.size() >= kMaxRememberedLines) seen_.clear();
    if (!seen_.emplace(line).second) return;
  }
  write("error", line);
}

void Logger::write(std::string_view level, std::string_view line) {
  char stamp[32];
  const std::time_t now = std::time(nullptr);
  std::tm tm_utc;
  gmtime_r(&now, &tm_utc);
  std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm_utc);
  std::lock_guard lock(mutex_);
  if (syslog_) {
    syslog(level == "error" ? LOG_ERR : LOG_INFO, "%.*s", static_cast<int>(line.size()),
           line.data());
    return;
  }
  FILE* out = file_ != nullptr ? file_ : stderr;
  std::fprintf(out, "%s imgfs %.*s: %.*s\n", stamp, static_cast<int>(level.size()), level.data(),
               static_cast<int>(line.size()), line.data());
  std::fflush(out);
}

}  // namespace imgfs::fusefs
