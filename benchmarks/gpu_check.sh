#!/usr/bin/env bash
# The package's GPU checks in one run, for a machine with CUDA (docs/performance.md, "On a GPU").
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu_check.sh   # the same steps at toy sizes, to check the script on a CPU
#
# Steps (each prints its command, output, exit status and seconds; logs and JSON go to $OUT):
#   1. tests     the CUDA tests (pytest -m gpu): solvers, CG refit and the pipeline on CUDA (a model that
#                starts on the host or on the device, offload, resume)
#   2. floors    GEMM rates, Gram accumulation and the H⁻¹ factorization against them (SmolLM2 and 8B widths)
#   3. scaling   every solver on factor-model layers from SmolLM2's down_proj shape to the 8B and 70B shapes
#   4. smollm2   the whole prune of a SmolLM2-135M-shaped model (random weights: the real GGUF does not
#                travel) at 30% MLP channels, 64 x 1024 tokens, with one forward pass as the floor
#   5. llama8b   one Llama-3-8B-shaped block, 64 x 2048 tokens: time, peak device memory, floor
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

step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start
    start=$(date +%s)
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc, $(( $(date +%s) - start )) s"
    [ "$rc" -eq 0 ] || failed=1
}

$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
    | tee "$OUT/machine.log"
if [ "$SMOKE" = 1 ]; then
    step tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_refit.py
    step floors "$PY" benchmarks/floors.py --device "$DEVICE" --widths 64 128 --tokens 256 --gemm 256 --repeats 1
    step scaling "$PY" benchmarks/scaling.py --device "$DEVICE" --methods spap wanda_sp --shapes smollm2-down \
        --timeout 300 --json "$OUT/scaling.json"
    step smollm2 "$PY" benchmarks/dry_run.py --shape tiny --device "$DEVICE" --n 4 --seqlen 32 --quiet \
        --json "$OUT/smollm2.json"
    step llama8b "$PY" benchmarks/dry_run.py --shape tiny --blocks 1 --device "$DEVICE" --n 4 --seqlen 32 --quiet \
        --json "$OUT/llama8b.json"
else
    step tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
    step floors "$PY" benchmarks/floors.py --device "$DEVICE" --widths 576 1536 4096 14336 --repeats 3
    step scaling "$PY" benchmarks/scaling.py --device "$DEVICE" --shapes all --timeout 240 --json "$OUT/scaling.json"
    step smollm2 "$PY" benchmarks/dry_run.py --shape smollm2-135m --device "$DEVICE" --n 64 --seqlen 1024 --quiet \
        --json "$OUT/smollm2.json"
    step llama8b "$PY" benchmarks/dry_run.py --shape llama3-8b --blocks 1 --device "$DEVICE" --n 64 --seqlen 2048 \
        --quiet --json "$OUT/llama8b.json"
fi
exit $failed
