// How many threads the CPU kernels use (reported by pymerge._C.build_info()).
#include "pymerge/cpu_kernels.h"

#if defined(PYMERGE_WITH_OPENMP)
#include <omp.h>
#endif

namespace pymerge::cpu {

int max_threads() {
#if defined(PYMERGE_WITH_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace pymerge::cpu
