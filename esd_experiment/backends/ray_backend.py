"""The Ray backend: one Ray task per job, asking Ray for the job's GPUs (or CPUs).

It has the local dispatcher's interface (``run(jobs, on_finish)``, ``stop``, ``now``,
``stopped``, ``stop_signum``, ``running_jobs``, ``pending_jobs``). Each task runs its job's
command as a subprocess (``backend_task.run_commands``; given ``worker_script``, in a
long-lived worker of ``task_workers``) with ``CUDA_VISIBLE_DEVICES`` set to the GPUs Ray
assigned (``ray.get_gpu_ids()``), output appended to the job's ``log_path``.
Ray schedules the tasks by their resources; a job's ``not_before`` keeps it here until then.

``stop()`` cancels the tasks (each passes the cancel on to its command's process group) and
``run()`` returns their results marked ``stopped``, as the local dispatcher does: Ray tasks
do not outlive the driver. Ray is optional (``requirements-ray.txt``); without it the
backend refuses to start with an InputError saying how to install it. Every node must see
the project and its Python at the same paths (the command names them).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from esd_experiment.backends.task import Outcome, TaskCommand, run_commands
from esd_experiment.core.errors import InputError
from gputracker.jobs import Job, JobResult, StopState

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # on the workers' PYTHONPATH: they unpickle tasks
INSTALL_HINT = "pip install -r requirements-ray.txt"
OnFinish = Callable[[JobResult], Iterable[Job] | None]


@dataclass(frozen=True)
class RayOptions:
    """``address``: a running cluster (``ray start --head`` prints it), None to start a local
    Ray for the run; ``gpus_per_job`` 0 means CPU mode, each task then asks for
    ``cpus_per_job`` CPUs and its command gets that many threads; ``require_gpus`` False:
    on a cluster without GPUs the jobs run in CPU mode instead of being refused."""

    address: str | None = None
    gpus_per_job: int = 1
    require_gpus: bool = True
    cpus_per_job: int = 1
    models_per_task: int = 1  # jobs run one after another by one task, in one worker
    poll_interval: float = 1.0
    grace_period: float = 10.0


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(f"Ray (--backend ray; optional: {INSTALL_HINT})")
    g.add_argument("--ray_address", default=None,
                   help="Ray cluster to join, e.g. 10.0.0.1:6379 (default: start a local Ray)")
    g.add_argument("--ray_cpus_per_job", type=int, default=RayOptions.cpus_per_job,
                   help="CPUs each task asks for in CPU mode (its thread count)")
    g.add_argument("--ray_models_per_task", type=int, default=RayOptions.models_per_task,
                   help="jobs one Ray task runs one after another, in one long-lived worker "
                        "(torch imported once per task; a task's results come back together)")


def ray_options_from_args(args: argparse.Namespace, gpus_per_job: int,
                          require_gpus: bool = True) -> RayOptions:
    """Options from ``add_ray_arguments``' flags; ``gpus_per_job``: the runner's
    ``--num_gpus_per_job``, 0 in CPU mode; ``require_gpus`` False for ``--device auto``."""
    if args.ray_cpus_per_job < 1:
        raise InputError(f"--ray_cpus_per_job must be at least 1, got {args.ray_cpus_per_job}")
    if args.ray_models_per_task < 1:
        raise InputError(f"--ray_models_per_task must be at least 1, got "
                         f"{args.ray_models_per_task}")
    if gpus_per_job < 0:
        raise InputError(f"GPUs per job must be 0 or more, got {gpus_per_job}")
    return RayOptions(address=args.ray_address, gpus_per_job=gpus_per_job,
                      require_gpus=require_gpus, cpus_per_job=args.ray_cpus_per_job,
                      models_per_task=args.ray_models_per_task)


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--backend ray needs Ray, which is not installed: {INSTALL_HINT}"
                         ) from None
    return ray


def _ray_task(commands: list[TaskCommand], cpu_only: bool, threads: int | None,
              grace_period: float, worker_script: Path | None = None) -> list[Outcome]:
    """Runs on a Ray worker: the job's command with the GPUs Ray gave this task."""
    import ray

    context = ray.get_runtime_context()
    gpus = () if cpu_only else tuple(int(gpu) for gpu in ray.get_gpu_ids())
    return run_commands(commands, gpus=gpus, threads=threads, task=context.get_task_id(),
                        grace_period=grace_period, worker_script=worker_script)


