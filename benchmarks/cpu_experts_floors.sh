#!/usr/bin/env bash
# The CPU-expert floors of docs/cpu_experts.md ("The floors, honestly"), on a GPU machine, from the
# repository root: GPU-only expertflow against `auto` (and `on` at batch 1) on the shared Mixtral
# trace, Mixtral-8x7B shape, 8 layers, 10 / 25 / 50% slots.
# Usage: benchmarks/cpu_experts_floors.sh TRACE_DIR OUT_DIR [stage ...]
#   stages: build, gpu-tests, gil, b1, b4, b16-history, b16-noisy, p512, rounds, rounds4, b4-oracle,
#   b16-oracle (default: all, in that order), and p512-rounds (the 512-token prompt in rounds, its
#   pass and decode steps of each round judged beside the pooled ones; not in the default)
# Each stage after build fits a 10-minute device call on the H200 machine (measured: batch 16 takes
# about 120 s a forecast, the rounds about 220 s, rounds4 about 270 s); a bench stage cut short keeps
# the configurations it finished in its JSON ("partial": true).
# TRACE_DIR holds mixtral-8x7b-instruct.gsm8k.jsonl (../shared/data/traces).
# benchmarks/cpu_experts_floors_table.py judges the floors from what these stages write.
# CUDA_GRAPHS=1: every run decodes with the non-expert layers as CUDA graphs (--cuda-graphs), and the
# files are named cpu_experts_cuda_graphs_* (the table's --cuda-graphs); the rounds stage runs auto and GPU-only only.
set -euo pipefail
traces=${1:?trace folder}; out=${2:?output folder}; shift 2
stages=${*:-build gpu-tests gil b1 b4 b16-history b16-noisy p512 rounds rounds4 b4-oracle b16-oracle}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
trace="trace:$traces/mixtral-8x7b-instruct.gsm8k.jsonl"
graphs=(); kind=floors; rounds_variants=normal,on
if [[ ${CUDA_GRAPHS:-0} == 1 ]]; then graphs=(--cuda-graphs); kind=cuda_graphs; rounds_variants=normal; fi
bench=(python3 -m expertflow.cli bench --arch mixtral-8x7b --layers 8 --routing "$trace" --policies expertflow
       --slots 6,16,32 --force "${graphs[@]}")
run() { echo "+ $*"; "$@"; }
for stage in $stages; do
  case $stage in
    build) run python3 -m pip install -q --no-build-isolation --no-deps -e . ;;
    gpu-tests) run python3 -m pytest -q -m gpu tests 2>&1 | tail -25 ;;
    gil) if [[ $kind == floors ]]; then run python3 benchmarks/cpu_experts_gil.py --out "$out/cpu-experts-gil-h200.json"
         else echo "gil: graphs do not change it; run it without CUDA_GRAPHS"; fi ;;
    b1) run "${bench[@]}" --predictors history,noisy-oracle:0.8,oracle --cpu-experts off,auto,on --new-tokens 32 \
          --out "$out/cpu_experts_${kind}_b1_h200.json" ;;
    b4) run "${bench[@]}" --predictors history,noisy-oracle:0.8 --cpu-experts off,auto --new-tokens 32 --batch 4 \
          --out "$out/cpu_experts_${kind}_b4_h200.json" ;;
    b16-history) run "${bench[@]}" --predictors history --cpu-experts off,auto --new-tokens 32 --batch 16 \
          --out "$out/cpu_experts_${kind}_b16_history_h200.json" ;;
    b16-noisy) run "${bench[@]}" --predictors noisy-oracle:0.8 --cpu-experts off,auto --new-tokens 32 --batch 16 \
          --out "$out/cpu_experts_${kind}_b16_noisy_h200.json" ;;
    p512) run "${bench[@]}" --predictors history,noisy-oracle:0.8,oracle --cpu-experts off,auto --new-tokens 4 \
          --prompt-len 512 --out "$out/cpu_experts_${kind}_p512_h200.json" ;;
    rounds) run python3 benchmarks/cpu_experts_variants.py --routing "$trace" --slots 16,32 "${graphs[@]}" \
          --predictors history,noisy-oracle:0.8,oracle --variants "$rounds_variants" --new-tokens 48 --rounds 2 \
          --out "$out/cpu_experts_${kind}_rounds_h200.json" ;;
    rounds4) run python3 benchmarks/cpu_experts_variants.py --routing "$trace" --slots 16,32 "${graphs[@]}" \
          --predictors history,noisy-oracle:0.8,oracle --variants normal --new-tokens 48 --rounds 4 \
          --out "$out/cpu_experts_${kind}_rounds4_h200.json" ;;
    p512-rounds) run python3 benchmarks/cpu_experts_variants.py --routing "$trace" --slots 6,16,32 "${graphs[@]}" \
          --predictors history,noisy-oracle:0.8,oracle --variants normal --new-tokens 16 --prompt-len 512 \
          --rounds "${P512_ROUNDS:-3}" --out "$out/cpu_experts_${kind}_p512_rounds_h200.json" ;;
    b4-oracle) run "${bench[@]}" --predictors oracle --cpu-experts off,auto --new-tokens 32 --batch 4 \
          --out "$out/cpu_experts_${kind}_b4_oracle_h200.json" ;;
    b16-oracle) run "${bench[@]}" --predictors oracle --cpu-experts off,auto --new-tokens 32 --batch 16 \
          --out "$out/cpu_experts_${kind}_b16_oracle_h200.json" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
