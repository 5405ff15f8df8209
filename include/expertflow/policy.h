// Victim choice, as pure functions of slot metadata. No state lives here.
//
// Invariants:
// - A policy only orders candidates; which slots are candidates (unpinned, priority, quota) is the
//   cache's decision. Every ordering ends with the slot index, so choices are deterministic.
// - lru: least recently used. lfu: fewest uses since loaded, then least recent.
//   lru_with_correction: lowest plan priority (wrong prefetches are demoted to 0), then least recent.
//   belady: farthest next use (never again first), then least recent: the offline optimum for replay.
//   expertflow: lowest plan priority, then farthest *estimated* next use. Layers run in order, so an
//   expert's next chance of use is its layer's next turn; it is expected later the more turns it has
//   sat unused since its last use: estimate = next turn of its layer - position of its last use
//   (positions count layer visits). Ties: the later next turn first (the layer just computed), then
//   least recent. With no plan this beats LRU on layer-sequential access, where LRU evicts exactly
//   the layer needed next.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace expertflow {

enum class Policy { kLru, kLfu, kLruWithCorrection, kBelady, kExpertflow };

Policy parse_policy(const std::string& name);  // throws, listing the valid names
std::string policy_name(Policy policy);

constexpr uint64_t kNeverUsedAgain = std::numeric_limits<uint64_t>::max();

struct SlotMeta {
  int layer = -1;           // -1: empty
  int expert = -1;
  int pin_count = 0;        // > 0 while compute may read the slot
  float plan_priority = 0;  // set by the latest prefetch plan; 0 = not wanted by it
  uint64_t last_use = 0;    // recency clock of the last access or load
  uint64_t use_count = 0;   // accesses since loaded
  uint64_t next_use = kNeverUsedAgain;  // belady only: position of the next access
  bool prefetched_unused = false;       // loaded by a prefetch and not acquired since
  uint64_t last_position = 0;           // layer-visit position of the last access or load

  bool empty() const { return layer < 0; }
};

// Where compute is: position counts layer visits (token * num_layers + layer). Used by expertflow.
struct VictimContext {
  uint64_t position = 0;
  int current_layer = 0;
  int num_layers = 0;  // 0: unknown; expertflow then orders like lru_with_correction

  // Position of the next visit of `layer` strictly after now.
  uint64_t next_turn(int layer) const;
};

// True when slot a should be evicted before slot b under `policy`.
bool evict_before(Policy policy, const SlotMeta& a, int a_index, const SlotMeta& b, int b_index,
                  const VictimContext& context = {});

// Index (into `slots`) of the victim among `candidates`, or -1 when there are none.
int choose_victim(Policy policy, const std::vector<SlotMeta>& slots, const std::vector<int>& candidates,
                  const VictimContext& context = {});

}  // namespace expertflow
