// Host backend: the "device" arena is ordinary host memory and copies run on worker threads.
//
// Invariants:
// - Each stream is one worker thread draining a FIFO of operations (copy, record, wait), so work on a
//   stream runs in order and streams run concurrently, as on a GPU. The null stream is the calling
//   thread: its operations run inline (compute on the CPU is synchronous).
// - An event keeps a record counter and a completion counter. record() takes the next number; the
//   stream that reaches it completes it. wait()/synchronize() capture the number current at the call,
//   which gives CUDA's "most recent record" semantics; number 0 (never recorded) is already complete.
// - Destroying a stream drains its queue first, so no operation outlives the memory it touches.
// - An event handle owns a shared reference; queued operations hold their own, so destroying an
//   event whose record or wait is still queued (legal in CUDA) frees it only once they have run.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "expertflow/backend.h"
#include "expertflow/error.h"

namespace expertflow {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kHostAlignment = 4096;

struct HostEvent {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0;
  uint64_t completed = 0;
  Clock::time_point completed_at{};

  uint64_t next_record() {
    std::lock_guard<std::mutex> lk(mu);
    return ++recorded;
  }
  void complete(uint64_t number) {
    {
      std::lock_guard<std::mutex> lk(mu);
      if (number > completed) {
        completed = number;
        completed_at = Clock::now();
      }
    }
    cv.notify_all();
  }
  void wait_for(uint64_t number) {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return completed >= number; });
  }
};

using EventRef = std::shared_ptr<HostEvent>;

EventRef& event_ref(Event event) { return *static_cast<EventRef*>(event); }

class HostStream {
 public:
  HostStream() : worker_([this] { run(); }) {}
  ~HostStream() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }
  void submit(std::function<void()> op) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      ops_.push_back(std::move(op));
    }
    cv_.notify_all();
  }
  void drain() {
    std::unique_lock<std::mutex> lk(mu_);
    idle_cv_.wait(lk, [&] { return ops_.empty() && !busy_; });
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lk(mu_);
    while (true) {
      cv_.wait(lk, [&] { return stopping_ || !ops_.empty(); });
      if (ops_.empty()) return;  // stopping and drained
      auto op = std::move(ops_.front());
      ops_.pop_front();
      busy_ = true;
      lk.unlock();
      op();
      lk.lock();
      busy_ = false;
      if (ops_.empty()) idle_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::deque<std::function<void()>> ops_;
  bool busy_ = false;
  bool stopping_ = false;
  std::thread worker_;  // last: starts after the members it uses exist
};

class HostBackend final : public Backend {
 public:
  std::string name() const override { return "host"; }
  bool is_gpu() const override { return false; }
  int device_index() const override { return -1; }

  void* alloc_pinned(size_t bytes) override { return alloc(bytes, "pinned host"); }
  void free_pinned(void* ptr) noexcept override { std::free(ptr); }
  void register_host(void* /*ptr*/, size_t /*bytes*/) override {}
  void unregister_host(void* /*ptr*/) noexcept override {}
  void* alloc_device(size_t bytes) override { return alloc(bytes, "host-backend slot arena"); }
  void free_device(void* ptr) noexcept override { std::free(ptr); }

  Stream create_stream(bool /*high_priority*/) override { return new HostStream(); }
  void destroy_stream(Stream stream) noexcept override { delete static_cast<HostStream*>(stream); }
  Event create_event(bool /*timing*/, bool /*host_sleeps*/) override { return new EventRef(std::make_shared<HostEvent>()); }
  void destroy_event(Event event) noexcept override { delete static_cast<EventRef*>(event); }

  void copy_to_device_async(void* dst, const void* src, size_t bytes, Stream stream) override {
    if (stream == nullptr) {
      std::memcpy(dst, src, bytes);
      return;
    }
    static_cast<HostStream*>(stream)->submit([dst, src, bytes] { std::memcpy(dst, src, bytes); });
  }
  void record(Event event, Stream stream) override {
    EventRef ev = event_ref(event);
    const uint64_t number = ev->next_record();
    if (stream == nullptr) {
      ev->complete(number);
      return;
    }
    static_cast<HostStream*>(stream)->submit([ev, number] { ev->complete(number); });
  }
  void wait(Stream stream, Event event) override {
    EventRef ev = event_ref(event);
    uint64_t number;
    {
      std::lock_guard<std::mutex> lk(ev->mu);
      number = ev->recorded;
    }
    if (stream == nullptr) {
      ev->wait_for(number);
      return;
    }
    static_cast<HostStream*>(stream)->submit([ev, number] { ev->wait_for(number); });
  }
  void wait_signal(Stream stream, std::shared_ptr<HostSignal> signal) override {
    if (stream == nullptr) {
      signal->wait();
      return;
    }
    static_cast<HostStream*>(stream)->submit([signal] { signal->wait(); });
  }
  bool query(Event event) override {
    HostEvent* ev = event_ref(event).get();
    std::lock_guard<std::mutex> lk(ev->mu);
    return ev->completed >= ev->recorded;
  }
  void synchronize(Event event) override { wait(nullptr, event); }
  void synchronize_stream(Stream stream) override {
    if (stream != nullptr) static_cast<HostStream*>(stream)->drain();
  }
  float elapsed_ms(Event start, Event end) override {
    HostEvent* a = event_ref(start).get();
    HostEvent* b = event_ref(end).get();
    synchronize(start);
    synchronize(end);
    std::lock_guard<std::mutex> la(a->mu);
    std::lock_guard<std::mutex> lb(b->mu);
    return std::chrono::duration<float, std::milli>(b->completed_at - a->completed_at).count();
  }

 private:
  static void* alloc(size_t bytes, const char* what) {
    const size_t rounded = (std::max<size_t>(bytes, 1) + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    void* ptr = rounded >= bytes ? std::aligned_alloc(kHostAlignment, rounded) : nullptr;
    EF_CHECK(ptr != nullptr, "could not allocate " << bytes << " bytes of " << what
                                                   << " memory; lower the size or free memory");
    return ptr;
  }
};

}  // namespace

std::shared_ptr<Backend> make_host_backend() { return std::make_shared<HostBackend>(); }

std::shared_ptr<Backend> make_backend(const std::string& name, int device_index) {
  EF_CHECK(device_index >= 0, "a device index is at least 0, got " << device_index);
  if (name == "host") return make_host_backend();
  if (name == "cuda" || name == "auto") {
    const std::string reason = cuda_unavailable_reason();
    if (reason.empty()) {
#ifdef EXPERTFLOW_WITH_CUDA
      return make_cuda_backend(device_index);
#endif
    }
    EF_CHECK(name == "auto", "the CUDA backend was asked for but cannot be used: " << reason
                                 << "; use backend 'host' (EXPERTFLOW_BACKEND=host) on this machine");
    return make_host_backend();
  }
  EF_CHECK(false, "unknown backend '" << name << "'; choose 'auto', 'cuda' or 'host'");
}

#ifndef EXPERTFLOW_WITH_CUDA
std::string cuda_unavailable_reason() {
  return "this build of expertflow has no CUDA support (the CUDA toolkit was not found at build time)";
}
#endif

}  // namespace expertflow
