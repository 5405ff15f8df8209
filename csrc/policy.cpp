// Victim choice. See include/expertflow/policy.h.
#include "expertflow/policy.h"

#include <tuple>

#include "expertflow/error.h"

namespace expertflow {

Policy parse_policy(const std::string& name) {
  if (name == "lru") return Policy::kLru;
  if (name == "lfu") return Policy::kLfu;
  if (name == "lru_with_correction") return Policy::kLruWithCorrection;
  if (name == "belady") return Policy::kBelady;
  EF_CHECK(false, "unknown cache policy '" << name << "'; choose lru, lfu, lru_with_correction or belady");
}

std::string policy_name(Policy policy) {
  switch (policy) {
    case Policy::kLru: return "lru";
    case Policy::kLfu: return "lfu";
    case Policy::kLruWithCorrection: return "lru_with_correction";
    case Policy::kBelady: return "belady";
  }
  return "unknown";
}

bool evict_before(Policy policy, const SlotMeta& a, int a_index, const SlotMeta& b, int b_index) {
  switch (policy) {
    case Policy::kLru:
      return std::tie(a.last_use, a_index) < std::tie(b.last_use, b_index);
    case Policy::kLfu:
      return std::tie(a.use_count, a.last_use, a_index) < std::tie(b.use_count, b.last_use, b_index);
    case Policy::kLruWithCorrection:
      return std::tie(a.plan_priority, a.last_use, a_index) < std::tie(b.plan_priority, b.last_use, b_index);
    case Policy::kBelady:
      // Farther next use first.
      if (a.next_use != b.next_use) return a.next_use > b.next_use;
      return std::tie(a.last_use, a_index) < std::tie(b.last_use, b_index);
  }
  return false;
}

int choose_victim(Policy policy, const std::vector<SlotMeta>& slots, const std::vector<int>& candidates) {
  int best = -1;
  for (int slot : candidates) {
    if (best < 0 || evict_before(policy, slots[slot], slot, slots[best], best)) best = slot;
  }
  return best;
}

}  // namespace expertflow
