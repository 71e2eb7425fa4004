#!/usr/bin/env bash
# The prepared GPU benchmark: one unattended run on a CUDA machine, under 8 minutes.
#   (a) training tokens/s and MFU vs. transformers      -> train.json
#   (b) decode tokens/s vs. transformers, HBM roofline   -> decode.json
#       and Alloy in Q4_0 (GGUF blocks) vs. transformers bf16 -> decode_q4_0.json
#   (c) GPU (capped) + CPU: Alloy's split vs. accelerate -> partition.json
#   then summary.json (machine, versions, commit, headline figures, every raw sample) and gpu.log.
# Results go to $OUT if set (the device tool's folder), else bench/results/gpu-<UTC time>/.
# Installs nothing from the network. Only alloy.plan / alloy.devices (measurement c) need a
# package the GPU machine lacks, pydantic: carry its wheels in .whl/ (docs/BENCHMARKS.md, GPU);
# they are unpacked offline into a temporary folder. Without them (c) measures accelerate alone.
# Usage: [ALLOY_COMMIT=sha] [PYTHON=python3] bash bench/gpu.sh
# BENCH_GPU_SMOKE=1 runs the same steps on the CPU with tiny models (CI's check of this script).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Nothing is fetched: the models are built from configs here and loaded from a local folder.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1

DEVICE_ARGS=(--device cuda)
if [ "${BENCH_GPU_SMOKE:-0}" = 1 ]; then
    DEVICE_ARGS=(--device cpu --tiny --dtype fp32)
elif ! "$PY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "gpu.sh: no CUDA: '$PY -c \"import torch; assert torch.cuda.is_available()\"' failed;" \
        "run this on a GPU machine" >&2
    exit 2
fi

OUT_DIR=${OUT:-$ROOT/bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR" || exit 2
exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1  # the whole log comes back with the JSON
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID"' EXIT  # let tee write the last lines before the folder is read
echo "gpu.sh: results in $OUT_DIR"

if ! "$PY" -c 'import pydantic' 2>/dev/null; then
    if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        SITE=$(mktemp -d /tmp/alloy-gpu-site.XXXX)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$ROOT"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE" \
            || echo "gpu.sh: could not unpack .whl/; measurement (c) will run accelerate alone"
    else
        echo "gpu.sh: pydantic is missing and no .whl/ was carried: measurement (c) will run accelerate alone"
    fi
fi

STATUS=()
run() {  # NAME LIMIT_S [ARGS...]: one measurement in its own process; a failure does not stop the rest
    # (MODULE=M run NAME ...: bench.gpu.M's measurement written as NAME.json)
    local name=$1 limit=$2 module=${MODULE:-$1}
    shift 2
    echo "== $name (at most ${limit} s) $(date -u +%H:%M:%S)"
    # --budget-s: start no new round once 70% of the limit is gone, so the result is written whole.
    timeout -k 10 "$limit" "$PY" -m "bench.gpu.$module" "${DEVICE_ARGS[@]}" --out "$OUT_DIR/$name.json" \
        --budget-s $((limit * 7 / 10)) "$@" >/dev/null  # stdout repeats $name.json; stderr is the log
    local rc=$?
    [ "$rc" = 124 ] && echo "gpu.sh: $name ran past ${limit} s and was stopped; $name.json keeps the samples taken"
    echo "== $name exit $rc"
    STATUS+=("$name=$rc")
}

START_S=$SECONDS
run train 150
run decode 100
# Alloy's Q4_0 blocks on the GPU against transformers in bf16 (the tiny CPU smoke model's run is
# tests/test_bench_gpu.py's; here it would only repeat the smoke's decode)
[ "${BENCH_GPU_SMOKE:-0}" = 1 ] || MODULE=decode run decode_q4_0 50 --alloy-dtype q4_0 --rounds 2
run partition 180
"$PY" -m bench.gpu.summary --dir "$OUT_DIR" --commit "${ALLOY_COMMIT:-}" --status "${STATUS[@]}"
echo "gpu.sh: done in $((SECONDS - START_S)) s: ${STATUS[*]}"
