// Runtime: prefetch / acquire / release over pool, cache and copy engine. See runtime.h.
#include "expertflow/runtime.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <utility>

#include "expertflow/error.h"

namespace expertflow {

namespace {

RuntimeOptions validated(const std::shared_ptr<ExpertPool>& pool, RuntimeOptions options) {
  EF_CHECK(pool != nullptr, "the runtime needs an expert pool");
  EF_CHECK(options.num_slots > 0, "num_slots must be at least 1, got " << options.num_slots);
  size_t num_experts = 0;
  for (int l = 0; l < pool->num_layers(); ++l) num_experts += static_cast<size_t>(pool->num_experts(l));
  if (options.slot_bytes == 0) options.slot_bytes = pool->max_expert_bytes();
  EF_CHECK(options.slot_bytes <= std::numeric_limits<size_t>::max() / 2 / static_cast<size_t>(options.num_slots),
           options.num_slots << " slots of " << options.slot_bytes << " bytes overflow the address space; lower slot_bytes");
  // More slots than experts are never used; refusing them also bounds the slot arena and the cache's
  // per-slot tables by the pool's size.
  EF_CHECK(static_cast<size_t>(options.num_slots) <= num_experts,
           "num_slots=" << options.num_slots << " asks for " << static_cast<size_t>(options.num_slots) * options.slot_bytes
                        << " bytes of slots, more than the pool's " << num_experts << " experts need; give at most "
                        << num_experts << " slots (every expert resident)");
  options.slot_bytes = align_up(options.slot_bytes, kTensorAlignment);
  for (int l = 0; l < pool->num_layers(); ++l) {
    EF_CHECK(pool->expert_bytes(l) <= options.slot_bytes,
             "an expert of layer " << l << " takes " << pool->expert_bytes(l) << " bytes, more than slot_bytes="
                                   << options.slot_bytes << "; raise slot_bytes to at least " << pool->expert_bytes(l));
  }
  return options;
}

}  // namespace

Runtime::Runtime(std::shared_ptr<ExpertPool> pool, RuntimeOptions options)
    : pool_(std::move(pool)),
      backend_(pool_->backend()),
      options_(validated(pool_, std::move(options))),
      policy_(parse_policy(options_.policy)),
      cache_(options_.num_slots, policy_, pool_->num_layers()) {
  EF_CHECK(policy_ != Policy::kBelady, "policy 'belady' needs the future and exists for trace replay only; "
                                       "choose lru, lfu or expertflow");
  arena_ = std::make_shared<Buffer>(pool_->backend(), Buffer::Kind::kDevice,
                                    options_.slot_bytes * static_cast<size_t>(options_.num_slots));
  engine_ = std::make_unique<CopyEngine>(pool_->backend(), options_.num_slots, options_.copy);
}

Runtime::~Runtime() { close(); }

void Runtime::close() noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  if (closed_) return;
  closed_ = true;
  if (engine_) engine_->close();
  arena_.reset();
  pool_.reset();  // the copies that read it have stopped; ExpertPool.close() may now free it
}

bool Runtime::closed() {
  std::lock_guard<std::mutex> lk(mu_);
  return closed_;
}

void Runtime::check_open() const { EF_CHECK(!closed_, "the expert cache is closed; create a new one"); }

void Runtime::check_distinct_experts(int layer, const std::vector<int>& experts, const char* call) const {
  for (int expert : experts) pool_->check_expert(layer, expert);
  EF_CHECK(std::set<int>(experts.begin(), experts.end()).size() == experts.size(),
           call << " of layer " << layer << " lists an expert twice; pass each expert once");
}

void Runtime::evict_locked(int slot) {
  const SlotMeta& m = cache_.slot(slot);
  if (m.empty()) return;
  if (engine_->cancel(slot)) {
    ++(m.backfilled ? stats_.cancelled_backfills : stats_.cancelled_prefetches);
  } else {
    ++stats_.evictions;
    if (m.prefetched_unused) ++stats_.wasted_prefetches;
  }
  cache_.clear(slot);
}