class RayBackend(StopState):
    """Runs ``gputracker.Job``s as Ray tasks. See the module doc."""

    def __init__(self, options: RayOptions, *, clock: Callable[[], float] = time.monotonic,
                 worker_script: Path | None = None):
        self._ray = import_ray()
        self.worker_script = worker_script  # jobs of this script run in a long-lived worker
        self.options = options
        self._clock = clock
        self._wake = threading.Event()
        self._queue: list[Job] = []
        # ref -> the task's jobs, its start times
        self._running: dict[object, tuple[list[Job], float, float]] = {}
        self._force = False

    @property
    def running_jobs(self) -> int:
        return sum(len(jobs) for jobs, _, _ in self._running.values())

    @property
    def pending_jobs(self) -> list[Job]:
        return list(self._queue)

    def now(self) -> float:
        return self._clock()

    def stop(self, reason: str = "stop requested", signum: int | None = None,
             force: bool = False) -> None:
        """Cancel the tasks and return from ``run()``; safe in a signal handler. ``force``
        kills the Ray workers at once instead of letting the commands stop."""
        self._note_stop(reason, signum)
        self._force = self._force or force
        self._wake.set()

    def run(self, jobs: Iterable[Job] = (), on_finish: OnFinish | None = None) -> list[JobResult]:
        """Run ``jobs`` and the retries ``on_finish`` returns; results in the order they end."""
        results: list[JobResult] = []
        self._queue = list(jobs)
        started_ray = self._connect()
        try:
            self._check_placement()
            while self._stop_reason is None and (self._queue or self._running):
                self._start_ready()
                self._collect(self._wait(), results, on_finish)
            if self._stop_reason is not None:
                logger.warning("stopping: %s", self._stop_reason)
                self._cancel(results, on_finish)
        except BaseException:
            self._cancel(results, None)
            raise
        finally:
            if started_ray:
                self._ray.shutdown()
        return results

    # ----- the loop --------------------------------------------------------------------------

    def _connect(self) -> bool:
        """Join ``address`` or start a local Ray, unless this process is connected already.
        Returns whether this call started the connection (``run`` then ends it)."""
        if self._ray.is_initialized():
            return False
        self._ray.init(address=self.options.address, include_dashboard=False,
                       log_to_driver=False, configure_logging=False)
        return True

    def _check_placement(self) -> None:
        """Refuse at once what no node of the cluster can run (Ray would wait for it in
        silence); without ``require_gpus``, a cluster without GPUs gets CPU mode."""
        nodes = [node.get("Resources", {}) for node in self._ray.nodes() if node.get("Alive")]
        gpus = max((resources.get("GPU", 0) for resources in nodes), default=0)
        cpus = max((resources.get("CPU", 0) for resources in nodes), default=0)
        o = self.options
        if o.gpus_per_job and not gpus and not o.require_gpus:
            logger.info("the Ray cluster has no GPUs: the models are analysed on CPUs")
            self.options = o = replace(o, gpus_per_job=0)
        if o.gpus_per_job and not gpus:
            raise InputError("the Ray cluster has no GPU: use --device cpu, or a cluster "
                             "with GPUs (--ray_address)")
        if o.gpus_per_job > gpus:
            raise InputError(f"{o.gpus_per_job} GPUs per job, but no Ray node has more than "
                             f"{gpus:g}: lower --num_gpus_per_job")
        if o.gpus_per_job == 0 and o.cpus_per_job > cpus:
            raise InputError(f"--ray_cpus_per_job {o.cpus_per_job}, but no Ray node has more "
                             f"than {cpus:g} CPUs: lower it")

    def _start_ready(self) -> None:
        now = self._clock()
        ready = [job for job in self._queue if job.not_before is None or job.not_before <= now]
        if not ready:
            return
        chosen = {id(job) for job in ready}
        self._queue = [job for job in self._queue if id(job) not in chosen]
        cpu_only = self.options.gpus_per_job == 0
        remote = self._ray.remote(_ray_task).options(
            num_gpus=self.options.gpus_per_job,
            num_cpus=self.options.cpus_per_job if cpu_only else 1,
            max_retries=0,  # a retry is the caller's decision (on_finish), not Ray's
            runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}},
        )
        size = self.options.models_per_task
        for group in (ready[i:i + size] for i in range(0, len(ready), size)):
            commands = [TaskCommand(job.name, job.argv, job.env, job.log_path,
                                    timeout=job.timeout) for job in group]
            ref = remote.remote(commands, cpu_only,
                                self.options.cpus_per_job if cpu_only else None,
                                self.options.grace_period, self.worker_script)
            self._running[ref] = (group, self._clock(), time.time())
            for job in group:
                logger.info("submitted %s to Ray (log %s)", job.name, job.log_path)

    def _wait(self) -> list:
        """Finished task refs, after at most one poll interval (or the next ``not_before``)."""
        timeout = self.options.poll_interval
        waits = [job.not_before - self._clock() for job in self._queue if job.not_before]
        timeout = max(0.0, min([timeout, *waits]))
        if not self._running:
            self._wake.wait(timeout)
            return []
        refs = list(self._running)
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # and every other one that has finished meanwhile
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    def _collect(self, refs: list, results: list[JobResult], on_finish: OnFinish | None,
                 stopped: bool = False) -> None:
        for ref in refs:
            jobs, start, started_at = self._running.pop(ref)
            for result in self._results(ref, jobs, start, started_at, stopped):
                results.append(result)
                logger.info("%s: %s", result.name, result.describe())
                for retry in (on_finish(result) if on_finish else None) or ():
                    self._queue.append(retry)

    def _results(self, ref, jobs: list[Job], start: float, started_at: float,
                 stopped: bool) -> list[JobResult]:
        """One result per job of the task, each from its own outcome (a command's outcome
        has its own start and end within the task)."""
        exceptions = self._ray.exceptions
        outcomes, detail = [None] * len(jobs), ""
        try:
            outcomes = self._ray.get(ref, timeout=0)  # finished, but for a task left running
        except exceptions.GetTimeoutError:
            detail = "the Ray task did not stop after its cancel"
        except exceptions.TaskCancelledError:
            detail = "the Ray task was cancelled"
        except exceptions.RayTaskError as exc:  # the task itself raised: a bug, not the cluster
            end = self._clock()
            return [JobResult(job, 1, (), None, 0, start, end, started_at, job.log_path,
                              stopped, detail=f"the Ray task failed: {exc}") for job in jobs]
        except exceptions.RayError as exc:  # worker or node died, object lost: worth a retry
            detail = f"Ray lost the task: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return [self._result(job, outcome, detail, start, started_at, stopped)
                for job, outcome in zip(jobs, outcomes, strict=True)]

    def _result(self, job: Job, outcome, detail: str, start: float, started_at: float,
                stopped: bool) -> JobResult:
        end = self._clock()
        if outcome is None:
            return JobResult(job, -signal.SIGKILL, (), None, 0, start, end, started_at,
                             job.log_path, stopped, detail=detail)
        returncode = outcome.returncode
        if outcome.error:
            returncode, detail = 1, outcome.error
        elif returncode is None:
            returncode, detail = -signal.SIGTERM, f"not started: the task got {outcome.signal}"
        return JobResult(job, returncode, outcome.gpus, outcome.threads, outcome.pid, start,
                         start + (outcome.end - outcome.start), started_at, job.log_path,
                         stopped, detail=detail, timed_out=outcome.timed_out)

    def _cancel(self, results: list[JobResult], on_finish: OnFinish | None) -> None:
        """Cancel every running task, wait for them (the commands get the grace period),
        and record them as stopped."""
        if not self._running:
            return
        logger.warning("cancelling %d Ray task(s)", len(self._running))
        for ref in self._running:
            self._ray.cancel(ref, force=self._force)
        deadline = self._clock() + self.options.grace_period + self.options.poll_interval
        while self._running and self._clock() < deadline:
            ready, _ = self._ray.wait(list(self._running), num_returns=len(self._running),
                                      timeout=self.options.poll_interval)
            self._collect(ready, results, on_finish, stopped=True)
            if self._force and self._running:
                for ref in self._running:
                    self._ray.cancel(ref, force=True)
        if self._running:
            logger.error("%d Ray task(s) did not stop within %.0f s", len(self._running),
                         self.options.grace_period)
            self._collect(list(self._running), results, on_finish, stopped=True)
