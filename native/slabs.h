// Slabs for the export's Readable chunks: see slabs.cc.
#pragma once

#include <napi.h>

namespace snapstream {

Napi::Value AllocSlab(const Napi::CallbackInfo& info);
Napi::Value TrimSlabs(const Napi::CallbackInfo& info);
Napi::Value SlabStatsOf(const Napi::CallbackInfo& info);

}  // namespace snapstream