void Runtime::apply_plan(const Plan& plan) {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  std::set<std::pair<int, int>> wanted;
  for (const PlanItem& item : plan.prefetch) {
    pool_->check_expert(item.layer, item.expert);
    EF_CHECK(!std::isnan(item.due), "the due position of layer " << item.layer << " expert " << item.expert << " is NaN");
    wanted.emplace(item.layer, item.expert);
  }
  if (!plan.next_use.empty()) {
    int max_experts = 0;
    for (int l = 0; l < pool_->num_layers(); ++l) max_experts = std::max(max_experts, pool_->num_experts(l));
    EF_CHECK(plan.stride >= max_experts,
             "next-use tables have rows of " << plan.stride << " experts but a layer has " << max_experts);
    const size_t want = static_cast<size_t>(pool_->num_layers()) * static_cast<size_t>(plan.stride);
    EF_CHECK(plan.next_use.size() == want && plan.following_use.size() == want,
             "next-use tables need " << want << " entries (" << pool_->num_layers() << " layers x " << plan.stride
                                     << "), got " << plan.next_use.size() << " and " << plan.following_use.size());
  }
  // Stale prefetches: what the new plan no longer names is not worth the rest of its bytes.
  for (int s = 0; s < cache_.num_slots(); ++s) {
    const SlotMeta& m = cache_.slot(s);
    if (!m.empty() && m.pin_count == 0 && !m.backfilled && !wanted.count({m.layer, m.expert}) && engine_->cancel(s)) {
      ++stats_.cancelled_prefetches;
      cache_.clear(s);
    }
  }
  std::vector<PlanLoad> planned;
  cache_.apply_plan(
      plan, [this](int slot) { evict_locked(slot); }, [this](const PlanLoad& p) { queue_prefetch_locked(p); },
      &planned, engine_->idle());
  for (const PlanLoad& p : planned) engine_->set_due(p.slot, p.due);
}

void Runtime::copy_later_locked(int slot, double due) {
  const SlotMeta& m = cache_.slot(slot);
  engine_->prefetch(slot, pool_->expert_data(m.layer, m.expert), slot_data(slot), pool_->expert_bytes(m.layer), due);
}

void Runtime::queue_prefetch_locked(const PlanLoad& load) {
  copy_later_locked(load.slot, load.due);
  ++stats_.prefetches;
}

void Runtime::readmit_locked() {
  cache_.readmit([this](int slot) { evict_locked(slot); }, [this](const PlanLoad& p) { queue_prefetch_locked(p); },
                 engine_->idle());
}

int Runtime::take_slot_locked(int layer, int expert) {
  const int s = cache_.pick_slot(layer, cache_.demand_due(), /*prefetch=*/false);
  return s < 0 ? -1 : occupy_locked(s, layer, expert);
}

int Runtime::occupy_locked(int slot, int layer, int expert) {
  evict_locked(slot);
  cache_.assign(slot, layer, expert);
  cache_.pin(slot);
  return slot;
}

std::vector<int> Runtime::acquire(int layer, const std::vector<int>& experts, Stream compute, bool wait,
                                  const std::vector<int>& spare) {
  std::vector<int> slots(experts.size(), -1);
  {
    std::lock_guard<std::mutex> lk(mu_);
    check_open();
    check_distinct_experts(layer, experts, "acquire");
    check_distinct_experts(layer, spare, "acquire's spare");
    for (int expert : spare) {
      EF_CHECK(std::find(experts.begin(), experts.end(), expert) == experts.end(),
               "acquire of layer " << layer << " lists expert " << expert << " both to acquire and to spare");
    }
    EF_CHECK(static_cast<int>(experts.size()) <= cache_.num_slots(),
             "capacity of " << cache_.num_slots() << " slots is smaller than the " << experts.size()
                            << " experts layer " << layer << " needs at once; give the cache at least "
                            << experts.size() << " slots");
    cache_.advance(layer);
    for (size_t i = 0; i < experts.size(); ++i) {
      slots[i] = cache_.find(layer, experts[i]);
      if (slots[i] >= 0) cache_.pin(slots[i]);
    }
    // The spared slots are pinned while the misses take theirs, and let go once no other is free. Not
    // one whose copy has not started: backfill() cancels that copy next, so sparing it would only
    // send a miss to evict another expert.
    std::vector<int> spared;
    for (int expert : spare) {
      const int s = cache_.find(layer, expert);
      if (s >= 0 && engine_->job_state(s) != CopyEngine::JobState::kQueued) {
        cache_.pin(s);
        spared.push_back(s);
      }
    }
    auto let_go_spared = [&] {
      for (int s : spared) cache_.unpin(s);
      spared.clear();
    };
    std::vector<size_t> missed;
    for (size_t i = 0; i < experts.size(); ++i) {
      if (slots[i] >= 0) continue;
      int s = take_slot_locked(layer, experts[i]);
      if (s < 0 && !spared.empty()) {
        let_go_spared();
        s = take_slot_locked(layer, experts[i]);
      }
      if (s < 0) {
        for (int pinned : slots) {
          if (pinned >= 0) cache_.unpin(pinned);
        }
        for (size_t j : missed) cache_.clear(slots[j]);
        EF_CHECK(false, "no slot is free for layer " << layer << " expert " << experts[i] << ": all "
                                                     << cache_.num_slots()
                                                     << " slots are pinned; release experts before "
                                                        "acquiring more, or give the cache more slots");
      }
      slots[i] = s;
      missed.push_back(i);
    }
    let_go_spared();
    for (size_t i = 0; i < experts.size(); ++i) {
      const int s = slots[i];
      if (std::find(missed.begin(), missed.end(), i) != missed.end()) {
        engine_->demand(s, pool_->expert_data(layer, experts[i]), slot_data(s), pool_->expert_bytes(layer));
        ++stats_.misses;
      } else {
        engine_->promote(s);
        ++stats_.hits;
        if (cache_.slot(s).prefetched_unused) ++stats_.prefetch_hits;
      }
      cache_.set_prefetched_unused(s, false);
      cache_.touch(s);
    }
    stats_.accesses += experts.size();
    // The clock moved and this layer's experts were used: prefetches that had to wait may go now.
    readmit_locked();
  }
  // Pinned slots cannot change hands, so waiting needs no cache lock (and must not hold it: on the
  // host backend the wait blocks this thread until the bytes land).
  if (wait) {
    for (int s : slots) engine_->wait_ready(s, compute);
  }
  return slots;
}

