"""A Slurm task of small models: one long-lived worker against a process per model.

Usage: python benchmarks/bench_slurm_list.py [--models 20] [--repeats 3] [--workdir DIR]

Needs Slurm (``bash tests/slurm/start_slurm.sh`` starts a single-node one). Writes the small
models of ``bench_list.py`` (BERT-like and GPT-2-like in turn, about 10 MB each) and their
list, then times, alternating and each a whole ``run_esd_experiment.py`` process, the list run
as ONE Slurm task (``--slurm_models_per_task`` = ``--models``, one CPU, ``--device cpu``):

  worker     the task's models in one long-lived worker (the default)
  per_model  ``ESD_WORKER_PER_MODEL=1``: a process per model, as before

and prints the median of each: the runner's wall time (submission and Slurm's scheduling
included) and the task's own time on its node (submitit's "Starting" to "Job completed"
lines), and the ratio worker / per_model of each. Exit code 0 when every run succeeded.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_list import ROOT, timed, write_inputs  # noqa: E402  (beside this script)

LOG_WAIT_S = 30.0  # for the task's last log line once the runner has its results
SUBMITIT_STAMP = re.compile(r"submitit INFO \(([0-9-]+ [0-9:,]+)\) - (Starting|Job completed)")


def task_seconds(out: Path) -> float:
    """The Slurm task's time on its node, from submitit's log of the (only) task; the runner
    may have collected the last outcome before the task wrote its last line."""
    logs = sorted((out / "slurm" / "submitit").glob("*_log.*"))  # .out and .err
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        text = "".join(log.read_text(errors="replace") for log in logs)
        stamps = {m.group(2): datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                  for m in SUBMITIT_STAMP.finditer(text)}
        if "Job completed" in stamps or time.monotonic() > deadline:
            return (stamps["Job completed"] - stamps["Starting"]).total_seconds()
        time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_slurm_list_"))
    try:
        listing = write_inputs(work, args.models)
        base_env = {k: v for k, v in os.environ.items() if k != "ESD_WORKER_PER_MODEL"}
        contenders = {"worker": base_env, "per_model": {**base_env, "ESD_WORKER_PER_MODEL": "1"}}
        walls: dict[str, list[float]] = {name: [] for name in contenders}
        tasks: dict[str, list[float]] = {name: [] for name in contenders}
        for repeat in range(args.repeats):
            for name, env in contenders.items():
                out = work / f"out-{name}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                argv = [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
                        str(listing), "--output_dir", str(out), "--device", "cpu",
                        "--no-progress", "--backend", "slurm", "--slurm_cpus_per_task", "1",
                        "--slurm_models_per_task", str(args.models), "--slurm_time", "30",
                        "--slurm_poll_interval", "0.5"]
                walls[name].append(timed(argv, env))
                tasks[name].append(task_seconds(out))
                print(f"repeat {repeat + 1} {name:9s} runner {walls[name][-1]:7.2f} s, "
                      f"task {tasks[name][-1]:7.2f} s", flush=True)
        print(f"\n{args.models} models in one Slurm task, medians of {args.repeats}:")
        med = {}
        for name in contenders:
            med[name] = statistics.median(walls[name]), statistics.median(tasks[name])
            print(f"  {name:9s} runner {med[name][0]:7.2f} s, task {med[name][1]:7.2f} s "
                  f"({med[name][1] / args.models:.3f} s a model)")
        print(f"  worker / per_model: runner {med['worker'][0] / med['per_model'][0]:.2f}, "
              f"task {med['worker'][1] / med['per_model'][1]:.2f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
