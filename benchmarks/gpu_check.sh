#!/usr/bin/env bash
# The package's GPU checks in one run, for a machine with CUDA (docs/performance.md, "On a GPU").
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu_check.sh   # the same steps at toy sizes, to check the script on a CPU
#
# Steps, most important first, each stopped at its own time limit (each prints its command, output, exit
# status and seconds; logs and JSON go to $OUT):
#   1. tests     the CUDA tests (pytest -m gpu): solvers, CG refit and the pipeline on CUDA (a model that
#                starts on the host or on the device, offload, resume)
#   2. llama8b   one Llama-3-8B-shaped block, 64 x 2048 tokens: time, peak device memory, floor
#   3. smollm2   the whole prune of a SmolLM2-135M-shaped model (random weights: the real GGUF does not
#                travel) at 30% MLP channels, 64 x 1024 tokens, with one forward pass as the floor
#   4. floors    GEMM rates, Gram accumulation and the H⁻¹ factorization against them (SmolLM2 and 8B widths)
#   5. scaling   spap, obs and admm on the SmolLM2 and 8B down_proj shapes
#   6. rows      where SPAP's unstructured and 2:4 time goes on the 8B gate_proj and down_proj shapes,
#                next to ADMM and SparseGPT (benchmarks/row_phases.py)
#   7. llama8b_rows  the 8B-shaped block at 50% unstructured
# STEPS="tests rows" runs only the steps named (default: all, in this order).
# Real SmolLM2 perplexities need the GGUF and ../shared/data, which a bare GPU machine lacks.
# Nothing here fails on slow timings: timings are printed, never asserted.
set -u
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=0

STEPS=${STEPS:-tests llama8b smollm2 floors scaling rows llama8b_rows}

step() {  # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    echo "== $name: $*"
    local start
    start=$(date +%s)
    timeout --kill-after 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "== $name: stopped at its limit of $limit s"
    echo "== $name: exit $rc, $(( $(date +%s) - start )) s"
    [ "$rc" -eq 0 ] || failed=1
}

$PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" | tee "$OUT/machine.log"
# pytest-timeout, where installed, stops one hung test instead of the whole step.
TEST_LIMIT=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")
if [ "$SMOKE" = 1 ]; then
    step tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu $TEST_LIMIT tests/test_refit.py
    step llama8b 120 "$PY" benchmarks/dry_run.py --shape tiny --blocks 1 --device "$DEVICE" --n 4 --seqlen 32 --quiet \
        --json "$OUT/llama8b.json"
    step smollm2 120 "$PY" benchmarks/dry_run.py --shape tiny --device "$DEVICE" --n 4 --seqlen 32 --quiet \
        --json "$OUT/smollm2.json"
    step floors 60 "$PY" benchmarks/floors.py --device "$DEVICE" --widths 64 128 --tokens 256 --gemm 256 --repeats 1
    step scaling 120 "$PY" benchmarks/scaling.py --device "$DEVICE" --methods spap wanda_sp --shapes smollm2-down \
        --timeout 60 --json "$OUT/scaling.json"
    step rows 60 "$PY" benchmarks/row_phases.py --device "$DEVICE" --shape 64 128 --structure 2:4
    step llama8b_rows 120 "$PY" benchmarks/dry_run.py --shape tiny --blocks 1 --device "$DEVICE" --n 4 --seqlen 32 \
        --structure unstructured --sparsity 0.5 --quiet --json "$OUT/llama8b_rows.json"
else
    # Most important first, each time-boxed, the limits add up to 12 minutes; STEPS picks a part of them for a shorter lease.
    step tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu $TEST_LIMIT tests
    step llama8b 130 "$PY" benchmarks/dry_run.py --shape llama3-8b --blocks 1 --device "$DEVICE" --n 64 --seqlen 2048 \
        --quiet --json "$OUT/llama8b.json"
    step smollm2 70 "$PY" benchmarks/dry_run.py --shape smollm2-135m --device "$DEVICE" --n 64 --seqlen 1024 --quiet \
        --json "$OUT/smollm2.json"
    step floors 20 "$PY" benchmarks/floors.py --device "$DEVICE" --widths 576 1536 4096 14336 --repeats 3
    step scaling 50 "$PY" benchmarks/scaling.py --device "$DEVICE" --methods spap obs admm \
        --shapes smollm2-down llama3-8b-down --timeout 20 --json "$OUT/scaling.json"
    step rows 150 bash -c 'for shape in "14336 4096" "4096 14336"; do for structure in 0.5 2:4; do
        "$0" benchmarks/row_phases.py --device "$1" --shape $shape --structure $structure || exit 1; done; done' "$PY" "$DEVICE"
    step llama8b_rows 150 "$PY" benchmarks/dry_run.py --shape llama3-8b --blocks 1 --device "$DEVICE" --n 64 \
        --seqlen 2048 --structure unstructured --sparsity 0.5 --quiet --json "$OUT/llama8b_rows.json"
fi
exit $failed
