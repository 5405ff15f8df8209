// Victim choice. See include/expertflow/policy.h.
#include "expertflow/policy.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

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

void kept_until_next_use(const double* next_use, const double* following_use, int num_layers, int num_experts,
                         int layer, double visit, const int* experts, int num_queried, int num_slots, double* kept) {
  EF_CHECK(num_layers > 0 && num_experts > 0, "next-use tables need at least one layer and one expert");
  EF_CHECK(layer >= 0 && layer < num_layers, "layer " << layer << " is out of range for " << num_layers << " layers");
  const double nan = std::nan("");
  // An expert's first named use after the visit: its next use, else (where a next use is named)
  // the one after it; NaN where none is.
  auto first_use = [visit, nan](double next, double following) {
    return next > visit ? next : (!std::isnan(next) && following > visit ? following : nan);
  };
  // The misses with a named use, by the visits from this one to it (whole visits); others answered at once.
  std::vector<std::pair<int64_t, int>> timed;  // (visits to its use, query index)
  for (int i = 0; i < num_queried; ++i) {
    EF_CHECK(experts[i] >= 0 && experts[i] < num_experts,
             "expert " << experts[i] << " is out of range for " << num_experts << " experts");
    const int k = layer * num_experts + experts[i];
    const double at = first_use(next_use[k], following_use[k]);
    if (std::isfinite(at)) {
      timed.emplace_back(static_cast<int64_t>(at - visit), i);
    } else {
      kept[i] = std::isinf(at) ? 0.0 : nan;  // never used again, or no use named
    }
  }
  if (timed.empty()) return;
  std::sort(timed.begin(), timed.end());
  // Column c is the visit c + 1 after this one, up to the latest miss's use (span). Every expert is
  // held at its first use (used_at); one used again before a miss's use, from after its first use
  // through its second (spans: its second use's column, and its first's); and at a miss's use also
  // those used a second time there (seconds_at).
  const int64_t span = std::max<int64_t>(1, timed.back().first);
  std::vector<int> used_at(span, 0), seconds_at(span + 1, 0), closing(span + 1, 0);
  std::vector<std::pair<int64_t, int64_t>> spans;  // (close, open)
  for (int k = 0, num_keys = num_layers * num_experts; k < num_keys; ++k) {
    const double next = next_use[k], following = following_use[k];
    const double first = first_use(next, following);
    if (!std::isfinite(first)) continue;
    const int64_t column = static_cast<int64_t>(first - visit - 1);
    if (column >= 0 && column < span) ++used_at[column];
    if (next > visit && following > next && following - visit <= span) {  // a second use within reach
      const int64_t second = static_cast<int64_t>(following - visit);
      ++seconds_at[second];
      if (second < span) {
        spans.emplace_back(second, static_cast<int64_t>(first - visit));
        ++closing[second];
      }
    }
  }
  // Spans grouped by their close (a counting sort): spans[starts[b], starts[b + 1]) close at b.
  std::vector<int64_t> starts(span + 2, 0), opens(spans.size());
  for (int64_t b = 0; b <= span; ++b) starts[b + 1] = starts[b] + closing[b];
  for (const auto& [close, open] : spans) opens[starts[close + 1] - closing[close]--] = open;
  std::vector<int> between(span + 1, 0);  // +1 where a span opens, -1 where it closes
  int64_t added = 0;  // spans closing before this column are in `between`
  for (const auto& [t, i] : timed) {  // each miss holds what the one before held, and more: a sweep
    for (; added < t && added < span; ++added) {
      for (int64_t j = starts[added]; j < starts[added + 1]; ++j) {
        ++between[std::min(opens[j], span)];
        --between[added];
      }
    }
    const int64_t n = std::max<int64_t>(1, std::min(span, t));
    int open = 0, most = 0;
    for (int64_t c = 0; c < n; ++c) {
      open += between[c];
      // at the miss's use, also those used a second time there, less the miss itself
      most = std::max(most, used_at[c] + open + (c == n - 1 ? seconds_at[t] - 1 : 0));
    }
    kept[i] = most < num_slots ? 1.0 : 0.0;
  }
}

}  // namespace expertflow
