// File helpers for tests that make fixtures with outside tools (qemu-img, qemu-io).
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <vector>

namespace imgfs::testing {

// The whole file (a failed read is a test failure).
std::vector<std::byte> read_file(const std::filesystem::path& path);

// Runs a shell command in `dir`, quietly; true on exit status 0.
bool run_in(const std::filesystem::path& dir, const std::string& command);

}  // namespace imgfs::testing
