// SlotCache: which (layer, expert) sits in which slot, and the metadata victim choice needs.
//
// Invariants:
// - Each resident (layer, expert) is in exactly one slot, and the map agrees with the slots.
// - A pinned slot (pin_count > 0) is never chosen as a victim.
// - Slots are chosen in this order: when the layer has a quota and holds at least that many slots,
//   one of its own slots; else an empty slot; else a slot of a layer above its quota; else, for a
//   layer below its quota, another layer's slot; else any candidate. Quotas steer placement; they
//   never make a load fail while some candidate exists.
// - A clock counts layer visits: layer l of step s is at position s * num_layers + l. access() and the
//   runtime's acquire() and backfill() move it to the layer's visit: a layer below the current one
//   starts the next step, the current layer again is the same visit (waves), and a plan's `now` says
//   where the next visit lands (which tells a new step of a one-layer model), so the planner and the
//   cache keep one clock.
// - A plan is predicted next uses (integrated prefetching and caching, Cao, Felten, Karlin and Li,
//   1995): tables of each expert's next use and the one after, where NaN means "no forecast": the
//   cache estimates it from its own history, 2 * (its layer's next visit) - (its last use), and a
//   forecast use whose visit has passed gives way to the next one (to the estimate once both have).
//   The expertflow policy evicts the expert needed farthest ahead. A prefetch of X, due at t, evicts the expert whose next use as seen
//   from t is farthest, and only when that expert is not needed before t: then, if the forecasts are
//   right, it is the victim demand paging under Belady would evict when X is needed, so prefetching
//   moves no more bytes than that demand paging would, it only moves them earlier. When that expert
//   is needed before t the plan waits (later entries too; entries already resident stay planned): the
//   cache tries again after every access (readmit), as the clock moves. Under lru and lfu a prefetch
//   evicts only slots the plan does not name.
// - A prefetch that is not sure is admitted only while the link is idle, one at a time, and only into
//   a free slot or over an expert no forecast expects again: a guess may use a free link and a free
//   slot, never delay a surer copy or evict something of value.
// - The cache holds no memory and does no copies: it is pure bookkeeping, shared by the runtime and
//   by trace replay, and not thread-safe (the runtime serialises access).
#pragma once

#include <cstdint>
#include <functional>
#include <unordered_map>
#include <vector>

#include "expertflow/policy.h"

namespace expertflow {

struct PlanItem {
  int layer = 0;
  int expert = 0;
  double due = 0;    // when the expert is needed, in the planner's clock: earlier loads go first
  bool sure = true;  // false: loaded only while the link is idle
};

struct Plan {
  // What to bring in, in the order to consider it (ascending due under the next-use policies).
  std::vector<PlanItem> prefetch;
  // Forecast next use of every (layer, expert), at [layer * stride + expert], and of the access after
  // it; NaN: none (the cache estimates), +inf: never. Empty: no tables, each named expert is next
  // used at its earliest due still ahead of the clock, then at the due after that.
  int stride = 0;
  std::vector<double> next_use;
  std::vector<double> following_use;
  // Position of the next layer visit (-inf: leave the cache's clock alone).
  double now = kDueNow;
};

struct PlanLoad {
  int slot = -1;
  double due = 0;
};

// What one layer's demand-paging access did (trace replay).
struct AccessResult {
  int hits = 0;
  int prefetch_hits = 0;      // hits on experts a plan loaded and nothing had used yet
  int evictions = 0;
  int wasted_evictions = 0;   // evicted experts that a plan loaded and nothing used
};

class SlotCache {
 public:
  using BeforeLoad = std::function<void(int)>;
  using AfterLoad = std::function<void(const PlanLoad&)>;

  // num_layers (0: unknown) is the clock's period; without it expertflow estimates by recency alone.
  SlotCache(int num_slots, Policy policy, int num_layers = 0);

  int num_slots() const { return static_cast<int>(slots_.size()); }
  Policy policy() const { return policy_; }
  const std::vector<SlotMeta>& slots() const { return slots_; }
  const SlotMeta& slot(int slot) const;
  double position() const { return position_; }

  int find(int layer, int expert) const;  // -1 when not resident
  int layer_count(int layer) const;

