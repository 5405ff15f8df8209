// CUDA backend: pinned host memory, device memory, streams and events through the CUDA runtime.
//
// Invariants:
// - Every CUDA call is checked; failures throw with the call, CUDA's error name and text.
// - The demand stream is created at the device's greatest priority, the prefetch stream at its least.
//   Priority does not reorder host-to-device copies on the H200 (measured), so the copy engine keeps
//   demand-before-prefetch on the host; priorities only help the kernels queued beside the copies.
// - Linked against the static CUDA runtime; where no driver or GPU exists, cudaGetDeviceCount fails
//   cleanly and cuda_unavailable_reason() says why, so "auto" falls back to the host backend.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "expertflow/backend.h"
#include "expertflow/error.h"

namespace expertflow {
namespace {

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device_index) : device_index_(device_index) {
    EF_CUDA_CHECK(cudaSetDevice(device_index_));
    EF_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least_priority_, &greatest_priority_));
  }

  std::string name() const override { return "cuda"; }
  bool is_gpu() const override { return true; }
  int device_index() const override { return device_index_; }

  void* alloc_pinned(size_t bytes) override {
    void* ptr = nullptr;
    const cudaError_t status = cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable);
    if (status != cudaSuccess) cudaGetLastError();
    EF_CHECK(status == cudaSuccess, "could not allocate " << bytes << " bytes of pinned host memory: "
                                                          << cudaGetErrorString(status));
    return ptr;
  }
  void free_pinned(void* ptr) noexcept override {
    if (ptr) cudaFreeHost(ptr);
  }
  void register_host(void* ptr, size_t bytes) override {
    activate();
    const cudaError_t status = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable);
    if (status != cudaSuccess) cudaGetLastError();
    EF_CHECK(status == cudaSuccess, "could not page-lock " << bytes << " bytes of shared host memory: "
                                                           << cudaGetErrorString(status));
  }
  void unregister_host(void* ptr) noexcept override {
    if (ptr && cudaSetDevice(device_index_) == cudaSuccess) cudaHostUnregister(ptr);
  }
  void* alloc_device(size_t bytes) override {
    activate();
    void* ptr = nullptr;
    const cudaError_t status = cudaMalloc(&ptr, bytes);
    if (status != cudaSuccess) cudaGetLastError();
    EF_CHECK(status == cudaSuccess, "could not allocate " << bytes << " bytes of GPU memory: "
                                                          << cudaGetErrorString(status)
                                                          << "; lower num_slots or slot_bytes");
    return ptr;
  }
  void free_device(void* ptr) noexcept override {
    if (ptr) cudaFree(ptr);
  }

  Stream create_stream(bool high_priority) override {
    activate();
    cudaStream_t stream = nullptr;
    EF_CUDA_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking,
                                               high_priority ? greatest_priority_ : least_priority_));
    return stream;
  }
  void destroy_stream(Stream stream) noexcept override {
    if (stream) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
  }
  Event create_event(bool timing, bool host_sleeps) override {
    activate();
    cudaEvent_t event = nullptr;
    const unsigned flags = (timing ? cudaEventDefault : cudaEventDisableTiming) | (host_sleeps ? cudaEventBlockingSync : 0);
    EF_CUDA_CHECK(cudaEventCreateWithFlags(&event, flags));
    return event;
  }
  void destroy_event(Event event) noexcept override {
    if (event) cudaEventDestroy(static_cast<cudaEvent_t>(event));
  }

  void copy_to_device_async(void* dst, const void* src, size_t bytes, Stream stream) override {
    EF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)));
  }
  void record(Event event, Stream stream) override {
    EF_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
  }
  void wait(Stream stream, Event event) override {
    EF_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0));
  }
  void wait_signal(Stream stream, std::shared_ptr<HostSignal> signal) override {
    // The host function runs on CUDA's own thread, after the work queued before it; it makes no CUDA
    // call, and owns its reference to the signal.
    auto* held = new std::shared_ptr<HostSignal>(std::move(signal));
    const cudaError_t status = cudaLaunchHostFunc(
        static_cast<cudaStream_t>(stream),
        [](void* data) {
          auto* signal = static_cast<std::shared_ptr<HostSignal>*>(data);
          (*signal)->wait();
          delete signal;
        },
        held);
    if (status != cudaSuccess) delete held;
    EF_CUDA_CHECK(status);
  }
  bool query(Event event) override {
    const cudaError_t status = cudaEventQuery(static_cast<cudaEvent_t>(event));
    if (status == cudaErrorNotReady) return false;
    EF_CUDA_CHECK(status);
    return true;
  }
  void synchronize(Event event) override { EF_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event))); }
  void synchronize_stream(Stream stream) override {
    EF_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  }
  float elapsed_ms(Event start, Event end) override {
    float ms = 0.f;
    EF_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end)));
    return ms;
  }

 private:
  // The runtime may be driven from threads that never selected a device (the dispatcher thread).
  void activate() { EF_CUDA_CHECK(cudaSetDevice(device_index_)); }

  int device_index_;
  int least_priority_ = 0;
  int greatest_priority_ = 0;
};

}  // namespace

std::string cuda_unavailable_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(status);
  }
  if (count == 0) return "no CUDA device is visible";
  return "";
}

std::shared_ptr<Backend> make_cuda_backend(int device_index) {
  int count = 0;
  EF_CUDA_CHECK(cudaGetDeviceCount(&count));
  EF_CHECK(device_index >= 0 && device_index < count,
           "GPU " << device_index << " does not exist: " << count << " CUDA device(s) are visible (0.." << count - 1 << ")");
  return std::make_shared<CudaBackend>(device_index);
}

}  // namespace expertflow
