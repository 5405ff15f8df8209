// SlotCache bookkeeping. See include/expertflow/cache.h.
#include "expertflow/cache.h"

#include <algorithm>
#include <limits>
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

int SlotCache::pick_slot(int layer, float below_priority, const std::function<bool(int)>& allowed) const {
  std::vector<int> own, others, over, all;
  for (int s = 0; s < num_slots(); ++s) {
    const SlotMeta& m = slots_[s];
    if (m.empty() || m.pin_count > 0 || !(m.plan_priority < below_priority) || !allowed(s)) continue;
    all.push_back(s);
    (m.layer == layer ? own : others).push_back(s);
    const int q = quota(m.layer);
    if (q >= 0 && layer_count(m.layer) > q) over.push_back(s);
  }
  const int q = quota(layer);
  if (q >= 0 && layer_count(layer) >= q && !own.empty()) return choose_victim(policy_, slots_, own);
  for (int s = 0; s < num_slots(); ++s) {
    if (slots_[s].empty() && allowed(s)) return s;
  }
  if (!over.empty()) return choose_victim(policy_, slots_, over);
  if (q >= 0 && !others.empty()) return choose_victim(policy_, slots_, others);  // below its quota
  return choose_victim(policy_, slots_, all);
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

void SlotCache::set_plan_priority(int slot, float priority) {
  check_slot(slot);
  slots_[slot].plan_priority = priority;
}

void SlotCache::clear_plan_priorities() {
  for (auto& m : slots_) m.plan_priority = 0;
}

void SlotCache::set_next_use(int slot, uint64_t position) {
  check_slot(slot);
  slots_[slot].next_use = position;
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

int SlotCache::access(int layer, const std::vector<int>& experts, const std::vector<uint64_t>* next_uses) {
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
  int hits = 0;
  std::string failure;
  for (size_t i = 0; i < experts.size() && failure.empty(); ++i) {
    int s = find(layer, experts[i]);
    if (s >= 0) {
      ++hits;
    } else {
      s = pick_slot(layer, std::numeric_limits<float>::infinity(), [](int) { return true; });
      if (s < 0) {
        failure = "no unpinned slot is left for layer " + std::to_string(layer) + " expert " + std::to_string(experts[i]);
        break;
      }
      assign(s, layer, experts[i]);
      pin(s);
      pinned.push_back(s);
    }
    touch(s);
    if (next_uses) set_next_use(s, (*next_uses)[i]);
  }
  for (int s : pinned) unpin(s);
  EF_CHECK(failure.empty(), failure << "; raise the capacity");
  return hits;
}

}  // namespace expertflow
