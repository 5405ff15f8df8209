// Victim choice, as pure functions of slot metadata. No state lives here.
//
// Invariants:
// - A policy only orders candidates; which slots are candidates (unpinned, not mid-copy, quota) is the
//   cache's decision. Every ordering ends with the slot index, so choices are deterministic.
// - lru: least recently used. lfu: fewest uses since loaded, then least recent.
//   lru_with_correction: lowest plan priority (wrong prefetches are demoted to 0), then least recent.
//   belady: farthest next use (never again first), then least recent: the offline optimum for replay.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace expertflow {

enum class Policy { kLru, kLfu, kLruWithCorrection, kBelady };

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

  bool empty() const { return layer < 0; }
};

// True when slot a should be evicted before slot b under `policy`.
bool evict_before(Policy policy, const SlotMeta& a, int a_index, const SlotMeta& b, int b_index);

// Index (into `slots`) of the victim among `candidates`, or -1 when there are none.
int choose_victim(Policy policy, const std::vector<SlotMeta>& slots, const std::vector<int>& candidates);

}  // namespace expertflow
