// NativeFile: one open file and its own small pool of I/O threads.
//
// Why not libuv's pool: it has 4 threads shared with fs, dns, crypto and zlib.
// Eight snapshot streams with two writes in flight each would occupy it
// completely, and an unrelated fs.readFile would wait behind 4 MiB O_DIRECT
// writes. Each NativeFile therefore owns its threads; completions come back to
// the JS thread through one ThreadSafeFunction.
//
// The same object also carries a unix stream socket: connected to a peer
// (connect), or listening for one (listen) and then connected to the one it
// accepts (accept replaces the listening descriptor). send/recv have no
// offset. QEMU's migration stream moves between the socket and aligned
// buffers on these threads, not through JS. shutdown() wakes a send or recv
// blocked on a peer that stopped, and ends a pending accept.
//
// prefault(buffer) needs no descriptor: it maps a buffer's pages in
// (MADV_POPULATE_WRITE) on the object's thread. src/io/prefaulter.ts keeps an
// object that is never opened for that alone, so the mapping runs beside the
// reads of the file's own threads.
//
// Ordering: operations start in FIFO order on `threads` workers, at most
// `setConcurrency(n)` of them at once (default: all threads). With more than
// one running, two queued operations may run concurrently; the TypeScript
// layer issues barriers (datasync, truncate, close) only when nothing else is
// queued.
#pragma once

#include <napi.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "slabs.h"
#include "syscalls.h"

namespace snapstream {

enum class OpKind { Open, Write, Read, DataSync, Truncate, Allocate, GetLock, SetLock, Stat, Close, Connect, Listen, Accept, Send, Recv, Prefault };

// The JavaScript values an operation keeps alive: its buffer and its callback.
// Created, reset and destroyed on the JS thread only (a Napi::Reference may
// not be touched anywhere else), so they live apart from the Op, which the
// worker may have to free itself. NativeFile keeps every live Pins in an
// intrusive list, so those whose Op was dropped are still freed, on the JS
// thread, when the file is finalized.
struct Pins {
  Napi::ObjectReference keepAlive;  // buffers stay referenced until completion
  Napi::FunctionReference callback;
  Pins* prev = nullptr;
  Pins* next = nullptr;
};

// Everything an operation needs, copied out of JS values before it is queued,
// so that the worker never touches JavaScript. Plain data: any thread may
// delete it.
struct Op {
  OpKind kind;
  OpenRequest open;
  uint8_t* data = nullptr;
  size_t length = 0;
  int64_t offset = 0;
  int64_t extent = 0;  // truncate length, fallocate/lock length; connect, accept: stall timeout in ms
  int mode = 0;        // fallocate mode, lock type; accept: how long to wait for the peer, ms
  Pins* pins = nullptr;  // owned by the JS thread, see Pins
  uintptr_t slab = 0;    // the chunk slab `data` lies in, pinned until the Op is destroyed (slabs.h)
  // Results, filled on the worker.
  SysResult result;
  OpenFacts openFacts;
  LockFacts lockFacts;
  StatFacts statFacts;

  Op() = default;
  Op(const Op&) = delete;
  Op& operator=(const Op&) = delete;
  // Wherever the Op ends (completed on the JS thread, dropped at teardown),
  // a slab it was using may be filed again.
  ~Op() {
    if (slab != 0) SlabUnpin(slab);
  }
};

class NativeFile : public Napi::ObjectWrap<NativeFile> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit NativeFile(const Napi::CallbackInfo& info);
  ~NativeFile() override;

 private:
  Napi::Value Open(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value DataSync(const Napi::CallbackInfo& info);
  Napi::Value Truncate(const Napi::CallbackInfo& info);
  Napi::Value Allocate(const Napi::CallbackInfo& info);
  Napi::Value GetLock(const Napi::CallbackInfo& info);
  Napi::Value SetLock(const Napi::CallbackInfo& info);
  Napi::Value Stat(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value Pending(const Napi::CallbackInfo& info);
  Napi::Value SetConcurrency(const Napi::CallbackInfo& info);
  Napi::Value Connect(const Napi::CallbackInfo& info);
  Napi::Value Listen(const Napi::CallbackInfo& info);
  Napi::Value Accept(const Napi::CallbackInfo& info);
  Napi::Value Send(const Napi::CallbackInfo& info);
  Napi::Value Recv(const Napi::CallbackInfo& info);
  Napi::Value Prefault(const Napi::CallbackInfo& info);
  Napi::Value Shutdown(const Napi::CallbackInfo& info);

  Napi::Value SubmitBare(const Napi::CallbackInfo& info, OpKind kind);
  Napi::Value SubmitRange(const Napi::CallbackInfo& info, OpKind kind, bool modeFirst);
  Napi::Value SubmitBuffer(const Napi::CallbackInfo& info, OpKind kind);
  Napi::Value SubmitStream(const Napi::CallbackInfo& info, OpKind kind);
  std::unique_ptr<Op> SocketOp(const Napi::CallbackInfo& info, OpKind kind);
  void Submit(Napi::Env env, std::unique_ptr<Op> op, const Napi::Value& callback,
              const Napi::Value& buffer = Napi::Value());
  void WorkerLoop();
  void Execute(Op* op);
  static void Complete(Napi::Env env, Napi::Function unused, NativeFile* self, Op* op);
  void StopWorkers();
  Pins* Pin(const Napi::Value& callback, const Napi::Value& buffer);
  void Unpin(Pins* pins);

  int fd_ = -1;
  unsigned threadCount_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Op*> queue_;
  bool stopping_ = false;
  unsigned running_ = 0;     // operations executing; guarded by mutex_
  unsigned maxRunning_ = 1;  // limit on running_; guarded by mutex_
  size_t pending_ = 0;      // JS thread only
  Pins* pinned_ = nullptr;  // JS thread only: head of the list of live Pins
  bool disposed_ = false;
  std::atomic<bool> shutdown_{false};  // set by shutdown(): a pending accept gives up
  Napi::TypedThreadSafeFunction<NativeFile, Op, Complete> tsfn_;
};

}  // namespace snapstream
