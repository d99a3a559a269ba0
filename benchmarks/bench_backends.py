"""Per-job scheduling overhead of the backends: local dispatcher, Slurm (submitit), Ray.

Usage: python benchmarks/bench_backends.py [--jobs 8] [--repeats 3] [--skip-slurm] [--skip-ray]

Each backend runs batches of probe jobs: a Python process that writes the wall-clock time
at which its first line runs, then exits. Per batch size (1 job, then --jobs jobs) and
backend, the rounds alternate the backends so they share the machine's state. Printed per
row, medians over the rounds:
- start: from handing the batch to ``run()`` to a job's first line (median over the batch,
  and the batch's slowest), i.e. submit to worker start;
- done: from ``run()`` called to ``run()`` returned, per job (the backend noticing the end
  is included: squeue polling for Slurm).
Then the cost of importing the backend modules in a fresh interpreter (seconds, peak RSS),
without and with submitit and ray, beside a bare interpreter (``json``).

Needs the single-node Slurm of tests/slurm/start_slurm.sh (run as root) for the Slurm rows
and Ray (requirements-ray.txt) for the Ray rows; a missing one is reported and skipped.
Writes only to a temporary directory, removed afterwards. Exit code 0.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gputracker import Dispatcher, Job  # noqa: E402

PROBE = "import sys, time; open(sys.argv[1], 'w').write(repr(time.time()))"
POLL_S = 0.2  # Slurm: squeue every 0.2 s, Ray: wait slices of 0.2 s


def probe_jobs(tmp: Path, count: int, tag: str) -> list[Job]:
    return [Job(name=f"{tag}-{i}", argv=[sys.executable, "-c", PROBE, str(tmp / f"{tag}-{i}")],
                log_path=tmp / "logs" / f"{tag}-{i}.log") for i in range(count)]


def measure(backend, tmp: Path, count: int, tag: str) -> tuple[float, float, float]:
    """(median start latency, slowest start latency, wall time per job), seconds."""
    jobs = probe_jobs(tmp, count, tag)
    t0 = time.time()
    results = backend.run(jobs)
    wall = time.time() - t0
    bad = [r.describe() for r in results if not r.ok]
    if bad or len(results) != count:
        raise RuntimeError(f"{tag}: {len(results)} results, failures: {bad}")
    starts = [float((tmp / job.name).read_text()) - t0 for job in jobs]
    return statistics.median(starts), max(starts), wall / count


def make_backends(tmp: Path, jobs: int, skip_slurm: bool, skip_ray: bool) -> dict:
    backends = {"local": lambda: Dispatcher(None, cpu_slots=jobs)}
    if not skip_slurm:
        from esd_experiment.backends.slurm import SlurmBackend, SlurmOptions

        start = subprocess.run(["bash", str(ROOT / "tests/slurm/start_slurm.sh")],
                               capture_output=True, text=True)
        if start.returncode == 0:
            options = SlurmOptions(poll_interval=POLL_S, time_min=10, cpus_per_task=1)
            backends["slurm"] = lambda o=options: SlurmBackend(o, tmp / "slurm-state")
        else:
            print(f"slurm skipped: {start.stderr.strip()}")
    if not skip_ray:
        try:
            import ray

            from esd_experiment.backends.ray_backend import RayBackend, RayOptions
        except ImportError:
            print("ray skipped: not installed (pip install -r requirements-ray.txt)")
        else:
            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            options = RayOptions(gpus_per_job=0, cpus_per_job=1, poll_interval=POLL_S)
            backends["ray"] = lambda o=options: RayBackend(o)
    return backends


def import_cost(modules: str) -> tuple[float, int]:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
    code = (f"import sys, time; t = time.perf_counter(); import {modules}; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print(time.perf_counter() - t, [line.split()[1] for line "
            "in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    return float(out[0]), int(out[1]) // 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=8, help="jobs in the larger batch")
    p.add_argument("--repeats", type=int, default=3, help="rounds per batch size")
    p.add_argument("--skip-slurm", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    try:
        backends = make_backends(tmp, args.jobs, args.skip_slurm, args.skip_ray)
        for name, make in backends.items():  # warm-up: Ray starts its workers, Slurm's daemons
            measure(make(), tmp, 1, f"warm-{name}")
        print("| backend | jobs | start median s | start max s | done s/job |")
        print("|---|---|---|---|---|")
        for count in (1, args.jobs):
            rows: dict[str, list[tuple[float, float, float]]] = {n: [] for n in backends}
            for r in range(args.repeats):
                for name, make in backends.items():
                    rows[name].append(measure(make(), tmp, count, f"{name}-{count}-{r}"))
            for name, values in rows.items():
                med = [statistics.median(column) for column in zip(*values, strict=True)]
                print(f"| {name} | {count} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} |")
        print("\n| imports | s | peak RSS MiB |\n|---|---|---|")
        for modules in ("json", "backend_slurm, backend_ray",
                        "backend_slurm, backend_ray, submitit, ray"):
            try:
                seconds, rss = import_cost(modules)
            except subprocess.CalledProcessError as exc:
                print(f"| {modules} | failed: {exc.stderr.strip().splitlines()[-1]} | |")
                continue
            print(f"| {modules} | {seconds:.2f} | {rss} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
