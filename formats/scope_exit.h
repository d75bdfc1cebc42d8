// ScopeExit: runs a callable when the scope ends, so a flag set under a mutex (an in-flight
// fill, the frontier's owner) is always cleared and its waiters woken, even when a std
// container throws on the way out.
#pragma once

#include <utility>

namespace imgfs {

template <typename F>
class ScopeExit {
 public:
  explicit ScopeExit(F f) : f_(std::move(f)) {}
  ScopeExit(const ScopeExit&) = delete;
  ScopeExit& operator=(const ScopeExit&) = delete;
  ~ScopeExit() { f_(); }

 private:
  F f_;
};

}  // namespace imgfs
