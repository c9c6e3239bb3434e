#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <string>

namespace snapstream {

namespace {

constexpr unsigned kMaxThreads = 4;

int64_t ToOffset(const Napi::Value& v, const char* what) {
  if (!v.IsNumber()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  // 2^53: beyond it a JS number cannot name every byte.
  if (!(d >= 0) || d > 9007199254740991.0 || std::floor(d) != d) {
    throw Napi::RangeError::New(v.Env(), std::string(what) + " must be a non-negative safe integer");
  }
  return static_cast<int64_t>(d);
}

// Milliseconds, 0..one day.
int64_t ToTimeout(const Napi::Value& v) {
  int64_t ms = ToOffset(v, "timeout");
  if (ms > 86400000) throw Napi::RangeError::New(v.Env(), "timeout must be at most one day");
  return ms;
}

void RequireFunction(const Napi::Value& v) {
  if (!v.IsFunction()) throw Napi::TypeError::New(v.Env(), "callback must be a function");
}

// Views a TypedArray's bytes. The caller keeps the array referenced.
uint8_t* ViewBytes(const Napi::Value& v, size_t* length) {
  if (!v.IsTypedArray()) throw Napi::TypeError::New(v.Env(), "buffer must be a TypedArray");
  auto ta = v.As<Napi::TypedArray>();
  auto ab = ta.ArrayBuffer();
  *length = ta.ByteLength();
  return static_cast<uint8_t*>(ab.Data()) + ta.ByteOffset();
}

Napi::Object Describe(Napi::Env env, Op* op) {
  Napi::Object o = Napi::Object::New(env);
  switch (op->kind) {
    case OpKind::Open: {
      const OpenFacts& f = op->openFacts;
      o.Set("fd", f.fd);
      o.Set("directInEffect", f.directInEffect);
      o.Set("isBlockDevice", f.isBlockDevice);
      o.Set("isRegular", f.isRegular);
      o.Set("size", static_cast<double>(f.size));
      o.Set("dioReported", f.dioReported);
      o.Set("dioMemAlign", f.dioMemAlign);
      o.Set("dioOffsetAlign", f.dioOffsetAlign);
      o.Set("logicalBlockSize", f.logicalBlockSize);
      o.Set("blockSize", f.blockSize);
      o.Set("fsType", static_cast<double>(f.fsType));
      break;
    }
    case OpKind::Connect:
    case OpKind::Listen:
    case OpKind::Accept:
      o.Set("fd", op->openFacts.fd);
      break;
    case OpKind::GetLock:
      o.Set("type", op->lockFacts.type);
      o.Set("pid", static_cast<double>(op->lockFacts.pid));
      break;
    case OpKind::Stat:
      o.Set("size", static_cast<double>(op->statFacts.size));
      o.Set("blocks", static_cast<double>(op->statFacts.blocks));
      o.Set("blockSize", op->statFacts.blockSize);
      break;
    default:
      break;
  }
  return o;
}

}  // namespace

Napi::Function NativeFile::Init(Napi::Env env) {
  return DefineClass(env, "NativeFile",
                     {
                         InstanceMethod<&NativeFile::Open>("open"),
                         InstanceMethod<&NativeFile::Write>("write"),
                         InstanceMethod<&NativeFile::Read>("read"),
                         InstanceMethod<&NativeFile::DataSync>("datasync"),
                         InstanceMethod<&NativeFile::Truncate>("truncate"),
                         InstanceMethod<&NativeFile::Allocate>("fallocate"),
                         InstanceMethod<&NativeFile::GetLock>("getlk"),
                         InstanceMethod<&NativeFile::SetLock>("setlk"),
                         InstanceMethod<&NativeFile::Stat>("fstat"),
                         InstanceMethod<&NativeFile::Close>("close"),
                         InstanceMethod<&NativeFile::Dispose>("dispose"),
                         InstanceMethod<&NativeFile::Pending>("pending"),
                         InstanceMethod<&NativeFile::SetConcurrency>("setConcurrency"),
                         InstanceMethod<&NativeFile::Connect>("connect"),
                         InstanceMethod<&NativeFile::Listen>("listen"),
                         InstanceMethod<&NativeFile::Accept>("accept"),
                         InstanceMethod<&NativeFile::Send>("send"),
                         InstanceMethod<&NativeFile::Recv>("recv"),
                         InstanceMethod<&NativeFile::Prefault>("prefault"),
                         InstanceMethod<&NativeFile::Shutdown>("shutdown"),
                     });
}

NativeFile::NativeFile(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeFile>(info) {
  Napi::Env env = info.Env();
  if (info.Length() > 0 && info[0].IsNumber()) {
    int64_t n = info[0].As<Napi::Number>().Int64Value();
    if (n < 1 || n > kMaxThreads) throw Napi::RangeError::New(env, "threads must be between 1 and 4");
    threadCount_ = static_cast<unsigned>(n);
  }
  tsfn_ = Napi::TypedThreadSafeFunction<NativeFile, Op, Complete>::New(env, "snapstream.io", 0, 1, this);
  tsfn_.Unref(env);  // only pending operations keep the event loop alive
  maxRunning_ = threadCount_;
  for (unsigned i = 0; i < threadCount_; i++) workers_.emplace_back([this] { WorkerLoop(); });
}

// Runs on the JS thread (a finalizer, or environment teardown).
NativeFile::~NativeFile() {
  StopWorkers();
  // Pins of operations whose completion never reached JS (the environment
  // went away first): the workers are joined, so nothing uses the buffers.
  while (pinned_ != nullptr) Unpin(pinned_);
  // A file that was never closed through close(): release the descriptor so a
  // garbage-collected stream cannot leak it.
  if (fd_ >= 0) ::close(fd_);
}

// JS thread only.
Pins* NativeFile::Pin(const Napi::Value& callback, const Napi::Value& buffer) {
  auto* pins = new Pins();
  pins->callback = Napi::Persistent(callback.As<Napi::Function>());
  if (!buffer.IsEmpty()) pins->keepAlive = Napi::Persistent(buffer.As<Napi::Object>());
  pins->next = pinned_;
  if (pinned_ != nullptr) pinned_->prev = pins;
  pinned_ = pins;
  return pins;
}

// JS thread only: the references are released here and nowhere else.
void NativeFile::Unpin(Pins* pins) {
  if (pins->prev != nullptr) pins->prev->next = pins->next;
  else pinned_ = pins->next;
  if (pins->next != nullptr) pins->next->prev = pins->prev;
  delete pins;
}

void NativeFile::StopWorkers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  // A socket operation may be blocked on its peer (or an accept on none):
  // end it, so the join below cannot wait for a stall timeout or forever.
  // Harmless for a file (ENOTSOCK); only reached with operations pending
  // when the environment goes away, since dispose() requires none.
  shutdown_.store(true);
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
  wake_.notify_all();
  for (auto& t : workers_) {
    if (t.joinable()) t.join();
  }
  // Operations that never ran (only possible if dispose raced a submit).
  for (Op* op : queue_) delete op;
  queue_.clear();
  if (!disposed_) {
    disposed_ = true;
    tsfn_.Release();
  }
}

void NativeFile::WorkerLoop() {
  for (;;) {
    Op* op = nullptr;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // At most maxRunning_ operations run at once, whatever the thread count:
      // the TypeScript layer lowers it when the device does better with fewer.
      wake_.wait(lock, [this] { return stopping_ || (!queue_.empty() && running_ < maxRunning_); });
      if (queue_.empty()) return;  // stopping and drained
      op = queue_.front();
      queue_.pop_front();
      running_++;
    }
    Execute(op);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      running_--;
    }
    wake_.notify_one();
    if (tsfn_.NonBlockingCall(op) != napi_ok) {
      // The environment is going away; nobody is left to receive the result.
      // Op is plain data; its Pins stay listed for ~NativeFile on the JS thread.
      delete op;
    }
  }
}

