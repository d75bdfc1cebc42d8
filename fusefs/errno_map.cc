#include "fusefs/errno_map.h"

#include <cerrno>

namespace imgfs::fusefs {

int errno_for_read(const Status& status) { return status.ok() ? 0 : EIO; }

}  // namespace imgfs::fusefs
