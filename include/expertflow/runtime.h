// Runtime: the pool, the slot cache and the copy engine behind prefetch / acquire / release.
//
// Invariants:
// - Slots are allocated once (num_slots x slot_bytes, one device arena) and every expert fits a slot.
// - acquire() pins the requested experts before loading any miss, so one call never evicts its own
//   experts; it returns only after every returned slot is either landed or awaited by `compute`.
// - A pinned slot is never evicted or overwritten; release() unpins and records the free event.
// - apply_plan(plan) replaces the previous plan: unfinished prefetches the new plan does not name are
//   cancelled (their slots emptied), named ones that are still queued take the new due, and new ones
//   are admitted as the cache decides (cache.h) and queued by due. acquire() moves the cache's clock
//   to the layer and, once its misses are on their way, admits what the plan still holds.
// - backfill() brings experts the caller computes elsewhere (the CPU) into slots for their next use,
//   as if acquire() had taken them: those held are pinned first, each missing one takes the slot a
//   demand miss would (never another of the call's), all are used in order, then unpinned. But a
//   missing one's copy goes on the prefetch path, due at the layer's next visit, and nothing waits
//   for it. So the cache evolves as if the GPU had run them, while the link works off the layer's
//   critical path. A copy is queued only while fewer than kBackfillMaxPendingPrefetches prefetch
//   jobs are unfinished: behind a longer queue it would land late, and meanwhile hold a slot. Under
//   the expertflow policy, where the plan forecasts a missing one's next use, its copy is a prefetch
//   for that use instead: due then, and admitted as the plan's prefetches are (never for an expert
//   not used again, only over a victim needed later). A held
//   one whose copy has not started (no byte handed to the link) is cancelled first and then treated
//   as missing: the caller computed it without that copy, so it moves only if the link has room, as
//   any backfill (kept, a forecast's prefetches the CPU overtook went on using the link). A new plan
//   does not cancel a backfill (nor a started prefetch that a backfill found) as stale, since it is
//   not a forecast the next plan can revise; like any unpinned slot it may still be evicted, by a
//   miss or by a plan's prefetch.
// - acquire(..., spare) takes the slots of `spare` (experts of the layer computed elsewhere in this
//   visit, whose backfill() follows) for its misses only when no other slot is free; not a slot whose
//   copy has not started, which backfill() cancels.
// - One mutex serialises cache state; the copy engine's own lock is taken only inside it.
// - After close() every call throws and the pool is let go (its pinned arena is freed with its last owner);
//   the slot arena lives on while zero-copy views of it exist.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "expertflow/cache.h"
#include "expertflow/copy_engine.h"
#include "expertflow/pool.h"

namespace expertflow {

// Unfinished prefetch jobs (queued or being submitted) below which backfill() still queues a copy:
// one copying and one waiting keeps the link busy without falling behind.
constexpr int kBackfillMaxPendingPrefetches = 2;

// What backfill() did with each expert.
enum class BackfillOutcome : uint8_t {
  kNotAdmitted = 0,  // not in a slot: the link had enough queued, or every slot was pinned
  kQueued = 1,       // its copy was queued into a slot
  kHeld = 2,         // it already held a slot (landed, or its copy on the way)
};

struct RuntimeOptions {
  int num_slots = 0;
  size_t slot_bytes = 0;  // 0: the pool's largest expert
  std::string policy = "lru";
  CopyEngineOptions copy;
};

struct RuntimeStats {
  uint64_t accesses = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t prefetch_hits = 0;        // first acquire of an expert a prefetch brought in
  uint64_t prefetches = 0;           // prefetch copies queued
  uint64_t wasted_prefetches = 0;    // prefetched, then evicted without being acquired
  uint64_t cancelled_prefetches = 0; // dropped before all their bytes moved
  uint64_t backfills = 0;            // copies queued by backfill(): their bytes count as prefetch_bytes,
                                     // the rest of one that acquire() promotes as demand_bytes
  uint64_t cancelled_backfills = 0;  // backfills evicted before all their bytes moved
  uint64_t evictions = 0;
  uint64_t bytes_copied = 0;
  uint64_t prefetch_bytes = 0;
  uint64_t demand_bytes = 0;
  uint64_t stalls = 0;
  double stall_ms = 0;
  uint64_t timed_demand_bytes = 0;  // demand loads timed on their stream (CopyStats): what a copy
  double demand_ms = 0;             // takes inside a step
};

class Runtime {
 public:
  Runtime(std::shared_ptr<ExpertPool> pool, RuntimeOptions options);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  void apply_plan(const Plan& plan);
  // Slots holding `experts` of `layer`, in order. `compute` will read them (null: see backend.h).
  // With wait=false the caller makes `compute` wait per slot (wait_ready), e.g. hits before misses.
  // `spare`: other experts of `layer`, computed elsewhere this visit, whose slots the misses take only
  // when no other slot is free (those whose bytes have started to move: see the invariants).
  std::vector<int> acquire(int layer, const std::vector<int>& experts, Stream compute, bool wait = true,
                           const std::vector<int>& spare = {});
  // Makes `compute` wait for an acquired slot's bytes; is_ready() tells without waiting.
  void wait_ready(int slot, Stream compute);
  // Makes `compute` wait until `signal` is set on the host, without waiting here: the result of an
  // expert the CPU computes, which the work queued after this reads (Backend::wait_signal).
  void wait_signal(std::shared_ptr<HostSignal> signal, Stream compute);
  bool is_ready(int slot);
  void release(int layer, const std::vector<int>& experts, Stream compute);
  // Experts of `layer` computed elsewhere this visit (see the invariants): a BackfillOutcome each.
  std::vector<uint8_t> backfill(int layer, const std::vector<int>& experts);
  void set_layer_quotas(std::vector<int> quotas);