void NativeFile::Execute(Op* op) {
  int fd = fd_;
  switch (op->kind) {
    case OpKind::Open:
      op->result = OpenFile(op->open, &op->openFacts);
      break;
    case OpKind::Write:
      op->result = WriteFull(fd, op->data, op->length, op->offset);
      break;
    case OpKind::Read:
      op->result = ReadFull(fd, op->data, op->length, op->offset);
      break;
    case OpKind::DataSync:
      op->result = snapstream::DataSync(fd);
      break;
    case OpKind::Truncate:
      op->result = snapstream::Truncate(fd, op->extent);
      break;
    case OpKind::Allocate:
      op->result = snapstream::Allocate(fd, op->mode, op->offset, op->extent);
      break;
    case OpKind::GetLock:
      op->result = snapstream::GetLock(fd, op->offset, op->extent, op->mode, &op->lockFacts);
      break;
    case OpKind::SetLock:
      op->result = snapstream::SetLock(fd, op->offset, op->extent, op->mode);
      break;
    case OpKind::Stat:
      op->result = snapstream::Stat(fd, &op->statFacts);
      break;
    case OpKind::Close:
      op->result = CloseFile(fd);
      break;
    case OpKind::Connect:
      op->result = ConnectUnix(op->open.path, static_cast<int>(op->extent), &op->openFacts.fd);
      break;
    case OpKind::Listen:
      op->result = ListenUnix(op->open.path, &op->openFacts.fd);
      break;
    case OpKind::Accept:
      op->result = AcceptOne(fd, op->mode, static_cast<int>(op->extent), &shutdown_, &op->openFacts.fd);
      break;
    case OpKind::Send:
      op->result = SendFull(fd, op->data, op->length);
      break;
    case OpKind::Recv:
      op->result = RecvFull(fd, op->data, op->length);
      break;
    case OpKind::Prefault:
      op->result = PrefaultWrite(op->data, op->length);
      break;
  }
}

