"""Corner cases of the cache's clock and next uses, where the native cache once departed from its
documented definition.

Each case is a short script of runtime calls and the slot the definition implies afterwards, worked
out by hand from cache.h / docs/runtime.md; both the runtime and tests/reference_cache.py must give it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import expertflow as ef
from expertflow.planner import Plan

from conftest import make_filled_pool
from reference_cache import ReferenceCache

NUM_EXPERTS = 6
NAN = math.nan


def tables(num_layers: int, **uses: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Next-use tables with no forecast (NaN) but for ``e<layer>_<expert>=(next, following)``."""
    next_use = np.full((num_layers, NUM_EXPERTS), NAN)
    following_use = np.full_like(next_use, NAN)
    for key, (first, second) in uses.items():
        layer, expert = (int(x) for x in key[1:].split("_"))
        next_use[layer, expert], following_use[layer, expert] = first, second
    return next_use, following_use


# name: (num_layers, policy, script, (layer, expert) to look at, what the definition implies)
CASES = {
    # Layer l of step s is at s * L + l; the clock starts before the first visit, so the first visit of
    # the last layer is step 0's: position L - 1.
    "first visit of the last layer, 3 layers": (
        3, "lru", [("acquire", 2, [0])], (2, 0), {"last_position": 2.0}),
    "first visit of the only layer": (
        1, "lru", [("acquire", 0, [0])], (0, 0), {"last_position": 0.0}),
    # ... and a lower layer then starts the next step: layer 0 of step 1 is position 3.
    "the step after a first visit of the last layer": (
        3, "lru", [("acquire", 2, [0]), ("acquire", 0, [1])], (0, 1),
        {"last_position": 3.0}),
    # A plan's `now` is where the next visit lands: -2 = -1 * 3 + 1 is layer 1's visit of step -1.
    "a negative now names its layer": (
        3, "lru", [("apply", [], None, -2.0), ("acquire", 1, [0])], (1, 0), {"last_position": -2.0}),
    # Expert (0, 0) is forecast at 0 and then 1; at position 2 both have passed, so nothing is
    # forecast: the estimate is 2 * (layer 0's next visit, 3) - (its last use, 0) = 6, and the use
    # after it two steps (6 visits) later.
    "a passed following use gives way to the estimate": (
        3, "expertflow",
        [("acquire", 0, [0]), ("apply", [], tables(3, e0_0=(0.0, 1.0)), -math.inf), ("acquire", 1, [1]),
         ("acquire", 2, [2])],
        (0, 0), {"last_position": 0.0, "next_use": 6.0, "following_use": 12.0}),
    # The same when the following use is not after the next use (it says nothing).
    "a following use before the next use says nothing": (
        3, "expertflow",
        [("acquire", 0, [0]), ("apply", [], tables(3, e0_0=(1.0, 0.0)), -math.inf), ("acquire", 1, [1]),
         ("acquire", 2, [2])],
        (0, 0), {"next_use": 6.0, "following_use": 12.0}),
    # A plan without tables: each named expert is next used at its due. Named at 2 and at 5 (in
    # ascending due order, as plans are), expert (0, 0) is next used at 2, and then at 5.
    "an expert named twice is next used at the earlier due": (
        3, "expertflow", [("prefetch", [(0, 0, 2.0), (0, 0, 5.0)])], (0, 0),
        {"next_use": 2.0, "following_use": 5.0}),
    # Two entries with one due are one use: the use after it is the next distinct due.
    "an expert named twice at one due is one use": (
        3, "expertflow", [("prefetch", [(0, 0, 2.0), (0, 0, 2.0), (0, 0, 5.0)])], (0, 0),
        {"next_use": 2.0, "following_use": 5.0}),
}


def run_runtime(num_layers: int, policy: str, script) -> dict:
    pool = make_filled_pool("host", num_layers=num_layers, num_experts=NUM_EXPERTS)
    with ef.ExpertCache(pool, num_slots=4, policy=policy) as cache:
        cache.pause_prefetch()  # deterministic: prefetches stay queued
        for op in script:
            if op[0] == "acquire":
                cache.acquire(op[1], op[2])
                cache.release(op[1], op[2])
            elif op[0] == "prefetch":
                cache.prefetch(op[1])
            else:
                _, _, tabs, now = op  # the cases' plans name no prefetch
                e = np.zeros(0, np.int32)
                cache.apply(Plan(e, e, np.zeros(0), *(tabs or (None, None)), now))
        return {(s["layer"], s["expert"]): s for s in cache.slot_table() if s["layer"] >= 0}


def run_reference(num_layers: int, policy: str, script) -> dict:
    ref = ReferenceCache(4, policy, num_layers)
    for op in script:
        if op[0] == "acquire":
            ref.acquire(op[1], op[2])
            ref.release(op[1], op[2])
        elif op[0] == "prefetch":
            ref.prefetch(op[1])
        else:
            _, entries, tabs, now = op
            ref.apply(entries, *(tabs or (None, None)), now)
    return {(s.layer, s.expert): vars(s) for s in ref.slots if s.layer >= 0}


def picked(slot: dict, want: dict) -> dict:
    return {k: slot[k] for k in want}


@pytest.mark.parametrize("case", CASES)
def test_the_reference_follows_the_definition(case):
    num_layers, policy, script, key, want = CASES[case]
    assert picked(run_reference(num_layers, policy, script)[key], want) == want


@pytest.mark.parametrize("case", CASES)
def test_the_runtime_follows_the_definition(case):
    num_layers, policy, script, key, want = CASES[case]
    assert picked(run_runtime(num_layers, policy, script)[key], want) == want