void Runtime::check_acquired_locked(int slot) const {
  check_open();
  EF_CHECK(slot >= 0 && slot < cache_.num_slots() && cache_.slot(slot).pin_count > 0,
           "slot " << slot << " is not acquired; wait only on slots that acquire() returned and that are not released");
}

void Runtime::wait_ready(int slot, Stream compute) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    check_acquired_locked(slot);
  }
  engine_->wait_ready(slot, compute);
}

void Runtime::wait_signal(std::shared_ptr<HostSignal> signal, Stream compute) {
  EF_CHECK(signal != nullptr, "wait_signal needs a signal");
  {
    std::lock_guard<std::mutex> lk(mu_);
    check_open();
  }
  backend_->wait_signal(compute, std::move(signal));
}

bool Runtime::is_ready(int slot) {
  std::lock_guard<std::mutex> lk(mu_);
  check_acquired_locked(slot);
  return engine_->is_ready(slot);
}

void Runtime::release(int layer, const std::vector<int>& experts, Stream compute) {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  std::vector<int> slots;
  for (int expert : experts) {
    pool_->check_expert(layer, expert);
    const int s = cache_.find(layer, expert);
    const int already = static_cast<int>(std::count(slots.begin(), slots.end(), s));
    EF_CHECK(s >= 0 && cache_.slot(s).pin_count > already,
             "release of layer " << layer << " expert " << expert
                                 << " which is not acquired (released twice, or never acquired)");
    slots.push_back(s);
  }
  for (int s : slots) {
    cache_.unpin(s);
    engine_->release(s, compute);
  }
}