// Runs on the JS thread.
void NativeFile::Complete(Napi::Env env, Napi::Function, NativeFile* self, Op* op) {
  std::unique_ptr<Op> owned(op);
  // The environment is torn down: `self` may be gone already, and its
  // destructor frees the Pins.
  if (env == nullptr) return;
  if ((op->kind == OpKind::Open || op->kind == OpKind::Connect || op->kind == OpKind::Listen) && op->result.error == 0) self->fd_ = op->openFacts.fd;
  if (op->kind == OpKind::Accept && op->result.error == 0) {
    // One peer only: the listening socket is done, the connection takes its place.
    if (self->fd_ >= 0) ::close(self->fd_);
    self->fd_ = op->openFacts.fd;
    // shutdown() came while accept4 was returning: it applies to the connection too.
    if (self->shutdown_.load()) ::shutdown(self->fd_, SHUT_RDWR);
  }
  if (op->kind == OpKind::Close) self->fd_ = -1;
  if (--self->pending_ == 0 && !self->disposed_) self->tsfn_.Unref(env);
  Napi::HandleScope scope(env);
  Napi::Value details = Describe(env, op);
  Napi::Function cb = op->pins->callback.Value();
  self->Unpin(op->pins);  // the buffer is no longer in use; `cb` is held by this scope
  // A callback that throws: node-addon-api turns the C++ exception into a
  // pending JS exception, and Node reports it as an uncaught exception, as
  // for a throw in any I/O callback. The TypeScript layer's callbacks only
  // settle promises or set state, and do not throw. While a worker thread's
  // environment is being terminated the call cannot run, and the error it
  // raises is dropped (NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS, binding.gyp).
  cb.Call({Napi::Number::New(env, op->result.error), Napi::Number::New(env, static_cast<double>(op->result.bytes)),
           Napi::String::New(env, op->result.syscall), details});
}

void NativeFile::Submit(Napi::Env env, std::unique_ptr<Op> op, const Napi::Value& callback, const Napi::Value& buffer) {
  if (disposed_) throw Napi::Error::New(env, "file is disposed");
  const bool needsFd = op->kind != OpKind::Open && op->kind != OpKind::Connect && op->kind != OpKind::Listen && op->kind != OpKind::Prefault;
  if (needsFd && fd_ < 0) throw Napi::Error::New(env, "file is not open");
  op->pins = Pin(callback, buffer);
  // A slab's finalizer can run before this Op ends (at an environment's
  // teardown): the pin keeps the slab out of the free list until then.
  if (op->data != nullptr) op->slab = SlabPin(op->data, op->length);
  if (pending_++ == 0) tsfn_.Ref(env);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(op.release());
  }
  wake_.notify_one();
}

