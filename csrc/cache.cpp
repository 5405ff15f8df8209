// SlotCache bookkeeping. See include/expertflow/cache.h.
#include "expertflow/cache.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "expertflow/error.h"

namespace expertflow {

SlotCache::SlotCache(int num_slots, Policy policy) : policy_(policy) {
  EF_CHECK(num_slots > 0, "the cache needs at least one slot, got num_slots=" << num_slots);
  slots_.resize(static_cast<size_t>(num_slots));
}

void SlotCache::check_slot(int slot) const {
  EF_CHECK(slot >= 0 && slot < num_slots(), "slot " << slot << " is out of range (num_slots=" << num_slots() << ")");
}

const SlotMeta& SlotCache::slot(int slot) const {
  check_slot(slot);
  return slots_[slot];
}

int SlotCache::find(int layer, int expert) const {
  const auto it = index_.find(key(layer, expert));
  return it == index_.end() ? -1 : it->second;
}

int SlotCache::layer_count(int layer) const {
  const auto it = layer_counts_.find(layer);
  return it == layer_counts_.end() ? 0 : it->second;
}

int SlotCache::quota(int layer) const {
  return layer >= 0 && layer < static_cast<int>(quotas_.size()) ? quotas_[layer] : -1;
}

int SlotCache::pick_slot(int layer, double due, bool prefetch) const {
  const bool spare_planned = prefetch && !orders_by_next_use(policy_);
  std::vector<int> own, others, over, all;
  for (int s = 0; s < num_slots(); ++s) {
    const SlotMeta& m = slots_[s];
    if (m.empty() || m.pin_count > 0 || (spare_planned && m.planned)) continue;
    all.push_back(s);
    (m.layer == layer ? own : others).push_back(s);
    const int q = quota(m.layer);
    if (q >= 0 && layer_count(m.layer) > q) over.push_back(s);
  }
  const int q = quota(layer);
  if (q >= 0 && layer_count(layer) >= q && !own.empty()) return choose_victim(policy_, slots_, own, due);
  for (int s = 0; s < num_slots(); ++s) {
    if (slots_[s].empty()) return s;
  }
  if (!over.empty()) return choose_victim(policy_, slots_, over, due);
  if (q >= 0 && !others.empty()) return choose_victim(policy_, slots_, others, due);  // below its quota
  return choose_victim(policy_, slots_, all, due);
}

void SlotCache::predict(SlotMeta& m) const {
  if (stride_ == 0) return;
  const size_t i = static_cast<size_t>(m.layer) * static_cast<size_t>(stride_) + static_cast<size_t>(m.expert);
  const bool known = m.expert < stride_ && i < next_use_.size();
  m.next_use = known ? next_use_[i] : kNeverUsed;
  m.following_use = known ? following_use_[i] : kNeverUsed;
}

void SlotCache::assign(int slot, int layer, int expert) {
  check_slot(slot);
  EF_CHECK(find(layer, expert) < 0, "layer " << layer << " expert " << expert << " is already resident in slot "
                                             << find(layer, expert));
  EF_CHECK(slots_[slot].pin_count == 0, "slot " << slot << " is pinned and cannot be reassigned");
  clear(slot);
  SlotMeta& m = slots_[slot];
  m.layer = layer;
  m.expert = expert;
  m.last_use = ++clock_;
  predict(m);
  index_[key(layer, expert)] = slot;
  ++layer_counts_[layer];
}

void SlotCache::clear(int slot) {
  check_slot(slot);
  SlotMeta& m = slots_[slot];
  EF_CHECK(m.pin_count == 0, "slot " << slot << " is pinned and cannot be cleared");
  if (!m.empty()) {
    index_.erase(key(m.layer, m.expert));
    if (--layer_counts_[m.layer] == 0) layer_counts_.erase(m.layer);
  }
  m = SlotMeta{};
}

void SlotCache::touch(int slot) {
  check_slot(slot);
  slots_[slot].last_use = ++clock_;
  ++slots_[slot].use_count;
}

void SlotCache::pin(int slot) {
  check_slot(slot);
  EF_CHECK(!slots_[slot].empty(), "cannot pin empty slot " << slot);
  ++slots_[slot].pin_count;
}

void SlotCache::unpin(int slot) {
  check_slot(slot);
  EF_CHECK(slots_[slot].pin_count > 0, "slot " << slot << " is not pinned");
  --slots_[slot].pin_count;
}

void SlotCache::set_prefetched_unused(int slot, bool value) {
  check_slot(slot);
  slots_[slot].prefetched_unused = value;
}

void SlotCache::set_layer_quotas(std::vector<int> quotas) {
  for (size_t l = 0; l < quotas.size(); ++l) {
    EF_CHECK(quotas[l] >= -1, "quota of layer " << l << " is " << quotas[l] << "; use a count >= 0 or -1 for none");
  }
  quotas_ = std::move(quotas);
}

std::vector<PlanLoad> SlotCache::apply_plan(const Plan& plan, const std::function<void(int)>& before_load,
                                            const std::function<void(const PlanLoad&)>& after_load,
                                            std::vector<PlanLoad>* planned, bool link_idle) {
  const bool has_tables = !plan.next_use.empty();
  if (has_tables) {
    EF_CHECK(plan.stride > 0, "a plan with next-use tables needs stride > 0, got " << plan.stride);
    EF_CHECK(plan.next_use.size() % static_cast<size_t>(plan.stride) == 0 &&
                 plan.following_use.size() == plan.next_use.size(),
             "next-use tables of " << plan.next_use.size() << " and " << plan.following_use.size()
                                   << " entries do not both hold whole rows of " << plan.stride << " experts");
    stride_ = plan.stride;
    next_use_ = plan.next_use;
    following_use_ = plan.following_use;
    now_ = plan.now;
  }
  for (SlotMeta& m : slots_) {
    m.planned = false;
    if (has_tables && !m.empty()) predict(m);
  }
  const bool by_next_use = orders_by_next_use(policy_);
  std::vector<PlanLoad> loads;
  for (const PlanItem& item : plan.prefetch) {
    EF_CHECK(!std::isnan(item.due), "the due position of layer " << item.layer << " expert " << item.expert << " is NaN");
    int s = find(item.layer, item.expert);
    if (s >= 0) {
      slots_[s].planned = true;
      if (!has_tables) slots_[s].next_use = item.due;
      if (planned) planned->push_back(PlanLoad{s, item.due});
      continue;
    }
    if (!item.sure && !link_idle) continue;
    s = pick_slot(item.layer, item.due, /*prefetch=*/true);
    if (s < 0) {
      if (by_next_use) break;
      continue;
    }
    // Conservative admission: the victim must not be needed before the expert that replaces it.
    if (by_next_use && !slots_[s].empty() && !(slots_[s].next_use > item.due)) break;
    // A guess may take a free slot, or one whose expert no forecast expects again; nothing of value.
    if (!item.sure && !slots_[s].empty() && slots_[s].next_use_after(item.due) != kNeverUsed) continue;
    before_load(s);
    assign(s, item.layer, item.expert);
    SlotMeta& m = slots_[s];
    m.planned = true;
    m.prefetched_unused = true;
    if (!has_tables) m.next_use = item.due;
    loads.push_back(PlanLoad{s, item.due});
    if (after_load) after_load(loads.back());
    link_idle = false;
  }
  return loads;
}

AccessResult SlotCache::access(int layer, const std::vector<int>& experts, const std::vector<double>* next_uses) {
  EF_CHECK(static_cast<int>(experts.size()) <= num_slots(),
           "capacity " << num_slots() << " is smaller than the " << experts.size() << " experts layer " << layer
                       << " needs at once; raise the capacity to at least " << experts.size());
  EF_CHECK(next_uses == nullptr || next_uses->size() == experts.size(),
           "got " << experts.size() << " experts but " << next_uses->size() << " next-use positions");
  std::vector<int> pinned;
  for (int expert : experts) {
    const int s = find(layer, expert);
    if (s >= 0 && std::find(pinned.begin(), pinned.end(), s) == pinned.end()) {
      pin(s);
      pinned.push_back(s);
    }
  }
  AccessResult result;
  std::string failure;
  for (size_t i = 0; i < experts.size() && failure.empty(); ++i) {
    int s = find(layer, experts[i]);
    if (s >= 0) {
      ++result.hits;
      if (slots_[s].prefetched_unused) ++result.prefetch_hits;
    } else {
      s = pick_slot(layer, now_, /*prefetch=*/false);
      if (s < 0) {
        failure = "no unpinned slot is left for layer " + std::to_string(layer) + " expert " + std::to_string(experts[i]);
        break;
      }
      if (!slots_[s].empty()) {
        ++result.evictions;
        if (slots_[s].prefetched_unused) ++result.wasted_evictions;
      }
      assign(s, layer, experts[i]);
      pin(s);
      pinned.push_back(s);
    }
    slots_[s].prefetched_unused = false;
    touch(s);
    if (next_uses) slots_[s].next_use = (*next_uses)[i];
  }
  for (int s : pinned) unpin(s);
  EF_CHECK(failure.empty(), failure << "; raise the capacity");
  return result;
}

}  // namespace expertflow
