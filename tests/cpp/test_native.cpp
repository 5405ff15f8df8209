// Native tests of the torch-free core: pool packing, policy victim choice, cache bookkeeping and
// copy engine ordering, on the host backend. Run by CTest; prints "N passed, M failed".
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "expertflow/backend.h"
#include "expertflow/cache.h"
#include "expertflow/copy_engine.h"
#include "expertflow/error.h"
#include "expertflow/host_linear.h"
#include "expertflow/policy.h"
#include "expertflow/pool.h"
#include "expertflow/runtime.h"

using namespace expertflow;

namespace {

struct Failure {
  std::string what;
};

#define EXPECT(cond)                                                                          \
  do {                                                                                        \
    if (!(cond)) throw Failure{std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " #cond}; \
  } while (0)

template <typename F>
void expect_error(F&& f, const std::string& fragment) {
  try {
    f();
  } catch (const Error& e) {
    if (std::string(e.what()).find(fragment) == std::string::npos) {
      throw Failure{std::string("error '") + e.what() + "' lacks '" + fragment + "'"};
    }
    return;
  }
  throw Failure{"expected an error containing '" + fragment + "'"};
}

// The host backend behind every call; a test backend overrides the calls it watches or breaks.
class ForwardingBackend : public Backend {
 public:
  std::shared_ptr<Backend> inner = make_host_backend();

  std::string name() const override { return "forwarding"; }
  bool is_gpu() const override { return false; }
  int device_index() const override { return -1; }
  void* alloc_pinned(size_t b) override { return inner->alloc_pinned(b); }
  void free_pinned(void* p) noexcept override { inner->free_pinned(p); }
  void register_host(void* p, size_t b) override { inner->register_host(p, b); }
  void unregister_host(void* p) noexcept override { inner->unregister_host(p); }
  void* alloc_device(size_t b) override { return inner->alloc_device(b); }
  void free_device(void* p) noexcept override { inner->free_device(p); }
  Stream create_stream(bool hp) override { return inner->create_stream(hp); }
  void destroy_stream(Stream s) noexcept override { inner->destroy_stream(s); }
  Event create_event(bool t, bool s) override { return inner->create_event(t, s); }
  void destroy_event(Event e) noexcept override { inner->destroy_event(e); }
  void copy_to_device_async(void* dst, const void* src, size_t bytes, Stream s) override {
    inner->copy_to_device_async(dst, src, bytes, s);
  }
  void record(Event e, Stream s) override { inner->record(e, s); }
  void wait(Stream s, Event e) override { inner->wait(s, e); }
  void wait_signal(Stream s, std::shared_ptr<HostSignal> signal) override { inner->wait_signal(s, std::move(signal)); }
  bool query(Event e) override { return inner->query(e); }
  void synchronize(Event e) override { inner->synchronize(e); }
  void synchronize_stream(Stream s) override { inner->synchronize_stream(s); }
  float elapsed_ms(Event a, Event b) override { return inner->elapsed_ms(a, b); }
};

// Logs every copy submitted (stream, destination, bytes).
class RecordingBackend final : public ForwardingBackend {
 public:
  struct Copy {
    Stream stream;
    void* dst;
    size_t bytes;
  };
  std::mutex mu;
  std::vector<Copy> copies;

  void copy_to_device_async(void* dst, const void* src, size_t bytes, Stream s) override {
    {
      std::lock_guard<std::mutex> lk(mu);
      copies.push_back({s, dst, bytes});
    }
    inner->copy_to_device_async(dst, src, bytes, s);
  }
};

// Holds every event back until open(): a chunk the dispatcher submitted stays in flight, so its job
// stays started.
class GatedBackend : public ForwardingBackend {
 public:
  std::mutex mu;
  std::condition_variable cv;
  bool is_open = false;

  void open() {
    {
      std::lock_guard<std::mutex> lk(mu);
      is_open = true;
    }
    cv.notify_all();
  }
  bool query(Event e) override {
    {
      std::lock_guard<std::mutex> lk(mu);
      if (!is_open) return false;
    }
    return inner->query(e);
  }
  void synchronize(Event e) override {
    {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return is_open; });
    }
    inner->synchronize(e);
  }
};

// Opens the gate when it goes out of scope. Declared after what waits on the gate (a copy engine, a
// runtime), it goes first: a failing check opens the gate, and close() does not wait forever on a
// chunk held back.
struct OpenOnExit {
  GatedBackend& gate;
  ~OpenOnExit() { gate.open(); }
};

// Gated, and keeps the source of every copy in the order the copy engine issued them.
class GatedRecordingBackend final : public GatedBackend {
 public:
  std::vector<const void*> sources;
  void copy_to_device_async(void* dst, const void* src, size_t bytes, Stream s) override {
    {
      std::lock_guard<std::mutex> lk(mu);
      sources.push_back(src);
    }
    inner->copy_to_device_async(dst, src, bytes, s);
  }
};

TensorSpec spec(const std::string& name, std::vector<int64_t> shape, size_t itemsize) {
  TensorSpec t;
  t.name = name;
  t.dtype = "raw";
  t.shape = std::move(shape);
  t.itemsize = itemsize;
  return t;
}

void test_pool_packing() {
  auto layout = ExpertLayout::pack({spec("w1", {7, 33}, 2), spec("b", {1}, 4), spec("w2", {33}, 4)});
  EXPECT(layout.tensors[0].offset == 0 && layout.tensors[0].nbytes == 462);
  EXPECT(layout.tensors[1].offset == 512 && layout.tensors[1].nbytes == 4);
  EXPECT(layout.tensors[2].offset == 768 && layout.tensors[2].nbytes == 132);
  EXPECT(layout.expert_bytes == 1024);
  ExpertPool pool(make_host_backend(), {3, 5}, {layout, ExpertLayout::pack({spec("x", {1}, 1)})});
  EXPECT(pool.total_bytes() == 3 * 1024 + 5 * 256);
  EXPECT(pool.expert_data(1, 0) == pool.expert_data(0, 2) + 1024);
  EXPECT(reinterpret_cast<uintptr_t>(pool.expert_data(1, 4)) % kTensorAlignment == 0);
  std::vector<uint8_t> src(132, 9);
  pool.write(0, 1, 2, src.data(), src.size());
  EXPECT(pool.expert_data(0, 1)[768] == 9 && pool.expert_data(0, 1)[768 + 131] == 9);
  expect_error([&] { pool.write(0, 1, 2, src.data(), 133); }, "overruns tensor 'w2'");
  expect_error([&] { pool.expert_data(2, 0); }, "unknown layer 2");
  expect_error([&] { pool.expert_data(1, 5); }, "unknown expert 5 of layer 1");
  expect_error([&] { ExpertLayout::pack({spec("a", {1}, 1), spec("a", {1}, 1)}); }, "listed twice");
}

void test_policy_victims() {
  std::vector<SlotMeta> slots(4);
  auto set = [&](int i, uint64_t last, uint64_t count, double next, double following) {
    slots[i].layer = 0;
    slots[i].expert = i;
    slots[i].last_use = last;
    slots[i].use_count = count;
    slots[i].next_use = next;
    slots[i].following_use = following;
  };
  set(0, 10, 5, 100, 400);
  set(1, 20, 1, kNeverUsed, kNeverUsed);
  set(2, 5, 9, 50, 300);
  set(3, 30, 1, kNeverUsed, kNeverUsed);
  const std::vector<int> all{0, 1, 2, 3};
  EXPECT(choose_victim(Policy::kLru, slots, all) == 2);
  EXPECT(choose_victim(Policy::kLfu, slots, all) == 1);         // fewest uses, older of the tie
  EXPECT(choose_victim(Policy::kBelady, slots, all) == 1);      // never again, older
  EXPECT(choose_victim(Policy::kExpertflow, slots, all) == 1);  // the same order, on predictions
  EXPECT(choose_victim(Policy::kBelady, slots, {0, 2}) == 0);   // farther next use
  // Seen from a load due at 75, slot 2 is next needed at 300 (its use at 50 comes first), slot 0 at 100.
  EXPECT(choose_victim(Policy::kExpertflow, slots, {0, 2}, 40) == 0);
  EXPECT(choose_victim(Policy::kExpertflow, slots, {0, 2}, 75) == 2);
  EXPECT(choose_victim(Policy::kExpertflow, slots, {0, 2}, 200) == 0);
  EXPECT(choose_victim(Policy::kExpertflow, slots, {0, 2}, 100) == 0);  // 0's use at 100 is not after 100
  EXPECT(choose_victim(Policy::kLru, slots, {}) == -1);
  expect_error([] { parse_policy("fifo"); }, "unknown cache policy 'fifo'");
}

void test_cache_pins_and_quotas() {
  SlotCache cache(3, Policy::kLru);
  for (int e = 0; e < 3; ++e) {
    const int s = cache.pick_slot(0, kDueNow, false);
    EXPECT(s == e);  // empty slots first, lowest index
    cache.assign(s, 0, e);
    cache.touch(s);
  }
  cache.pin(0);
  EXPECT(cache.pick_slot(1, kDueNow, false) == 1);  // slot 0 is older but pinned
  cache.unpin(0);
  expect_error([&] { cache.unpin(0); }, "slot 0 is not pinned");
  expect_error([&] { cache.assign(1, 0, 0); }, "already resident");
  cache.set_layer_quotas({1, 3});
  EXPECT(cache.pick_slot(0, kDueNow, false) == 0);  // layer 0 at 3 > quota 1: its own LRU slot
  EXPECT(cache.pick_slot(1, kDueNow, false) == 0);  // layer 1 below quota: takes layer 0's excess
  // Under lru a prefetch spares the slots its plan names.
  Plan plan;
  plan.prefetch = {{0, 0, 1}, {1, 5, 2}};
  const auto loads = cache.apply_plan(plan, [](int) {});
  EXPECT(loads.size() == 1 && loads[0].slot == 1 && cache.find(1, 5) == 1);
  // Replay access: a layer's resident experts are never victims of its own misses.
  SlotCache replay(2, Policy::kLru);
  EXPECT(replay.access(0, {0, 1}, nullptr).hits == 0);
  EXPECT(replay.access(0, {1, 2}, nullptr).hits == 1);
  EXPECT(replay.find(0, 1) >= 0 && replay.find(0, 2) >= 0 && replay.find(0, 0) < 0);
  expect_error([&] { replay.access(0, {0, 1, 2}, nullptr); }, "capacity 2 is smaller than the 3 experts");
}

// Accesses A B C A B C ... (positions 0, 1, 2, ...) with two slots. Demand paging under Belady misses
// every other access. The aggressive rule (evict the farthest next use now, to fetch the next miss)
// misses every access; the conservative rule the cache implements loads exactly Belady's experts.
void test_conservative_admission() {
  const int kSteps = 30;
  auto uses = [](int expert, double after) {  // next position of `expert` strictly after `after`
    double p = std::floor(after) + 1;
    while (static_cast<int>(p) % 3 != expert) p += 1;
    return p;
  };
  SlotCache cache(2, Policy::kExpertflow);
  int loads = 0;
  for (int pos = 0; pos < kSteps; ++pos) {
    const int expert = pos % 3;
    Plan plan;
    plan.stride = 3;
    for (int e = 0; e < 3; ++e) {
      const double next = uses(e, pos - 0.5);  // the access at `pos` itself is still ahead
      plan.next_use.push_back(next);
      plan.following_use.push_back(uses(e, next));
    }
    for (int ahead = 0; ahead < 3; ++ahead) plan.prefetch.push_back(PlanItem{0, (pos + ahead) % 3, double(pos + ahead)});
    loads += static_cast<int>(cache.apply_plan(plan, [](int) {}).size());
    EXPECT(cache.find(0, expert) >= 0);  // every access is a hit: each load came before its use
    cache.touch(cache.find(0, expert));
  }
  SlotCache belady(2, Policy::kBelady);
  int misses = 0;
  for (int pos = 0; pos < kSteps; ++pos) {
    const std::vector<double> next{uses(pos % 3, pos)};
    misses += 1 - belady.access(0, {pos % 3}, &next).hits;
  }
  EXPECT(loads == misses);
  EXPECT(misses == 1 + kSteps / 2);
}

void test_copy_engine_due_order_and_chunks() {
  auto backend = std::make_shared<RecordingBackend>();
  constexpr size_t kChunk = 4096, kBytes = 3 * kChunk + 100;
  std::vector<uint8_t> src(4 * kBytes), dst(4 * kBytes, 0);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + 3);
  CopyEngine engine(backend, 4, CopyEngineOptions{kChunk, 1});
  engine.pause();
  const double due[4] = {3, 1, 2, 4};
  for (int s = 0; s < 4; ++s) engine.prefetch(s, &src[s * kBytes], &dst[s * kBytes], kBytes, due[s]);
  EXPECT(engine.cancel(3));  // cancelled before any byte moved
  EXPECT(!engine.cancel(3));
  engine.resume();
  engine.synchronize();
  EXPECT(std::memcmp(src.data(), dst.data(), 3 * kBytes) == 0);
  EXPECT(dst[3 * kBytes] == 0 && dst[4 * kBytes - 1] == 0);
  std::vector<int> order;
  for (const auto& c : backend->copies) {
    EXPECT(c.bytes <= kChunk && c.stream == engine.prefetch_stream());
    const int slot = static_cast<int>((static_cast<uint8_t*>(c.dst) - dst.data()) / kBytes);
    if (order.empty() || order.back() != slot) order.push_back(slot);
  }
  EXPECT((order == std::vector<int>{1, 2, 0}));  // earliest due first, each job whole before the next
  EXPECT(backend->copies.size() == 3 * 4);
  EXPECT(engine.stats().prefetch_bytes == 3 * kBytes);
}

