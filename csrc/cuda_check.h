// EF_CUDA_CHECK: a CUDA runtime call that must succeed (shared by the CUDA sources in csrc/).
//
// Invariants: a failing call throws expertflow::Error naming the call, CUDA's error name and text.
#pragma once

#include <cuda_runtime.h>

#include "expertflow/error.h"

#define EF_CUDA_CHECK(call)                                                                     \
  do {                                                                                          \
    const cudaError_t ef_status_ = (call);                                                      \
    EF_CHECK(ef_status_ == cudaSuccess, #call << " failed: " << cudaGetErrorName(ef_status_) \
                                              << ": " << cudaGetErrorString(ef_status_));       \
  } while (0)