  // Moves the clock to `layer`'s visit and brings every slot's next uses up to date.
  void advance(int layer);
  // The forecast's next use of (layer, expert) after the current visit, from the plan's tables (or,
  // without them, the dues naming it): +inf for never, NaN where no forecast names one (the cache
  // then estimates, predict()).
  double forecast_next_use(int layer, int expert) const;
  // The due of a demand load: now, on the clock the expertflow policy's next uses follow (belady's
  // next uses count accesses, not the clock, and need none).
  double demand_due() const { return policy_ == Policy::kExpertflow ? position_ : kDueNow; }
  // A slot to load an expert of `layer` into, due at `due` (demand_due(): a demand load), or -1 when
  // none may be taken. Candidates are unpinned; a prefetch under lru or lfu also spares planned slots.
  int pick_slot(int layer, double due, bool prefetch) const;
  // Conservative admission of a load due at `due` into `slot` (pick_slot's): the slot is empty, or
  // its expert is next needed after `due`.
  bool may_replace(int slot, double due) const;

  void assign(int slot, int layer, int expert);  // replaces the occupant
  void clear(int slot);
  void touch(int slot);                          // an access: recency, frequency, position
  void pin(int slot);
  void unpin(int slot);                          // throws when not pinned
  void set_prefetched_unused(int slot, bool value);
  void set_backfilled(int slot);                 // until the slot is cleared
  // Replaces the plan and admits its prefetches (see the invariants): runs before_load(slot) for each
  // slot about to be reused and after_load for each load as soon as it is chosen (so a later entry
  // that evicts it finds its copy queued). Returns the loads in plan order. `planned` receives the
  // plan's entries that were already resident. `link_idle`: no copy is queued or in flight.
  std::vector<PlanLoad> apply_plan(const Plan& plan, const BeforeLoad& before_load, const AfterLoad& after_load = nullptr,
                                   std::vector<PlanLoad>* planned = nullptr, bool link_idle = false);
  // Admits the current plan's prefetches that are still ahead of the clock (after an access).
  std::vector<PlanLoad> readmit(const BeforeLoad& before_load, const AfterLoad& after_load = nullptr,
                                bool link_idle = false);
  // quotas[l] >= 0 caps layer l; -1 or a missing entry leaves it uncapped; empty clears all quotas.
  void set_layer_quotas(std::vector<int> quotas);
  const std::vector<int>& layer_quotas() const { return quotas_; }

  // One layer of demand paging (trace replay): the clock moves to the layer, every listed expert is
  // accessed in order, loading misses; the layer's resident experts are pinned for the duration, so
  // victims are never needed by this layer. next_uses (may be null) gives each access's next-use
  // position (belady). Throws when the cache cannot hold the layer's experts.
  AccessResult access(int layer, const std::vector<int>& experts, const std::vector<double>* next_uses);

 private:
  static uint64_t key(int layer, int expert) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(layer)) << 32) | static_cast<uint32_t>(expert);
  }
  void check_slot(int slot) const;
  int quota(int layer) const;
  // (layer, expert)'s forecast uses still ahead of the clock: the next (NaN: none named) and the one named
  // after it (NaN: none)
  void forecast(int layer, int expert, double& first, double& second) const;
  void predict(SlotMeta& m) const;  // m's next uses from the tables, the estimate and the clock
  void refresh();                   // predict() every resident (expertflow)
  std::vector<PlanLoad> admit(const BeforeLoad& before_load, const AfterLoad& after_load,
                              std::vector<PlanLoad>* planned, bool link_idle);

  Policy policy_;
  int num_layers_;
  std::vector<SlotMeta> slots_;
  std::unordered_map<uint64_t, int> index_;
  std::unordered_map<int, int> layer_counts_;
  std::vector<int> quotas_;
  uint64_t clock_ = 0;
  double position_ = -1;   // the current visit (-1: before the first)
  int current_layer_ = -1;
  double next_visit_ = kDueNow;  // a plan's `now`: where the next visit lands
  bool timed_ = false;           // the current plan keeps the clock: prefetches behind it are spent
  std::vector<PlanItem> prefetch_;  // the current plan's
  int stride_ = 0;
  std::vector<double> next_use_;
  std::vector<double> following_use_;
  std::unordered_map<uint64_t, std::vector<double>> named_due_;  // no tables: each named expert's dues, ascending
};

}  // namespace expertflow