  RuntimeStats stats();
  void reset_stats();
  std::vector<SlotMeta> slot_table();
  // Whether each of `experts` of `layer` holds a slot (landed or in flight).
  std::vector<uint8_t> resident(int layer, const std::vector<int>& experts);
  // Whether each of `experts` of `layer` holds a slot whose bytes have landed.
  std::vector<uint8_t> landed(int layer, const std::vector<int>& experts);
  // For each of `experts` of `layer`: -1 when it holds no slot, else the bytes of its copy not yet
  // handed to the link (0: landed, or every byte on its way; acquire() moves the rest of a prefetch
  // to the demand stream, so these are what the link still carries for it).
  std::vector<int64_t> bytes_to_submit(int layer, const std::vector<int>& experts);
  void synchronize();
  void pause_prefetch();
  void resume_prefetch();
  void close() noexcept;
  bool closed();

  int num_slots() const { return options_.num_slots; }
  size_t slot_bytes() const { return options_.slot_bytes; }
  Policy policy() const { return policy_; }
  const std::shared_ptr<Backend>& backend() const { return backend_; }
  const std::shared_ptr<Buffer>& arena() const { return arena_; }

 private:
  void check_open() const;
  // Every expert of `layer` exists and none is listed twice (`call` names the caller in the error).
  void check_distinct_experts(int layer, const std::vector<int>& experts, const char* call) const;
  // of_slot(its slot, -1 when it holds none) for each of `experts` of `layer`, under the lock.
  template <typename T, typename OfSlot>
  std::vector<T> each_expert(int layer, const std::vector<int>& experts, OfSlot&& of_slot);
  void check_acquired_locked(int slot) const;
  uint8_t* slot_data(int slot) const { return arena_->data() + options_.slot_bytes * static_cast<size_t>(slot); }
  void evict_locked(int slot);
  void queue_prefetch_locked(const PlanLoad& load);
  // Queues the copy of the slot's expert on the prefetch path, due at `due` (counted by the caller).
  void copy_later_locked(int slot, double due);
  // Admits the plan's prefetches that had to wait, as the clock has moved.
  void readmit_locked();
  // The slot a demand miss of `expert` takes, emptied, assigned and pinned; -1 when every slot is pinned.
  int take_slot_locked(int layer, int expert);
  // Empties `slot` (evicting its expert, cancelling a copy not started), gives it to (layer, expert)
  // and pins it; returns it.
  int occupy_locked(int slot, int layer, int expert);

  std::shared_ptr<ExpertPool> pool_;  // null after close()
  std::shared_ptr<Backend> backend_;
  RuntimeOptions options_;
  Policy policy_;
  std::shared_ptr<Buffer> arena_;
  std::unique_ptr<CopyEngine> engine_;
  SlotCache cache_;
  RuntimeStats stats_;
  std::mutex mu_;
  bool closed_ = false;
};

}  // namespace expertflow
