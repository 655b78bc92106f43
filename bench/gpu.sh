#!/usr/bin/env bash
# Every figure this project cannot measure without a GPU, in one run (budget: 8 minutes on one
# H100-class GPU). Each figure is printed with its dtype, batch, peak memory and the bf16/fp32 matmul
# rate measured in the same process:
#   1. DiT-XL training step (bf16 autocast, fused AdamW) on 32 x 128 and on 256 x 768, torch.compile
#      off and on: MFU against the measured bf16 matmul rate, first-step (compile) time
#   2. DiT-XL forward on 32 vs 256 tokens at batch 64: measured speedup beside the analytic ratio
#   3. the whole sample pipeline with CFG 4.5 (50 Euler steps): FlatDINO vs RAE images/s, bf16 and fp32
#   4. extract with DINOv2-B (random weights) and JPEGs decoded on the GPU: images/s
#
#   bench/gpu.sh               # on the GPU machine, from anywhere; the project must be importable
#   bench/gpu.sh --cpu-smoke   # the same scripts at tiny sizes on the CPU (a test runs this)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
start=$(date +%s)
section() { printf '\n=== %s (%ss elapsed)\n' "$1" "$(( $(date +%s) - start ))"; }

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    export BENCH_PEAK_SECONDS=0.3
    section "smoke: DiT training step (tiny)"
    $PY dit_step.py --device cpu --preset tiny-dit --batch 4 --seconds 0.2 --threads 1
    section "smoke: 32 vs 256 tokens forward (tiny)"
    $PY dit_tokens.py --device cpu --size tiny --batch 2 --seconds 0.2 --threads 1
    section "smoke: sample pipeline with CFG (tiny)"
    $PY sample.py --device cpu --tiny --images 8 --steps 2 --threads 1
    section "smoke: extract (tiny encoder)"
    $PY extract.py --device cpu --encoder tiny --images 24 --batch-size 8 --threads 1
elif [[ $# -gt 0 ]]; then
    echo "usage: bench/gpu.sh [--cpu-smoke]" >&2
    exit 2
else
    for preset_batch in "xl-32x128 256" "rae-xl-256x768 64"; do
        set -- $preset_batch
        section "DiT-XL training step, $1, batch $2, bf16 autocast + fused AdamW, compile off"
        $PY dit_step.py --device cuda --dtype bf16 --preset "$1" --batch "$2" --seconds 8
        section "DiT-XL training step, $1, batch $2, bf16 autocast + fused AdamW, compile on"
        $PY dit_step.py --device cuda --dtype bf16 --preset "$1" --batch "$2" --seconds 8 --compile
    done
    section "DiT-XL forward, 32 x 128 vs 256 x 768 tokens, batch 64, bf16"
    $PY dit_tokens.py --device cuda --size XL --dtype bf16 --batch 64 --seconds 4
    section "sample pipeline, CFG 4.5 on (0.225, 1), 50 Euler steps, DiT-XL + decoder-xl, bf16, batch 128"
    $PY sample.py --device cuda --dtype bf16 --images 512 --batch 128
    section "sample pipeline, as above in fp32 (TF32 matmuls), batch 64"
    $PY sample.py --device cuda --dtype fp32 --images 192 --batch 64
    section "extract, DINOv2-B/14-reg4 (random weights), JPEGs decoded on the GPU, batch 256, TF32"
    $PY extract.py --device cuda --encoder dinov2-b-reg4 --images 4096 --batch-size 256 --workers 8 --tf32
fi
section "done"
