#!/usr/bin/env bash
# The real-shape decode benchmarks of docs/benchmarks.md, on a GPU machine, from the repository root.
# Usage: benchmarks/real_shapes.sh TRACE_DIR OUT_DIR [stage ...]
#   stages: build, gpu-tests, mixtral, gpt-oss, smoke (default: build gpu-tests mixtral gpt-oss)
# TRACE_DIR holds mixtral-8x7b-instruct.gsm8k.jsonl and gpt-oss-120b.route.csv (../shared/data/traces).
set -euo pipefail
traces=${1:?trace folder}; out=${2:?output folder}; shift 2
stages=${*:-build gpu-tests mixtral gpt-oss}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
run() { echo "+ $*"; "$@"; }
for stage in $stages; do
  case $stage in
    build) run python3 -m pip install -q --no-build-isolation --no-deps -e . ;;
    gpu-tests) run python3 -m pytest -q -m gpu tests 2>&1 | tail -25 ;;
    smoke)
      run python3 -m expertflow.cli bench --arch mixtral-8x7b --layers 8 --routing "trace:$traces/mixtral-8x7b-instruct.gsm8k.jsonl" \
        --slots 25%,100% --policies all_gpu,lru,gate_ahead,expertflow --predictors history,oracle,noisy-oracle:0.8 \
        --new-tokens 24 --out "$out/smoke_mixtral.json" ;;
    mixtral)
      run python3 -m expertflow.cli bench --arch mixtral-8x7b --layers 8 --routing "trace:$traces/mixtral-8x7b-instruct.gsm8k.jsonl" \
        --slots 10%,25%,50%,100% --policies all_gpu,lru,gate_ahead,expertflow \
        --predictors history,oracle,noisy-oracle:0.8,gate-oracle:0.8 --new-tokens 64 --accelerate 25% \
        --out "$out/decode_mixtral_h200.json" ;;
    gpt-oss)
      run python3 -m expertflow.cli bench --arch gpt-oss-120b --layers 8 --routing "trace:$traces/gpt-oss-120b.route.csv" \
        --slots 10%,25%,50% --policies all_gpu,lru,gate_ahead,expertflow \
        --predictors history,oracle,noisy-oracle:0.8,gate-oracle:0.8 --new-tokens 64 \
        --out "$out/decode_gpt_oss_h200.json" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
