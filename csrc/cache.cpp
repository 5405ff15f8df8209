// SlotCache bookkeeping. See include/expertflow/cache.h.
#include "expertflow/cache.h"

#include <algorithm>
#include <limits>
#include <cmath>
#include <string>

#include "expertflow/error.h"

namespace expertflow {

SlotCache::SlotCache(int num_slots, Policy policy, int num_layers) : policy_(policy), num_layers_(num_layers) {
  EF_CHECK(num_slots > 0, "the cache needs at least one slot, got num_slots=" << num_slots);
  EF_CHECK(num_layers >= 0, "num_layers must be >= 0, got " << num_layers);
  slots_.resize(static_cast<size_t>(num_slots));
}

namespace {
// Last-use position of an expert never used since it was loaded: its estimate is beyond any other's.
constexpr double kNeverUsedPosition = -1e12;
}  // namespace

void SlotCache::advance(int layer) {
  EF_CHECK(layer >= 0 && (num_layers_ == 0 || layer < num_layers_),
           "layer " << layer << " is out of range (num_layers=" << num_layers_ << ")");
  if (num_layers_ > 0) {
    const double L = num_layers_;
    // Floor remainder: a negative `now` names its layer too (-2 is layer 1 of step -1 with 3 layers).
    if (next_visit_ != kDueNow && next_visit_ - L * std::floor(next_visit_ / L) == layer) {
      position_ = next_visit_;
    } else if (current_layer_ < 0) {  // the first visit: step 0
      position_ = layer;
    } else if (layer != current_layer_) {  // the same layer again is the same visit (waves)
      position_ += static_cast<double>(((layer - current_layer_) % num_layers_ + num_layers_) % num_layers_);
    }
    if (position_ >= next_visit_) next_visit_ = kDueNow;
  }
  current_layer_ = layer;
  refresh();
}

void SlotCache::forecast(int layer, int expert, double& first, double& second) const {
  first = second = std::numeric_limits<double>::quiet_NaN();
  if (stride_ > 0) {
    const size_t i = static_cast<size_t>(layer) * static_cast<size_t>(stride_) + static_cast<size_t>(expert);
    if (expert < stride_ && i < next_use_.size()) {
      first = next_use_[i];
      second = following_use_[i];
    }
  } else if (const auto it = named_due_.find(key(layer, expert)); it != named_due_.end()) {
    const std::vector<double>& dues = it->second;
    const auto ahead = std::upper_bound(dues.begin(), dues.end(), position_);
    if (ahead != dues.end()) first = *ahead;
    if (ahead != dues.end() && ahead + 1 != dues.end()) second = *(ahead + 1);
  }
  if (!std::isnan(first) && first <= position_) first = second;  // that visit has come: the next use is the one after
  if (!std::isnan(first) && first <= position_) first = std::numeric_limits<double>::quiet_NaN();  // so has that one
}

double SlotCache::forecast_next_use(int layer, int expert) const {
  double first, second;
  forecast(layer, expert, first, second);
  return first;
}

void SlotCache::predict(SlotMeta& m) const {
  double estimate;
  if (num_layers_ > 0) {
    // The layer's next visit after the current one, pushed back by the time the expert sat unused.
    const int ahead = ((m.layer - current_layer_ - 1) % num_layers_ + num_layers_) % num_layers_ + 1;
    const double turn = position_ + ahead;
    const double last = m.last_position == kDueNow ? kNeverUsedPosition : m.last_position;
    estimate = 2 * turn - last;
  } else {
    estimate = 1e15 + static_cast<double>(clock_ - m.last_use);  // no clock: the least recent is farthest
  }
  const double gap = 2.0 * std::max(num_layers_, 1);
  double first, second;
  forecast(m.layer, m.expert, first, second);
  if (std::isnan(first)) {
    m.next_use = estimate;
    m.following_use = estimate + gap;
  } else {
    m.next_use = first;
    m.following_use = !std::isnan(second) && second > first ? second : first + gap;
  }
}

void SlotCache::refresh() {
  if (policy_ != Policy::kExpertflow) return;
  for (SlotMeta& m : slots_) {
    if (!m.empty()) predict(m);
  }
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

bool SlotCache::may_replace(int slot, double due) const {
  check_slot(slot);
  return slots_[slot].empty() || slots_[slot].next_use > due;
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
  if (policy_ == Policy::kExpertflow) predict(m);
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
  SlotMeta& m = slots_[slot];
  m.last_use = ++clock_;
  m.last_position = position_;
  ++m.use_count;
  if (policy_ == Policy::kExpertflow) predict(m);
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

void SlotCache::set_backfilled(int slot) {
  check_slot(slot);
  slots_[slot].backfilled = true;
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

std::vector<PlanLoad> SlotCache::apply_plan(const Plan& plan, const BeforeLoad& before_load, const AfterLoad& after_load,
                                            std::vector<PlanLoad>* planned, bool link_idle) {
  for (const PlanItem& item : plan.prefetch) {
    EF_CHECK(item.layer >= 0 && item.expert >= 0 && (num_layers_ == 0 || item.layer < num_layers_),
             "plan entry layer " << item.layer << " expert " << item.expert << " is out of range"
                                 << (num_layers_ > 0 ? " (num_layers=" + std::to_string(num_layers_) + ")" : ""));
    EF_CHECK(!std::isnan(item.due), "the due position of layer " << item.layer << " expert " << item.expert << " is NaN");
  }
  if (!plan.next_use.empty()) {
    EF_CHECK(plan.stride > 0, "a plan with next-use tables needs stride > 0, got " << plan.stride);
    EF_CHECK(plan.next_use.size() % static_cast<size_t>(plan.stride) == 0 &&
                 plan.following_use.size() == plan.next_use.size(),
             "next-use tables of " << plan.next_use.size() << " and " << plan.following_use.size()
                                   << " entries do not both hold whole rows of " << plan.stride << " experts");
    stride_ = plan.stride;
    next_use_ = plan.next_use;
    following_use_ = plan.following_use;
    named_due_.clear();
  } else {
    stride_ = 0;
    next_use_.clear();
    following_use_.clear();
    named_due_.clear();
    for (const PlanItem& item : plan.prefetch) named_due_[key(item.layer, item.expert)].push_back(item.due);
    for (auto& entry : named_due_) {  // ascending, each use once: two entries with one due are one use
      std::vector<double>& dues = entry.second;
      std::sort(dues.begin(), dues.end());
      dues.erase(std::unique(dues.begin(), dues.end()), dues.end());
    }
  }
  timed_ = plan.now != kDueNow;
  if (timed_) next_visit_ = plan.now;
  prefetch_ = plan.prefetch;
  for (SlotMeta& m : slots_) m.planned = false;
  refresh();
  return admit(before_load, after_load, planned, link_idle);
}

std::vector<PlanLoad> SlotCache::readmit(const BeforeLoad& before_load, const AfterLoad& after_load, bool link_idle) {
  if (!timed_) return {};  // a plan without a clock is admitted once
  return admit(before_load, after_load, nullptr, link_idle);
}

std::vector<PlanLoad> SlotCache::admit(const BeforeLoad& before_load, const AfterLoad& after_load,
                                       std::vector<PlanLoad>* planned, bool link_idle) {
  const bool by_next_use = orders_by_next_use(policy_);
  bool admitting = true;  // once a next-use plan must wait, later entries wait too; residents stay planned
  std::vector<PlanLoad> loads;
  for (const PlanItem& item : prefetch_) {
    if (timed_ && item.due <= position_) continue;  // its visit has come: too late to prefetch
    int s = find(item.layer, item.expert);
    if (s >= 0) {
      slots_[s].planned = true;
      if (planned) planned->push_back(PlanLoad{s, item.due});
      continue;
    }
    if (!admitting || (!item.sure && !link_idle)) continue;
    s = pick_slot(item.layer, item.due, /*prefetch=*/true);
    if (s < 0) {
      admitting = !by_next_use;
      continue;
    }
    // Conservative admission: the victim must not be needed before the expert that replaces it.
    if (by_next_use && !may_replace(s, item.due)) {
      admitting = false;
      continue;
    }
    // A guess may take a free slot, or one whose expert no forecast expects again; nothing of value.
    if (!item.sure && !slots_[s].empty() && slots_[s].next_use_after(item.due) != kNeverUsed) continue;
    before_load(s);
    assign(s, item.layer, item.expert);
    SlotMeta& m = slots_[s];
    m.planned = true;
    m.prefetched_unused = true;
    loads.push_back(PlanLoad{s, item.due});
    if (after_load) after_load(loads.back());
    link_idle = false;
  }
  return loads;
}

AccessResult SlotCache::access(int layer, const std::vector<int>& experts, const std::vector<double>* next_uses) {
  for (int expert : experts) {
    EF_CHECK(expert >= 0, "layer " << layer << " lists expert " << expert << "; expert ids are >= 0");
  }
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
      s = pick_slot(layer, demand_due(), /*prefetch=*/false);
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