Napi::Value NativeFile::Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (fd_ >= 0) throw Napi::Error::New(env, "file is already open");
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsObject()) throw Napi::TypeError::New(env, "open(path, flags, cb)");
  RequireFunction(info[2]);
  auto op = std::make_unique<Op>();
  op->kind = OpKind::Open;
  Napi::Object f = info[1].As<Napi::Object>();
  op->open.path = info[0].As<Napi::String>().Utf8Value();
  if (op->open.path.find('\0') != std::string::npos) throw Napi::TypeError::New(env, "path contains a NUL byte");
  op->open.write = f.Get("write").ToBoolean();
  op->open.create = f.Get("create").ToBoolean();
  op->open.exclusive = f.Get("exclusive").ToBoolean();
  op->open.truncate = f.Get("truncate").ToBoolean();
  op->open.direct = f.Get("direct").ToBoolean();
  Napi::Value mode = f.Get("mode");
  op->open.mode = mode.IsNumber() ? (mode.As<Napi::Number>().Int32Value() & 07777) : 0600;
  Submit(env, std::move(op), info[2]);
  return env.Undefined();
}

// write(buffer, position, cb) and read(buffer, position, cb).
Napi::Value NativeFile::SubmitBuffer(const Napi::CallbackInfo& info, OpKind kind) {
  Napi::Env env = info.Env();
  if (info.Length() < 3) throw Napi::TypeError::New(env, "expected (buffer, position, cb)");
  RequireFunction(info[2]);
  auto op = std::make_unique<Op>();
  op->kind = kind;
  op->data = ViewBytes(info[0], &op->length);
  op->offset = ToOffset(info[1], "position");
  Submit(env, std::move(op), info[2], info[0]);
  return env.Undefined();
}

Napi::Value NativeFile::Write(const Napi::CallbackInfo& info) { return SubmitBuffer(info, OpKind::Write); }

// connect(path, timeoutMs, cb) and listen(path, cb): a unix stream socket
// instead of a file.
Napi::Value NativeFile::Connect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3) throw Napi::TypeError::New(env, "connect(path, timeoutMs, cb)");
  auto op = SocketOp(info, OpKind::Connect);
  op->extent = ToTimeout(info[1]);
  RequireFunction(info[2]);
  Submit(env, std::move(op), info[2]);
  return env.Undefined();
}

Napi::Value NativeFile::Listen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2) throw Napi::TypeError::New(env, "listen(path, cb)");
  auto op = SocketOp(info, OpKind::Listen);
  RequireFunction(info[1]);
  Submit(env, std::move(op), info[1]);
  return env.Undefined();
}

// accept(waitMs, timeoutMs, cb): the one peer of a listening socket, which
// then replaces it; waits at most waitMs (0: until shutdown()).
Napi::Value NativeFile::Accept(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3) throw Napi::TypeError::New(env, "accept(waitMs, timeoutMs, cb)");
  RequireFunction(info[2]);
  auto op = std::make_unique<Op>();
  op->kind = OpKind::Accept;
  op->mode = static_cast<int>(ToTimeout(info[0]));
  op->extent = ToTimeout(info[1]);
  Submit(env, std::move(op), info[2]);
  return env.Undefined();
}

std::unique_ptr<Op> NativeFile::SocketOp(const Napi::CallbackInfo& info, OpKind kind) {
  Napi::Env env = info.Env();
  if (fd_ >= 0) throw Napi::Error::New(env, "file is already open");
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "path must be a string");
  auto op = std::make_unique<Op>();
  op->kind = kind;
  op->open.path = info[0].As<Napi::String>().Utf8Value();
  if (op->open.path.find('\0') != std::string::npos) throw Napi::TypeError::New(env, "path contains a NUL byte");
  return op;
}

// send(buffer, cb) and recv(buffer, cb): the whole buffer, no offset.
Napi::Value NativeFile::Send(const Napi::CallbackInfo& info) { return SubmitStream(info, OpKind::Send); }

Napi::Value NativeFile::Recv(const Napi::CallbackInfo& info) { return SubmitStream(info, OpKind::Recv); }

// prefault(buffer, cb): maps the buffer's pages writable on this object's
// thread, so that a later read into it does not fault them in itself. Needs no
// descriptor: an object only ever used for this is never opened.
Napi::Value NativeFile::Prefault(const Napi::CallbackInfo& info) { return SubmitStream(info, OpKind::Prefault); }

Napi::Value NativeFile::SubmitStream(const Napi::CallbackInfo& info, OpKind kind) {
  Napi::Env env = info.Env();
  if (info.Length() < 2) throw Napi::TypeError::New(env, "expected (buffer, cb)");
  RequireFunction(info[1]);
  auto op = std::make_unique<Op>();
  op->kind = kind;
  op->data = ViewBytes(info[0], &op->length);
  Submit(env, std::move(op), info[1], info[0]);
  return env.Undefined();
}

