// Victim choice, as pure functions of slot metadata. No state lives here.
//
// Invariants:
// - A policy only orders candidates; which slots are candidates (unpinned, quota, planned) is the
//   cache's decision. Every ordering ends with the slot index, so choices are deterministic.
// - lru: least recently used. lfu: fewest uses since loaded, then least recent.
// - belady and expertflow order by next use: the slot whose next access comes farthest ahead goes
//   first (never again before all), then least recent. belady's next uses are the true ones (trace
//   replay); expertflow's are the planner's predictions. Positions are any monotone clock the caller
//   keeps (the planner counts layer visits).
// - For a load due at position `due`, a slot used before `due` is ranked by the access after that
//   one (following_use): that is the slot's next use as seen from `due`. With due = -inf (a demand
//   load) the ranking is by next_use alone.
// - kept_until_next_use answers, from a plan's next-use tables alone, whether that ranking would keep
//   an expert until its next use: the CPU experts' leave rule asks it at each late visit of a plan,
//   on the thread that launches the GPU's work, so it is a plain loop over the tables (microseconds).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace expertflow {

enum class Policy { kLru, kLfu, kBelady, kExpertflow };

Policy parse_policy(const std::string& name);  // throws, listing the valid names
std::string policy_name(Policy policy);
// True for the policies that evict by next use (and admit prefetches by it).
bool orders_by_next_use(Policy policy);

constexpr double kNeverUsed = std::numeric_limits<double>::infinity();
constexpr double kDueNow = -std::numeric_limits<double>::infinity();

struct SlotMeta {
  int layer = -1;                       // -1: empty
  int expert = -1;
  int pin_count = 0;                    // > 0 while compute may read the slot
  bool planned = false;                 // named by the latest plan's prefetch list
  bool prefetched_unused = false;       // loaded by a prefetch and not acquired since
  bool backfilled = false;              // the runtime's backfill() queued its copy or found it on the way
  uint64_t last_use = 0;                // recency clock of the last access or load
  uint64_t use_count = 0;               // accesses since loaded
  double last_position = kDueNow;       // position of the last access since loaded (kDueNow: none)
  double next_use = kNeverUsed;         // position of the next access (belady: true; expertflow: predicted)
  double following_use = kNeverUsed;    // position of the access after that one (expertflow)

  bool empty() const { return layer < 0; }
  // The next use as seen from a load due at `due`.
  double next_use_after(double due) const { return next_use > due ? next_use : following_use; }
};

// True when slot a should be evicted before slot b under `policy`, for a load due at `due`.
bool evict_before(Policy policy, const SlotMeta& a, int a_index, const SlotMeta& b, int b_index, double due = kDueNow);

// Index (into `slots`) of the victim among `candidates`, or -1 when there are none.
int choose_victim(Policy policy, const std::vector<SlotMeta>& slots, const std::vector<int>& candidates,
                  double due = kDueNow);

// Whether a cache of `num_slots` slots that evicts the expert needed farthest ahead would keep each
// of `experts` (`num_queried` ids of `layer`, used at position `visit`) until its next use, by a
// plan's tables `next_use` and `following_use` ([num_layers * num_experts], row-major by layer;
// NaN: not forecast, inf: never): writes `kept[i]` 1 (kept), 0 (not, or never used again) or NaN
// (no use of it named after `visit`). Belady's rule over the uses the tables name (each expert's
// first use after `visit` and, where it comes later, the one after it): kept until its use t when
// at every visit in (visit, t] fewer than `num_slots` other experts must be held, counting those
// used there, those between their first and second use whose second comes before t, and at t those
// used a second time there. Positions are whole visits. (planner.Plan.kept_until_next_use.)
void kept_until_next_use(const double* next_use, const double* following_use, int num_layers, int num_experts,
                         int layer, double visit, const int* experts, int num_queried, int num_slots, double* kept);

}  // namespace expertflow
