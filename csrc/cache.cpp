// SlotCache bookkeeping. See include/expertflow/cache.h.
#include "expertflow/cache.h"

#include <algorithm>
#include <limits>
#include <string>

#include "expertflow/error.h"

namespace expertflow {

SlotCache::SlotCache(int num_slots, Policy policy, int num_layers) : policy_(policy) {
  EF_CHECK(num_slots > 0, "the cache needs at least one slot, got num_slots=" << num_slots);
  EF_CHECK(num_layers >= 0, "num_layers must be >= 0, got " << num_layers);
  slots_.resize(static_cast<size_t>(num_slots));
  context_.num_layers = num_layers;
}

void SlotCache::advance(int layer) {
  EF_CHECK(layer >= 0 && (context_.num_layers == 0 || layer < context_.num_layers),
           "layer " << layer << " is out of range (num_layers=" << context_.num_layers << ")");
  if (layer < context_.current_layer) {
    context_.position += static_cast<uint64_t>(context_.num_layers - context_.current_layer + layer);
  } else {
    context_.position += static_cast<uint64_t>(layer - context_.current_layer);
  }
  context_.current_layer = layer;
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

int SlotCache::pick_slot(int layer, float below_priority) const {
  std::vector<int> own, others, over, all;
  for (int s = 0; s < num_slots(); ++s) {
    const SlotMeta& m = slots_[s];
    if (m.empty() || m.pin_count > 0 || !(m.plan_priority < below_priority)) continue;
    all.push_back(s);
    (m.layer == layer ? own : others).push_back(s);
    const int q = quota(m.layer);
    if (q >= 0 && layer_count(m.layer) > q) over.push_back(s);
  }
  const int q = quota(layer);
  if (q >= 0 && layer_count(layer) >= q && !own.empty()) return choose_victim(policy_, slots_, own, context_);
  for (int s = 0; s < num_slots(); ++s) {
    if (slots_[s].empty()) return s;
  }
  if (!over.empty()) return choose_victim(policy_, slots_, over, context_);
  if (q >= 0 && !others.empty()) return choose_victim(policy_, slots_, others, context_);  // below its quota
  return choose_victim(policy_, slots_, all, context_);
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
  m.last_position = context_.position;
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
  slots_[slot].last_position = context_.position;
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

std::vector<int> SlotCache::apply_plan(const std::vector<PlanItem>& plan, const std::function<void(int)>& before_load,
                                       std::vector<int>* raised) {
  std::vector<int> loaded;
  for (const PlanItem& item : plan) {
    int s = find(item.layer, item.expert);
    if (s >= 0) {
      if (item.priority > slots_[s].plan_priority) {
        slots_[s].plan_priority = item.priority;
        if (raised) raised->push_back(s);
      }
      continue;
    }
    s = pick_slot(item.layer, item.priority);
    if (s < 0) continue;  // every slot holds something at least as wanted
    before_load(s);
    assign(s, item.layer, item.expert);
    slots_[s].plan_priority = item.priority;
    slots_[s].prefetched_unused = true;
    loaded.push_back(s);
  }
  return loaded;
}

std::vector<int> SlotCache::demote_unrequested(int layer, const std::vector<int>& requested_slots) {
  std::vector<int> demoted;
  for (int s = 0; s < num_slots(); ++s) {
    SlotMeta& m = slots_[s];
    if (m.layer == layer && m.plan_priority > 0 &&
        std::find(requested_slots.begin(), requested_slots.end(), s) == requested_slots.end()) {
      m.plan_priority = 0;
      demoted.push_back(s);
    }
  }
  return demoted;
}

AccessResult SlotCache::access(int layer, const std::vector<int>& experts, const std::vector<uint64_t>* next_uses) {
  EF_CHECK(static_cast<int>(experts.size()) <= num_slots(),
           "capacity " << num_slots() << " is smaller than the " << experts.size() << " experts layer " << layer
                       << " needs at once; raise the capacity to at least " << experts.size());
  EF_CHECK(next_uses == nullptr || next_uses->size() == experts.size(),
           "got " << experts.size() << " experts but " << next_uses->size() << " next-use positions");
  advance(layer);
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
      s = pick_slot(layer, std::numeric_limits<float>::infinity());
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
    if (next_uses) set_next_use(s, (*next_uses)[i]);
  }
  for (int s : pinned) unpin(s);
  EF_CHECK(failure.empty(), failure << "; raise the capacity");
  if (policy_ == Policy::kExpertflow || policy_ == Policy::kLruWithCorrection) demote_unrequested(layer, pinned);
  return result;
}
}  // namespace expertflow
