// BackgroundIndexer: one thread per mount that inflates each opened bundle to its end, so its
// gzip index is complete, and the stream checked (CRC32, ISIZE, tar SHA1), before readers go
// far into it. Reads behind the pass are served from its checkpoints at once; a read ahead of
// it joins the same single frontier (GzipSource), so no work is done twice. When a pass ends,
// `on_indexed` runs (the catalog saves, and may publish, the index).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "formats/gzip_source.h"
#include "fusefs/logger.h"

namespace imgfs::fusefs {

class BackgroundIndexer {
 public:
  enum class State { kNone, kQueued, kRunning, kDone, kFailed };

  // `log` outlives the indexer. The thread starts with the first request (a mount forks into
  // the background after opening some chains, and threads do not survive a fork).
  BackgroundIndexer(Logger& log, std::function<void()> on_indexed)
      : log_(log), on_indexed_(std::move(on_indexed)) {}
  // Stops the pass in progress at its next step and joins the thread.
  ~BackgroundIndexer();

  BackgroundIndexer(const BackgroundIndexer&) = delete;
  BackgroundIndexer& operator=(const BackgroundIndexer&) = delete;

  // Queues one pass over `gzip`, which `owner` keeps alive; a gzip already queued, indexed or
  // failed is not queued again. `name` is for the log. Thread-safe.
  void request(std::shared_ptr<const BlockSource> owner, const formats::GzipSource* gzip,
               std::string name);

  // Where the pass over `gzip` stands. Thread-safe.
  State state(const formats::GzipSource* gzip) const;

  static const char* state_name(State state);

 private:
  struct Job {
    std::shared_ptr<const BlockSource> owner;
    const formats::GzipSource* gzip;
    std::string name;
  };

  void run();
  // Drives `job` to the end of its stream in steps, stopping early when stopping_ is set.
  Status index(const Job& job) const;

  Logger& log_;
  const std::function<void()> on_indexed_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;                                // GUARDED_BY(mu_)
  std::deque<Job> queue_;                                // GUARDED_BY(mu_)
  std::map<const formats::GzipSource*, State> states_;   // GUARDED_BY(mu_)
  std::thread worker_;                                   // GUARDED_BY(mu_)
};

}  // namespace imgfs::fusefs
