// The sign election of the generalized task-arithmetic maps, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

namespace pymerge {

// None: plain weighted sum; Sum: the sign of the weighted sum (mergekit's default); Count: the sign of the
// count of positive minus negative deltas. Stable codes: Python passes these integers.
enum class Consensus : int32_t { None = 0, Sum = 1, Count = 2 };

}  // namespace pymerge
