"""CPU experts' decision rules side by side, in one process on one model, in rounds: GPU-only
(``cpu_experts`` off) and ``auto``, then each variant (``auto`` under a changed rule; ``on`` runs
``on``, and ``guess`` GPU-only too), round after round (every other round in the reverse order), so
that drift in the machine's speed, and any effect of a variant's place in a round, falls on every
variant alike. The variants:

- ``normal``: off and auto as built;
- ``onway_link``: auto, but a copy on its way (a prefetch, a backfill) always stays on the link: only
  experts with no slot may go to the CPU (``ExpertCache.bytes_to_submit`` reads 0 for the others);
- ``never``: auto whose cost model never picks the CPU: the engine's CPU-expert path with no CPU
  work (what merely enabling it costs);
- ``no_leave``: auto that leaves no forecast miss to the CPU ahead (``CostModel.misses_left_to_cpu``
  reads 0): the plan's prefetches apply whole, and the CPU takes only what its layer's choice gives it;
- ``leave2``: auto that leaves up to two forecast misses a visit to the CPU ahead, wherever it
  leaves any (``CostModel.misses_left_to_cpu`` reads at least 2 where it reads more than 0);
- ``leave_kept``: auto whose plan leaves late forecast misses to the CPU ahead whether or not the
  cache would keep them until their next use (``Plan.kept_until_next_use`` at a named visit reads 0);
- ``leave_all``: ``leave2`` and ``leave_kept`` together;
- ``cpu_misses``: auto whose layer choice sends every miss of 1 or 2 tokens with no byte on the link
  to the CPU, and keeps every copy already on its way on the link;
- ``on``: every miss on the CPU (``cpu_experts="on"``), as built;
- ``threads:N``: auto with N CPU threads (``cpu_threads``) instead of the default (the cores less
  one beside a GPU): fewer leave more cores to the launching thread and the copy engine's dispatcher;
- ``max_tokens:N``: auto whose layer choice keeps every miss of more than N tokens on the link
  (a prompt's experts copy, as GPU-only's do);
- ``switch:US``: auto with Python's switch interval (``sys.setswitchinterval``) at US microseconds
  for its run, where the code as built leaves Python's default (5 ms): the CPU's worker needs
  Python's lock to start and end each expert, and a thread holding the lock hands it on only after
  an interval. (6fc626f made the executor set 500, so in the files measured on that code
  ``normal`` ran at 500 and ``switch:5000`` at Python's default; measured no faster, the executor
  went back to leaving the interval alone.)
- ``chunks:N``: off and auto with N prefetch chunks in flight (``max_chunks_in_flight``) instead of 2:
  the link stays busy for longer while the dispatcher thread waits for a core;
- ``guess``: off and auto whose planner prefetches every forecast it trusts (``prefetch_confidence``
  equal to ``confidence``, 0.5): a forecast measured right 80% of the time is then a sure prefetch,
  where as built (0.9) it loads only on an idle link into a slot no forecast expects again.

The variants that priced a CPU expert's later copy (``no_reuse``, ``later_half``, ``no_later``,
``no_later_all``, ``later_cheaper``) went with that price (docs/cpu_experts.md, the round that dropped
it; the script as they ran is in git history), and ``backfill:N`` (backfills queued behind up to N
unfinished prefetch jobs instead of 2) with its native option (26cc02e), measured slower.

Each row is a bench row (``expertflow.bench``) with its variant and round, the resident step of its
run (``all_gpu_ms``), and its ``batch`` and ``prompt_len`` (``--batch``, ``--prompt-len``: rounds
of batch 4 or 16, or of a long prompt's pass, whose ``prefill_ms`` each row gives); ``machine`` and
``pinned_gbps`` are the first run's.

    python benchmarks/cpu_experts_variants.py --routing trace:TRACES/mixtral-8x7b-instruct.gsm8k.jsonl \\
        --slots 32 --predictors oracle,history --new-tokens 48 --rounds 2 --variants normal,onway_link \\
        --out benchmarks/results/cpu_experts_variants_32slots_48tokens_h200.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import bench_cli
import numpy as np
from tqdm import tqdm

import expertflow.cpu_experts as cpu_experts
from expertflow.bench.harness import BenchConfig, build_model, run_bench
from expertflow.planner import Plan
from expertflow.policies import Expertflow
from expertflow.runtime import ExpertCache

VARIANTS = ("normal", "onway_link", "never", "no_leave", "leave2", "leave_kept", "leave_all", "cpu_misses", "guess", "on")


def main() -> None:
    parser = bench_cli.parser(__doc__, slots="32", new_tokens=48, live=True)
    parser.add_argument("--predictors", default="oracle,history")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="normal,onway_link")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--prompt-len", type=int, default=16, help="tokens of each sequence's prompt")
    args = parser.parse_args()
    variants = args.variants.split(",")

    def count_of(variant: str, kind: str) -> int | None:
        name, _, n = variant.partition(":")
        return int(n) if name == kind and n.isdigit() and int(n) >= 1 else None

    counted = ("threads", "chunks", "switch", "max_tokens")
    unknown = [v for v in variants if v not in VARIANTS and all(count_of(v, kind) is None for kind in counted)]
    if unknown or args.rounds < 1:
        parser.error(f"--variants takes {', '.join(VARIANTS)}, threads:N, chunks:N, switch:US and max_tokens:N, and --rounds at least 1")
    if args.batch < 1 or args.prompt_len < 1:
        parser.error("--batch and --prompt-len must be at least 1")
    cfg = BenchConfig(arch=args.arch, layers=args.layers, routing=args.routing, slots=args.slots.split(","),
                      policies=["expertflow"], predictors=args.predictors.split(","), cpu_experts=["off", "auto"],
                      new_tokens=args.new_tokens, batch=args.batch, prompt_len=args.prompt_len,
                      cuda_graphs=args.cuda_graphs, progress=False)
    model = build_model(cfg)
    bytes_to_submit, choose, kept = ExpertCache.bytes_to_submit, cpu_experts.CostModel.choose, Plan.kept_until_next_use
    left = cpu_experts.CostModel.misses_left_to_cpu
    attach = Expertflow.attach
    cache_init = ExpertCache.__init__
    switch_interval = sys.getswitchinterval()

    def trusting_attach(self, info):
        """``attach`` with every trusted forecast a sure prefetch."""
        self.prefetch_confidence = self.confidence
        return attach(self, info)

    def unkept_ahead(self, layer, experts, num_slots, visit):
        """The leave rule's question (a later visit): no miss is kept."""
        return np.zeros(len(experts))

    def at_least_two(self, num_tokens):
        n = left(self, num_tokens)
        return max(n, 2) if n else 0

    # variant -> the method it replaces (the others keep theirs)
    bytes_to_submit_of = {
        "onway_link": lambda self, layer, experts: [b if b < 0 else 0 for b in bytes_to_submit(self, layer, experts)]}
    choose_of = {
        "never": lambda self, num_tokens, copy_shares=None: [False] * len(num_tokens),
        "cpu_misses": lambda self, num_tokens, copy_shares=None: [
            n <= 2 and share == 1.0 for n, share in zip(num_tokens, copy_shares or [1.0] * len(num_tokens))],
    }
    kept_of = {"leave_kept": unkept_ahead, "leave_all": unkept_ahead}
    left_of = {"no_leave": lambda self, num_tokens: 0, "leave2": at_least_two, "leave_all": at_least_two}
    attach_of = {"guess": trusting_attach}
    both_modes = ("normal", "guess")  # the variants that change GPU-only too run it too (and chunks:N)
    rows: list[dict] = []
    meta: dict = {}
    command = bench_cli.command(__file__, args)
    try:
        order = [(r, v) for r in range(args.rounds) for v in (variants if r % 2 == 0 else variants[::-1])]
        for rnd, variant in tqdm(order, desc="variants"):
            ExpertCache.bytes_to_submit = bytes_to_submit_of.get(variant, bytes_to_submit)  # type: ignore[method-assign]
            max_tokens = count_of(variant, "max_tokens")
            # The capped misses still count as run in the wrapped choice's learning: their prices
            # neither move nor drift back (the screen compares decode times only).
            cpu_experts.CostModel.choose = (  # type: ignore[method-assign]
                choose_of.get(variant, choose) if max_tokens is None else
                lambda self, num_tokens, copy_shares=None, cap=max_tokens: [
                    cpu and n <= cap for cpu, n in zip(choose(self, num_tokens, copy_shares), num_tokens)])
            Plan.kept_until_next_use = kept_of.get(variant, kept)  # type: ignore[method-assign]
            cpu_experts.CostModel.misses_left_to_cpu = left_of.get(variant, left)  # type: ignore[method-assign]
            Expertflow.attach = attach_of.get(variant, attach)  # type: ignore[method-assign]
            switch_us = count_of(variant, "switch")
            sys.setswitchinterval(switch_interval if switch_us is None else switch_us * 1e-6)
            chunks = count_of(variant, "chunks")
            ExpertCache.__init__ = (cache_init if chunks is None else  # type: ignore[method-assign]
                                    functools.partialmethod(cache_init, max_chunks_in_flight=chunks))
            modes = (["off", "auto"] if rnd % 2 == 0 else ["auto", "off"]) if variant in both_modes or chunks else [
                "on" if variant == "on" else "auto"]
            result = run_bench(dataclasses.replace(cfg, cpu_experts=modes, cpu_threads=count_of(variant, "threads")), model)
            meta = meta or {"machine": result["machine"], "pinned_gbps": result["pinned_gbps"]}
            for r in result["rows"]:
                if r["policy"] == "expertflow":
                    rows.append({"variant": variant, "round": rnd, "all_gpu_ms": result["all_gpu_ms"],
                                 "batch": result["batch"], "prompt_len": result["prompt_len"], **r})
                    tqdm.write(f"{variant:10s} round {rnd} {r['predictor']:7s} {r['slots']:>4} {r['cpu_experts']:5s} "
                               f"median {r['ms_per_token']:.2f} mean {r['ms_per_token_mean']:.2f} ms/token, "
                               f"{r['cpu_experts_per_token']:.2f} CPU experts/token, {r['bytes_per_token'] / 1e9:.2f} GB/token")
            # after every variant, so that a run cut short keeps its finished rounds
            args.out.write_text(json.dumps({"command": command, **meta, "rows": rows}, indent=1))
    finally:
        ExpertCache.bytes_to_submit = bytes_to_submit  # type: ignore[method-assign]
        cpu_experts.CostModel.choose = choose  # type: ignore[method-assign]
        Plan.kept_until_next_use = kept  # type: ignore[method-assign]
        cpu_experts.CostModel.misses_left_to_cpu = left  # type: ignore[method-assign]
        Expertflow.attach = attach  # type: ignore[method-assign]
        ExpertCache.__init__ = cache_init  # type: ignore[method-assign]
        sys.setswitchinterval(switch_interval)
        model.pool.close()


if __name__ == "__main__":
    main()
