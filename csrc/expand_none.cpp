// Expansion where no CUDA compiler was found: the Python side expands with torch instead.
//
// Invariants: expand_kernels_available() is false; expand_weight always throws.
#include "expertflow/error.h"
#include "expertflow/expand.h"

namespace expertflow {

bool expand_kernels_available() { return false; }

void expand_weight(const ExpandArgs&) {
  EF_CHECK(false, "this build of expertflow has no expansion kernels (no CUDA compiler was found at build time)");
}

}  // namespace expertflow
