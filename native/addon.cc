// Module entry: the NativeFile class and the aligned-window helper.
#include <napi.h>

#include <unistd.h>

#include <cstdint>

#include "file.h"

namespace snapstream {
namespace {

// Bytes to skip from the start of an ArrayBuffer so that the window begins at
// a multiple of `alignment`. Lets JS own the memory (no external buffers, which
// the V8 sandbox refuses) while O_DIRECT still gets aligned addresses.
Napi::Value AlignmentSkip(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsArrayBuffer() || !info[1].IsNumber()) {
    throw Napi::TypeError::New(env, "alignmentSkip(arrayBuffer, alignment)");
  }
  auto ab = info[0].As<Napi::ArrayBuffer>();
  int64_t alignment = info[1].As<Napi::Number>().Int64Value();
  if (alignment <= 0 || (alignment & (alignment - 1)) != 0 || alignment > (1 << 20)) {
    throw Napi::RangeError::New(env, "alignment must be a power of two up to 1 MiB");
  }
  auto addr = reinterpret_cast<uintptr_t>(ab.Data());
  uintptr_t mis = addr & static_cast<uintptr_t>(alignment - 1);
  return Napi::Number::New(env, mis == 0 ? 0 : static_cast<double>(alignment - static_cast<int64_t>(mis)));
}

}  // namespace
}  // namespace snapstream

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeFile", snapstream::NativeFile::Init(env));
  exports.Set("alignmentSkip", Napi::Function::New(env, snapstream::AlignmentSkip));
  // The MMU page size: I/O buffers start on a page boundary (see src/io/alignment.ts).
  long page = sysconf(_SC_PAGESIZE);
  exports.Set("pageSize", Napi::Number::New(env, page > 0 ? static_cast<double>(page) : 4096.0));
  return exports;
}

NODE_API_MODULE(NODE_GYP_MODULE_NAME, InitModule)
