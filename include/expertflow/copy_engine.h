// CopyEngine: moves experts from the pinned pool into device slots on two streams.
//
// Invariants:
// - Demand loads are submitted at once, from the caller's thread, on the demand stream. Prefetches wait
//   in a host-side queue ordered by due position (the earliest needed first, then arrival) and a
//   dispatcher thread submits them in
//   chunks of chunk_bytes on the prefetch stream, with at most max_chunks_in_flight chunks unfinished
//   and none while a demand load is unfinished. Stream priority does not reorder host-to-device copies
//   on the GPU (measured on the H200), so this host-side throttle is what lets a demand load overtake a
//   long prefetch: it waits for at most the chunks already in flight.
// - The dispatcher never spins: it sleeps on its chunk events and on the newest demand load's ready
//   event, so it does not slow the thread that launches compute.
// - Each slot has at most one unfinished job. A job is queued (no chunk submitted), started (some
//   chunks submitted; only the dispatcher's current job) or submitted (all chunks submitted; the slot's
//   ready event is recorded after the last one). Queued and started jobs can be cancelled: a started
//   job's remaining chunks are dropped and the slot's ready event is recorded after those already
//   submitted, so the next copy into the slot lands after them.
// - Before the first byte of a job lands, its stream waits on the slot's free event (recorded on the
//   compute stream when the slot's last reader released it) and on the slot's previous ready event:
//   weights are never overwritten while read, and two jobs for one slot never interleave.
// - Compute waits on a slot only after its job is submitted, so it never waits on a stale record.
// - Timers are event pairs: a stall on the compute stream, a demand load on the demand stream. Each
//   stream's timers are harvested in the order they were recorded, once their end event has
//   completed, into the stats window they were recorded in (reset_stats opens a new one, so a load
//   in flight across a reset counts in neither). Their events are reused, and destroyed only by
//   close(); a timer is taken before any state changes, and given back if a backend call fails.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "expertflow/backend.h"

namespace expertflow {

struct CopyEngineOptions {
  size_t chunk_bytes = size_t{8} << 20;  // measured on the H200: docs/benchmarks.md
  int max_chunks_in_flight = 2;
};

struct CopyStats {
  uint64_t prefetch_bytes = 0;
  uint64_t demand_bytes = 0;
  uint64_t num_stalls = 0;   // compute had to wait for a copy still in flight
  double stall_ms = 0;       // how long compute waited, measured with events on the compute stream
  // Demand loads timed on the demand stream, from the start of their bytes to their landing: what a
  // copy takes inside a step (beside prefetch chunks and the CPU's memory traffic), not alone.
  uint64_t timed_demand_bytes = 0;
  double demand_ms = 0;
};

class CopyEngine {
 public:
  enum class JobState { kNone, kQueued, kStarted, kSubmitted };

  CopyEngine(std::shared_ptr<Backend> backend, int num_slots, CopyEngineOptions options);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Queues a copy of `bytes` from src to dst for `slot`, needed at `due` (any monotone clock; earlier
  // dues go first). The slot must have no unfinished job.
  void prefetch(int slot, const void* src, void* dst, size_t bytes, double due);
  void set_due(int slot, double due);  // no-op unless the slot's job is queued
  bool cancel(int slot);                        // drops an unsubmitted job (or its rest); false if none
  JobState job_state(int slot);
  // Bytes of the slot's prefetch not yet handed to a stream (queued or started); 0 for a slot whose
  // bytes have all been submitted (or that has no job). Never blocks.
  size_t unsubmitted_bytes(int slot);
  // Copies now on the demand stream. The slot must have no unfinished job.
  void demand(int slot, const void* src, void* dst, size_t bytes);
  // Moves the rest of a queued or started prefetch of `slot` to the demand stream; no-op otherwise.
  // Returns true when a job was promoted.
  bool promote(int slot);
  // Makes `compute` wait until the slot's bytes have landed. Returns true when it had to wait. Not
  // to be called while close() may run: close() destroys the events and streams it records on.
  bool wait_ready(int slot, Stream compute);
  // True when the slot's bytes have landed (never blocks).
  bool is_ready(int slot);
  // True when no prefetch is queued or being submitted and no copy is in flight (never blocks).
  bool idle();
  // Prefetch jobs queued or being submitted (never blocks).
  int num_pending_prefetches();
  // Compute on `compute` stops reading the slot once it reaches this point.
  void release(int slot, Stream compute);

  void pause();   // the dispatcher submits no new prefetch chunk until resume()
  void resume();
  // Waits until every submitted copy has landed and, unless paused, every queued one too.
  void synchronize();
  CopyStats stats();
  void reset_stats();
  void close() noexcept;  // stops the dispatcher, drops queued jobs, waits for copies in flight

  Stream prefetch_stream() const { return prefetch_stream_; }
  Stream demand_stream() const { return demand_stream_; }
  const CopyEngineOptions& options() const { return options_; }

 private:
  struct Job {
    const uint8_t* src = nullptr;
    uint8_t* dst = nullptr;
    size_t bytes = 0;
    size_t submitted = 0;
    double due = 0;
    uint64_t sequence = 0;
    JobState state = JobState::kNone;
  };
  struct Timer {
    Event start = nullptr;
    Event end = nullptr;
    size_t bytes = 0;          // a demand load's bytes (a stall: 0)
    uint64_t generation = 0;   // the stats window it counts in
  };
  using QueueKey = std::tuple<double, uint64_t, int>;  // (due, arrival, slot)

  Job& new_job_locked(int slot, const void* src, void* dst, size_t bytes, double due);
  void run_dispatcher();
  void submit_chunk_locked();
  bool demand_outstanding_locked();
  void submit_demand_locked(int slot, size_t from, Timer& timer);
  // Takes a timer, then runs `change` (the job's state change, returning the byte the load starts
  // at) and submits the load; the timer goes back if either throws.
  template <typename Change>
  void submit_demand_timed_locked(int slot, Change&& change);
  Timer take_timer_locked();
  void give_back_timer_locked(const Timer& timer);
  void harvest_timers_locked();
  void check_slot(int slot) const;
  void rethrow_dispatcher_error_locked();

  std::shared_ptr<Backend> backend_;
  CopyEngineOptions options_;
  Stream prefetch_stream_ = nullptr;
  Stream demand_stream_ = nullptr;
  std::vector<Event> ready_events_;
  std::vector<Event> free_events_;
  std::vector<Event> chunk_events_;
  size_t next_chunk_event_ = 0;

  std::mutex mu_;
  std::condition_variable dispatcher_cv_;
  std::condition_variable idle_cv_;
  std::vector<Job> jobs_;
  std::set<QueueKey> queue_;
  int current_ = -1;                  // slot whose job the dispatcher is submitting
  std::deque<Event> chunks_in_flight_;
  std::vector<int> demand_in_flight_;
  std::deque<Timer> stalls_pending_;   // on the compute stream, in record order
  std::deque<Timer> demands_pending_;  // on the demand stream, in record order
  std::vector<Timer> timers_free_;
  uint64_t stats_generation_ = 0;
  uint64_t next_sequence_ = 0;
  CopyStats stats_;
  bool paused_ = false;
  bool stopping_ = false;
  bool closed_ = false;
  std::string dispatcher_error_;
  std::thread dispatcher_;
};

}  // namespace expertflow
