// Expansion of a compressed expert weight into dense weights on the GPU, in one pass.
//
// Invariants:
// - Every output element is round_to_dense(float(code) * scale) with the product in fp32 and one
//   round-to-nearest-even into the dense type: bit for bit what the torch reference in
//   python/expertflow/formats.py computes (which casts, then multiplies in place), so a GPU run and a
//   CPU run of the same expert agree.
// - A weight is `rows x cols` in its stored orientation ([out, in]); `transposed` writes `[cols, rows]`
//   (gpt-oss keeps its dense experts as [in, out]).
// - Pointers are device memory on `device`; the kernel runs on `stream` (null: the legacy default
//   stream) and returns without waiting. Nothing is allocated.
// - ExpertExpansion expands all of one expert's weights in one call: their codes and scales sit at
//   fixed offsets in the expert's packed bytes (a slot), their outputs at fixed addresses (a scratch
//   buffer), so a step passes one pointer per expert. Its arguments are checked once, when it is made.
// - Built only where CMake finds a CUDA compiler (csrc/expand.cu, for sm_80 and sm_90 plus PTX);
//   elsewhere csrc/expand_none.cpp makes expand_kernels_available() false, and expand_weight and
//   ExpertExpansion throw.
#pragma once

#include <cstdint>
#include <vector>

namespace expertflow {

enum class StoredFormat {
  kFp8Block,  // float8_e4m3fn codes [rows, cols]; fp32 scale per 128 x 128 block [ceil(rows/128), ceil(cols/128)]
  kInt8Row,   // int8 codes [rows, cols]; fp32 scale per row [rows]
  kMxfp4,     // uint8 [rows, cols/32, 16]: two e2m1 codes a byte, low nibble first; e8m0 scale per 32 [rows, cols/32]
};

enum class DenseType { kBf16, kFp16, kFp32 };

struct ExpandArgs {
  StoredFormat format;
  DenseType dtype;
  const void* codes;
  const void* scales;
  void* out;
  int64_t rows;
  int64_t cols;
  bool transposed;
  int device;
  void* stream;
};

bool expand_kernels_available();
void expand_weight(const ExpandArgs& args);

// A weight inside an expert's packed bytes: codes and scales at byte offsets from the expert's start.
struct PackedWeight {
  StoredFormat format;
  DenseType dtype;
  int64_t codes_offset;
  int64_t scales_offset;
  void* out;
  int64_t rows;
  int64_t cols;
  bool transposed;
};

class ExpertExpansion {
 public:
  ExpertExpansion(std::vector<PackedWeight> weights, int device);
  // Expands every weight of the expert whose packed bytes start at `base` (device memory) on `stream`.
  void run(const void* base, void* stream) const;
  int device() const { return device_; }

 private:
  std::vector<PackedWeight> weights_;
  int device_;
};

}  // namespace expertflow
