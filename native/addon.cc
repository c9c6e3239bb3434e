// Module entry: the NativeFile class, the aligned-memory helpers and the chunk slabs.
#include <napi.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>

#include "file.h"
#include "slabs.h"

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
  if (alignment <= 0 || (alignment & (alignment - 1)) != 0 || alignment > (int64_t{1} << 25)) {
    throw Napi::RangeError::New(env, "alignment must be a power of two up to 32 MiB");
  }
  auto addr = reinterpret_cast<uintptr_t>(ab.Data());
  uintptr_t mis = addr & static_cast<uintptr_t>(alignment - 1);
  return Napi::Number::New(env, mis == 0 ? 0 : static_cast<double>(alignment - static_cast<int64_t>(mis)));
}

// The transparent huge page size (PMD size), or 0 when the kernel offers none
// to madvise: THP compiled out, or its mode 'never'.
int64_t HugePageBytes() {
  std::ifstream mode("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  if (!std::getline(mode, line) || line.find("[never]") != std::string::npos) return 0;
  std::ifstream size("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size");
  int64_t bytes = 0;
  if (!(size >> bytes) || bytes <= 0 || (bytes & (bytes - 1)) != 0) return 0;
  return bytes;
}

// madvise(MADV_HUGEPAGE) over the whole huge pages inside
// arrayBuffer[offset, offset + length). Returns the bytes advised: 0 when no
// whole huge page fits or the kernel refuses (the memory then stays in small
// pages, which is correct, only slower). Asks nothing of the memory's
// contents: advice, not a write.
Napi::Value AdviseHugePages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsArrayBuffer() || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsNumber()) {
    throw Napi::TypeError::New(env, "adviseHugePages(arrayBuffer, offset, length, hugePageBytes)");
  }
  auto ab = info[0].As<Napi::ArrayBuffer>();
  int64_t offset = info[1].As<Napi::Number>().Int64Value();
  int64_t length = info[2].As<Napi::Number>().Int64Value();
  int64_t huge = info[3].As<Napi::Number>().Int64Value();
  auto total = static_cast<int64_t>(ab.ByteLength());
  if (offset < 0 || length < 0 || offset > total || length > total - offset || huge <= 0 || (huge & (huge - 1)) != 0) {
    throw Napi::RangeError::New(env, "adviseHugePages: window outside the buffer or bad page size");
  }
  auto begin = reinterpret_cast<uintptr_t>(ab.Data()) + static_cast<uintptr_t>(offset);
  auto mask = static_cast<uintptr_t>(huge - 1);
  uintptr_t start = (begin + mask) & ~mask;
  uintptr_t end = (begin + static_cast<uintptr_t>(length)) & ~mask;
  if (end <= start) return Napi::Number::New(env, 0);
  if (madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE) != 0) return Napi::Number::New(env, 0);
  return Napi::Number::New(env, static_cast<double>(end - start));
}

}  // namespace
}  // namespace snapstream

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeFile", snapstream::NativeFile::Init(env));
  exports.Set("alignmentSkip", Napi::Function::New(env, snapstream::AlignmentSkip));
  exports.Set("adviseHugePages", Napi::Function::New(env, snapstream::AdviseHugePages));
  exports.Set("allocSlab", Napi::Function::New(env, snapstream::AllocSlab));
  exports.Set("trimSlabs", Napi::Function::New(env, snapstream::TrimSlabs));
  exports.Set("slabStats", Napi::Function::New(env, snapstream::SlabStatsOf));
  // Transparent huge pages for large I/O buffers (src/io/alignment.ts); 0: none.
  exports.Set("hugePageSize", Napi::Number::New(env, static_cast<double>(snapstream::HugePageBytes())));
  // The MMU page size: I/O buffers start on a page boundary (see src/io/alignment.ts).
  long page = sysconf(_SC_PAGESIZE);
  exports.Set("pageSize", Napi::Number::New(env, page > 0 ? static_cast<double>(page) : 4096.0));
  return exports;
}

NODE_API_MODULE(NODE_GYP_MODULE_NAME, InitModule)