// shutdown(): both directions of a connected socket, at once and on the JS
// thread; a send or recv blocked in a worker returns with an error (or end of
// stream), so a peer that stopped reading cannot hold the file forever. A
// pending accept gives up within 100 ms (ECANCELED), and a connection it
// returns anyway is shut down as it is installed. Returns the errno (0 on
// success, ENOTSOCK for a file).
Napi::Value NativeFile::Shutdown(const Napi::CallbackInfo& info) {
  shutdown_.store(true);
  int rc = fd_ >= 0 ? ::shutdown(fd_, SHUT_RDWR) : -1;
  return Napi::Number::New(info.Env(), rc == 0 ? 0 : (fd_ >= 0 ? errno : EBADF));
}

Napi::Value NativeFile::Read(const Napi::CallbackInfo& info) { return SubmitBuffer(info, OpKind::Read); }

// Operations whose only argument is the callback.
Napi::Value NativeFile::SubmitBare(const Napi::CallbackInfo& info, OpKind kind) {
  RequireFunction(info[0]);
  auto op = std::make_unique<Op>();
  op->kind = kind;
  Submit(info.Env(), std::move(op), info[0]);
  return info.Env().Undefined();
}

// Operations on a byte range with an integer mode: fallocate(mode, offset,
// length, cb) and the locks (start, length, type, cb). `modeFirst` says which.
Napi::Value NativeFile::SubmitRange(const Napi::CallbackInfo& info, OpKind kind, bool modeFirst) {
  Napi::Env env = info.Env();
  const size_t modeAt = modeFirst ? 0 : 2;
  const size_t startAt = modeFirst ? 1 : 0;
  if (info.Length() < 4 || !info[modeAt].IsNumber()) throw Napi::TypeError::New(env, "expected (range, mode, cb)");
  RequireFunction(info[3]);
  auto op = std::make_unique<Op>();
  op->kind = kind;
  op->mode = info[modeAt].As<Napi::Number>().Int32Value();
  op->offset = ToOffset(info[startAt], "offset");
  op->extent = ToOffset(info[startAt + 1], "length");
  Submit(env, std::move(op), info[3]);
  return env.Undefined();
}

Napi::Value NativeFile::DataSync(const Napi::CallbackInfo& info) { return SubmitBare(info, OpKind::DataSync); }
Napi::Value NativeFile::Stat(const Napi::CallbackInfo& info) { return SubmitBare(info, OpKind::Stat); }
Napi::Value NativeFile::Close(const Napi::CallbackInfo& info) { return SubmitBare(info, OpKind::Close); }
Napi::Value NativeFile::Allocate(const Napi::CallbackInfo& info) { return SubmitRange(info, OpKind::Allocate, true); }
Napi::Value NativeFile::GetLock(const Napi::CallbackInfo& info) { return SubmitRange(info, OpKind::GetLock, false); }
Napi::Value NativeFile::SetLock(const Napi::CallbackInfo& info) { return SubmitRange(info, OpKind::SetLock, false); }

Napi::Value NativeFile::Truncate(const Napi::CallbackInfo& info) {
  RequireFunction(info[1]);
  auto op = std::make_unique<Op>();
  op->kind = OpKind::Truncate;
  op->extent = ToOffset(info[0], "length");
  Submit(info.Env(), std::move(op), info[1]);
  return info.Env().Undefined();
}

// Stops the threads. Only called once nothing is pending.
Napi::Value NativeFile::Dispose(const Napi::CallbackInfo& info) {
  if (pending_ != 0) throw Napi::Error::New(info.Env(), "dispose with operations pending");
  StopWorkers();
  return info.Env().Undefined();
}

Napi::Value NativeFile::Pending(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(pending_));
}

// setConcurrency(n): at most n operations run at once (1..threads). Queued
// operations keep their FIFO order; a lower limit applies from the next
// operation a thread picks up.
Napi::Value NativeFile::SetConcurrency(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "setConcurrency(n)");
  int64_t n = info[0].As<Napi::Number>().Int64Value();
  if (n < 1 || n > static_cast<int64_t>(threadCount_)) throw Napi::RangeError::New(env, "concurrency must be between 1 and the thread count");
  {
    std::lock_guard<std::mutex> lock(mutex_);
    maxRunning_ = static_cast<unsigned>(n);
  }
  wake_.notify_all();
  return env.Undefined();
}

}  // namespace snapstream
