// Thin, errno-preserving wrappers around the Linux syscalls snapstream needs.
// Nothing here touches JavaScript: these run on the I/O threads.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace snapstream {

// Result of any syscall wrapper: errno (0 = success), the syscall that failed,
// and a byte count where one applies.
struct SysResult {
  int error = 0;
  const char* syscall = "";
  int64_t bytes = 0;
};

struct OpenRequest {
  std::string path;
  bool write = false;
  bool create = false;
  bool exclusive = false;
  bool truncate = false;
  bool direct = false;
  int mode = 0600;
};

struct OpenFacts {
  int fd = -1;
  bool directInEffect = false;  // O_DIRECT is set on the open file description
  bool isBlockDevice = false;
  bool isRegular = false;
  int64_t size = 0;              // st_size, or BLKGETSIZE64 for block devices
  uint32_t dioMemAlign = 0;      // statx STATX_DIOALIGN; 0 = not reported
  uint32_t dioOffsetAlign = 0;
  bool dioReported = false;      // STATX_DIOALIGN was in stx_mask
  uint32_t logicalBlockSize = 0; // BLKSSZGET for block devices, else 0
  uint32_t blockSize = 0;        // st_blksize
  int64_t fsType = 0;            // statfs f_type
};

struct LockFacts {
  int type = 0;     // 0 = unlocked, 1 = read, 2 = write
  int64_t pid = 0;  // -1 for OFD locks
};

struct StatFacts {
  int64_t size = 0;
  int64_t blocks = 0;  // 512-byte units
  uint32_t blockSize = 0;
};

SysResult OpenFile(const OpenRequest& req, OpenFacts* facts);
SysResult WriteFull(int fd, const uint8_t* data, size_t length, int64_t offset);
SysResult ReadFull(int fd, uint8_t* data, size_t length, int64_t offset);
SysResult DataSync(int fd);
SysResult Truncate(int fd, int64_t length);
SysResult Allocate(int fd, int mode, int64_t offset, int64_t length);
SysResult GetLock(int fd, int64_t start, int64_t length, int type, LockFacts* facts);
SysResult SetLock(int fd, int64_t start, int64_t length, int type);
SysResult Stat(int fd, StatFacts* facts);
SysResult CloseFile(int fd);

// Stream sockets (QEMU's migration channel). ConnectUnix opens a blocking
// SOCK_STREAM socket to `path`; `timeoutMs` > 0 bounds every later send or
// recv that makes no progress for that long (SO_SNDTIMEO/SO_RCVTIMEO: the call
// fails with EAGAIN). SendFull writes every byte (never raising SIGPIPE);
// RecvFull reads until `length` bytes or end of stream.
SysResult ConnectUnix(const std::string& path, int timeoutMs, int* fd);
SysResult SendFull(int fd, const uint8_t* data, size_t length);
// ListenUnix binds a new unix stream socket at `path` (which must not exist)
// and listens for one peer. AcceptOne waits for that peer in slices of at
// most 100 ms, giving up when `*cancelled` turns true (ECANCELED) or after
// `waitMs` (ETIMEDOUT); the accepted socket gets `timeoutMs` as ConnectUnix's.
SysResult ListenUnix(const std::string& path, int* fd);
SysResult AcceptOne(int listenFd, int waitMs, int timeoutMs, const std::atomic<bool>* cancelled, int* fd);
SysResult RecvFull(int fd, uint8_t* data, size_t length);

// Memory, not a file: maps every whole page inside [data, data + length)
// writable, as a first write would, without touching the bytes
// (madvise MADV_POPULATE_WRITE, Linux 5.14). `bytes` is the length populated;
// EINVAL from an older kernel leaves the faults to the first real access.
SysResult PrefaultWrite(uint8_t* data, size_t length);

}  // namespace snapstream
