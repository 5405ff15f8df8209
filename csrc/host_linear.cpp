// A linear layer on the host's cores (invariants in include/expertflow/host_linear.h).
#include "expertflow/host_linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <system_error>

#include "expertflow/backend.h"
#include "expertflow/error.h"

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 intrinsics warn on their own _mm*_undefined_* (GCC bug 105593, fixed in 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define EF_X86 1
#endif

namespace expertflow {
namespace {

using Operands = LinearOperands;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN (quiet)
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Rows [r0, r1) of y for every token: one fp32 accumulator per output, in index order.
void rows_portable(const Operands& j, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* w = j.w + r * j.in;
    for (int64_t t = 0; t < j.n; ++t) {
      const uint16_t* x = j.x + t * j.in;
      float acc = 0.0f;
      for (int64_t k = 0; k < j.in; ++k) acc += bf16_to_float(x[k]) * bf16_to_float(w[k]);
      j.y[t * j.out + r] = float_to_bf16(acc);
    }
  }
}

#ifdef EF_X86

// Each row of w streams from memory once; the hardware prefetcher alone left the kernel at 30 GB/s on a
// 2-core EPYC where a software prefetch 2 KB ahead of every row reached 45 (8 MB per expert read).
constexpr int kPrefetchBytes = 2048;

#define EF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define EF_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

EF_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 mask) {  // 16 bf16 -> fp32
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Tiles of R rows by T tokens: each row's bytes are read once per T tokens, and R x T independent
// accumulators keep the vector units busy while the loads stream. The operands are copied into
// locals and the loops fully unrolled so that GCC keeps the accumulators in registers: reading them
// through the Operands reference, it stored all 16 accumulators of a 4 x 4 tile to the stack at every
// step of k. The two kernels below differ only in their step of k: its width, loads and products.

template <int R, int T>
inline void tile_rows(const Operands& j, int64_t r, int64_t t, const uint16_t* (&x)[T], const uint16_t* (&w)[R]) {
#pragma GCC unroll 4
  for (int b = 0; b < T; ++b) x[b] = j.x + (t + b) * j.in;
#pragma GCC unroll 4
  for (int a = 0; a < R; ++a) w[a] = j.w + (r + a) * j.in;
}

template <int R, int T>
EF_AVX512 inline void zero_tile(__m512 (&acc)[R][T]) {
#pragma GCC unroll 4
  for (int a = 0; a < R; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < T; ++b) acc[a][b] = _mm512_setzero_ps();
}

template <int R, int T>
EF_AVX512 inline void store_tile(const Operands& j, int64_t r, int64_t t, __m512 (&acc)[R][T]) {
#pragma GCC unroll 4
  for (int a = 0; a < R; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < T; ++b) j.y[(t + b) * j.out + r + a] = float_to_bf16(_mm512_reduce_add_ps(acc[a][b]));
}

// AVX-512F: bf16 widened to fp32, 16 fused multiply-adds a step.
template <int R, int T>
EF_AVX512 void tile_avx512(const Operands& j, int64_t r, int64_t t) {
  const int64_t in = j.in;
  const uint16_t* x[T];
  const uint16_t* w[R];
  tile_rows<R, T>(j, r, t, x, w);
  __m512 acc[R][T];
  zero_tile<R, T>(acc);
  for (int64_t k = 0; k < in; k += 16) {
    const __mmask16 mask = in - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (in - k)) - 1u);
    __m512 xv[T];
#pragma GCC unroll 4
    for (int b = 0; b < T; ++b) xv[b] = load16(x[b] + k, mask);
#pragma GCC unroll 4
    for (int a = 0; a < R; ++a) {
      _mm_prefetch(reinterpret_cast<const char*>(w[a] + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 wv = load16(w[a] + k, mask);
#pragma GCC unroll 4
      for (int b = 0; b < T; ++b) acc[a][b] = _mm512_fmadd_ps(wv, xv[b], acc[a][b]);
    }
  }
  store_tile<R, T>(j, r, t, acc);
}

// vdpbf16ps: 32 bf16 products a step, added in pairs into 16 fp32 lanes (inputs' denormals read as 0).
template <int R, int T>
EF_AVX512_BF16 void tile_avx512_bf16(const Operands& j, int64_t r, int64_t t) {
  const int64_t in = j.in;
  const uint16_t* x[T];
  const uint16_t* w[R];
  tile_rows<R, T>(j, r, t, x, w);
  __m512 acc[R][T];
  zero_tile<R, T>(acc);
  for (int64_t k = 0; k < in; k += 32) {
    const __mmask32 mask =
        in - k >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << (in - k)) - 1u);
    __m512bh xv[T];
#pragma GCC unroll 4
    for (int b = 0; b < T; ++b) xv[b] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x[b] + k);
#pragma GCC unroll 4
    for (int a = 0; a < R; ++a) {
      _mm_prefetch(reinterpret_cast<const char*>(w[a] + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[a] + k);
#pragma GCC unroll 4
      for (int b = 0; b < T; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], wv, xv[b]);
    }
  }
  store_tile<R, T>(j, r, t, acc);
}

