// seek_map FILE: prints the data runs of FILE as "START LENGTH" lines, found only with
// lseek(SEEK_DATA) and lseek(SEEK_HOLE), never by reading. The integration tests compare it
// with `qemu-img map` of the same image.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: seek_map FILE\n");
    return 2;
  }
  const int fd = open(argv[1], O_RDONLY);
  if (fd < 0) {
    std::fprintf(stderr, "seek_map: %s: %s\n", argv[1], std::strerror(errno));
    return 1;
  }
  off_t position = 0;
  for (;;) {
    const off_t data = lseek(fd, position, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;
      std::fprintf(stderr, "seek_map: SEEK_DATA at %lld: %s\n", static_cast<long long>(position),
                   std::strerror(errno));
      return 1;
    }
    const off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole <= data) {
      std::fprintf(stderr, "seek_map: SEEK_HOLE at %lld: %s\n", static_cast<long long>(data),
                   hole < 0 ? std::strerror(errno) : "no progress");
      return 1;
    }
    std::printf("%lld %lld\n", static_cast<long long>(data), static_cast<long long>(hole - data));
    position = hole;
  }
  close(fd);
  return 0;
}
