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
// I/O into a slab: a native operation on a slab's bytes pins it (SlabPin,
// from NativeFile::Submit) until the operation is destroyed. A finalizer
// that runs meanwhile (Node calls them at an environment's teardown, before
// the file's threads are joined) only marks the slab; the last unpin files
// it. So a slab is never handed out again, or freed, under a running read.
//
// Bounds: the free list holds at most kMaxFreeBytes; a slab beyond that is
// freed. trimSlabs(idleMs) frees the slabs idle that long (JS calls it on a
// timer after an export), so an idle process holds none for long. Shared by
// every environment (worker threads) of the process, under one mutex.
#include "slabs.h"

#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
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

// A slab handed out: its geometry, the operations using its bytes, and
// whether its ArrayBuffer has been finalized meanwhile.
struct LiveSlab {
  size_t length;
  size_t alignment;
  unsigned pins = 0;
  bool finalized = false;
};

std::mutex gMutex;
std::vector<Slab> gFree;  // most recently freed last
size_t gFreeBytes = 0;
SlabStats gStats;
std::map<uintptr_t, LiveSlab> gLive;  // by start address
size_t gLiveBytes = 0;

// With gMutex held: a slab no longer live goes to the free list, or back to
// the C library when the list is full. Returns the memory to free() outside
// the lock, or nullptr.
void* FileLocked(void* data, size_t length, size_t alignment) {
  if (gFreeBytes + length > kMaxFreeBytes) {
    gStats.released++;
    return data;
  }
  gFree.push_back({data, length, alignment, std::chrono::steady_clock::now()});
  gFreeBytes += length;
  return nullptr;
}

// The slab's ArrayBuffer is gone: file it now, or when its last operation ends.
void ReturnSlab(void* data) {
  void* drop = nullptr;
  {
    std::lock_guard<std::mutex> lock(gMutex);
    auto it = gLive.find(reinterpret_cast<uintptr_t>(data));
    if (it == gLive.end()) return;  // not ours: never happens
    if (it->second.pins > 0) {
      it->second.finalized = true;
      return;
    }
    const LiveSlab slab = it->second;
    gLive.erase(it);
    gLiveBytes -= slab.length;
    drop = FileLocked(data, slab.length, slab.alignment);
  }
  std::free(drop);
}

void FinalizeSlab(napi_env, void* data, void*) { ReturnSlab(data); }

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

// An Error with a `code` the TypeScript side tells refusals from failures by.
Napi::Error CodedError(Napi::Env env, const char* message, const char* code) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  return error;
}

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
  }
  const bool reused = data != nullptr;
  if (data == nullptr) {
    if (posix_memalign(&data, align, len) != 0) throw CodedError(env, "allocSlab: out of memory", "SLAB_NO_MEMORY");
    if (huge > 0) madvise(data, len, MADV_HUGEPAGE);  // advice: refused, the slab stays in small pages
  }
  {
    std::lock_guard<std::mutex> lock(gMutex);
    if (!reused) gStats.allocated++;
    gLive.emplace(reinterpret_cast<uintptr_t>(data), LiveSlab{len, align});
    gLiveBytes += len;
  }
  napi_value buffer;
  napi_status status = napi_create_external_arraybuffer(env, data, len, FinalizeSlab, nullptr, &buffer);
  if (status != napi_ok) {
    if (status == napi_no_external_buffers_allowed) {
      // Refused before the runtime took the memory (a V8 sandbox): it is still ours.
      ReturnSlab(data);
      throw CodedError(env, "allocSlab: external buffers are not allowed here", "SLAB_REFUSED");
    }
    // Whether the runtime kept the memory is unknown: the slab stays live (a
    // leak) rather than risk handing it out twice.
    throw Napi::Error::New(env, "allocSlab: napi_create_external_arraybuffer failed");
  }
  // From here on the ArrayBuffer owns the slab, whatever throws.
  Napi::Object out = Napi::Object::New(env);
  out.Set("buffer", Napi::Value(env, buffer));
  out.Set("fresh", Napi::Boolean::New(env, !reused));
  return out;
}

uintptr_t SlabPin(const void* p, size_t length) {
  if (p == nullptr) return 0;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(gMutex);
  auto it = gLive.upper_bound(addr);
  if (it == gLive.begin()) return 0;
  --it;
  if (addr - it->first >= it->second.length || length > it->second.length - (addr - it->first)) return 0;
  it->second.pins++;
  return it->first;
}

void SlabUnpin(uintptr_t start) {
  void* drop = nullptr;
  {
    std::lock_guard<std::mutex> lock(gMutex);
    auto it = gLive.find(start);
    if (it == gLive.end() || it->second.pins == 0) return;  // never happens
    if (--it->second.pins > 0 || !it->second.finalized) return;
    const LiveSlab slab = it->second;
    gLive.erase(it);
    gLiveBytes -= slab.length;
    drop = FileLocked(reinterpret_cast<void*>(start), slab.length, slab.alignment);
  }
  std::free(drop);
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
  SlabStats stats;
  size_t live, liveBytes, free, freeBytes;
  {
    std::lock_guard<std::mutex> lock(gMutex);
    stats = gStats;
    live = gLive.size();
    liveBytes = gLiveBytes;
    free = gFree.size();
    freeBytes = gFreeBytes;
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("allocated", stats.allocated);
  o.Set("reused", stats.reused);
  o.Set("released", stats.released);
  o.Set("live", static_cast<double>(live));
  o.Set("liveBytes", static_cast<double>(liveBytes));
  o.Set("free", static_cast<double>(free));
  o.Set("freeBytes", static_cast<double>(freeBytes));
  return o;
}

}  // namespace snapstream
