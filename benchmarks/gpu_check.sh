#!/usr/bin/env bash
# The GPU checks in one command, for whoever is lent a machine with CUDA.
#
# Usage: bash benchmarks/gpu_check.sh        (PYTHON=python3 and GPU_CHECK_LAYERS=2 by default)
#
# Runs, each under its own time limit so that the whole ends in under 8 minutes on one
# H100/H200:
#   1. the CUDA-only tests (pytest -m cuda: CPU/CUDA parity of rows and eigenvalues) and the
#      real-NVML test of gputracker; a CUDA test that skips counts as a failure;
#   2. benchmarks/bench_esd.py --device cuda on a 7B-shaped synthetic checkpoint (hidden 4096,
#      MLP 11008, vocab 32000, GPU_CHECK_LAYERS layers, bf16): the runner, the worker and the
#      estimator against the bare per-matrix torch loop, and batched eigvalsh of same-shaped
#      Grams against per-matrix eigvalsh;
#   3. the dispatcher on the real NVML: three jobs through gputracker.Dispatcher on GPU 0,
#      each checking the CUDA_VISIBLE_DEVICES it was given and opening the device;
#   4. benchmarks/bench_views.py --device cuda at TinyLlama's shapes (hidden 2048, MLP 5632,
#      vocab 32000, one block): what --mp_fit and --randomize add to a plain run on the GPU
#      (the shuffle's sort on the device, its random keys on the CPU).
# Prints the machine and a markdown summary for BENCHMARKS.md. Writes only under a temporary
# directory (removed at the end). Exit code: 0 when every step passed; 1 when CUDA is missing
# or a step failed or ran out of time (the step is named).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LAYERS=${GPU_CHECK_LAYERS:-2}
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
  fail "torch sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); run this on a machine with an NVIDIA GPU and a CUDA build of torch"
GPU=$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB")')
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "gpu_check on $GPU, driver ${DRIVER:-unknown}, $(nproc) CPUs, $("$PY" -c 'import torch; print("torch", torch.__version__)'), $(date -u +%Y-%m-%d)"

echo "== 1. CUDA tests"
# Only the files that hold CUDA tests: others import optional packages (gguf, Ray) that a GPU
# image may lack, and -m cuda deselects all of their tests anyway. In one process (no
# addopts): a GPU image may lack pytest-xdist.
mapfile -t CUDA_FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py)
[ "${#CUDA_FILES[@]}" -gt 0 ] || fail "no test file marks a test with pytest.mark.cuda"
timeout 150 "$PY" -m pytest -o addopts= -q -rs -m cuda "${CUDA_FILES[@]}" 2>&1 | tee "$WORK/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "CUDA tests (see above)"
grep -q "SKIPPED" "$WORK/tests.txt" && fail "a CUDA test was skipped on a CUDA machine"
timeout 60 "$PY" -m pytest -o addopts= -q -rs tests/test_gputracker.py -k "nvml_query_reads_every_gpu" \
  2>&1 | tee "$WORK/nvml_test.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "real-NVML test (see above)"
grep -qE "(^|[^0-9])1 passed" "$WORK/nvml_test.txt" || fail "the real-NVML test did not run"

echo "== 2. bench_esd.py --device cuda --shape 7b --layers $LAYERS"
timeout 330 "$PY" benchmarks/bench_esd.py --device cuda --shape 7b --layers "$LAYERS" \
  --repeats 2 --workdir "$WORK/bench" 2>&1 | tee "$WORK/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "bench_esd.py (exit 124 = over its 330 s)"

echo "== 3. dispatcher on the real NVML"
timeout 60 "$PY" - "$WORK/dispatch" <<'EOF' 2>&1 | tee "$WORK/dispatch.txt"
import sys, time
from pathlib import Path

sys.path.insert(0, ".")
from gputracker import Dispatcher, Job, nvml_query

readings = nvml_query()
for r in readings:
    print(f"NVML GPU {r.index}: {r.memory_used_mb:.0f} / {r.memory_total_mb:.0f} MiB used")
check = ("import os, torch; assert os.environ['CUDA_VISIBLE_DEVICES'] == '0', os.environ; "
         "torch.zeros(1, device='cuda'); print(torch.cuda.get_device_name())")
jobs = [Job(name=f"job{i}", argv=[sys.executable, "-c", check],
            log_path=Path(sys.argv[1]) / f"job{i}.log") for i in range(3)]
# Free below what GPU 0 uses now plus 1 GiB; two consecutive free readings 0.2 s apart.
dispatcher = Dispatcher([0], memory_threshold_mb=readings[0].memory_used_mb + 1024,
                        max_check=2, poll_interval=0.2)
t0 = time.monotonic()
results = dispatcher.run(jobs)
wall = time.monotonic() - t0
bad = [r.describe() for r in results if not r.ok]
runs = sum(r.duration for r in results)
print(f"DISPATCH jobs={len(results)} failed={len(bad)} wall_s={wall:.2f} "
      f"first_start_s={min(r.start for r in results) - t0:.2f} job_s={runs:.2f}")
sys.exit(1 if bad or len(results) != 3 else 0)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "dispatcher on the real NVML (see above)"

echo "== 4. bench_views.py --device cuda (--mp_fit and --randomize)"
timeout 90 "$PY" benchmarks/bench_views.py --device cuda --hidden 2048 --mlp 5632 --layers 1 \
  --repeats 3 --runs plain,mp_fit,randomize,eigensolve,shuffles,keys 2>&1 | tee "$WORK/views.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "bench_views.py (exit 124 = over its 90 s)"

echo
echo "## GPU check: $GPU (driver ${DRIVER:-unknown}), $(date -u +%Y-%m-%d)"
echo
echo "Command: \`bash benchmarks/gpu_check.sh\` (bench: \`bench_esd.py --device cuda --shape 7b --layers $LAYERS --repeats 2\`)"
echo
echo "| check | result |"
echo "|---|---|"
echo "| CUDA tests (\`pytest -m cuda\`) | $(tail -1 "$WORK/tests.txt") |"
echo "| real-NVML test | $(tail -1 "$WORK/nvml_test.txt") |"
echo "| dispatcher on real NVML | $(grep '^DISPATCH' "$WORK/dispatch.txt" | cut -d' ' -f2-) |"
echo
awk '/^\|/ { print; table = 1; next } table { print ""; table = 0 }' "$WORK/bench.txt"
echo
echo "Views (\`bench_views.py --device cuda --hidden 2048 --mlp 5632 --layers 1 --repeats 3\`):"
echo
grep -E '^(\||medians|minima|CPU minima)' "$WORK/views.txt"