void test_copy_engine_demand_overtakes_queue() {
  auto backend = std::make_shared<RecordingBackend>();
  constexpr size_t kBytes = 64 << 10;
  std::vector<uint8_t> src(3 * kBytes, 5), dst(3 * kBytes, 0);
  CopyEngine engine(backend, 3, CopyEngineOptions{4096, 2});
  engine.pause();
  engine.prefetch(0, &src[0], &dst[0], kBytes, 1.0);
  engine.prefetch(1, &src[kBytes], &dst[kBytes], kBytes, 1.0);
  engine.demand(2, &src[2 * kBytes], &dst[2 * kBytes], kBytes);
  EXPECT(engine.wait_ready(2, nullptr) || dst[2 * kBytes] == 5);
  EXPECT(dst[2 * kBytes + kBytes - 1] == 5);
  EXPECT(engine.job_state(0) == CopyEngine::JobState::kQueued);  // the queue did not have to drain
  // what the link still has to carry: a queued job's every byte, nothing of a submitted one
  EXPECT(engine.unsubmitted_bytes(0) == kBytes && engine.unsubmitted_bytes(1) == kBytes);
  EXPECT(engine.unsubmitted_bytes(2) == 0);
  EXPECT(engine.promote(1));  // a queued prefetch needed now moves to the demand stream
  EXPECT(engine.unsubmitted_bytes(1) == 0);
  engine.wait_ready(1, nullptr);
  EXPECT(dst[kBytes] == 5 && dst[2 * kBytes - 1] == 5);
  EXPECT(backend->copies.size() == 2 && backend->copies[0].stream == engine.demand_stream() &&
         backend->copies[1].stream == engine.demand_stream());
  expect_error([&] { engine.prefetch(1, &src[0], &dst[0], kBytes, 1.0); engine.demand(1, &src[0], &dst[0], kBytes); },
               "already has an unfinished copy");
}

