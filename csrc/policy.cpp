// Victim choice. See include/expertflow/policy.h.
#include "expertflow/policy.h"

#include <algorithm>
#include <tuple>

#include "expertflow/error.h"

namespace expertflow {

Policy parse_policy(const std::string& name) {
  if (name == "lru") return Policy::kLru;
  if (name == "lfu") return Policy::kLfu;
  if (name == "lru_with_correction") return Policy::kLruWithCorrection;
  if (name == "belady") return Policy::kBelady;
  if (name == "expertflow") return Policy::kExpertflow;
  EF_CHECK(false, "unknown cache policy '" << name << "'; choose lru, lfu, lru_with_correction, expertflow or belady");
}

std::string policy_name(Policy policy) {
  switch (policy) {
    case Policy::kLru: return "lru";
    case Policy::kLfu: return "lfu";
    case Policy::kLruWithCorrection: return "lru_with_correction";
    case Policy::kBelady: return "belady";
    case Policy::kExpertflow: return "expertflow";
  }
  return "unknown";
}

uint64_t VictimContext::next_turn(int layer) const {
  if (num_layers <= 0) return position;
  const int ahead = ((layer - current_layer - 1) % num_layers + num_layers) % num_layers + 1;  // 1..num_layers
  return position + static_cast<uint64_t>(ahead);
}

bool evict_before(Policy policy, const SlotMeta& a, int a_index, const SlotMeta& b, int b_index,
                  const VictimContext& context) {
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
    case Policy::kExpertflow: {
      if (a.plan_priority != b.plan_priority) return a.plan_priority < b.plan_priority;
      const uint64_t a_turn = context.next_turn(a.layer), b_turn = context.next_turn(b.layer);
      const uint64_t a_estimate = a_turn - std::min(a.last_position, a_turn);
      const uint64_t b_estimate = b_turn - std::min(b.last_position, b_turn);
      if (a_estimate != b_estimate) return a_estimate > b_estimate;
      if (a_turn != b_turn) return a_turn > b_turn;
      return std::tie(a.last_use, a_index) < std::tie(b.last_use, b_index);
    }
  }
  return false;
}

int choose_victim(Policy policy, const std::vector<SlotMeta>& slots, const std::vector<int>& candidates,
                  const VictimContext& context) {
  int best = -1;
  for (int slot : candidates) {
    if (best < 0 || evict_before(policy, slots[slot], slot, slots[best], best, context)) best = slot;
  }
  return best;
}

}  // namespace expertflow
