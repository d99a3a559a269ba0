"""Shared by the cluster-backend tests: a probe job, its markers, and the real worker's argv."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from gputracker import Job

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "esd_worker.py"

# The probe appends one JSON line per run to its marker file (so a test counts runs and sees
# where each ran), then waits while its hold file exists, then exits with the code asked for.
PROBE = """
import json, os, sys, time
marker, code, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3]
env = os.environ
task = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        if env.get("SLURM_ARRAY_TASK_ID") else env.get("SLURM_JOB_ID", ""))
with open(marker, "a") as fh:
    fh.write(json.dumps({"task": task, "cvd": env.get("CUDA_VISIBLE_DEVICES"),
                         "omp": env.get("OMP_NUM_THREADS"), "extra": env.get("PROBE_EXTRA"),
                         "start": time.time(), "pid": os.getpid()}) + "\\n")
print("probe ran", flush=True)
while hold and os.path.exists(hold):
    time.sleep(0.1)
sys.exit(code)
"""


def probe_job(tmp: Path, name: str, code: int = 0, hold: Path | None = None, **kwargs) -> Job:
    return Job(name=name, argv=[sys.executable, "-c", PROBE, str(tmp / f"{name}.marker"),
                                str(code), str(hold or "")],
               log_path=tmp / "logs" / f"{name}.log", **kwargs)


def runs(tmp: Path, name: str) -> list[dict]:
    """The runs the probe ``name`` recorded, oldest first."""
    path = tmp / f"{name}.marker"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(predicate, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def worker_argv(model: Path, output_dir: Path) -> list[str]:
    """The worker's command line as a runner on a cluster builds it (no --parent_pid: the
    runner is not the worker's parent there)."""
    return [sys.executable, str(WORKER), "--model_id", str(model), "--output_dir",
            str(output_dir), "--device", "cpu", "--no-parallel_esd"]
