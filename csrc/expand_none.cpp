// Expansion where no CUDA compiler was found: the Python side expands with torch instead.
//
// Invariants: expand_kernels_available() is false; expand_weight and ExpertExpansion always throw.
#include "expertflow/error.h"
#include "expertflow/expand.h"

namespace expertflow {

bool expand_kernels_available() { return false; }

namespace {
constexpr const char* kNoKernels = "this build of expertflow has no expansion kernels (no CUDA compiler was found at build time)";
}  // namespace

void expand_weight(const ExpandArgs&) { EF_CHECK(false, kNoKernels); }

ExpertExpansion::ExpertExpansion(std::vector<PackedWeight>, int device) : device_(device) { EF_CHECK(false, kNoKernels); }

void ExpertExpansion::run(const void*, void*) const { EF_CHECK(false, kNoKernels); }

}  // namespace expertflow
