#!/usr/bin/env bash
# The fixed costs of one GPU job, for a machine with CUDA: the runner against the worker alone
# on the demo's tiny Llama (so the eigensolve is negligible), beside Python with torch, torch's
# CUDA start, and NVML's start and first reading (what the runner's dispatcher adds).
#
# Usage: bash benchmarks/gpu_overhead.sh        (PYTHON=python3, REPEATS=3 by default)
# Prints one line per step and repeat (wall seconds, exit code), then the runner's last log.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -c "import sys; sys.path.insert(0, '.'); from demo import build_demo_zoo; \
build_demo_zoo('$WORK/zoo')" >/dev/null 2>&1 || { echo "cannot build the demo models" >&2; exit 1; }
printf 'model_id\n%s\n' "$WORK/zoo/tiny-llama" > "$WORK/list.csv"

timed() {  # wall seconds and exit code of a command, its output discarded
    local start=$EPOCHREALTIME
    "$@" >/dev/null 2>&1
    local rc=$?
    awk -v a="$start" -v b="$EPOCHREALTIME" -v rc="$rc" 'BEGIN { printf "%.2f s (exit %d)", b - a, rc }'
}

for i in $(seq 1 "${REPEATS:-3}"); do
    echo "repeat $i"
    echo "  python + import torch      $(timed "$PY" -c 'import torch')"
    echo "  + CUDA start               $(timed "$PY" -c 'import torch; torch.zeros(1, device="cuda")')"
    echo "  NVML start + one reading   $(timed "$PY" -c 'import sys; sys.path.insert(0, "."); from gputracker import nvml_query; nvml_query()')"
    rm -rf "$WORK/w"
    echo "  worker, --device cuda      $(timed "$PY" esd_worker.py --model_id "$WORK/zoo/tiny-llama" --output_dir "$WORK/w" --device cuda)"
    rm -rf "$WORK/r"
    echo "  runner, --device cuda      $(timed "$PY" run_esd_experiment.py --model_list "$WORK/list.csv" --output_dir "$WORK/r" --no-progress --device cuda --gpus 0 --max_check 1 --poll_interval 0.5 --gpu_memory_threshold 2048)"
done
tail -5 "$WORK/r/logs/esd_experiment.log"
