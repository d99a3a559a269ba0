"""The dispatcher: a pool of GPUs (or CPU slots), a queue of jobs, one child process per job
(or, with the ``WorkerPool`` launcher of gputracker/pool.py, one long-lived worker per slot).

GPU mode. NVML is read every ``poll_interval`` seconds. Each GPU keeps a count of its
consecutive readings below ``memory_threshold_mb``; the count survives between polls and
between jobs, so after the first ``max_check`` readings a free GPU is granted at once. A GPU
held by one of our jobs is busy whatever it reads (our own job's memory hides the reading)
and is granted again as soon as that job exits, without waiting for a poll; from the next
poll on its readings count again, so a GPU someone else took meanwhile is noticed.

CPU mode (no GPUs). ``cpu_slots`` jobs run at once, each with ``CUDA_VISIBLE_DEVICES=""`` and
``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` set to
``max(1, cores // cpu_slots)``.

Finished jobs wake the dispatch loop through a condition variable; the loop starts the next
job immediately. ``stop()`` only sets a flag and wakes the loop, so it is safe to call from a
signal handler; the loop then sends SIGTERM to every running job's process group, SIGKILL
after ``grace_period`` seconds, and ``run()`` returns (``stopped`` tells the caller why).
Any exception inside ``run()`` terminates the running jobs the same way before it propagates.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from esd_experiment.core.errors import InputError
from gputracker.gpus import GPUQueryError, GPUStatus, nvml_query
from gputracker.jobs import (
    Allocation,
    Job,
    JobResult,
    Launcher,
    ProcessHandle,
    StopState,
    launch_in_session,
)

logger = logging.getLogger(__name__)

# Longest single wait of the loop: a safety net only, every event also notifies the loop.
_MAX_WAIT = 1.0
# After SIGKILL the kernel reaps at once unless a process is stuck in the driver.
_KILL_WAIT = 5.0
# Variables set to the per-job thread count in CPU mode.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Consecutive failed GPU readings that end a run (six polls: a minute at the default interval).
MAX_QUERY_FAILURES = 6

OnFinish = Callable[[JobResult], Iterable[Job] | None]
Wait = Callable[[threading.Condition, float], object]


def _condition_wait(cond: threading.Condition, timeout: float) -> None:
    cond.wait(timeout)


class _GPUPool:
    """GPU ids, their consecutive-free counts, and the ones our jobs hold."""

    polls = True

    def __init__(self, gpus: Sequence[int], per_job: int, threshold_mb: float, max_check: int):
        self.gpus = tuple(gpus)
        self.per_job = per_job
        self.threshold_mb = threshold_mb
        self.max_check = max_check
        self.free_readings = dict.fromkeys(self.gpus, 0)
        self.held: set[int] = set()

    def reset(self) -> None:
        self.free_readings = dict.fromkeys(self.gpus, 0)

    def observe(self, statuses: Sequence[GPUStatus], ours: frozenset[int] = frozenset()) -> None:
        """One reading of every GPU. ``ours``: GPUs where an idle worker of ours holds memory
        (a CUDA context), read like the ones our jobs hold."""
        by_index = {status.index: status for status in statuses}
        missing = [gpu for gpu in self.gpus if gpu not in by_index]
        if missing:
            raise InputError(
                f"--gpus asks for GPU(s) {missing} but the machine has GPU(s) "
                f"{sorted(by_index)}: pass indices from that list (nvidia-smi order)"
            )
        for gpu in self.gpus:
            if gpu in self.held or gpu in ours:
                continue  # our own job's memory: the reading says nothing about others
            free = by_index[gpu].memory_used_mb < self.threshold_mb
            self.free_readings[gpu] = (
                min(self.free_readings[gpu] + 1, self.max_check) if free else 0
            )
        logger.debug("GPU readings: %s", {g: by_index[g].memory_used_mb for g in self.gpus})

    def take(self) -> tuple[int, ...] | None:
        ready = [
            gpu
            for gpu in self.gpus
            if gpu not in self.held and self.free_readings[gpu] >= self.max_check
        ]
        if len(ready) < self.per_job:
            return None
        chosen = tuple(sorted(ready[: self.per_job]))
        self.held.update(chosen)
        return chosen

    def release(self, gpus: tuple[int, ...]) -> None:
        self.held.difference_update(gpus)


class _CPUPool:
    """``slots`` interchangeable CPU slots."""

    polls = False

    def __init__(self, slots: int):
        self.slots = slots
        self.in_use = 0

    def reset(self) -> None:
        pass

    def take(self) -> tuple[int, ...] | None:
        if self.in_use >= self.slots:
            return None
        self.in_use += 1
        return ()

    def release(self, gpus: tuple[int, ...]) -> None:
        self.in_use -= 1


@dataclass(frozen=True)
class _Running:
    job: Job
    handle: ProcessHandle
    allocation: Allocation
    start: float
    started_at: float


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


class Dispatcher(StopState):
    """Runs jobs on free GPUs (or CPU slots), one child process per job. See the module doc."""

    def __init__(
        self,
        gpus: Sequence[int] | None,
        *,
        gpus_per_job: int = 1,
        memory_threshold_mb: float = 500.0,
        max_check: int = 10,
        poll_interval: float = 10.0,
        cpu_slots: int = 1,
        cpu_count: int | None = None,
        grace_period: float = 10.0,
        query: Callable[[], Sequence[GPUStatus]] = nvml_query,
        launcher: Launcher = launch_in_session,
        clock: Callable[[], float] = time.monotonic,
        wait: Wait = _condition_wait,
    ):
        gpus = list(gpus or [])
        _check(len(set(gpus)) == len(gpus), f"--gpus lists a GPU twice ({gpus}): list each once")
        _check(all(g >= 0 for g in gpus), f"--gpus has a negative index ({gpus})")
        _check(poll_interval > 0, f"poll interval must be positive, got {poll_interval}")
        _check(grace_period >= 0, f"grace period must be >= 0 s, got {grace_period}")
        if gpus:
            _check(
                1 <= gpus_per_job <= len(gpus),
                f"--num_gpus_per_job {gpus_per_job} needs between 1 and the {len(gpus)} "
                f"GPU(s) given by --gpus {' '.join(map(str, gpus))}: lower it or add GPUs",
            )
            _check(memory_threshold_mb > 0, "--gpu_memory_threshold must be positive (MB)")
            _check(max_check >= 1, f"--max_check must be at least 1, got {max_check}")
            self._pool: _GPUPool | _CPUPool = _GPUPool(
                gpus, gpus_per_job, memory_threshold_mb, max_check
            )
            self._threads = None
        else:
            _check(cpu_slots >= 1, f"cpu_slots must be at least 1, got {cpu_slots}")
            cores = _available_cores() if cpu_count is None else cpu_count
            _check(cores >= 1, f"cpu_count must be at least 1, got {cores}")
            self._pool = _CPUPool(cpu_slots)
            self._threads = max(1, cores // cpu_slots)
        self.gpus = tuple(gpus)
        self._poll_interval = poll_interval
        self._grace_period = grace_period
        self._query = query
        self._launcher = launcher
        self._clock = clock
        self._wait = wait
        # An RLock: stop() may run in a signal handler on the thread that holds the lock.
        self._cond = threading.Condition(threading.RLock())
        self._pending: list[Job] = []
        self._running: dict[int, _Running] = {}
        self._finished: list[tuple[int, int | BaseException, float]] = []
        self._keys = itertools.count()
        self._woken = False
        self._active = False
        self._force = False
        self._query_failures = 0
        self._timed_out: dict[int, float] = {}  # running job key -> when SIGKILL is due

    # ----- public API -----------------------------------------------------------------

    @property
    def cpu_mode(self) -> bool:
        return not self.gpus

    @property
    def threads_per_job(self) -> int | None:
        """The thread count each CPU-mode job gets; None in GPU mode."""
        return self._threads

    @property
    def running_jobs(self) -> int:
        return len(self._running)

    @property
    def pending_jobs(self) -> list[Job]:
        """Queued jobs not started yet (after a stop: the ones that never ran)."""
        with self._cond:
            return list(self._pending)

    def now(self) -> float:
        """The dispatcher's clock, the one ``Job.not_before`` is measured on."""
        return self._clock()

    def submit(self, job: Job) -> None:
        """Queue a job; safe from any thread, during or before ``run()``."""
        with self._cond:
            self._pending.append(job)
            self._woken = True
            self._cond.notify_all()

    def stop(self, reason: str = "stop requested", signum: int | None = None, force: bool = False):
        """Ask ``run()`` to terminate its jobs and return; returns at once.

        Safe in a signal handler. ``force`` skips what is left of the grace period (SIGKILL
        now), for a second Ctrl-C. A stopped dispatcher stays stopped: it starts no job again.
        """
        self._note_stop(reason, signum)
        if force:
            self._force = True
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def run(self, jobs: Iterable[Job] = (), on_finish: OnFinish | None = None) -> list[JobResult]:
        """Run ``jobs`` (plus any submitted) and return every result, in the order they ended.

        ``on_finish(result)`` runs on this thread once per result and may return new jobs to
        queue (a retry with ``not_before``). Returns when nothing is queued or running, or,
        after ``stop()``, once the running jobs are terminated: their results have
        ``stopped=True``, the jobs ``on_finish`` returns then are queued but not started,
        and ``stopped``/``pending_jobs`` tell the caller. On any exception the running jobs
        are terminated (without ``on_finish``) before it propagates.
        """
        with self._cond:
            if self._active:
                raise RuntimeError("Dispatcher.run() is already running")
            self._active = True
            self._pending.extend(jobs)
        results: list[JobResult] = []
        self._pool.reset()
        try:
            self._dispatch(results, on_finish)
        except BaseException:
            self._terminate(results, None)
            raise
        finally:
            with self._cond:
                self._active = False
            close = getattr(self._launcher, "close", None)  # long-lived workers (pool.py)
            if close is not None:
                close()
        return results

    # ----- the loop ---------------------------------------------------------------------

    def _dispatch(self, results: list[JobResult], on_finish: OnFinish | None) -> None:
        next_poll: float | None = None
        while True:
            with self._cond:
                self._woken = False
            self._collect(results, on_finish)
            if self._stop_reason is not None:
                logger.warning("stopping: %s", self._stop_reason)
                self._terminate(results, on_finish)
                return
            now = self._clock()
            self._enforce_timeouts(now)
            if self._pool.polls and (next_poll is None or now >= next_poll):
                self._poll()
                next_poll = now + self._poll_interval
            self._start_ready(now)
            with self._cond:
                if self._woken or self._finished:
                    continue
                if not self._pending and not self._running:
                    return
                self._wait(self._cond, self._timeout(now, next_poll))

    def _poll(self) -> None:
        """One GPU reading. A failed reading (a driver hiccup) restarts every free count, so no
        GPU is granted on stale readings; only ``MAX_QUERY_FAILURES`` failures in a row stop
        the run, with the last error."""
        try:
            statuses = self._query()
        except GPUQueryError as exc:
            self._query_failures += 1
            if self._query_failures >= MAX_QUERY_FAILURES:
                raise
            logger.warning("GPU query failed (%d in a row, giving up at %d): %s",
                           self._query_failures, MAX_QUERY_FAILURES, exc)
            self._pool.reset()
            return
        self._query_failures = 0
        idle_gpus = getattr(self._launcher, "idle_gpus", None)  # long-lived workers (pool.py)
        self._pool.observe(statuses, idle_gpus() if idle_gpus is not None else frozenset())

    def _enforce_timeouts(self, now: float) -> None:
        """SIGTERM to each job past its timeout, SIGKILL once the grace period is over too."""
        for key, run in list(self._running.items()):
            if run.job.timeout is None:
                continue
            if key not in self._timed_out and now >= run.start + run.job.timeout:
                logger.warning("%s: timed out after %g s; SIGTERM (pid %d)", run.job.name,
                               run.job.timeout, run.handle.pid)
                self._timed_out[key] = now + self._grace_period
                run.handle.send_signal(signal.SIGTERM)
            elif key in self._timed_out and now >= self._timed_out[key]:
                logger.warning("%s: still running after SIGTERM; SIGKILL (pid %d)",
                               run.job.name, run.handle.pid)
                self._timed_out[key] = math.inf
                run.handle.send_signal(signal.SIGKILL)

    def _timeout(self, now: float, next_poll: float | None) -> float:
        deadlines = [job.not_before for job in self._pending if job.not_before is not None]
        deadlines += [run.start + run.job.timeout for key, run in self._running.items()
                      if run.job.timeout is not None and key not in self._timed_out]
        deadlines += [t for t in self._timed_out.values() if t != math.inf]
        if next_poll is not None:
            deadlines.append(next_poll)
        later = [d - now for d in deadlines if d > now]
        return min([_MAX_WAIT, *later])

    def _start_ready(self, now: float) -> None:
        while self._stop_reason is None:
            with self._cond:
                ready = [
                    i
                    for i, job in enumerate(self._pending)
                    if job.not_before is None or job.not_before <= now
                ]
                if not ready:
                    return
                gpus = self._pool.take()
                if gpus is None:
                    return
                job = self._pending.pop(ready[0])
            self._launch(job, gpus)

    def _launch(self, job: Job, gpus: tuple[int, ...]) -> None:
        allocation = Allocation(gpus, self._threads)
        try:
            argv = job.command(allocation)
            handle = self._launcher(argv, self._child_env(job, allocation), job.log_path)
        except BaseException:
            self._pool.release(gpus)
            raise
        key = next(self._keys)
        self._running[key] = _Running(job, handle, allocation, self._clock(), time.time())
        where = f"GPU {','.join(map(str, gpus))}" if gpus else f"CPU ({self._threads} threads)"
        logger.info("started %s on %s (pid %d, log %s)", job.name, where, handle.pid, job.log_path)
        threading.Thread(
            target=self._reap, args=(key, handle), name=f"reap-{handle.pid}", daemon=True
        ).start()

    def _child_env(self, job: Job, allocation: Allocation) -> dict[str, str]:
        env = dict(os.environ)
        env.update(job.env)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, allocation.gpus))
        if allocation.threads is not None:
            env.update(dict.fromkeys(THREAD_VARS, str(allocation.threads)))
        return env

    def _reap(self, key: int, handle: ProcessHandle) -> None:
        try:
            outcome: int | BaseException = handle.wait()
        except BaseException as exc:  # handed to the loop, which raises it
            outcome = exc
        end = self._clock()
        with self._cond:
            self._finished.append((key, outcome, end))
            self._woken = True
            self._cond.notify_all()

    def _collect(self, results: list[JobResult], on_finish: OnFinish | None) -> None:
        """Record finished children, then hand each result to ``on_finish``."""
        for result in self._drain(results, frozenset()):
            if on_finish is not None:
                for job in on_finish(result) or ():
                    self.submit(job)

    def _drain(self, results: list[JobResult], stopped: frozenset[int]) -> list[JobResult]:
        """Turn finished children into results (appended to ``results``) and free their GPUs."""
        with self._cond:
            finished, self._finished = self._finished, []
        new, errors = [], []
        for key, outcome, end in finished:
            run = self._running.pop(key)
            self._pool.release(run.allocation.gpus)
            if isinstance(outcome, BaseException):
                errors.append(outcome)
                continue
            result = JobResult(
                job=run.job,
                returncode=outcome,
                gpus=run.allocation.gpus,
                threads=run.allocation.threads,
                pid=run.handle.pid,
                start=run.start,
                end=end,
                started_at=run.started_at,
                log_path=run.job.log_path,
                stopped=key in stopped,
                timed_out=self._timed_out.pop(key, None) is not None,
            )
            logger.info("%s: %s after %.1f s", result.name, result.describe(), result.duration)
            new.append(result)
        results.extend(new)
        if errors:
            raise errors[0]
        return new

    # ----- stopping ---------------------------------------------------------------------

    def _terminate(self, results: list[JobResult], on_finish: OnFinish | None) -> None:
        """SIGTERM every running job's process group, SIGKILL after the grace period.

        ``on_finish`` sees the terminated jobs only once every one of them is gone.
        """
        if not self._running:
            return
        signalled = frozenset(self._running)
        logger.warning(
            "terminating %d running job(s) (SIGKILL after %.0f s)",
            len(signalled),
            self._grace_period,
        )
        terminated: list[JobResult] = []
        try:
            for run in list(self._running.values()):
                run.handle.send_signal(signal.SIGTERM)
            self._wait_for_exits(self._clock() + self._grace_period, honour_force=True)
        finally:  # also when a second KeyboardInterrupt cuts the grace period short
            self._drain(terminated, signalled)
            for run in self._running.values():
                logger.warning("%s still running: SIGKILL (pid %d)", run.job.name, run.handle.pid)
                run.handle.send_signal(signal.SIGKILL)
            self._wait_for_exits(self._clock() + _KILL_WAIT, honour_force=False)
            self._drain(terminated, signalled)
            results.extend(terminated)
            if self._running:
                pids = [run.handle.pid for run in self._running.values()]
                logger.error("job processes %s survived SIGKILL (stuck in the kernel?)", pids)
        if on_finish is not None:
            for result in terminated:
                for job in on_finish(result) or ():
                    self.submit(job)

    def _wait_for_exits(self, deadline: float, honour_force: bool) -> None:
        with self._cond:
            while len(self._finished) < len(self._running):
                remaining = deadline - self._clock()
                if remaining <= 0 or (honour_force and self._force):
                    return
                self._wait(self._cond, min(remaining, _MAX_WAIT))
