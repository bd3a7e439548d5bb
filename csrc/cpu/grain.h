// The grain of at::parallel_for in the layer kernels (bn_cpu.cpp, pool_cpu.cpp).
#pragma once
#include <cstdint>

namespace mspcnn {

// Items (channels, planes) of `per_item` values each to hand a thread at a
// time: about 16 k values of work, at least one item.
inline int64_t grain_for(int64_t per_item) {
  const int64_t g = 16384 / (per_item > 1 ? per_item : 1);
  return g < 1 ? 1 : g;
}

}  // namespace mspcnn
