"""Dispatch overhead: gputracker.Dispatcher against the original gputracker's algorithm.

Usage: python benchmarks/bench_dispatch.py [--jobs 200] [--gpus 4] [--real-warmup]

Runs --jobs no-op jobs (real ``/bin/true`` processes) on --gpus fake GPUs that always read
free, and prints one table row per scheduler. Writes the job logs to a temporary directory
that is removed afterwards. Exit code 0.

Overhead per job = (wall time x GPUs - sum of the jobs' run times) / jobs: the GPU time the
scheduler leaves idle, per job. A job's run time is measured from the moment its process
exists to the moment it is reaped, so process start-up counts as overhead.

Rows:
- ours, poll 10 s, max_check 10: the runner's defaults. Before the first grant the
  dispatcher needs 10 free readings 10 s apart (90 s); by default that idle wait is
  fast-forwarded (the clock jumps while no job runs) and reported as simulated; the
  200 jobs after it run in real time. --real-warmup waits the 90 s for real.
- ours, poll 0.05 s, max_check 10: everything real.
- original: the original gputracker's algorithm, re-implemented here and run on a simulated
  clock with the same fake GPUs and the job run times measured in the first row: for each
  job, a fresh count of consecutive free readings (one reading now, then one every 10 s)
  until a GPU has max_check of them, then a random 10-30 s pause before the next request.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gputracker import Dispatcher, GPUStatus, Job, launch_in_session  # noqa: E402

NOOP = shutil.which("true") or "/bin/true"
ORIGINAL_POLL_S = 10.0
ORIGINAL_STAGGER_S = (10.0, 30.0)


@dataclass(frozen=True)
class Row:
    scheduler: str
    clock: str
    poll_s: float
    max_check: int
    first_grant_s: float  # from the start of the run to the first job's start
    wall_s: float  # from the first job's start to the last job's end
    job_time_s: float  # sum of the jobs' run times
    start_interval_s: float  # mean time between consecutive job starts
    jobs: int
    gpus: int

    def overhead(self, with_warmup: bool) -> float:
        wall = self.wall_s + (self.first_grant_s if with_warmup else 0.0)
        return (wall * self.gpus - self.job_time_s) / self.jobs


class FastForward:
    """Real time, except that a wait with no job running jumps the clock ahead instead."""

    def __init__(self):
        self.skipped = 0.0
        self.dispatcher: Dispatcher | None = None

    def now(self) -> float:
        return time.monotonic() + self.skipped

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        if self.dispatcher.running_jobs == 0:
            self.skipped += timeout
        else:
            cond.wait(timeout)


def run_ours(
    n_jobs: int, n_gpus: int, poll_s: float, max_check: int, fast_forward: bool
) -> tuple[Row, list[float]]:
    readings = [GPUStatus(i, 0.0, 81_559.0) for i in range(n_gpus)]
    clock = FastForward()
    skipped_at_first_start: list[float] = []

    def launcher(argv, env, log_path):
        skipped_at_first_start.append(clock.skipped)
        return launch_in_session(argv, env, log_path)

    timing = {"clock": clock.now, "wait": clock.wait} if fast_forward else {}
    dispatcher = Dispatcher(
        list(range(n_gpus)), max_check=max_check, poll_interval=poll_s,
        query=lambda: readings, launcher=launcher, **timing,
    )  # fmt: skip
    clock.dispatcher = dispatcher
    logs = Path(tempfile.mkdtemp(prefix="bench_dispatch_"))
    try:
        jobs = [Job(f"noop{i}", [NOOP], logs / f"noop{i}.log") for i in range(n_jobs)]
        begin = dispatcher.now()
        results = dispatcher.run(jobs)
    finally:
        shutil.rmtree(logs)
    if not all(r.ok for r in results):
        raise SystemExit(f"a no-op job failed: {[r.describe() for r in results if not r.ok]}")
    if clock.skipped != skipped_at_first_start[0]:
        raise SystemExit("the clock jumped while jobs ran: the timings would not be real")
    starts = sorted(r.start for r in results)
    simulated = fast_forward and clock.skipped > 0
    return Row(
        scheduler="ours",
        clock="warm-up simulated, jobs real" if simulated else "real",
        poll_s=poll_s,
        max_check=max_check,
        first_grant_s=starts[0] - begin,
        wall_s=max(r.end for r in results) - starts[0],
        job_time_s=sum(r.duration for r in results),
        start_interval_s=(starts[-1] - starts[0]) / (len(starts) - 1),
        jobs=n_jobs,
        gpus=n_gpus,
    ), [r.duration for r in results]


def simulate_original(durations: list[float], n_gpus: int, max_check: int, seed: int) -> Row:
    """The original algorithm on a simulated clock (see the module doc)."""
    rng = random.Random(seed)
    now = 0.0
    busy_until = dict.fromkeys(range(n_gpus), 0.0)
    starts, ends = [], []
    for duration in durations:
        counts = dict.fromkeys(busy_until, 0)  # the count restarts at every request
        while True:
            for gpu, until in busy_until.items():  # every fake GPU reads free unless ours runs
                counts[gpu] = counts[gpu] + 1 if until <= now else 0
            ready = [gpu for gpu, count in counts.items() if count >= max_check]
            if ready:
                break
            now += ORIGINAL_POLL_S
        busy_until[ready[0]] = now + duration
        starts.append(now)
        ends.append(now + duration)
        now += rng.uniform(*ORIGINAL_STAGGER_S)
    return Row(
        scheduler="original",
        clock="simulated",
        poll_s=ORIGINAL_POLL_S,
        max_check=max_check,
        first_grant_s=starts[0],
        wall_s=max(ends) - starts[0],
        job_time_s=sum(durations),
        start_interval_s=(starts[-1] - starts[0]) / (len(starts) - 1),
        jobs=len(durations),
        gpus=n_gpus,
    )


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'scheduler':<9} {'clock':<29} {'poll s':>6} {'max_check':>9} {'1st grant s':>11} "
        f"{'wall s':>9} {'sum job s':>9} {'start gap s':>11} {'overhead/job s':>14} "
        f"{'incl. warm-up':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.scheduler:<9} {r.clock:<29} {r.poll_s:>6g} {r.max_check:>9d} "
            f"{r.first_grant_s:>11.2f} {r.wall_s:>9.2f} {r.job_time_s:>9.2f} "
            f"{r.start_interval_s:>11.4f} {r.overhead(False):>14.4f} {r.overhead(True):>13.4f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="no-op jobs per scheduler")
    parser.add_argument("--gpus", type=int, default=4, help="fake GPUs, all reading free")
    parser.add_argument("--max_check", type=int, default=10, help="free readings before a grant")
    parser.add_argument("--real-warmup", action="store_true",
                        help="wait the first row's 90 s warm-up for real")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the original's stagger")
    args = parser.parse_args()

    default_row, durations = run_ours(
        args.jobs, args.gpus, 10.0, args.max_check, fast_forward=not args.real_warmup
    )
    fast_row, _ = run_ours(args.jobs, args.gpus, 0.05, args.max_check, fast_forward=False)
    original = simulate_original(durations, args.gpus, args.max_check, args.seed)
    print(f"{args.jobs} jobs of {NOOP} on {args.gpus} fake GPUs reading 0 MB; "
          f"overhead/job = (wall x {args.gpus} - sum job s) / {args.jobs}")  # fmt: skip
    print_table([default_row, fast_row, original])
    return 0


if __name__ == "__main__":
    sys.exit(main())
