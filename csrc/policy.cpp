// Victim choice. See include/expertflow/policy.h.
#include "expertflow/policy.h"

#include <tuple>

#include "expertflow/error.h"

namespace expertflow {

Policy parse_policy(const std::string& name) {
  if (name == "lru") return Policy::kLru;
  if (name == "lfu") return Policy::kLfu;
  if (name == "belady") return Policy::kBelady;
  if (name == "expertflow") return Policy::kExpertflow;
  EF_CHECK(false, "unknown cache policy '" << name << "'; choose lru, lfu, expertflow or belady");
}

std::string policy_name(Policy policy) {
  switch (policy) {
    case Policy::kLru: return "lru";
    case Policy::kLfu: return "lfu";
    case Policy::kBelady: return "belady";
    case Policy::kExpertflow: return "expertflow";
  }
  return "unknown";
}

bool orders_by_next_use(Policy policy) { return policy == Policy::kBelady || policy == Policy::kExpertflow; }

bool evict_before(Policy policy, const SlotMeta& a, int a_index, const SlotMeta& b, int b_index, double due) {
  switch (policy) {
    case Policy::kLru:
      return std::tie(a.last_use, a_index) < std::tie(b.last_use, b_index);
    case Policy::kLfu:
      return std::tie(a.use_count, a.last_use, a_index) < std::tie(b.use_count, b.last_use, b_index);
    case Policy::kBelady:
    case Policy::kExpertflow: {
      const double a_next = a.next_use_after(due), b_next = b.next_use_after(due);
      if (a_next != b_next) return a_next > b_next;  // farther first
      return std::tie(a.last_use, a_index) < std::tie(b.last_use, b_index);
    }
  }
  return false;
}

int choose_victim(Policy policy, const std::vector<SlotMeta>& slots, const std::vector<int>& candidates, double due) {
  int best = -1;
  for (int slot : candidates) {
    if (best < 0 || evict_before(policy, slots[slot], slot, slots[best], best, due)) best = slot;
  }
  return best;
}

}  // namespace expertflow
