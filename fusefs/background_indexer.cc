#include "fusefs/background_indexer.h"

#include <algorithm>

namespace imgfs::fusefs {

namespace {
// How far the frontier moves per step: small enough that a stop request is seen soon.
constexpr uint64_t kStepBytes = 16ull << 20;
}  // namespace

BackgroundIndexer::~BackgroundIndexer() {
  std::thread worker;
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    worker = std::move(worker_);
  }
  cv_.notify_all();
  if (worker.joinable()) worker.join();
}

const char* BackgroundIndexer::state_name(State state) {
  switch (state) {
    case State::kNone: return "none";
    case State::kQueued: return "queued";
    case State::kRunning: return "running";
    case State::kDone: return "done";
    case State::kFailed: return "failed";
  }
  return "none";
}

void BackgroundIndexer::request(std::shared_ptr<const BlockSource> owner,
                                const formats::GzipSource* gzip, std::string name) {
  if (gzip == nullptr) return;
  {
    std::lock_guard lock(mu_);
    if (stopping_ || states_.count(gzip) != 0) return;
    if (gzip->fully_indexed()) {
      states_[gzip] = State::kDone;
      return;
    }
    states_[gzip] = State::kQueued;
    queue_.push_back(Job{std::move(owner), gzip, std::move(name)});
    if (!worker_.joinable()) worker_ = std::thread([this] { run(); });
  }
  cv_.notify_all();
}

BackgroundIndexer::State BackgroundIndexer::state(const formats::GzipSource* gzip) const {
  std::lock_guard lock(mu_);
  auto it = states_.find(gzip);
  return it == states_.end() ? State::kNone : it->second;
}

void BackgroundIndexer::run() {
  for (;;) {
    Job job;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      states_[job.gzip] = State::kRunning;
    }
    Status s = index(job);
    if (s.ok() && !job.gzip->fully_indexed()) return;  // stopped
    if (s.ok()) {
      log_.info("indexed " + job.name + " to its end (" +
                std::to_string(job.gzip->checkpoint_count()) + " checkpoints)");
      on_indexed_();  // before kDone: "done" means the index is saved too
    } else {
      log_.error("background indexing of " + job.name + ": " + s.to_string());
    }
    std::lock_guard lock(mu_);
    states_[job.gzip] = s.ok() ? State::kDone : State::kFailed;
  }
}

Status BackgroundIndexer::index(const Job& job) const {
  const formats::GzipSource& gzip = *job.gzip;
  const uint64_t size = gzip.size();
  std::byte one{};
  uint64_t position = gzip.inflated_bytes();
  while (position < size) {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return Status::OK();
    }
    // Reading one byte far ahead moves the frontier there; the last byte ends the stream
    // and runs its checks.
    const uint64_t target = std::min(size - 1, position + kStepBytes);
    if (Status s = gzip.read_at(target, std::span(&one, 1)); !s.ok()) return s;
    position = target + 1;
  }
  return Status::OK();
}

}  // namespace imgfs::fusefs
