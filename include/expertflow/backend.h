// Backend: the only place that talks to CUDA or emulates it.
//
// Invariants:
// - Streams and events are opaque handles. A null Stream is the caller's compute stream: on CUDA the
//   legacy default stream, on the host backend the calling thread itself (work on it runs inline).
// - Event semantics follow CUDA: wait(stream, event) and synchronize(event) refer to the event's most
//   recent record at the time of the call; an event never recorded counts as complete.
// - Work submitted to one stream runs in submission order; different streams run concurrently.
// - Allocation failures throw with the size asked for; free/destroy never throw.
// - A stream waiting on a HostSignal holds up only its own later work, never the thread that queued
//   the wait: the CPU computes an expert while the GPU's queue already holds what reads its result.
//   The signal must be set (the CPU's worker sets it whatever happens) or the stream never moves on.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>

namespace expertflow {

using Stream = void*;
using Event = void*;

// A flag the host sets once (Backend::wait_signal).
class HostSignal {
 public:
  void set() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      set_ = true;
    }
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [this] { return set_; });
  }
  bool is_set() const {
    std::lock_guard<std::mutex> lk(mu_);
    return set_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  // True when "device" memory is GPU memory (compute must run on the GPU to read slots).
  virtual bool is_gpu() const = 0;
  virtual int device_index() const = 0;

  virtual void* alloc_pinned(size_t bytes) = 0;
  virtual void free_pinned(void* ptr) noexcept = 0;
  // Page-locks host memory allocated elsewhere (a shared mapping) for this device's copies;
  // unregister_host undoes it. No-ops on the host backend.
  virtual void register_host(void* ptr, size_t bytes) = 0;
  virtual void unregister_host(void* ptr) noexcept = 0;
  virtual void* alloc_device(size_t bytes) = 0;
  virtual void free_device(void* ptr) noexcept = 0;

  // high_priority: the demand stream; otherwise the prefetch stream.
  virtual Stream create_stream(bool high_priority) = 0;
  virtual void destroy_stream(Stream stream) noexcept = 0;
  // timing: elapsed_ms may read it. host_sleeps: synchronize() on it sleeps until the event fires
  // instead of spinning (CUDA's blocking sync); for threads that wait in the background, whose
  // spinning slows the thread that launches compute.
  virtual Event create_event(bool timing, bool host_sleeps) = 0;
  virtual void destroy_event(Event event) noexcept = 0;

  virtual void copy_to_device_async(void* dst, const void* src, size_t bytes, Stream stream) = 0;
  virtual void record(Event event, Stream stream) = 0;
  virtual void wait(Stream stream, Event event) = 0;
  // Work queued on `stream` after this call waits until `signal` is set; the caller does not wait
  // (CUDA: a host function that blocks the stream until then; the host backend's null stream, the
  // calling thread itself, waits inline).
  virtual void wait_signal(Stream stream, std::shared_ptr<HostSignal> signal) = 0;
  virtual bool query(Event event) = 0;
  virtual void synchronize(Event event) = 0;
  virtual void synchronize_stream(Stream stream) = 0;
  // Milliseconds between two completed timing events.
  virtual float elapsed_ms(Event start, Event end) = 0;
};

// "auto" picks CUDA when a GPU is visible, else host; "cuda" without a GPU throws with the reason.
// device_index: the GPU the CUDA backend copies to (one process per GPU when distributed).
std::shared_ptr<Backend> make_backend(const std::string& name, int device_index = 0);
std::shared_ptr<Backend> make_host_backend();
// Empty string when a CUDA device is usable; otherwise why not.
std::string cuda_unavailable_reason();
#ifdef EXPERTFLOW_WITH_CUDA
std::shared_ptr<Backend> make_cuda_backend(int device_index);
#endif

}  // namespace expertflow
