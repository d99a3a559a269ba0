"""Small models on Ray: many models per task (one long-lived worker) against a task per model.

Usage: python benchmarks/bench_ray_list.py [--models 20] [--repeats 3] [--workdir DIR]

Needs Ray (``pip install -r requirements-ray.txt``); the runner starts a local Ray for each run
(its start-up is in both times). Writes the small models of ``bench_list.py`` and their list,
then times, alternating and each a whole ``run_esd_experiment.py --backend ray`` process on
one CPU per task (``--device cpu``):

  per_task   ``--ray_models_per_task`` = ``--models``: one task, its models in one worker
  per_model  ``--ray_models_per_task 1``: a task, and a worker process, per model

and prints the medians and their ratio. Exit code 0 when every run succeeded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_list import ROOT, timed, write_inputs  # noqa: E402  (beside this script)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ray_list_"))
    try:
        listing = write_inputs(work, args.models)
        env = {k: v for k, v in os.environ.items() if k != "ESD_WORKER_PER_MODEL"}
        contenders = {"per_task": args.models, "per_model": 1}
        walls: dict[str, list[float]] = {name: [] for name in contenders}
        for repeat in range(args.repeats):
            for name, per_task in contenders.items():
                out = work / f"out-{name}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                argv = [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
                        str(listing), "--output_dir", str(out), "--device", "cpu",
                        "--no-progress", "--backend", "ray", "--ray_cpus_per_job", "1",
                        "--ray_models_per_task", str(per_task)]
                walls[name].append(timed(argv, env))
                print(f"repeat {repeat + 1} {name:9s} {walls[name][-1]:7.2f} s", flush=True)
        med = {name: statistics.median(times) for name, times in walls.items()}
        print(f"\n{args.models} models on a local Ray, medians of {args.repeats}:")
        for name in contenders:
            print(f"  {name:9s} {med[name]:7.2f} s ({med[name] / args.models:.3f} s a model)")
        print(f"  per_task / per_model: {med['per_task'] / med['per_model']:.2f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