template <template <int, int> class Tile>
void rows_tiled(const Operands& j, int64_t r0, int64_t r1) {
  constexpr int kRows = 4, kTokens = 4;
  for (int64_t r = r0; r < r1;) {
    const bool full = r1 - r >= kRows;
    for (int64_t t = 0; t < j.n; t += kTokens) {
      switch (std::min<int64_t>(kTokens, j.n - t) + (full ? 0 : kTokens)) {
        case 1: Tile<kRows, 1>::run(j, r, t); break;
        case 2: Tile<kRows, 2>::run(j, r, t); break;
        case 3: Tile<kRows, 3>::run(j, r, t); break;
        case 4: Tile<kRows, 4>::run(j, r, t); break;
        case 5: Tile<1, 1>::run(j, r, t); break;
        case 6: Tile<1, 2>::run(j, r, t); break;
        case 7: Tile<1, 3>::run(j, r, t); break;
        default: Tile<1, 4>::run(j, r, t); break;
      }
    }
    r += full ? kRows : 1;
  }
}

template <int R, int T>
struct Avx512Tile {
  static void run(const Operands& j, int64_t r, int64_t t) { tile_avx512<R, T>(j, r, t); }
};
template <int R, int T>
struct Avx512Bf16Tile {
  static void run(const Operands& j, int64_t r, int64_t t) { tile_avx512_bf16<R, T>(j, r, t); }
};
#endif  // EF_X86

void run_rows(HostIsa isa, const Operands& j, int64_t r0, int64_t r1) {
#ifdef EF_X86
  if (isa == HostIsa::kAvx512Bf16) return rows_tiled<Avx512Bf16Tile>(j, r0, r1);
  if (isa == HostIsa::kAvx512) return rows_tiled<Avx512Tile>(j, r0, r1);
#endif
  (void)isa;
  rows_portable(j, r0, r1);
}

// Columns [c0, c1) of h = silu(g) * u for every token, as torch computes it on bf16 tensors: silu in
// fp32 of the rounded gate, rounded; the product in fp32 of the two rounded factors, rounded. j.x
// holds [g | u] per token (2 * j.out values), j.y the result (j.out values a token).
void silu_mul_columns(const Operands& j, int64_t c0, int64_t c1) {
  for (int64_t t = 0; t < j.n; ++t) {
    const uint16_t* g = j.x + t * 2 * j.out;
    const uint16_t* u = g + j.out;
    uint16_t* h = j.y + t * j.out;
    for (int64_t i = c0; i < c1; ++i) {
      const float gate = bf16_to_float(g[i]);
      const float act = bf16_to_float(float_to_bf16(gate / (1.0f + std::exp(-gate))));
      h[i] = float_to_bf16(act * bf16_to_float(u[i]));
    }
  }
}

constexpr int64_t kChunkBytes = 128 << 10;  // of w per chunk: a few hundred chunks per expert weight
// silu(g) * u's columns per chunk: scalar exp takes about 10 ns, so a chunk is some 10 us a token
// (one thread took 170 us for a Mixtral expert's 14336 columns, against 2.6 ms for its products).
constexpr int64_t kSiluColumnsPerChunk = 1024;
constexpr uint64_t kChunkBits = 32;         // the ticket: generation above, next chunk below

}  // namespace

HostIsa host_isa(HostIsa limit) {
  HostIsa best = HostIsa::kPortable;
#ifdef EF_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    best = __builtin_cpu_supports("avx512bf16") ? HostIsa::kAvx512Bf16 : HostIsa::kAvx512;
  }
#endif
  return std::min(best, limit);
}

std::string host_isa_name(HostIsa isa) {
  switch (isa) {
    case HostIsa::kAvx512Bf16: return "avx512bf16";
    case HostIsa::kAvx512: return "avx512";
    case HostIsa::kPortable: break;
  }
  return "portable";
}

HostLinear::HostLinear(int num_threads, HostIsa isa_limit) : isa_(host_isa(isa_limit)) {
  EF_CHECK(num_threads >= 1 && num_threads <= 4096, "num_threads must be 1 to 4096, got " << num_threads);
  workers_.reserve(num_threads - 1);
  try {
    for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  } catch (const std::system_error& e) {
    close();  // the threads already started must be joined before they are destroyed
    EF_CHECK(false, "could not start " << num_threads << " threads: " << e.what());
  }
}

