// Expansion kernels (see include/expertflow/expand.h for the invariants).
//
// Why a kernel: torch expands in two passes (cast, then an in-place multiply by the broadcast scale),
// 7 bytes of traffic per element in bf16; the MXFP4 lookup and a transpose add more. One pass reads the
// code (1 byte, or half of one) and writes the dense value (2 bytes), so expanding a Mixtral expert
// costs about as much as reading it once from GPU memory.
//
// - expand_rows: the stored orientation, 8 elements a thread (one 8-byte or 4-byte load, one 16-byte
//   store in bf16), grid-stride. Needs cols % 8 == 0 and aligned pointers; the pool aligns every tensor
//   to 256 bytes.
// - expand_tiles: anything else, and the transposed output: a 32 x 32 tile decoded into shared memory,
//   then written out row by row of the output, so both the reads and the writes are coalesced.
#include "expertflow/expand.h"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "expertflow/error.h"

namespace expertflow {
namespace {

constexpr int kFp8Block = 128;
constexpr int kMxBlock = 32;
constexpr int kTile = 32;

__device__ __forceinline__ float fp8_value(uint8_t code) {
  __nv_fp8_e4m3 v;
  v.__x = code;
  return static_cast<float>(v);
}

// e2m1: sign, 2 exponent bits, 1 mantissa bit -> 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives, built
// as fp32 bits (a table indexed at run time would sit in local memory and halve the kernel's speed)
__device__ __forceinline__ float fp4_value(uint32_t nibble) {
  const uint32_t exponent = (nibble >> 1) & 3u, mantissa = nibble & 1u;
  uint32_t bits = exponent ? ((exponent + 126u) << 23) | (mantissa << 22)  // (1 + m/2) * 2^(e-1)
                           : (mantissa ? 0x3F000000u : 0u);                  // subnormal: 0.5 or 0
  bits |= (nibble & 8u) << 28;                                                // sign
  return __uint_as_float(bits);
}

// 2^(e - 127) exactly (2^-127 is an fp32 subnormal, still exact)
__device__ __forceinline__ float e8m0_value(uint8_t e) { return ldexpf(1.0f, static_cast<int>(e) - 127); }

template <typename T>
__device__ __forceinline__ T to_dense(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_dense(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half to_dense(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ float to_dense(float x) { return x; }

// One element (r, c) of the stored weight, in fp32.
template <StoredFormat F>
__device__ __forceinline__ float decode(const uint8_t* codes, const void* scales, int64_t r, int64_t c, int64_t cols) {
  if constexpr (F == StoredFormat::kFp8Block) {
    const int64_t scale_cols = (cols + kFp8Block - 1) / kFp8Block;
    const float s = static_cast<const float*>(scales)[(r / kFp8Block) * scale_cols + c / kFp8Block];
    return fp8_value(codes[r * cols + c]) * s;
  } else if constexpr (F == StoredFormat::kInt8Row) {
    return static_cast<float>(static_cast<int8_t>(codes[r * cols + c])) * static_cast<const float*>(scales)[r];
  } else {
    const uint8_t byte = codes[r * (cols / 2) + c / 2];
    const uint8_t e = static_cast<const uint8_t*>(scales)[r * (cols / kMxBlock) + c / kMxBlock];
    return fp4_value((c & 1) ? (byte >> 4) : (byte & 15u)) * e8m0_value(e);
  }
}

// Eight consecutive elements (r, c .. c + 7) of the stored weight, c % 8 == 0, in fp32.
template <StoredFormat F>
__device__ __forceinline__ void decode8(const uint8_t* codes, const void* scales, int64_t r, int64_t c, int64_t cols,
                                        float v[8]) {
  if constexpr (F == StoredFormat::kMxfp4) {
    const uint32_t bytes = *reinterpret_cast<const uint32_t*>(codes + r * (cols / 2) + c / 2);
    const float s = e8m0_value(static_cast<const uint8_t*>(scales)[r * (cols / kMxBlock) + c / kMxBlock]);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = fp4_value(bytes >> (4 * i)) * s;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(codes + r * cols + c);
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
    if constexpr (F == StoredFormat::kFp8Block) {
      const int64_t scale_cols = (cols + kFp8Block - 1) / kFp8Block;
      const float s = static_cast<const float*>(scales)[(r / kFp8Block) * scale_cols + c / kFp8Block];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = fp8_value(b[i]) * s;
    } else {
      const float s = static_cast<const float*>(scales)[r];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(static_cast<int8_t>(b[i])) * s;
    }
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* out, const float v[8]) {
  if constexpr (sizeof(T) == 2) {
    uint4 packed;
    T* p = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = to_dense<T>(v[i]);
    *reinterpret_cast<uint4*>(out) = packed;
  } else {
    reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

template <StoredFormat F, typename T>
__global__ void expand_rows(const uint8_t* codes, const void* scales, T* out, int64_t rows, int64_t cols) {
  const int64_t per_row = cols / 8;
  const int64_t total = rows * per_row;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = g / per_row;
    const int64_t c = (g - r * per_row) * 8;
    float v[8];
    decode8<F>(codes, scales, r, c, cols, v);
    store8(out + r * cols + c, v);
  }
}

template <StoredFormat F, typename T, bool Transposed>
__global__ void expand_tiles(const uint8_t* codes, const void* scales, T* out, int64_t rows, int64_t cols) {
  __shared__ float tile[kTile][kTile + 1];  // +1: no bank conflicts on the column read
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = decode<F>(codes, scales, r, c, cols);
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    if constexpr (Transposed) {  // out [cols, rows]: threadIdx.x walks along r
      const int64_t c = c0 + i, r = r0 + threadIdx.x;
      if (r < rows && c < cols) out[c * rows + r] = to_dense<T>(tile[threadIdx.x][i]);
    } else {
      const int64_t r = r0 + i, c = c0 + threadIdx.x;
      if (r < rows && c < cols) out[r * cols + c] = to_dense<T>(tile[i][threadIdx.x]);
    }
  }
}

template <StoredFormat F, typename T>
void launch(const ExpandArgs& a) {
  const auto* codes = static_cast<const uint8_t*>(a.codes);
  T* out = static_cast<T*>(a.out);
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const bool aligned = reinterpret_cast<uintptr_t>(a.codes) % 8 == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  if (!a.transposed && a.cols % 8 == 0 && aligned) {
    const int64_t total = a.rows * (a.cols / 8);
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 8192);
    expand_rows<F, T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(codes, a.scales, out, a.rows, a.cols);
  } else {
    const int64_t tiles_y = (a.rows + kTile - 1) / kTile;
    EF_CHECK(tiles_y <= 65535, "a weight of " << a.rows << " rows is too tall to expand in one launch");
    const dim3 grid(static_cast<unsigned>((a.cols + kTile - 1) / kTile), static_cast<unsigned>(tiles_y));
    const dim3 block(kTile, 8);
    if (a.transposed)
      expand_tiles<F, T, true><<<grid, block, 0, stream>>>(codes, a.scales, out, a.rows, a.cols);
    else
      expand_tiles<F, T, false><<<grid, block, 0, stream>>>(codes, a.scales, out, a.rows, a.cols);
  }
  EF_CUDA_CHECK(cudaGetLastError());
}

template <StoredFormat F>
void launch_format(const ExpandArgs& a) {
  switch (a.dtype) {
    case DenseType::kBf16: return launch<F, __nv_bfloat16>(a);
    case DenseType::kFp16: return launch<F, __half>(a);
    case DenseType::kFp32: return launch<F, float>(a);
  }
}

// Makes `device` current for the launch and restores the caller's device, also when a launch throws.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    EF_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) EF_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

void check_shape(StoredFormat format, int64_t rows, int64_t cols) {
  EF_CHECK(rows > 0 && cols > 0, "cannot expand a " << rows << " x " << cols << " weight");
  EF_CHECK(format != StoredFormat::kMxfp4 || cols % kMxBlock == 0,
           "mxfp4 needs a multiple of " << kMxBlock << " columns, got " << cols);
}

void launch_any(const ExpandArgs& a) {
  switch (a.format) {
    case StoredFormat::kFp8Block: launch_format<StoredFormat::kFp8Block>(a); break;
    case StoredFormat::kInt8Row: launch_format<StoredFormat::kInt8Row>(a); break;
    case StoredFormat::kMxfp4: launch_format<StoredFormat::kMxfp4>(a); break;
  }
}

}  // namespace

bool expand_kernels_available() { return true; }

void expand_weight(const ExpandArgs& a) {
  check_shape(a.format, a.rows, a.cols);
  EF_CHECK(a.codes && a.scales && a.out, "expand_weight needs codes, scales and an output");
  DeviceGuard guard(a.device);
  launch_any(a);
}

ExpertExpansion::ExpertExpansion(std::vector<PackedWeight> weights, int device)
    : weights_(std::move(weights)), device_(device) {
  EF_CHECK(!weights_.empty(), "an expert expansion needs at least one weight");
  for (const PackedWeight& w : weights_) {
    check_shape(w.format, w.rows, w.cols);
    EF_CHECK(w.out && w.codes_offset >= 0 && w.scales_offset >= 0,
             "an expert expansion needs an output and non-negative offsets for every weight");
  }
}

void ExpertExpansion::run(const void* base, void* stream) const {
  EF_CHECK(base, "expanding an expert needs the address of its packed bytes");
  DeviceGuard guard(device_);
  const auto* bytes = static_cast<const uint8_t*>(base);
  for (const PackedWeight& w : weights_) {
    launch_any(ExpandArgs{w.format, w.dtype, bytes + w.codes_offset, bytes + w.scales_offset, w.out, w.rows, w.cols,
                          w.transposed, device_, stream});
  }
}

}  // namespace expertflow
