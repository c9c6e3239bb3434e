// Slabs: aligned blocks for the export's Readable chunks, recycled when the
// consumer's chunk is garbage-collected.
//
// A Readable hands each chunk to its consumer, who may keep it, so a chunk
// cannot be a reused slot (pumpTo's way). Allocated as an ordinary
// ArrayBuffer, every 4 MiB chunk was fresh memory: calloc cleared memory its
// heap handed back, on the JS thread, or the kernel zeroed new pages, and the
// huge-page alignment cost a third more address space (docs/performance.md,
// seventh and eighth rounds). A slab is exactly the chunk, aligned, and goes
// back to a free list when V8 collects the chunk's ArrayBuffer (its
// finalizer runs on the JS thread), for the next chunk of the same size.
//
// Contents: a slab is handed out uninitialised (fresh from posix_memalign, or
// holding an earlier chunk's bytes). The caller overwrites every byte before
// a consumer sees it (src/qcow2/vmstate-reader.ts).
//
// Bounds: the free list holds at most kMaxFreeBytes; a slab beyond that is
// freed. trimSlabs(idleMs) frees the slabs idle that long (JS calls it on a
// timer after an export), so an idle process holds none for long. Shared by
// every environment (worker threads) of the process, under one mutex.
#include "slabs.h"

#include <sys/mman.h>

#include <chrono>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace snapstream {
namespace {

constexpr size_t kMaxFreeBytes = size_t{64} << 20;

struct Slab {
  void* data;
  size_t length;
  size_t alignment;
  std::chrono::steady_clock::time_point freedAt;
};

struct SlabStats {
  double allocated = 0;  // slabs made by posix_memalign
  double reused = 0;     // slabs handed out again from the free list
  double released = 0;   // slabs given back to the C library
};

std::mutex gMutex;
std::vector<Slab> gFree;  // most recently freed last
size_t gFreeBytes = 0;
SlabStats gStats;
size_t gLive = 0;  // slabs handed out and not yet finalized

// What a finalizer needs to file its slab; owned by the ArrayBuffer.
struct SlabHint {
  size_t length;
  size_t alignment;
};

void ReturnSlab(void* data, size_t length, size_t alignment) {
  std::lock_guard<std::mutex> lock(gMutex);
  gLive--;
  if (gFreeBytes + length > kMaxFreeBytes) {
    gStats.released++;
    std::free(data);
    return;
  }
  gFree.push_back({data, length, alignment, std::chrono::steady_clock::now()});
  gFreeBytes += length;
}

void FinalizeSlab(Napi::Env, void* data, SlabHint* hint) {
  ReturnSlab(data, hint->length, hint->alignment);
  delete hint;
}

// A free slab of exactly this geometry, or nullptr.
void* TakeFree(size_t length, size_t alignment) {
  for (size_t i = gFree.size(); i-- > 0;) {
    Slab& s = gFree[i];
    if (s.length == length && s.alignment == alignment) {
      void* data = s.data;
      gFree.erase(gFree.begin() + static_cast<std::ptrdiff_t>(i));
      gFreeBytes -= length;
      gStats.reused++;
      return data;
    }
  }
  return nullptr;
}

bool IsPowerOfTwo(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

}  // namespace

// allocSlab(length, alignment, hugePageBytes): { buffer, fresh }, an
// ArrayBuffer of exactly `length` bytes at a multiple of `alignment`,
// uninitialised, and whether it is new memory (not from the free list), whose
// pages are not mapped yet. With hugePageBytes > 0 a new slab is advised
// MADV_HUGEPAGE (advice only).
Napi::Value AllocSlab(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber()) {
    throw Napi::TypeError::New(env, "allocSlab(length, alignment, hugePageBytes)");
  }
  int64_t length = info[0].As<Napi::Number>().Int64Value();
  int64_t alignment = info[1].As<Napi::Number>().Int64Value();
  int64_t huge = info[2].As<Napi::Number>().Int64Value();
  if (length <= 0 || length > (int64_t{1} << 30) || !IsPowerOfTwo(alignment) || alignment < static_cast<int64_t>(sizeof(void*)) ||
      alignment > (int64_t{1} << 25) || length % alignment != 0 || huge < 0 || (huge > 0 && !IsPowerOfTwo(huge))) {
    throw Napi::RangeError::New(env, "allocSlab: length must be a positive multiple of a power-of-two alignment, up to 1 GiB");
  }
  const auto len = static_cast<size_t>(length);
  const auto align = static_cast<size_t>(alignment);
  void* data;
  {
    std::lock_guard<std::mutex> lock(gMutex);
    data = TakeFree(len, align);
    gLive++;
  }
  const bool reused = data != nullptr;
  if (data == nullptr) {
    if (posix_memalign(&data, align, len) != 0) {
      std::lock_guard<std::mutex> lock(gMutex);
      gLive--;
      throw Napi::Error::New(env, "allocSlab: out of memory");
    }
    if (huge > 0) madvise(data, len, MADV_HUGEPAGE);  // advice: refused, the slab stays in small pages
    std::lock_guard<std::mutex> lock(gMutex);
    gStats.allocated++;
  }
  auto* hint = new SlabHint{len, align};
  try {
    Napi::Object out = Napi::Object::New(env);
    out.Set("buffer", Napi::ArrayBuffer::New(env, data, len, FinalizeSlab, hint));
    out.Set("fresh", Napi::Boolean::New(env, !reused));
    return out;
  } catch (...) {
    // External buffers refused (a V8 sandbox): the caller falls back to JS memory.
    delete hint;
    ReturnSlab(data, len, align);
    throw;
  }
}

// trimSlabs(idleMs): frees the free slabs idle at least that long; returns how many remain free.
Napi::Value TrimSlabs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "trimSlabs(idleMs)");
  double idleMs = info[0].As<Napi::Number>().DoubleValue();
  if (!(idleMs >= 0)) throw Napi::RangeError::New(env, "trimSlabs: idleMs must be >= 0");
  const auto now = std::chrono::steady_clock::now();
  std::vector<void*> dropped;
  size_t remaining;
  {
    std::lock_guard<std::mutex> lock(gMutex);
    std::vector<Slab> keep;
    for (const Slab& s : gFree) {
      double idle = std::chrono::duration<double, std::milli>(now - s.freedAt).count();
      if (idle >= idleMs) {
        dropped.push_back(s.data);
        gFreeBytes -= s.length;
        gStats.released++;
      } else {
        keep.push_back(s);
      }
    }
    gFree.swap(keep);
    remaining = gFree.size();
  }
  for (void* d : dropped) std::free(d);
  return Napi::Number::New(env, static_cast<double>(remaining));
}

// slabStats(): counters for tests and diagnostics.
Napi::Value SlabStatsOf(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  std::lock_guard<std::mutex> lock(gMutex);
  o.Set("allocated", gStats.allocated);
  o.Set("reused", gStats.reused);
  o.Set("released", gStats.released);
  o.Set("live", static_cast<double>(gLive));
  o.Set("free", static_cast<double>(gFree.size()));
  o.Set("freeBytes", static_cast<double>(gFreeBytes));
  return o;
}

}  // namespace snapstream
