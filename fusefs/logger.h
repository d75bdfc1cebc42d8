// Logger: timestamped log lines to stderr or a log file, with duplicate suppression so a
// failing image logs its cause once rather than once per read.
#pragma once

#include <cstdio>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_set>

namespace imgfs::fusefs {

class Logger {
 public:
  // Logs to stderr until open_file() succeeds.
  Logger() = default;
  ~Logger();
  Logger(const Logger&) = delete;
  Logger& operator=(const Logger&) = delete;

  // Appends to `path` from now on (created 0600). Returns false and keeps stderr on failure.
  bool open_file(const std::string& path);

  // Sends lines to syslog from now on, unless a log file is open (for a daemon without one).
  void use_syslog();

  // Thread-safe.
  void info(std::string_view line);
  void error(std::string_view line);
  // Logs `line` only the first time this exact line is seen (bounded memory).
  void error_once(std::string_view line);

 private:
  void write(std::string_view level, std::string_view line);

  std::mutex mutex_;
  FILE* file_ = nullptr;  // GUARDED_BY(mutex_); null means stderr or syslog
  bool syslog_ = false;   // GUARDED_BY(mutex_)
  std::unordered_set<std::string> seen_;  // GUARDED_BY(mutex_)
};

}  // namespace imgfs::fusefs
