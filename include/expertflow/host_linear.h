// A linear layer on the host's cores, for experts computed where their weights already are (the
// pinned pool) instead of being copied to the GPU.
//
// Why native: at decode an expert sees a token or two, so y = x . W^T is a matrix-vector product
// that only has to read W once. It is bound by host memory bandwidth, and it shares the cores with
// the thread that launches the GPU's kernels. On the H200 machine torch's bf16 CPU matmul read a
// cold Mixtral expert at 55-62 GB/s, this kernel at 111-122; and torch splits the rows statically,
// so its call waits for its slowest thread, which a busy core makes slow.
//
// Invariants:
// - y [n, out] = x [n, in] . w [out, in]^T, every tensor bf16 (raw bits), row-major and contiguous.
//   Products and sums are fp32 (exact products; the sum's order differs from torch's); each output
//   rounds once to bf16, to nearest even. NaN stays NaN. The AVX-512 BF16 kernel (vdpbf16ps) reads
//   denormal inputs as zero and flushes denormal partial sums to zero.
// - Rows of w are dealt out in chunks of about 128 KB from an atomic counter, so a thread that lost
//   its core leaves its share to the others instead of holding up the call. The calling thread works
//   too; num_threads counts it.
// - Workers sleep on a condition variable between calls: an idle HostLinear takes no core.
// - One call runs at a time (a mutex); calls from several threads take turns.
// - The kernels: AVX-512 BF16 dot products where the CPU has them, else AVX-512F, else portable C++;
//   chosen at construction (the CPU is asked at run time, so one build runs on every x86-64 CPU).
// - gated_silu_expert_bf16 runs a whole gated SiLU expert (Mixtral, Qwen-MoE, DeepSeek, OLMoE) in
//   one call: both products as linear_bf16 computes them, and between them silu(gate) * up with
//   torch's roundings (each of gate, up, silu(gate) and the product rounds once to bf16), its
//   columns dealt out to the workers as a product's rows are (scalar exp: one thread took 170 us for
//   a Mixtral expert, 5% of its products at decode on the H200 machine's cores). One call
//   from Python, so the thread computing it never takes Python's lock back between the expert's
//   steps, which a busy launching thread would hold it through; and it sets the caller's `done`
//   signal once y is written, before its caller has the lock back (the GPU waits for that signal).
//   It does not set `done` when it throws: the caller must, so a waiting stream moves on.
// - close() (and destruction) joins the workers; a call after close() throws. Nothing is allocated
//   after construction: the expert's intermediates live in the caller's scratch memory.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace expertflow {

class HostSignal;  // backend.h

// One product's operands: y [n, out] = x [n, in] . w [out, in]^T.
struct LinearOperands {
  const uint16_t* x;
  const uint16_t* w;
  uint16_t* y;
  int64_t n, in, out;
};

enum class HostIsa { kPortable, kAvx512, kAvx512Bf16 };

// The best kernel this CPU runs, at most `limit`.
HostIsa host_isa(HostIsa limit = HostIsa::kAvx512Bf16);
std::string host_isa_name(HostIsa isa);

class HostLinear {
 public:
  // num_threads >= 1 (the caller plus num_threads - 1 workers); isa at most what host_isa() allows.
  explicit HostLinear(int num_threads, HostIsa isa_limit = HostIsa::kAvx512Bf16);
  ~HostLinear();
  HostLinear(const HostLinear&) = delete;
  HostLinear& operator=(const HostLinear&) = delete;

  void linear_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n, int64_t in, int64_t out);
  // y [n, hidden] = (silu(g) * u) . down^T where [g | u] = x . gate_up^T: gate_up [2 * inter, hidden]
  // (the gate's rows first), down [hidden, inter], x [n, hidden]. scratch holds 3 * n * inter values.
  // done (may be null) is set once y is written.
  void gated_silu_expert_bf16(const uint16_t* x, const uint16_t* gate_up, const uint16_t* down, uint16_t* y,
                              uint16_t* scratch, int64_t n, int64_t hidden, int64_t inter, HostSignal* done = nullptr);
  void close() noexcept;  // joins the workers; idempotent

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }
  HostIsa isa() const { return isa_; }

 private:
  // A call's work, dealt out in chunks: rows of a product, or (silu_mul) columns of silu(g) * u,
  // operands.x holding [g | u] per token and operands.y the result, operands.out columns.
  struct Job {
    LinearOperands operands;
    int64_t rows_per_chunk, num_chunks;
    bool silu_mul = false;
  };
  void run_linear(const LinearOperands& operands);  // one product; call_mu_ held
  void run_job(const Job& job);                      // every chunk of job, the caller working too; call_mu_ held
  void run_chunks(const Job& job, uint32_t generation);
  void worker_loop();

  const HostIsa isa_;
  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // one call at a time
  std::mutex mu_;       // guards the fields below
  std::condition_variable wake_, done_;
  Job job_{};
  // Calls so far, modulo 2^32: 32 bits, as the ticket holds them, so the two compare equal after it
  // wraps (a worker that sleeps through 2^32 calls is not needed: the others take the chunks).
  uint32_t generation_ = 0;
  // Set once, by close(), which holds call_mu_ too: a call reads it under call_mu_ alone.
  bool stopping_ = false;
  // The next chunk to take, with the call's generation in the high 32 bits: a worker that woke late
  // cannot take a chunk of a call it did not read.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> num_done_{0};  // chunks of the current call finished
};

}  // namespace expertflow
