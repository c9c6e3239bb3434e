// Slabs for the export's Readable chunks: see slabs.cc.
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace snapstream {

Napi::Value AllocSlab(const Napi::CallbackInfo& info);
Napi::Value TrimSlabs(const Napi::CallbackInfo& info);
Napi::Value SlabStatsOf(const Napi::CallbackInfo& info);

// Pins the live slab holding [p, p + length) while a native operation uses
// those bytes; returns its start (for SlabUnpin), or 0 when they are not in
// one slab. Any thread.
uintptr_t SlabPin(const void* p, size_t length);
void SlabUnpin(uintptr_t start);

}  // namespace snapstream
