#include "syscalls.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/time.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cstring>

namespace snapstream {

namespace {

SysResult Fail(const char* syscall) {
  SysResult r;
  r.error = errno;
  r.syscall = syscall;
  return r;
}

SysResult Ok(int64_t bytes = 0) {
  SysResult r;
  r.bytes = bytes;
  return r;
}

void ProbeDirectAlignment(int fd, OpenFacts* facts) {
  struct statx sx {};
  // statx on the fd (AT_EMPTY_PATH) so we describe exactly what we opened.
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN) != 0) {
    facts->dioReported = true;
    facts->dioMemAlign = sx.stx_dio_mem_align;
    facts->dioOffsetAlign = sx.stx_dio_offset_align;
  }
}

}  // namespace

SysResult OpenFile(const OpenRequest& req, OpenFacts* facts) {
  int flags = O_CLOEXEC | (req.write ? O_RDWR : O_RDONLY);
  if (req.create) flags |= O_CREAT;
  if (req.exclusive) flags |= O_EXCL;
  if (req.truncate) flags |= O_TRUNC;
  if (req.direct) flags |= O_DIRECT;
  int fd;
  do {
    fd = open(req.path.c_str(), flags, req.mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return Fail("open");

  struct stat st {};
  if (fstat(fd, &st) != 0) {
    SysResult r = Fail("fstat");
    close(fd);
    return r;
  }
  if (S_ISDIR(st.st_mode)) {
    close(fd);
    errno = EISDIR;
    return Fail("open");
  }
  facts->fd = fd;
  facts->isRegular = S_ISREG(st.st_mode);
  facts->isBlockDevice = S_ISBLK(st.st_mode);
  facts->size = st.st_size;
  facts->blockSize = static_cast<uint32_t>(st.st_blksize);
  int fl = fcntl(fd, F_GETFL);
  facts->directInEffect = fl >= 0 && (fl & O_DIRECT) != 0;
  ProbeDirectAlignment(fd, facts);
  if (facts->isBlockDevice) {
    int sector = 0;
    if (ioctl(fd, BLKSSZGET, &sector) == 0 && sector > 0) facts->logicalBlockSize = static_cast<uint32_t>(sector);
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) == 0) facts->size = static_cast<int64_t>(bytes);
  }
  struct statfs sfs {};
  if (fstatfs(fd, &sfs) == 0) facts->fsType = static_cast<int64_t>(sfs.f_type);
  return Ok();
}

SysResult WriteFull(int fd, const uint8_t* data, size_t length, int64_t offset) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = pwrite(fd, data + done, length - done, offset + static_cast<int64_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      SysResult r = Fail("pwrite");
      r.bytes = static_cast<int64_t>(done);
      return r;
    }
    if (n == 0) {
      // A zero-length write for a non-empty request means no progress is possible.
      errno = ENOSPC;
      SysResult r = Fail("pwrite");
      r.bytes = static_cast<int64_t>(done);
      return r;
    }
    done += static_cast<size_t>(n);
  }
  return Ok(static_cast<int64_t>(done));
}

SysResult ReadFull(int fd, uint8_t* data, size_t length, int64_t offset) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = pread(fd, data + done, length - done, offset + static_cast<int64_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      SysResult r = Fail("pread");
      r.bytes = static_cast<int64_t>(done);
      return r;
    }
    if (n == 0) break;  // end of file
    done += static_cast<size_t>(n);
  }
  return Ok(static_cast<int64_t>(done));
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14 (uapi asm-generic/mman-common.h)
#endif