void test_copy_engine_counts_a_started_jobs_unsubmitted_bytes() {
  auto backend = std::make_shared<GatedBackend>();
  constexpr size_t kChunk = 4096, kBytes = 3 * kChunk + 100;
  std::vector<uint8_t> src(kBytes, 9), dst(kBytes, 0);
  CopyEngine engine(backend, 1, CopyEngineOptions{kChunk, 1});
  const OpenOnExit open_on_exit{*backend};  // declared after the engine, so it goes first
  engine.prefetch(0, src.data(), dst.data(), kBytes, 1.0);
  for (int i = 0; i < 5000 && engine.job_state(0) != CopyEngine::JobState::kStarted; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT(engine.job_state(0) == CopyEngine::JobState::kStarted);
  EXPECT(engine.unsubmitted_bytes(0) == kBytes - kChunk);  // one chunk on the link, the rest to go
  backend->open();
  engine.synchronize();
  EXPECT(engine.unsubmitted_bytes(0) == 0 && dst[kBytes - 1] == 9);
}

void test_copy_waits_for_the_slot_to_be_freed() {
  // Compute (a host stream) is held up behind a long copy, then reads the slot and releases it.
  // A prefetch of new bytes into that slot must not land before compute has read the old ones.
  auto backend = make_host_backend();
  constexpr size_t kBytes = 4096, kBig = size_t{256} << 20;
  std::vector<uint8_t> old_bytes(kBytes, 1), new_bytes(kBytes, 2), slot(old_bytes), seen(kBytes, 0);
  std::vector<uint8_t> big_src(kBig, 3), big_dst(kBig, 0);
  Stream blocker = backend->create_stream(false);
  Stream compute = backend->create_stream(false);
  Event gate = backend->create_event(false, false);
  backend->copy_to_device_async(big_dst.data(), big_src.data(), kBig, blocker);
  backend->record(gate, blocker);
  backend->wait(compute, gate);
  backend->copy_to_device_async(seen.data(), slot.data(), kBytes, compute);  // compute reads the slot
  {
    CopyEngine engine(backend, 1, CopyEngineOptions{4096, 2});
    engine.release(0, compute);
    engine.prefetch(0, new_bytes.data(), slot.data(), kBytes, 1.0);
    engine.synchronize();
    backend->synchronize_stream(compute);
  }
  EXPECT(seen[0] == 1 && seen[kBytes - 1] == 1);  // compute saw the old expert, untorn
  EXPECT(slot[0] == 2 && slot[kBytes - 1] == 2);  // and the new one landed after
  backend->destroy_event(gate);
  backend->destroy_stream(compute);
  backend->destroy_stream(blocker);
}

// A stream waiting on a host signal holds up its later work until the signal is set; the thread that
// queued the wait goes on at once.
void test_stream_waits_for_a_host_signal() {
  auto backend = make_host_backend();
  Stream compute = backend->create_stream(false);
  Event done = backend->create_event(false, false);
  auto signal = std::make_shared<HostSignal>();
  uint8_t result = 0, seen = 0;
  backend->wait_signal(compute, signal);                                  // returns without waiting
  backend->copy_to_device_async(&seen, &result, 1, compute);              // reads what the setter wrote
  backend->record(done, compute);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT(!backend->query(done) && !signal->is_set());
  result = 7;
  signal->set();
  backend->synchronize(done);
  EXPECT(seen == 7 && signal->is_set());
  backend->wait_signal(nullptr, signal);  // the calling thread itself: set already, so no wait
  backend->destroy_event(done);
  backend->destroy_stream(compute);
}

// Belady's keep test over a plan's tables (a two-layer, four-expert example worked by hand; the Python
// tests check it against the definition over random tables).
void test_kept_until_next_use() {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  // After layer 0's visit at position 0: L0E0 next at 2, L0E1 at 6, L0E2 never, L0E3 not forecast;
  // L1E3 at 1 and 3 (held between), L1E0 at 5.
  const std::vector<double> next_use = {2, 6, inf, nan, 5, inf, inf, 1};
  const std::vector<double> following = {4, inf, inf, nan, 7, inf, inf, 3};
  const std::vector<int> experts = {0, 1, 2, 3};
  std::vector<double> kept(4);
  kept_until_next_use(next_use.data(), following.data(), 2, 4, 0, 0.0, experts.data(), 4, 2, kept.data());
  EXPECT(kept[0] == 1.0 && kept[1] == 0.0 && kept[2] == 0.0 && std::isnan(kept[3]));
  kept_until_next_use(next_use.data(), following.data(), 2, 4, 0, 0.0, experts.data(), 4, 3, kept.data());
  EXPECT(kept[0] == 1.0 && kept[1] == 1.0);
  const int bad = 4;
  expect_error([&] { kept_until_next_use(next_use.data(), following.data(), 2, 4, 0, 0.0, &bad, 1, 2, kept.data()); },
               "expert 4 is out of range for 4 experts");
}

// Demand loads are timed on their stream, from their first byte to their last; prefetches are not.
void test_copy_engine_times_demand_loads() {
  auto backend = make_host_backend();
  constexpr size_t kSmall = 64 << 10, kBig = size_t{64} << 20;
  std::vector<uint8_t> src(kSmall + kBig, 7), dst(kSmall + kBig, 0);
  CopyEngine engine(backend, 2, CopyEngineOptions{4096, 2});
  engine.pause();
  engine.prefetch(0, &src[0], &dst[0], kSmall, 1.0);
  const auto start = std::chrono::steady_clock::now();
  engine.demand(1, &src[kSmall], &dst[kSmall], kBig);
  engine.wait_ready(1, nullptr);  // the null stream is this thread: it blocks until the bytes land
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  CopyStats s = engine.stats();
  EXPECT(s.timed_demand_bytes == kBig && dst[kSmall + kBig - 1] == 7);
  EXPECT(s.demand_ms > 0 && s.demand_ms <= wall_ms + 0.5);
  EXPECT(engine.promote(0));  // the queued prefetch, needed now: timed as a demand load of its bytes
  engine.wait_ready(0, nullptr);
  s = engine.stats();
  EXPECT(s.timed_demand_bytes == kBig + kSmall && s.demand_bytes == kBig + kSmall && s.prefetch_bytes == 0);
  engine.reset_stats();
  s = engine.stats();
  EXPECT(s.timed_demand_bytes == 0 && s.demand_ms == 0);
  engine.resume();
  engine.prefetch(0, &src[0], &dst[0], kSmall, 1.0);  // a prefetch moves bytes but is not timed
  engine.synchronize();
  engine.demand(1, &src[kSmall], &dst[kSmall], 0);  // nothing to move: nothing timed
  engine.wait_ready(1, nullptr);
  s = engine.stats();
  EXPECT(s.prefetch_bytes == kSmall && s.timed_demand_bytes == 0 && s.demand_bytes == 0);
  // A load still in flight at a reset counts in neither window.
  engine.demand(1, &src[kSmall], &dst[kSmall], kBig);
  engine.reset_stats();
  engine.synchronize();
  s = engine.stats();
  EXPECT(s.timed_demand_bytes == 0 && s.demand_bytes == 0 && s.demand_ms == 0);
  engine.demand(0, &src[0], &dst[0], kSmall);  // and the next window times its own
  engine.synchronize();
  EXPECT(engine.stats().timed_demand_bytes == kSmall);
}

// Fails the create_event call numbered `fail_at` (counting from 1).
class FailingEventBackend final : public ForwardingBackend {
 public:
  explicit FailingEventBackend(int fail_at) : fail_at_(fail_at) {}
  Event create_event(bool t, bool s) override {
    if (++num_created_ == fail_at_) throw Error("create_event failed (injected)");
    return inner->create_event(t, s);
  }

 private:
  int fail_at_;
  int num_created_ = 0;
};

// A demand load whose timer cannot be made fails before its job changes: the slot takes the next
// load as if the failed one had never been asked for. (One slot, {4096, 2}: the engine makes 2 + 3
// events; the demand's timer is the 6th and 7th.)
void test_copy_engine_demand_fails_before_its_job_changes() {
  for (int fail_at : {6, 7}) {
    auto backend = std::make_shared<FailingEventBackend>(fail_at);
    constexpr size_t kBytes = 8192;
    std::vector<uint8_t> src(kBytes, 9), dst(kBytes, 0);
    CopyEngine engine(backend, 1, CopyEngineOptions{4096, 2});
    expect_error([&] { engine.demand(0, src.data(), dst.data(), kBytes); }, "injected");
    EXPECT(engine.job_state(0) == CopyEngine::JobState::kNone);
    engine.demand(0, src.data(), dst.data(), kBytes);
    engine.wait_ready(0, nullptr);
    EXPECT(dst[kBytes - 1] == 9 && engine.stats().timed_demand_bytes == kBytes);
  }
}

// Two layers of four 4000-byte experts on the host backend; every byte of layer l expert e is 16 l + e.
std::shared_ptr<ExpertPool> filled_pool() {
  auto pool = std::make_shared<ExpertPool>(make_host_backend(), std::vector<int>{4, 4},
                                           std::vector<ExpertLayout>(2, ExpertLayout::pack({spec("w", {1000}, 4)})));
  for (int l = 0; l < 2; ++l)
    for (int e = 0; e < 4; ++e) {
      std::vector<uint8_t> bytes(4000, static_cast<uint8_t>(l * 16 + e));
      pool->write(l, e, 0, bytes.data(), bytes.size());
    }
  return pool;
}

RuntimeOptions three_lru_slots() {
  RuntimeOptions options;
  options.num_slots = 3;
  options.policy = "lru";
  return options;
}

void test_runtime_round_trip() {
  auto pool = filled_pool();
  const RuntimeOptions options = three_lru_slots();
  Runtime runtime(pool, options);
  Plan plan;
  plan.prefetch = {{1, 2, 0.0}};
  runtime.apply_plan(plan);
  auto slots = runtime.acquire(1, {2, 3}, nullptr);
  EXPECT(runtime.arena()->data()[runtime.slot_bytes() * slots[0]] == 18);
  EXPECT(runtime.arena()->data()[runtime.slot_bytes() * slots[1] + 3999] == 19);
  runtime.release(1, {2, 3}, nullptr);
  expect_error([&] { runtime.release(1, {2}, nullptr); }, "not acquired");
  const RuntimeStats s = runtime.stats();
  EXPECT(s.hits == 1 && s.misses == 1 && s.prefetch_hits == 1 && s.bytes_copied == 2 * 4096);
  runtime.close();
  expect_error([&] { runtime.acquire(0, {0}, nullptr); }, "closed");
}

// Backfill: experts computed elsewhere enter slots on the prefetch path, two copies at most waiting,
// and no plan cancels them; once landed they are hits with the pool's bytes.
void test_runtime_backfill() {
  auto pool = filled_pool();
  const RuntimeOptions options = three_lru_slots();
  Runtime runtime(pool, options);
  runtime.pause_prefetch();  // the copies wait, so "unfinished" is known
  EXPECT((runtime.backfill(0, {1, 2, 3}) == std::vector<uint8_t>{1, 1, 0}));  // the third finds two waiting
  EXPECT((runtime.resident(0, {1, 2, 3}) == std::vector<uint8_t>{1, 1, 0}));
  EXPECT((runtime.landed(0, {1, 2}) == std::vector<uint8_t>{0, 0}));
  runtime.apply_plan(Plan{});  // a plan naming nothing cancels unfinished prefetches, not backfills
  EXPECT((runtime.resident(0, {1, 2}) == std::vector<uint8_t>{1, 1}));
  // Found again before a byte went, a backfill is cancelled and queued again (one other waits).
  EXPECT((runtime.backfill(0, {1}) == std::vector<uint8_t>{1}));
  expect_error([&] { runtime.backfill(0, {1, 1}); }, "twice");
  expect_error([&] { runtime.backfill(0, {4}); }, "expert");
  runtime.resume_prefetch();
  runtime.synchronize();
  EXPECT((runtime.landed(0, {1, 2, 3}) == std::vector<uint8_t>{1, 1, 0}));
  auto slots = runtime.acquire(0, {2, 1}, nullptr);
  EXPECT(runtime.arena()->data()[runtime.slot_bytes() * slots[0] + 3999] == 2);
  EXPECT(runtime.arena()->data()[runtime.slot_bytes() * slots[1]] == 1);
  runtime.release(0, {2, 1}, nullptr);
  const RuntimeStats s = runtime.stats();
  EXPECT(s.backfills == 3 && s.cancelled_backfills == 1 && s.hits == 2 && s.misses == 0 && s.prefetches == 0 &&
         s.cancelled_prefetches == 0);
  EXPECT(s.prefetch_bytes == 2 * 4096 && s.demand_bytes == 0);

  // Two experts of one call never take each other's slot, even where the layer's quota is one slot; a
  // prefetch that a backfill finds before any of its bytes went is cancelled, and queued again only
  // where a backfill would be (here two copies wait: not); a backfill evicted before it lands counts
  // as a cancelled backfill.
  Runtime second(pool, options);
  second.set_layer_quotas({1, 1});
  second.pause_prefetch();
  EXPECT((second.backfill(1, {0, 1}) == std::vector<uint8_t>{1, 1}));
  EXPECT((second.resident(1, {0, 1}) == std::vector<uint8_t>{1, 1}));
  Plan plan;
  plan.prefetch = {{0, 3, 0.0}};
  second.apply_plan(plan);  // the third slot, its copy held back
  EXPECT((second.resident(0, {3}) == std::vector<uint8_t>{1}));
  EXPECT((second.backfill(0, {3}) == std::vector<uint8_t>{0}));
  EXPECT((second.resident(0, {3}) == std::vector<uint8_t>{0}));
  second.acquire(0, {0, 1, 2}, nullptr);  // three misses: the free slot, then the two unfinished backfills
  second.release(0, {0, 1, 2}, nullptr);
  const RuntimeStats t = second.stats();
  EXPECT(t.backfills == 2 && t.cancelled_backfills == 2 && t.cancelled_prefetches == 1 && t.misses == 3);

  // A spared expert whose copy has not started is not spared (backfill cancels that copy next): the
  // miss takes its slot, the least recently used, and the landed experts stay.
  Runtime third(pool, options);
  third.pause_prefetch();
  Plan one;
  one.prefetch = {{0, 1, 0.0}};
  third.apply_plan(one);
  third.acquire(1, {0}, nullptr);
  third.acquire(1, {1}, nullptr);
  third.release(1, {0}, nullptr);
  third.release(1, {1}, nullptr);
  third.acquire(0, {2}, nullptr, true, /*spare=*/{1});
  EXPECT((third.resident(0, {1, 2}) == std::vector<uint8_t>{0, 1}));
  EXPECT((third.resident(1, {0, 1}) == std::vector<uint8_t>{1, 1}));
  EXPECT(third.stats().cancelled_prefetches == 1);
  third.release(0, {2}, nullptr);
  expect_error([&] { third.acquire(0, {2}, nullptr, true, {1, 1}); }, "spare of layer 0 lists an expert twice");
  third.resume_prefetch();
}

// Under the expertflow policy a backfill whose next use the plan forecasts is a prefetch for that use:
// never for an expert not used again, and only over a victim needed later; with no forecast it takes
// the slot a demand miss would, as before.
void test_runtime_backfill_by_forecast() {
  auto pool = filled_pool();
  RuntimeOptions options = three_lru_slots();
  options.policy = "expertflow";
  Runtime runtime(pool, options);
  runtime.pause_prefetch();
  runtime.acquire(1, {0, 1, 2}, nullptr, /*wait=*/false);  // position 1: layer 1 of step 0
  runtime.release(1, {0, 1, 2}, nullptr);
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  Plan plan;
  plan.stride = 4;
  plan.now = 2;  // the next visit: layer 0 of step 1
  // [layer * 4 + expert]; layer 0's experts are used at this visit (2), then at following_use
  plan.next_use = {inf, 2, nan, 2, /*layer 1*/ 3, 5, inf, inf};
  plan.following_use = {inf, 4, nan, 10, /*layer 1*/ nan, nan, inf, inf};
  runtime.apply_plan(plan);
  // Expert 1, next used at 4: over layer 1's expert 2 (never used again). Expert 0: never used again.
  // Expert 3, next used at 10: the victim would be layer 1's expert 1, needed at 5: not admitted.
  // Expert 2, with no forecast: the slot a demand miss takes (layer 1's expert 1, the farthest of
  // those left as seen now: 5 against 3).
  EXPECT((runtime.backfill(0, {1, 0, 3, 2}) == std::vector<uint8_t>{1, 0, 0, 1}));
  EXPECT((runtime.resident(0, {0, 1, 2, 3}) == std::vector<uint8_t>{0, 1, 1, 0}));
  EXPECT((runtime.resident(1, {0, 1, 2}) == std::vector<uint8_t>{1, 0, 0}));
  EXPECT(runtime.stats().backfills == 2);
  runtime.resume_prefetch();
  runtime.synchronize();
  EXPECT((runtime.landed(0, {1, 2}) == std::vector<uint8_t>{1, 1}));

  // Its copy is due at that use: behind a prefetch due sooner, though that one was queued after it.
  auto backend = std::make_shared<GatedRecordingBackend>();
  auto gated = std::make_shared<ExpertPool>(backend, std::vector<int>{4, 4},
                                            std::vector<ExpertLayout>(2, ExpertLayout::pack({spec("w", {4096}, 4)})));
  options.copy.chunk_bytes = 4096;
  options.copy.max_chunks_in_flight = 1;  // the first copy's first chunk holds the link while the gate is shut
  Runtime ordered(gated, options);
  const OpenOnExit open_on_exit{*backend};  // declared after the runtime, so it goes first
  Plan tables;
  tables.stride = 4;
  tables.now = 0;
  tables.next_use.assign(8, inf);
  tables.following_use.assign(8, inf);
  tables.next_use[1] = 0;           // layer 0 expert 1: used now, then at 6
  tables.following_use[1] = 6;
  tables.next_use[4 + 0] = 1;       // layer 1 expert 0: at 1 (the copy holding the link)
  tables.next_use[4 + 2] = 3;       // layer 1 expert 2: at 3
  tables.prefetch = {{1, 0, 1.0}};
  ordered.apply_plan(tables);
  EXPECT((ordered.backfill(0, {1}) == std::vector<uint8_t>{1}));  // due at 6 (a demand miss's rule: 2)
  tables.prefetch = {{1, 0, 1.0}, {1, 2, 3.0}};
  ordered.apply_plan(tables);
  backend->open();
  ordered.synchronize();
  std::vector<const void*> starts;  // each copy's first chunk, in the order they went
  for (const void* src : backend->sources) {
    for (const auto& [l, e] : std::vector<std::pair<int, int>>{{1, 0}, {1, 2}, {0, 1}}) {
      if (src == gated->expert_data(l, e)) starts.push_back(src);
    }
  }
  EXPECT((starts == std::vector<const void*>{gated->expert_data(1, 0), gated->expert_data(1, 2), gated->expert_data(0, 1)}));
}

// Copies on their way when the CPU computes their experts: a started one is kept for the next use (no
// new plan cancels it) and the layer's misses spare its slot while another is free; a queued one is
// cancelled (two others still unfinished: not queued again).
void test_runtime_backfill_of_copies_on_their_way() {
  auto backend = std::make_shared<GatedBackend>();
  constexpr size_t kChunk = 4096;  // four chunks an expert
  auto pool = std::make_shared<ExpertPool>(backend, std::vector<int>{4, 4},
                                           std::vector<ExpertLayout>(2, ExpertLayout::pack({spec("w", {4096}, 4)})));
  RuntimeOptions options = three_lru_slots();
  options.copy.chunk_bytes = kChunk;
  options.copy.max_chunks_in_flight = 1;  // the first chunk stays on the link while the gate is shut
  Runtime runtime(pool, options);
  const OpenOnExit open_on_exit{*backend};  // declared after the runtime, so it goes first
  const size_t bytes = pool->expert_bytes(0);
  Plan plan;
  plan.prefetch = {{0, 1, 0.0}, {0, 2, 1.0}, {0, 3, 2.0}};
  runtime.apply_plan(plan);
  for (int i = 0; i < 5000 && runtime.bytes_to_submit(0, {1})[0] == static_cast<int64_t>(bytes); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT((runtime.bytes_to_submit(0, {1, 2, 3}) ==
          std::vector<int64_t>{static_cast<int64_t>(bytes - kChunk), static_cast<int64_t>(bytes), static_cast<int64_t>(bytes)}));
  EXPECT((runtime.backfill(0, {1, 2}) == std::vector<uint8_t>{2, 0}));
  EXPECT((runtime.resident(0, {1, 2, 3}) == std::vector<uint8_t>{1, 0, 1}));
  EXPECT(runtime.stats().cancelled_prefetches == 1);
  runtime.apply_plan(Plan{});  // stale: expert 3's prefetch; expert 1's copy now serves its next use
  EXPECT((runtime.resident(0, {1, 2, 3}) == std::vector<uint8_t>{1, 0, 0}));
  EXPECT(runtime.stats().cancelled_prefetches == 2);
  // Fill the two free slots: layer 0 expert 1 is now the least recently used.
  runtime.acquire(1, {0, 1}, nullptr, /*wait=*/false);
  runtime.release(1, {0, 1}, nullptr);
  runtime.acquire(0, {3}, nullptr, false, /*spare=*/{1});  // evicts layer 1 expert 0, not the spared slot
  EXPECT((runtime.resident(0, {1, 3}) == std::vector<uint8_t>{1, 1}));
  EXPECT((runtime.resident(1, {0, 1}) == std::vector<uint8_t>{0, 1}));
  runtime.acquire(0, {2}, nullptr, false, {1});  // evicts layer 1 expert 1: every slot but the spared one pinned ...
  EXPECT((runtime.resident(0, {1, 2}) == std::vector<uint8_t>{1, 1}));
  runtime.acquire(0, {0}, nullptr, false, {1});  // ... so this miss takes it
  EXPECT((runtime.resident(0, {0, 1}) == std::vector<uint8_t>{1, 0}));
  EXPECT(runtime.stats().cancelled_backfills == 1);
  expect_error([&] { runtime.acquire(0, {2}, nullptr, false, {2}); }, "both to acquire and to spare");
  backend->open();
  runtime.release(0, {3, 2, 0}, nullptr);
  runtime.synchronize();
}

uint16_t bf16_of_int(int v) {  // small integers are exact in bf16: the float's top 16 bits
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>(u >> 16);
}

// Integer operands with |y| <= 240 make every product, sum and bf16 result exact, so each kernel must
// give the definition's answer bit for bit, whatever its order of summation.
void test_host_linear_exact() {
  std::vector<HostIsa> isas = {HostIsa::kPortable};
  if (host_isa() >= HostIsa::kAvx512) isas.push_back(HostIsa::kAvx512);
  if (host_isa() == HostIsa::kAvx512Bf16) isas.push_back(HostIsa::kAvx512Bf16);
  for (HostIsa isa : isas) {
    for (int threads : {1, 3}) {
      HostLinear linear(threads, isa);
      EXPECT(linear.isa() == isa && linear.num_threads() == threads);
      for (int64_t n : {1, 2, 3, 5, 6, 9}) {
        for (int64_t in : {1, 7, 33, 60}) {
          for (int64_t out : {1, 7, 33, 70, 2190}) {  // 2190 rows at in=60: chunks of 1092, 1092 and 6
            std::vector<int> xi(n * in), wi(out * in);
            for (size_t i = 0; i < xi.size(); ++i) xi[i] = static_cast<int>((i * 7 + n) % 5) - 2;
            for (size_t i = 0; i < wi.size(); ++i) wi[i] = static_cast<int>((i * 3 + out) % 5) - 2;
            std::vector<uint16_t> x(xi.size()), w(wi.size()), y(n * out, 0xffff);
            for (size_t i = 0; i < xi.size(); ++i) x[i] = bf16_of_int(xi[i]);
            for (size_t i = 0; i < wi.size(); ++i) w[i] = bf16_of_int(wi[i]);
            linear.linear_bf16(x.data(), w.data(), y.data(), n, in, out);
            for (int64_t t = 0; t < n; ++t) {
              for (int64_t r = 0; r < out; ++r) {
                int sum = 0;
                for (int64_t k = 0; k < in; ++k) sum += xi[t * in + k] * wi[r * in + k];
                if (y[t * out + r] != bf16_of_int(sum)) {
                  throw Failure{"isa " + host_isa_name(isa) + " n=" + std::to_string(n) + " in=" + std::to_string(in) +
                                " out=" + std::to_string(out) + ": y[" + std::to_string(t) + "," +
                                std::to_string(r) + "] != " + std::to_string(sum)};
                }
              }
            }
          }
        }
      }
    }
  }
}

// Many calls from two threads at once, on one pool of four: each caller gets its own answer.
void test_host_linear_concurrent_calls() {
  HostLinear linear(4);
  const int64_t in = 40, out = 300;
  std::vector<uint16_t> w(out * in, bf16_of_int(1));
  auto caller = [&](int value, bool* ok) {
    std::vector<uint16_t> x(in, bf16_of_int(value)), y(out);
    for (int call = 0; call < 200; ++call) {
      std::fill(y.begin(), y.end(), 0);
      linear.linear_bf16(x.data(), w.data(), y.data(), 1, in, out);
      for (uint16_t v : y) *ok = *ok && v == bf16_of_int(value * in);
    }
  };
  bool ok_a = true, ok_b = true;
  std::thread a(caller, 1, &ok_a), b(caller, -2, &ok_b);
  a.join();
  b.join();
  EXPECT(ok_a && ok_b);
  std::vector<uint16_t> x(in), y(out);
  expect_error([&] { linear.linear_bf16(x.data(), w.data(), y.data(), 0, in, out); }, "sizes must be positive");
  expect_error([&] { linear.linear_bf16(nullptr, w.data(), y.data(), 1, in, out); }, "needs x, w and y");
  expect_error([] { HostLinear bad(0); }, "num_threads");
  linear.close();
  linear.close();  // twice is fine
  expect_error([&] { linear.linear_bf16(x.data(), w.data(), y.data(), 1, in, out); }, "after close");
}

// A gated SiLU expert in one call against its definition from tested parts: the products as
// linear_bf16 gives them, and between them silu(g) = g / (1 + exp(-g)) of the rounded gate, rounded
// to bf16, times the rounded up, rounded; bit for bit, over odd sizes and 1 and 3 threads. The
// signal is set once y is written, and not by a call that throws.
void test_host_linear_gated_silu_expert() {
  auto bf16 = [](float f) {  // round to nearest even (finite values)
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  };
  auto value = [](uint16_t bits) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  };
  for (int threads : {1, 3}) {
    HostLinear linear(threads);
    for (int64_t n : {1, 2, 5}) {
      for (int64_t hidden : {1, 7, 33}) {
        for (int64_t inter : {1, 9, 70}) {
          std::vector<uint16_t> x(n * hidden), gate_up(2 * inter * hidden), down(hidden * inter);
          auto fill = [&](std::vector<uint16_t>& v, int step, int period, float scale) {
            for (size_t i = 0; i < v.size(); ++i) {
              v[i] = bf16(static_cast<float>(static_cast<int>(i * step % period) - period / 2) * scale);
            }
          };
          fill(x, 7, 11, 0.25f);
          fill(gate_up, 5, 13, 0.1f);
          fill(down, 3, 7, 0.2f);
          std::vector<uint16_t> y(n * hidden, 0xffff), scratch(3 * n * inter);
          HostSignal done;
          linear.gated_silu_expert_bf16(x.data(), gate_up.data(), down.data(), y.data(), scratch.data(), n, hidden, inter,
                                        &done);
          EXPECT(done.is_set());
          std::vector<uint16_t> gu(n * 2 * inter), h(n * inter), want(n * hidden);
          linear.linear_bf16(x.data(), gate_up.data(), gu.data(), n, hidden, 2 * inter);
          for (int64_t t = 0; t < n; ++t) {
            for (int64_t i = 0; i < inter; ++i) {
              const float g = value(gu[t * 2 * inter + i]), u = value(gu[t * 2 * inter + inter + i]);
              h[t * inter + i] = bf16(value(bf16(g / (1.0f + std::exp(-g)))) * u);
            }
          }
          linear.linear_bf16(h.data(), down.data(), want.data(), n, inter, hidden);
          if (y != want) {
            throw Failure{"gated_silu_expert_bf16 n=" + std::to_string(n) + " hidden=" + std::to_string(hidden) +
                          " inter=" + std::to_string(inter) + " threads=" + std::to_string(threads)};
          }
        }
      }
    }
    std::vector<uint16_t> x(4), w(8), y(4), scratch(6);
    HostSignal untouched;
    expect_error(
        [&] { linear.gated_silu_expert_bf16(x.data(), w.data(), w.data(), y.data(), nullptr, 1, 4, 1, &untouched); },
        "needs x, gate_up, down, y and scratch");
    expect_error([&] { linear.gated_silu_expert_bf16(x.data(), w.data(), w.data(), y.data(), scratch.data(), 0, 4, 1); },
                 "sizes must be positive");
    linear.close();
    expect_error(
        [&] { linear.gated_silu_expert_bf16(x.data(), w.data(), w.data(), y.data(), scratch.data(), 1, 4, 1, &untouched); },
        "after close");
    EXPECT(!untouched.is_set());
  }
}

}  // namespace

