"""CPU experts over several runs: for each bench result file, each mode's speed-up over GPU-only
(``cpu_experts`` off) at the same slots, batch and forecast, on the decode step (``ms_per_token``, the
median; and the mean step, the decode steps' total time) and on the prompt's pass (``prefill_ms``); then, over all the files, the least, median and greatest
speed-up of each (batch, prompt, policy, forecast, slots, mode). A process's speed varies (the
resident step by up to 51% between processes on the H200 machine), so a floor is judged over runs in
separate processes.

    python benchmarks/cpu_experts_runs.py benchmarks/results/cpu_experts_runs_*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from expertflow.bench import gpu_only_row


def speedups(result: dict) -> list[dict]:
    """One row per (slots, mode) that has a GPU-only row beside it: its ratios to that row."""
    rows = [r for r in result["rows"] if r["policy"] != "all_gpu"]
    out = []
    for r in rows:
        off = gpu_only_row(rows, r)
        if off is None:
            continue
        out.append({"batch": result["batch"], "prompt_len": result["prompt_len"], "slots": r["slots"], "policy": r["policy"],
                    "forecast": r.get("predictor") or "-",
                    "mode": r["cpu_experts_asked"], "decode": off["ms_per_token"] / r["ms_per_token"],
                    "decode_mean": off["ms_per_token_mean"] / r["ms_per_token_mean"],
                    "prefill": off["prefill_ms"] / r["prefill_ms"], "ms": r["ms_per_token"],
                    "off_ms": off["ms_per_token"], "prefill_ms": r["prefill_ms"], "off_prefill_ms": off["prefill_ms"],
                    "cpu_scales": r.get("cpu_scales"), "link_scale": r.get("link_scale")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    spread: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in args.files:
        result = json.loads(path.read_text())
        resident = result.get("all_gpu_ms")
        print(f"{path.name}: batch {result['batch']}, prompt {result['prompt_len']}, resident step "
              + (f"{resident:.1f} ms" if resident else "not run"))
        for s in speedups(result):
            # {case: {tokens: scale}} (older files: {tokens: scale}, or none)
            learnt = s["cpu_scales"] or {}
            cases = learnt if all(isinstance(v, dict) for v in learnt.values()) else {"": learnt}
            scales = "; ".join(f"{case} " * bool(case) + " ".join(f"{k} {v:.2f}" for k, v in per.items())
                               for case, per in cases.items())
            link = f" link {s['link_scale']:.2f}" if s["link_scale"] is not None else ""
            print(f"  {s['policy']:<10} {s['forecast']:<8} {s['slots']:>4} {s['mode']:<4} decode {s['off_ms']:7.1f} -> {s['ms']:7.1f} ms ({s['decode']:.2f}x)"
                  f"  prefill {s['off_prefill_ms']:7.1f} -> {s['prefill_ms']:7.1f} ms ({s['prefill']:.2f}x)"
                  f"  scales: cpu {scales or '-'}{link}")
            key = (s["batch"], s["prompt_len"], s["policy"], s["forecast"], s["slots"], s["mode"])
            spread[key]["decode"].append(s["decode"])
            spread[key]["decode (mean step)"].append(s["decode_mean"])
            spread[key]["prefill"].append(s["prefill"])
    print("over the runs: least / median / greatest speed-up over GPU-only")
    def order(key: tuple) -> tuple:
        batch, prompt, policy, forecast, slots, mode = key
        return batch, prompt, policy, forecast, int(slots) if slots.isdigit() else 0, mode

    for (batch, prompt, policy, forecast, slots, mode), ratios in sorted(spread.items(), key=lambda kv: order(kv[0])):
        line = " ".join(f"{what} {min(v):.2f} / {statistics.median(v):.2f} / {max(v):.2f}" for what, v in ratios.items())
        print(f"  batch {batch:>2} prompt {prompt:>3} {policy:<10} {forecast:<8} slots {slots:>4} {mode:<4} ({len(ratios['decode'])} runs) {line}")


if __name__ == "__main__":
    main()