HostLinear::~HostLinear() { close(); }

void HostLinear::close() noexcept {
  std::lock_guard<std::mutex> call(call_mu_);  // after a call in progress
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) {
    if (t.joinable()) t.join();
  }
}

void HostLinear::linear_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n, int64_t in, int64_t out) {
  EF_CHECK(x != nullptr && w != nullptr && y != nullptr, "linear_bf16 needs x, w and y");
  EF_CHECK(n >= 1 && in >= 1 && out >= 1, "linear_bf16 sizes must be positive: n=" << n << ", in=" << in
                                                                                   << ", out=" << out);
  std::lock_guard<std::mutex> call(call_mu_);
  EF_CHECK(!stopping_, "linear_bf16 after close()");
  run_linear(LinearOperands{x, w, y, n, in, out});
}

void HostLinear::gated_silu_expert_bf16(const uint16_t* x, const uint16_t* gate_up, const uint16_t* down, uint16_t* y,
                                        uint16_t* scratch, int64_t n, int64_t hidden, int64_t inter, HostSignal* done) {
  EF_CHECK(x != nullptr && gate_up != nullptr && down != nullptr && y != nullptr && scratch != nullptr,
           "gated_silu_expert_bf16 needs x, gate_up, down, y and scratch");
  EF_CHECK(n >= 1 && hidden >= 1 && inter >= 1,
           "gated_silu_expert_bf16 sizes must be positive: n=" << n << ", hidden=" << hidden << ", inter=" << inter);
  std::lock_guard<std::mutex> call(call_mu_);
  EF_CHECK(!stopping_, "gated_silu_expert_bf16 after close()");
  uint16_t* gu = scratch;                  // [n, 2 * inter]: gate, then up
  uint16_t* h = scratch + 2 * n * inter;  // [n, inter]
  run_linear(LinearOperands{x, gate_up, gu, n, hidden, 2 * inter});
  run_job(Job{LinearOperands{gu, nullptr, h, n, 2 * inter, inter}, kSiluColumnsPerChunk,
              (inter + kSiluColumnsPerChunk - 1) / kSiluColumnsPerChunk, /*silu_mul=*/true});
  run_linear(LinearOperands{h, down, y, n, inter, hidden});
  if (done != nullptr) done->set();
}

void HostLinear::run_linear(const LinearOperands& operands) {
  const int64_t rows_per_chunk = std::max<int64_t>(4, kChunkBytes / (operands.in * 2) / 4 * 4);
  run_job(Job{operands, rows_per_chunk, (operands.out + rows_per_chunk - 1) / rows_per_chunk});
}

void HostLinear::run_job(const Job& job) {
  const int64_t num_chunks = job.num_chunks;
  EF_CHECK(num_chunks < (int64_t{1} << kChunkBits), "a product of " << job.operands.out << " rows is too large");
  uint32_t generation;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = job;
    num_done_.store(0, std::memory_order_relaxed);
    generation = ++generation_;
    ticket_.store(uint64_t{generation} << kChunkBits, std::memory_order_release);
  }
  wake_.notify_all();
  run_chunks(job_, generation);
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return num_done_.load(std::memory_order_acquire) == num_chunks; });
}

void HostLinear::run_chunks(const Job& job, uint32_t generation) {
  uint64_t ticket = ticket_.load(std::memory_order_acquire);
  for (;;) {
    // A worker that woke late may hold an old call's job: the generation in the ticket tells.
    if ((ticket >> kChunkBits) != generation) return;
    const int64_t chunk = static_cast<int64_t>(ticket & ((uint64_t{1} << kChunkBits) - 1));
    if (chunk >= job.num_chunks) return;
    if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) continue;
    const int64_t r0 = chunk * job.rows_per_chunk;
    const int64_t r1 = std::min(job.operands.out, r0 + job.rows_per_chunk);
    if (job.silu_mul) {
      silu_mul_columns(job.operands, r0, r1);
    } else {
      run_rows(isa_, job.operands, r0, r1);
    }
    if (num_done_.fetch_add(1, std::memory_order_acq_rel) + 1 == job.num_chunks) {
      std::lock_guard<std::mutex> lock(mu_);  // the caller checks under mu_: no lost wake-up
      done_.notify_one();
    }
    ticket = ticket_.load(std::memory_order_acquire);
  }
}

void HostLinear::worker_loop() {
  uint32_t seen = 0;
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      job = job_;
    }
    run_chunks(job, seen);
  }
}

}  // namespace expertflow