int main() {
  const std::vector<std::pair<std::string, std::function<void()>>> tests = {
      {"pool_packing", test_pool_packing},
      {"policy_victims", test_policy_victims},
      {"cache_pins_and_quotas", test_cache_pins_and_quotas},
      {"conservative_admission", test_conservative_admission},
      {"copy_engine_due_order_and_chunks", test_copy_engine_due_order_and_chunks},
      {"copy_engine_demand_overtakes_queue", test_copy_engine_demand_overtakes_queue},
      {"copy_engine_counts_a_started_jobs_unsubmitted_bytes", test_copy_engine_counts_a_started_jobs_unsubmitted_bytes},
      {"copy_waits_for_the_slot_to_be_freed", test_copy_waits_for_the_slot_to_be_freed},
      {"copy_engine_times_demand_loads", test_copy_engine_times_demand_loads},
      {"stream_waits_for_a_host_signal", test_stream_waits_for_a_host_signal},
      {"kept_until_next_use", test_kept_until_next_use},
      {"copy_engine_demand_fails_before_its_job_changes", test_copy_engine_demand_fails_before_its_job_changes},
      {"runtime_round_trip", test_runtime_round_trip},
      {"runtime_backfill", test_runtime_backfill},
      {"runtime_backfill_of_copies_on_their_way", test_runtime_backfill_of_copies_on_their_way},
      {"runtime_backfill_by_forecast", test_runtime_backfill_by_forecast},
      {"host_linear_exact", test_host_linear_exact},
      {"host_linear_concurrent_calls", test_host_linear_concurrent_calls},
      {"host_linear_gated_silu_expert", test_host_linear_gated_silu_expert},
  };
  int passed = 0, failed = 0;
  for (const auto& [name, fn] : tests) {
    try {
      fn();
      ++passed;
      std::cout << "PASS " << name << "\n";
    } catch (const Failure& f) {
      ++failed;
      std::cout << "FAIL " << name << ": " << f.what << "\n";
    } catch (const std::exception& e) {
      ++failed;
      std::cout << "FAIL " << name << ": unexpected exception: " << e.what() << "\n";
    }
  }
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}
