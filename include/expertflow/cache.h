// SlotCache: which (layer, expert) sits in which slot, and the metadata victim choice needs.
//
// Invariants:
// - Each resident (layer, expert) is in exactly one slot, and the map agrees with the slots.
// - A pinned slot (pin_count > 0) is never chosen as a victim.
// - Slots are chosen in this order: when the layer has a quota and holds at least that many slots,
//   one of its own slots; else an empty slot; else a slot of a layer above its quota; else, for a
//   layer below its quota, another layer's slot; else any candidate. Quotas steer placement; they
//   never make a load fail while some candidate exists.
// - The cache holds no memory and does no copies: it is pure bookkeeping, shared by the runtime and
//   by trace replay, and not thread-safe (the runtime serialises access).
#pragma once

#include <cstdint>
#include <functional>
#include <unordered_map>
#include <vector>

#include "expertflow/policy.h"

namespace expertflow {

struct PlanItem {
  int layer = 0;
  int expert = 0;
  float priority = 1;  // > 0; higher loads first and is evicted last
};

// What one layer's demand-paging access did (trace replay).
struct AccessResult {
  int hits = 0;
  int prefetch_hits = 0;      // hits on experts a plan loaded and nothing had used yet
  int evictions = 0;
  int wasted_evictions = 0;   // evicted experts that a plan loaded and nothing used
};

class SlotCache {
 public:
  // num_layers (0: unknown) lets the expertflow policy place layers in their cyclic order.
  SlotCache(int num_slots, Policy policy, int num_layers = 0);

  int num_slots() const { return static_cast<int>(slots_.size()); }
  Policy policy() const { return policy_; }
  const std::vector<SlotMeta>& slots() const { return slots_; }
  const SlotMeta& slot(int slot) const;

  int find(int layer, int expert) const;  // -1 when not resident
  int layer_count(int layer) const;

  // A slot to load an expert of `layer` into, or -1 when none may be taken. Candidates are unpinned
  // and have plan priority below `below_priority`.
  int pick_slot(int layer, float below_priority) const;

  void assign(int slot, int layer, int expert);  // replaces the occupant; resets use metadata
  void clear(int slot);
  void touch(int slot);                          // an access: recency and frequency
  void pin(int slot);
  void unpin(int slot);                          // throws when not pinned
  void set_plan_priority(int slot, float priority);
  void clear_plan_priorities();
  void set_next_use(int slot, uint64_t position);
  void set_prefetched_unused(int slot, bool value);
  // Compute moves to `layer`: a layer at or below the current one starts the next token.
  void advance(int layer);
  const VictimContext& context() const { return context_; }
  // Applies a plan, highest priority first: a resident entry's priority rises to the plan's (its slot
  // is appended to `raised`); an absent one takes a slot of lower priority, after before_load(slot)
  // has run for the slot's previous occupant. Returns the slots loaded, in plan order.
  std::vector<int> apply_plan(const std::vector<PlanItem>& plan, const std::function<void(int)>& before_load,
                              std::vector<int>* raised = nullptr);
  // The router of `layer` has spoken: its planned experts that it did not ask for drop to priority 0.
  // Returns the slots demoted.
  std::vector<int> demote_unrequested(int layer, const std::vector<int>& requested_slots);
  // quotas[l] >= 0 caps layer l; -1 or a missing entry leaves it uncapped; empty clears all quotas.
  void set_layer_quotas(std::vector<int> quotas);
  const std::vector<int>& layer_quotas() const { return quotas_; }

  // One layer of demand paging (trace replay): every listed expert is accessed in order, loading
  // misses; the layer's resident experts are pinned for the duration, so victims are never needed by
  // this layer. next_uses (may be null) gives each access's next-use position, for belady.
  // Throws when the cache cannot hold the layer's experts.
  AccessResult access(int layer, const std::vector<int>& experts, const std::vector<uint64_t>* next_uses);

 private:
  static uint64_t key(int layer, int expert) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(layer)) << 32) | static_cast<uint32_t>(expert);
  }
  void check_slot(int slot) const;
  int quota(int layer) const;

  Policy policy_;
  std::vector<SlotMeta> slots_;
  std::unordered_map<uint64_t, int> index_;
  std::unordered_map<int, int> layer_counts_;
  std::vector<int> quotas_;
  uint64_t clock_ = 0;
  VictimContext context_;
};

}  // namespace expertflow