std::vector<uint8_t> Runtime::backfill(int layer, const std::vector<int>& experts) {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  check_distinct_experts(layer, experts, "backfill");
  cache_.advance(layer);
  // Its next use is at the layer's next visit at the earliest: prefetches due sooner go first.
  const double due = cache_.position() + pool_->num_layers();
  // As acquire() does: the experts already held are pinned first and each one loaded is pinned, so no
  // expert of this call takes another's slot; they are used in order, then let go.
  std::vector<int> slots(experts.size(), -1);
  std::vector<uint8_t> outcome(experts.size(), static_cast<uint8_t>(BackfillOutcome::kNotAdmitted));
  for (size_t i = 0; i < experts.size(); ++i) {
    const int s = cache_.find(layer, experts[i]);
    if (s < 0) continue;
    const CopyEngine::JobState state = engine_->job_state(s);
    if (state == CopyEngine::JobState::kQueued && cache_.slot(s).pin_count == 0) {
      // Overtaken before a byte went: the caller has its result without this copy, which moves (below)
      // only where any backfill would. (Kept, a forecast's prefetches that the CPU took used the link
      // as much as without the CPU, and with the CPU's time on top.) A backfill queued at an earlier
      // visit and still waiting is cancelled the same way.
      evict_locked(s);
      continue;
    }
    cache_.pin(s);
    slots[i] = s;
    outcome[i] = static_cast<uint8_t>(BackfillOutcome::kHeld);
    // A prefetch part way over the link now serves the next use: no new plan cancels it as stale.
    if (state == CopyEngine::JobState::kStarted) cache_.set_backfilled(s);
  }
  for (size_t i = 0; i < experts.size(); ++i) {
    if (slots[i] >= 0 || engine_->num_pending_prefetches() >= kBackfillMaxPendingPrefetches) continue;
    // Where the plan forecasts the expert's next use, its backfill is a prefetch for that use: due then,
    // and admitted as a prefetch is (cache.h): not for an expert never used again, and only over an
    // expert not needed before it. In the slot a demand miss takes, a CPU expert used again only
    // after the cache's reach evicted one needed sooner, and its bytes delayed the forecast's
    // prefetches.
    const double next = policy_ == Policy::kExpertflow ? cache_.forecast_next_use(layer, experts[i])
                                                       : std::numeric_limits<double>::quiet_NaN();
    int s = -1;
    if (std::isnan(next)) {
      s = take_slot_locked(layer, experts[i]);  // the slot a demand miss takes
    } else if (!std::isinf(next)) {
      const int victim = cache_.pick_slot(layer, next, /*prefetch=*/true);
      if (victim >= 0 && cache_.may_replace(victim, next)) s = occupy_locked(victim, layer, experts[i]);
    }
    if (s < 0) continue;  // every slot is pinned, or the forecast does not admit it
    copy_later_locked(s, std::isnan(next) ? due : next);
    cache_.set_backfilled(s);
    slots[i] = s;
    outcome[i] = static_cast<uint8_t>(BackfillOutcome::kQueued);
    ++stats_.backfills;
  }
  for (int s : slots) {
    if (s < 0) continue;
    cache_.set_prefetched_unused(s, false);
    cache_.touch(s);
    cache_.unpin(s);  // after every load of the call: none took another's slot
  }
  // The clock may have moved (a layer whose experts all ran on the CPU acquires nothing): prefetches
  // that had to wait may go now, as after acquire().
  readmit_locked();
  return outcome;
}

void Runtime::set_layer_quotas(std::vector<int> quotas) {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  EF_CHECK(quotas.size() <= static_cast<size_t>(pool_->num_layers()),
           "got quotas for " << quotas.size() << " layers but the pool has " << pool_->num_layers());
  cache_.set_layer_quotas(std::move(quotas));
}

RuntimeStats Runtime::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  RuntimeStats out = stats_;
  const CopyStats copy = engine_->stats();
  out.prefetch_bytes = copy.prefetch_bytes;
  out.demand_bytes = copy.demand_bytes;
  out.bytes_copied = copy.prefetch_bytes + copy.demand_bytes;
  out.stalls = copy.num_stalls;
  out.stall_ms = copy.stall_ms;
  out.timed_demand_bytes = copy.timed_demand_bytes;
  out.demand_ms = copy.demand_ms;
  return out;
}

void Runtime::reset_stats() {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  stats_ = RuntimeStats{};
  engine_->reset_stats();
}

std::vector<SlotMeta> Runtime::slot_table() {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  return cache_.slots();
}

template <typename T, typename OfSlot>
std::vector<T> Runtime::each_expert(int layer, const std::vector<int>& experts, OfSlot&& of_slot) {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  std::vector<T> out;
  out.reserve(experts.size());
  for (int expert : experts) {
    pool_->check_expert(layer, expert);
    out.push_back(of_slot(cache_.find(layer, expert)));
  }
  return out;
}

std::vector<uint8_t> Runtime::resident(int layer, const std::vector<int>& experts) {
  return each_expert<uint8_t>(layer, experts, [](int s) { return s >= 0; });
}

std::vector<uint8_t> Runtime::landed(int layer, const std::vector<int>& experts) {
  return each_expert<uint8_t>(layer, experts, [this](int s) { return s >= 0 && engine_->is_ready(s); });
}

std::vector<int64_t> Runtime::bytes_to_submit(int layer, const std::vector<int>& experts) {
  return each_expert<int64_t>(layer, experts,
                              [this](int s) { return s < 0 ? int64_t{-1} : static_cast<int64_t>(engine_->unsubmitted_bytes(s)); });
}

void Runtime::synchronize() {
  CopyEngine* engine;
  {
    std::lock_guard<std::mutex> lk(mu_);
    check_open();
    engine = engine_.get();
  }
  engine->synchronize();
}

void Runtime::pause_prefetch() {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  engine_->pause();
}

void Runtime::resume_prefetch() {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  engine_->resume();
}

}  // namespace expertflow
