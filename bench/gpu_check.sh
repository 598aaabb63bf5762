#!/usr/bin/env bash
# A prepared GPU check for when a GPU machine is lent (about 6 minutes on one GPU, at most 8 by the timeouts):
#   1. environment: nvidia-smi, torch / CUDA / cuDNN versions, edgefuse info            (timeout 45 s)
#   2. MMLU scoring throughput at batch 64 on SmolLM2, letters and cloze, float32 and bfloat16,
#      and bfloat16's agreement with float32 on the same 1,000 items                       (timeout 120 s)
#   3. Taylor pruning, then training steps on the pruned model in float32 and bfloat16: each step's
#      time and the peak CUDA memory (torch.cuda.max_memory_allocated)                    (timeout 75 s)
#   4. the 200-item study bench/gpu-study.yaml (device cuda, dtype bfloat16)             (timeout 220 s)
# Outputs (small: JSON, logs, the study's report) go to $OUT, or ./gpu_check_out when $OUT is unset; models and
# run directories go to $WORK (default: a temporary directory). A step that fails or times out is recorded in
# steps.tsv and the next one still runs. Run from the repository root:  bash bench/gpu_check.sh
set -uo pipefail

OUT="${OUT:-./gpu_check_out}"
WORK="${WORK:-$(mktemp -d -t edgefuse-gpu-check-XXXXXX)}"
mkdir -p "$OUT" "$WORK"
export EDGEFUSE_CACHE="${EDGEFUSE_CACHE:-$WORK/cache}"
export TOKENIZERS_PARALLELISM=false

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    for p in .venv/bin/python python3 python; do
        if command -v "$p" >/dev/null 2>&1; then echo "$p"; return; fi
    done
    echo python3
}
PY="$(pick_python)"
# the working tree's edgefuse, also where the package is not installed in this environment
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

# step NAME SECONDS COMMAND...: run COMMAND under a timeout, its output to $OUT/NAME.log, its status to steps.tsv
step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS rc
    echo "== $name (timeout ${limit}s)"
    # bash -c: a step may be one of the functions below (exported), which timeout cannot run by itself
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    [[ $rc -eq 124 ]] && echo "   timed out after ${limit}s" || echo "   rc $rc in $((SECONDS - t0))s"
    tail -n 3 "$OUT/$name.log"
}

environment() {
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" bench/gpu_check.py env --out "$OUT/env.json"
    "$PY" -m edgefuse.cli info
}

study() {
    "$PY" -m edgefuse.cli run bench/gpu-study.yaml --run-dir "$WORK/study" --no-progress
    local rc=$?
    mkdir -p "$OUT/study"
    for f in report.md results.json run.log stages.jsonl; do
        [[ -f "$WORK/study/$f" ]] && cp "$WORK/study/$f" "$OUT/study/"
    done
    return $rc
}

export OUT WORK PY
export -f environment study

if ! "$PY" -c 'import torch, transformers, edgefuse' > "$OUT/import.log" 2>&1; then
    echo "cannot import torch, transformers and edgefuse with $PY (see $OUT/import.log); set PYTHON=..." >&2
    exit 2
fi

step environment 45 environment
step scoring 120 "$PY" bench/gpu_check.py score --out "$OUT/scoring.json" --batch 64 --items 1000
step training 75 "$PY" bench/gpu_check.py train --out "$OUT/training.json" --batch 8 --seq 256 --steps 4 \
    --work "$WORK/train"
step study 220 study

echo "== summary ($OUT)"
column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
awk -F'\t' 'NR > 1 && $2 != 0 { bad = 1 } END { exit bad }' "$OUT/steps.tsv"
