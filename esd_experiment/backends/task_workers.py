"""Long-lived workers for a cluster task: the models of one Slurm or Ray task run in one process.

A Slurm task runs ``--slurm_models_per_task`` jobs one after another (``backend_task``). When
the runner gives the task its worker script, the task starts its jobs through
``gputracker.pool.WorkerPool``, as the local dispatcher does: a job whose command line is
``[python, script, ...]`` runs in a worker process started once for the task, with the
isolation rules of docs/workers.md (a job that does not exit 0 retires its worker, the next job
gets a fresh one; SIGTERM and SIGKILL for a job go to its worker's process group). Any other
command line, or every job when the runner's environment has ``ESD_WORKER_PER_MODEL=1``, runs
in a process of its own, as before.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gputracker.jobs import Launcher, ProcessHandle, launch_in_session
from gputracker.pool import PER_MODEL_ENV, WorkerPool


def worker_for_tasks(script: Path) -> Path | None:
    """The worker script a cluster task runs its jobs in; None (a process per job) under
    ``ESD_WORKER_PER_MODEL=1``, read where the run is started, not on the nodes."""
    return None if os.environ.get(PER_MODEL_ENV, "") == "1" else Path(script)


def task_launcher(worker_script: Path | None) -> Launcher:
    """How a task starts its jobs: long-lived workers of ``worker_script`` (None: a process
    per job)."""
    return launch_in_session if worker_script is None else WorkerPool(worker_script)


def close_launcher(launcher: Launcher) -> None:
    """Retire the task's idle workers (a process-per-job launcher has none)."""
    close: Callable[[], None] | None = getattr(launcher, "close", None)
    if close is not None:
        close()


class Ending:
    """``handle.wait()`` run once, in a thread of its own, so that the task's main thread can
    wait for it in a sleep loop: a Ray cancel arrives there as a Python-level interrupt that
    a thread blocked in a system call would not see, and the task's signal handlers, which
    signal the job, run there too."""

    def __init__(self, handle: ProcessHandle):
        self._handle = handle
        self._code: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"wait-{handle.pid}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._code = self._handle.wait()
        except BaseException as exc:  # noqa: BLE001  (raised again in the waiting thread)
            self._error = exc

    def wait(self, deadline: float | None = None, step: float = 0.05) -> int | None:
        """The job's exit status; None once ``deadline`` (``time.time()``) has passed with
        the job still running."""
        while self._thread.is_alive():
            if deadline is not None and time.time() >= deadline:
                return None
            time.sleep(step)
        if self._error is not None:
            raise self._error
        return self._code
