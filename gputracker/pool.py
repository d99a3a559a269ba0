"""Long-lived workers: a launcher that runs a script's jobs in processes started once per slot.

``WorkerPool(script)`` is a ``Launcher`` for the dispatcher. A job whose command line is
``[python, script, ...]`` runs inside a worker process (``script --serve FD``, see
``gputracker.serve``) instead of a process of its own, so the interpreter's start and the
script's imports (torch: seconds) are paid once per worker instead of once per job. Any other
command line is started by ``launch_in_session`` as before.

A worker serves one slot: it is started with the slot's environment (``CUDA_VISIBLE_DEVICES``,
the thread counts) and only takes jobs whose environment is exactly that one. It is a process
group of its own, like a job's process, and it is what the job's handle signals: a timeout or
a stop kills the worker with the job (SIGTERM, then SIGKILL), and the job's result carries the
signal, as it would for a job in its own process. A worker is retired (never reused) after
a job that did not exit 0, after ``max_jobs`` jobs, or when its resident memory after a job
exceeds ``max_rss_mb``; the next job of its slot gets a fresh one. A job that ends the worker
(``os._exit``, a crash) has the worker's exit status as its own. See docs/workers.md.

``ESD_WORKER_PER_MODEL=1`` in the environment makes ``launcher_for`` return the plain
one-process-per-job launcher.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from gputracker.jobs import GroupProcess, Launcher, ProcessHandle, launch_in_session, open_log

logger = logging.getLogger(__name__)

PER_MODEL_ENV = "ESD_WORKER_PER_MODEL"
# A worker is replaced after this many jobs: bounds what slow leaks (caches of libraries,
# fragmentation) can add up to over a list of thousands of models.
MAX_JOBS = 200
# ... or once its resident memory after a job exceeds this: a large model's tensors freed but
# kept by the allocator would otherwise stay with the worker through the small ones after it.
MAX_RSS_MB = 3072.0
# Seconds between checks that a worker running a job is still alive.
REPORT_POLL_S = 0.5
# Seconds a retired worker has to leave after its stdin closes before it is killed.
RETIRE_WAIT = 5.0


def _gpus_of(env: Mapping[str, str]) -> frozenset[str]:
    return frozenset(g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g)


class _Worker:
    """One serving process: its group, the pipe jobs go in by, the pipe statuses come out of."""

    def __init__(self, python: str, script: Path, env: Mapping[str, str], log_path: Path):
        read_fd, write_fd = os.pipe()
        try:
            with open_log(log_path, [python, str(script), "--serve"], env,
                          " of a worker") as log:
                popen = subprocess.Popen(
                    [python, str(script), "--serve", str(write_fd)], env=dict(env),
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, pass_fds=(write_fd,), text=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.popen = popen
        self.group = GroupProcess(popen)
        self.pid = popen.pid
        self.stdin = popen.stdin
        self.results = os.fdopen(read_fd, "r")
        self.env = dict(env)
        self.gpus = _gpus_of(env)
        self.jobs = 0

    def send(self, argv: Sequence[str], log_path: Path) -> None:
        """Hand a job to the worker. A worker that died meanwhile is noticed by ``report``."""
        try:
            self.stdin.write(json.dumps({"argv": list(argv), "log": str(log_path)}) + "\n")
            self.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def report(self) -> dict | None:
        """The status of the job sent last, or None when the worker ended without one. Waits
        for the status line or for the worker's exit, whichever comes first: a process the job
        forked may hold the pipe open after the worker is gone."""
        while True:
            readable, _, _ = select.select([self.results], [], [], REPORT_POLL_S)
            if readable:
                line = self.results.readline()
                return json.loads(line) if line else None
            try:  # exited? (not reaped: its process group stays addressable)
                gone = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                gone = True
            if gone is not None:
                readable, _, _ = select.select([self.results], [], [], 0)
                line = self.results.readline() if readable else ""
                return json.loads(line) if line.endswith("\n") else None

    def close_pipes(self) -> None:
        for pipe in (self.stdin, self.results):
            try:
                pipe.close()
            except OSError:
                pass  # a broken pipe to a worker that is gone

    def retire(self) -> int:
        """Close its stdin (it leaves its loop), kill it if it lingers; its exit status."""
        try:
            self.stdin.close()
        except OSError:
            pass
        try:
            self.popen.wait(timeout=RETIRE_WAIT)
        except subprocess.TimeoutExpired:
            self.group.send_signal(signal.SIGKILL)
        code = self.group.wait()
        self.close_pipes()
        return code


class _PooledJob:
    """The handle of one job running in a worker (the dispatcher's ``ProcessHandle``)."""

    def __init__(self, pool: WorkerPool, worker: _Worker, key: tuple):
        self._pool, self._worker, self._key = pool, worker, key
        self.pid = worker.pid
        self._lock = threading.Lock()
        self._returncode: int | None = None
        self._signalled = False

    def poll(self) -> int | None:
        return self._returncode

    def wait(self) -> int:
        """The job's exit status: the one the worker reports, or the worker's own when the job
        ended it. A worker whose job did not exit 0, or that is worn, is retired here."""
        worker = self._worker
        report = worker.report()
        with self._lock:  # from now on a signal for this job must not reach the worker
            if report is None:
                code = worker.group.wait()
            else:
                code = int(report["status"])
            self._returncode = code
        if report is None:
            worker.close_pipes()
            return code
        worker.jobs += 1
        worn = worker.jobs >= self._pool.max_jobs or report["rss_mb"] > self._pool.max_rss_mb
        if code == 0 and not worn and not self._signalled:
            self._pool._idle_again(self._key, worker)
        else:
            why = f"exit code {code}" if code else (
                f"{worker.jobs} jobs" if worker.jobs >= self._pool.max_jobs
                else f"{report['rss_mb']:.0f} MB resident")
            logger.info("retiring worker pid %d after its job (%s)", worker.pid, why)
            worker.retire()
        return code

    def send_signal(self, signum: int) -> None:
        with self._lock:
            if self._returncode is None:
                self._signalled = True
                self._worker.group.send_signal(signum)


class WorkerPool:
    """A ``Launcher`` that runs ``script``'s jobs in long-lived workers; see the module doc."""

    def __init__(self, script: Path, *, python: str | None = None, max_jobs: int = MAX_JOBS,
                 max_rss_mb: float = MAX_RSS_MB):
        self.script = Path(script).resolve()
        self.python = python or sys.executable
        self.max_jobs, self.max_rss_mb = max_jobs, max_rss_mb
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[_Worker]] = {}
        self.started = 0  # workers started so far

    def __call__(self, argv: Sequence[str], env: Mapping[str, str],
                 log_path: Path) -> ProcessHandle:
        argv = [str(a) for a in argv]
        if len(argv) < 2 or argv[0] != self.python or Path(argv[1]).resolve() != self.script:
            return launch_in_session(argv, env, log_path)
        key = tuple(sorted(env.items()))
        gpus = _gpus_of(env)
        with self._lock:
            idle = self._idle.get(key) or []
            worker = idle.pop() if idle else None
            if worker is not None and worker.popen.poll() is not None:
                worker.close_pipes()  # it died while idle (the OOM killer): start another
                worker = None
            # An idle worker of another slot on one of these GPUs holds a CUDA context there.
            others = [w for k, ws in self._idle.items() if k != key
                      for w in ws if w.gpus & gpus]
            for k in list(self._idle):
                self._idle[k] = [w for w in self._idle[k] if w not in others]
        for other in others:
            other.retire()
        if worker is None:
            worker = _Worker(self.python, self.script, env, log_path)
            self.started += 1
        open_log(log_path, argv, env, f" in worker pid {worker.pid}").close()
        worker.send(argv[2:], log_path)
        return _PooledJob(self, worker, key)

    def _idle_again(self, key: tuple, worker: _Worker) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(worker)

    def idle_gpus(self) -> frozenset[int]:
        """The GPUs of idle workers: their readings include our own idle CUDA contexts."""
        with self._lock:
            return frozenset(int(g) for ws in self._idle.values() for w in ws
                             for g in w.gpus if g.isdigit())

    def close(self) -> None:
        """Retire every idle worker (running ones end with their jobs)."""
        with self._lock:
            workers = [w for ws in self._idle.values() for w in ws]
            self._idle.clear()
        for worker in workers:
            worker.retire()


def launcher_for(script: Path) -> Launcher:
    """Long-lived workers for ``script``, or one process per job under ESD_WORKER_PER_MODEL=1."""
    if os.environ.get(PER_MODEL_ENV, "") == "1":
        return launch_in_session
    return WorkerPool(script)
