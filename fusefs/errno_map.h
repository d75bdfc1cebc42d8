// The only place a Status becomes an errno (mountpoint's fs/error.rs).
#pragma once

#include "formats/status.h"

namespace imgfs::fusefs {

// For the read path (open's chain and read): every failure is EIO, whatever its code, because
// a reader can do nothing else with it; the log line carries the cause.
int errno_for_read(const Status& status);

}  // namespace imgfs::fusefs