SysResult PrefaultWrite(uint8_t* data, size_t length) {
  long page = sysconf(_SC_PAGESIZE);
  auto mask = static_cast<uintptr_t>(page > 0 ? page : 4096) - 1;
  auto begin = reinterpret_cast<uintptr_t>(data);
  // Whole pages only (I/O buffers start on a page boundary): a page shared
  // with other memory is left to its first access.
  uintptr_t start = (begin + mask) & ~mask;
  uintptr_t end = (begin + length) & ~mask;
  if (end <= start) return Ok(0);
  int rc;
  do {
    rc = madvise(reinterpret_cast<void*>(start), end - start, MADV_POPULATE_WRITE);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? Ok(static_cast<int64_t>(end - start)) : Fail("madvise");
}

SysResult DataSync(int fd) {
  int rc;
  do {
    rc = fdatasync(fd);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? Ok() : Fail("fdatasync");
}

SysResult Truncate(int fd, int64_t length) {
  int rc;
  do {
    rc = ftruncate(fd, length);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? Ok() : Fail("ftruncate");
}

SysResult Allocate(int fd, int mode, int64_t offset, int64_t length) {
  int rc;
  do {
    rc = fallocate(fd, mode, offset, length);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? Ok(length) : Fail("fallocate");
}

static short LockType(int type) {
  return type == 2 ? F_WRLCK : type == 1 ? F_RDLCK : F_UNLCK;
}

SysResult GetLock(int fd, int64_t start, int64_t length, int type, LockFacts* facts) {
  struct flock fl {};
  fl.l_type = LockType(type);
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = length;
  fl.l_pid = 0;  // required for OFD locks
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return Fail("fcntl(F_OFD_GETLK)");
  facts->type = fl.l_type == F_WRLCK ? 2 : fl.l_type == F_RDLCK ? 1 : 0;
  facts->pid = fl.l_pid;
  return Ok();
}

SysResult SetLock(int fd, int64_t start, int64_t length, int type) {
  struct flock fl {};
  fl.l_type = LockType(type);
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = length;
  fl.l_pid = 0;
  int rc;
  do {
    rc = fcntl(fd, F_OFD_SETLK, &fl);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? Ok() : Fail("fcntl(F_OFD_SETLK)");
}

SysResult Stat(int fd, StatFacts* facts) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return Fail("fstat");
  facts->size = st.st_size;
  facts->blocks = st.st_blocks;
  facts->blockSize = static_cast<uint32_t>(st.st_blksize);
  if (S_ISBLK(st.st_mode)) {
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) == 0) facts->size = static_cast<int64_t>(bytes);
  }
  return Ok();
}

SysResult CloseFile(int fd) {
  // close() is not retried on EINTR: on Linux the descriptor is released anyway.
  return close(fd) == 0 ? Ok() : Fail("close");
}

namespace {

bool UnixAddress(const std::string& path, struct sockaddr_un* addr) {
  addr->sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr->sun_path)) {
    errno = ENAMETOOLONG;
    return false;
  }
  std::memcpy(addr->sun_path, path.c_str(), path.size() + 1);
  return true;
}

// SO_SNDTIMEO and SO_RCVTIMEO: a send or recv that moves nothing for this long fails with EAGAIN.
bool SetStallTimeout(int s, int timeoutMs) {
  if (timeoutMs <= 0) return true;
  struct timeval tv {};
  tv.tv_sec = timeoutMs / 1000;
  tv.tv_usec = (timeoutMs % 1000) * 1000;
  return setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0 && setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0;
}

}  // namespace

SysResult ConnectUnix(const std::string& path, int timeoutMs, int* fd) {
  struct sockaddr_un addr {};
  if (!UnixAddress(path, &addr)) return Fail("connect");
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return Fail("socket");
  if (!SetStallTimeout(s, timeoutMs)) {
    SysResult r = Fail("setsockopt");
    close(s);
    return r;
  }
  int rc;
  do {
    rc = connect(s, reinterpret_cast<const struct sockaddr*>(&addr), sizeof addr);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    SysResult r = Fail("connect");
    close(s);
    return r;
  }
  *fd = s;
  return Ok();
}

SysResult ListenUnix(const std::string& path, int* fd) {
  struct sockaddr_un addr {};
  if (!UnixAddress(path, &addr)) return Fail("bind");
  // Non-blocking: AcceptOne polls first, and a wake-up with nobody to accept
  // gives EAGAIN instead of blocking. The accepted socket is blocking.
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) return Fail("socket");
  if (bind(s, reinterpret_cast<const struct sockaddr*>(&addr), sizeof addr) != 0) {
    SysResult r = Fail("bind");
    close(s);
    return r;
  }
  if (listen(s, 1) != 0) {
    SysResult r = Fail("listen");
    close(s);
    return r;
  }
  *fd = s;
  return Ok();
}

SysResult AcceptOne(int listenFd, int waitMs, int timeoutMs, const std::atomic<bool>* cancelled, int* fd) {
  int waited = 0;
  for (;;) {
    if (cancelled->load()) {
      errno = ECANCELED;
      return Fail("accept");
    }
    if (waitMs > 0 && waited >= waitMs) {
      errno = ETIMEDOUT;
      return Fail("accept");
    }
    int slice = waitMs > 0 ? (waitMs - waited < 100 ? waitMs - waited : 100) : 100;
    struct pollfd p {};
    p.fd = listenFd;
    p.events = POLLIN;
    int n = poll(&p, 1, slice);
    if (n < 0 && errno != EINTR) return Fail("poll");
    if (n <= 0) {
      waited += slice;
      continue;
    }
    // shutdown() on a listening socket wakes poll, and accept then fails (EINVAL): report the cancel.
    if (cancelled->load()) continue;
    int c = accept4(listenFd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      return Fail("accept");
    }
    if (!SetStallTimeout(c, timeoutMs)) {
      SysResult r = Fail("setsockopt");
      close(c);
      return r;
    }
    *fd = c;
    return Ok();
  }
}

SysResult SendFull(int fd, const uint8_t* data, size_t length) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = send(fd, data + done, length - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      SysResult r = Fail("send");
      r.bytes = static_cast<int64_t>(done);
      return r;
    }
    done += static_cast<size_t>(n);
  }
  return Ok(static_cast<int64_t>(done));
}

SysResult RecvFull(int fd, uint8_t* data, size_t length) {
  size_t done = 0;
  while (done < length) {
    ssize_t n = recv(fd, data + done, length - done, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      SysResult r = Fail("recv");
      r.bytes = static_cast<int64_t>(done);
      return r;
    }
    if (n == 0) break;  // the peer closed: end of stream
    done += static_cast<size_t>(n);
  }
  return Ok(static_cast<int64_t>(done));
}

}  // namespace snapstream
