"""The Slurm backend: jobs run as Slurm job arrays submitted through submitit.

It has the local dispatcher's interface (``run(jobs, on_finish)``, ``stop``, ``now``,
``stopped``, ``stop_signum``, ``running_jobs``, ``pending_jobs``), so a runner hands it the
same ``gputracker.Job`` list. ``models_per_task`` jobs share one array task and run one after
another on its node (``backend_task.run_commands``), each appending to its own ``log_path``;
given ``worker_script``, the task runs that script's jobs in one long-lived worker
(``task_workers``, docs/workers.md).

Everything it submits is recorded in ``<state_dir>/submissions.json`` (one record per job:
name, Slurm task id, attempt, the token naming its outcome file), so a later backend on the
same state directory (a rerun, waiting or detached) adopts a job that is still queued or
running instead of submitting it again, and collects the outcome of one that has finished.
Files under ``<state_dir>``: ``submitit/`` (sbatch scripts, pickled tasks, Slurm's own
stdout/stderr per task), ``outcomes/<token>.json`` (written on the node) and the record.

A task ended by Slurm (time limit, scancel, preemption, node failure) yields a result killed
by SIGTERM whose ``detail`` says which. The compute nodes must see the project, its Python
and ``state_dir`` at the same paths (a shared filesystem); a task that Slurm could not even
start because it could not write its log there stops the run with an InputError. A job's
argv and ``env`` are pickled into ``state_dir``: secrets (a hub token) belong in the
submitting environment, which sbatch passes on to the task, not in ``Job.env``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shlex
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from esd_experiment.backends.slurm_cli import (
    SCHEDULER_ENDED,
    SlurmCLI,
    TaskState,
    last_lines,
    require_sbatch,
    submission_error,
)
from esd_experiment.backends.task import Outcome, TaskCommand, read_outcome, run_commands
from esd_experiment.core.errors import InputError, TransientError
from esd_experiment.core.paths import SLURM_STATE, write_text_atomic
from gputracker.jobs import Job, JobResult, StopState

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # put on the node's PYTHONPATH: it unpickles tasks
STATE_FILE = Path(SLURM_STATE).name  # in its state directory
SIGNAL_DELAY_S = 90  # submitit's default warning before the time limit
OnFinish = Callable[[JobResult], Iterable[Job] | None]


@dataclass(frozen=True)
class SlurmOptions:
    """How tasks are requested from Slurm (``add_slurm_arguments`` documents each)."""

    partition: str | None = None
    time_min: int = 240
    gpus_per_task: int = 0
    require_gpus: bool = True  # False: on a partition without GPUs, CPU tasks instead
    cpus_per_task: int = 1
    mem_gb: float | None = None
    array_parallelism: int = 256
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()
    additional: tuple[tuple[str, str], ...] = ()
    models_per_task: int = 1
    detach: bool = False
    cancel_on_exit: bool = False
    poll_interval: float = 15.0
    job_name: str = "gputracker"


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Slurm (--backend slurm)")
    g.add_argument("--slurm_partition", default=None, help="partition (default: the cluster's)")
    g.add_argument("--slurm_time", type=int, default=SlurmOptions.time_min,
                   help="time limit of each task, minutes (covers all its models)")
    g.add_argument("--slurm_gpus_per_task", type=int, default=None,
                   help="GPUs per task (default: --num_gpus_per_job; 0 with --device cpu)")
    g.add_argument("--slurm_cpus_per_task", type=int, default=SlurmOptions.cpus_per_task,
                   help="CPUs per task")
    g.add_argument("--slurm_mem_gb", type=float, default=None, help="memory per task, GB")
    g.add_argument("--slurm_array_parallelism", type=int,
                   default=SlurmOptions.array_parallelism, help="array tasks running at once")
    g.add_argument("--slurm_account", default=None, help="account to charge")
    g.add_argument("--slurm_qos", default=None, help="quality of service")
    g.add_argument("--slurm_constraint", default=None, help="node features, e.g. a100")
    g.add_argument("--slurm_setup", action="append", default=[], metavar="LINE",
                   help="shell line run before the worker (module load, activating an "
                        "environment); repeat for several")
    g.add_argument("--slurm_additional", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. mail-type=FAIL; repeat for several")
    g.add_argument("--slurm_models_per_task", type=int, default=1,
                   help="models run one after another in each array task")
    g.add_argument("--slurm_poll_interval", type=float, default=SlurmOptions.poll_interval,
                   help="seconds between squeue checks while waiting")
    g.add_argument("--detach", action="store_true",
                   help="submit, print the job ids and exit; a rerun collects the results")
    g.add_argument("--cancel_on_exit", action="store_true",
                   help="on Ctrl-C cancel the submitted jobs instead of leaving them running")


def slurm_options_from_args(args: argparse.Namespace, default_gpus: int,
                            job_name: str = SlurmOptions.job_name,
                            require_gpus: bool = True) -> SlurmOptions:
    """Options from ``add_slurm_arguments``' flags; ``default_gpus`` stands in for an unset
    ``--slurm_gpus_per_task`` (the runner's ``--num_gpus_per_job``, 0 in CPU mode).
    ``require_gpus`` False (``--device auto``): CPU tasks where the partition has no GPUs,
    unless ``--slurm_gpus_per_task`` asks for them."""
    gpus = default_gpus if args.slurm_gpus_per_task is None else args.slurm_gpus_per_task
    for flag, value, low in (("--slurm_time", args.slurm_time, 1),
                             ("--slurm_gpus_per_task", gpus, 0),
                             ("--slurm_cpus_per_task", args.slurm_cpus_per_task, 1),
                             ("--slurm_array_parallelism", args.slurm_array_parallelism, 1),
                             ("--slurm_models_per_task", args.slurm_models_per_task, 1)):
        if value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")
    if args.slurm_mem_gb is not None and args.slurm_mem_gb <= 0:
        raise InputError(f"--slurm_mem_gb must be positive, got {args.slurm_mem_gb}")
    if args.slurm_poll_interval <= 0:
        raise InputError(f"--slurm_poll_interval must be positive, got {args.slurm_poll_interval}")
    return SlurmOptions(
        partition=args.slurm_partition, time_min=args.slurm_time, gpus_per_task=gpus,
        require_gpus=require_gpus or args.slurm_gpus_per_task is not None,
        cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb,
        array_parallelism=args.slurm_array_parallelism, account=args.slurm_account,
        qos=args.slurm_qos, constraint=args.slurm_constraint, setup=tuple(args.slurm_setup),
        additional=parse_additional(args.slurm_additional),
        models_per_task=args.slurm_models_per_task, detach=args.detach,
        cancel_on_exit=args.cancel_on_exit, poll_interval=args.slurm_poll_interval,
        job_name=job_name)


def parse_additional(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise InputError(f"--slurm_additional {item!r}: expected KEY=VALUE, e.g. "
                             "mail-type=FAIL (an sbatch option without its dashes)")
        pairs.append((key, value.strip()))
    return tuple(pairs)


@dataclass(frozen=True)
class Submission:
    """One job as submitted: its Slurm task, the token naming its outcome file and its
    command (a rerun adopts only the same command: not one of other options)."""

    name: str
    task: str
    token: str
    attempt: int
    submitted_at: float
    argv: tuple[str, ...] = ()


def load_submissions(state_dir: Path) -> dict[str, Submission]:
    """The jobs a Slurm run on this state directory submitted, by token ({} when none)."""
    path = Path(state_dir) / STATE_FILE
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["submissions"]
        return {row["token"]: Submission(**{**row, "argv": tuple(row.get("argv", ()))})
                for row in rows}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} cannot be read ({exc}): it records the jobs submitted "
                         "to Slurm; check them with squeue, then remove the file") from None


def pending_tasks(output_dir: Path) -> list[str]:
    """The Slurm tasks that a run on ``output_dir`` submitted and left queued or running
    (``--detach``, Ctrl-C), as ``squeue`` lists them; none where Slurm's commands are absent,
    squeue does not answer or no record is kept."""
    if shutil.which("squeue") is None:
        return []
    try:
        records = load_submissions((Path(output_dir) / SLURM_STATE).parent)
        return sorted(SlurmCLI().queued(r.task for r in records.values()))
    except (InputError, TransientError):
        return []


class SlurmBackend(StopState):
    """Runs ``gputracker.Job``s as Slurm array tasks. See the module doc."""

    def __init__(self, options: SlurmOptions, state_dir: Path, *, cli: SlurmCLI | None = None,
                 clock: Callable[[], float] = time.time, worker_script: Path | None = None):
        require_sbatch()
        self.worker_script = worker_script  # a task's jobs of this script share one process
        self.state_dir = Path(state_dir)
        self._cli = cli or SlurmCLI()
        self.options = self._placeable(options)
        self._clock = clock
        self._wake = threading.Event()
        self._records: dict[str, Submission] = {}          # token -> record, all runs
        self._tracked: dict[str, Job] = {}                 # token -> job of this run
        self._queue: list[Job] = []
        self._started = clock()
        self.left_running: dict[str, str] = {}             # name -> Slurm task, after run()

    def _placeable(self, o: SlurmOptions) -> SlurmOptions:
        """``o`` checked against the partition's GPUs (sinfo): GPUs it has none of become CPU
        tasks when not required, else an InputError, as is more GPUs than any node has."""
        if o.gpus_per_task == 0:
            return o
        most = self._cli.partition_gpus(o.partition)
        where = f"partition {o.partition}" if o.partition else "the default partition"
        if most is None:  # an unknown partition: sbatch's own message names it
            return o
        if most == 0 and not o.require_gpus:
            logger.info("%s has no GPUs: the models are analysed on CPUs", where)
            return replace(o, gpus_per_task=0)
        if most == 0:
            raise InputError(f"{where} has no GPUs (no gpu GRES in sinfo): use --device cpu, "
                             "or a partition with GPUs (--slurm_partition)")
        if o.gpus_per_task > most:
            raise InputError(f"{o.gpus_per_task} GPUs per task, but no node of {where} has "
                             f"more than {most}: lower --num_gpus_per_job (or "
                             "--slurm_gpus_per_task), or choose another --slurm_partition")
        return o

    # ----- the Dispatcher's interface --------------------------------------------------------

    @property
    def running_jobs(self) -> int:
        return len(self._tracked)

    @property
    def pending_jobs(self) -> list[Job]:
        return list(self._queue)

    def now(self) -> float:
        return self._clock()

    def stop(self, reason: str = "stop requested", signum: int | None = None,
             force: bool = False) -> None:
        """Stop waiting; safe in a signal handler. The jobs keep running on Slurm unless
        ``cancel_on_exit`` (``force`` changes nothing: nothing local is left to kill)."""
        self._note_stop(reason, signum)
        self._wake.set()

    def run(self, jobs: Iterable[Job] = (), on_finish: OnFinish | None = None) -> list[JobResult]:
        """Adopt or collect what earlier runs submitted, submit the rest, and (unless
        ``detach``) wait for every job; returns the results in the order they were seen.

        ``on_finish`` may return retries; their ``not_before`` becomes sbatch ``--begin``.
        After ``stop()`` or with ``detach``, ``left_running`` names the jobs still on Slurm.
        """
        results: list[JobResult] = []
        jobs = list(jobs)
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):  # submissions.json keys the jobs by name
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"job names must be unique; given twice: {', '.join(twice)}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._started = self._clock()
        self._records = load_submissions(self.state_dir)
        try:
            self._queue = []
            self._adopt(jobs, results, on_finish)
            while self._stop_reason is None:
                self._submit()
                if self.options.detach or not self._tracked:
                    break
                self._wake.wait(self.options.poll_interval)
                self._wake.clear()
                self._collect(results, on_finish)
            if self._stop_reason is not None:
                logger.warning("stopping: %s", self._stop_reason)
                if self.options.cancel_on_exit:
                    self._cancel_tracked(results, on_finish)
        finally:
            self.left_running = {job.name: self._records[token].task
                                 for token, job in self._tracked.items()}
            if self.left_running and not self.options.detach:
                logger.warning("%d job(s) left running on Slurm; a rerun collects them; "
                               "cancel them with: %s", len(self.left_running),
                               self.scancel_command())
        return results

    # ----- what a runner reports -------------------------------------------------------------

    @property
    def job_ids(self) -> list[str]:
        """The Slurm job ids (array ids) of the jobs left running."""
        return sorted({task.split("_")[0] for task in self.left_running.values()}, key=int)

    def scancel_command(self) -> str:
        return shlex.join(["scancel", *self.job_ids])

    # ----- adoption and collection -----------------------------------------------------------

    def _adopt(self, jobs: list[Job], results: list[JobResult],
               on_finish: OnFinish | None) -> None:
        """Track the jobs an earlier run submitted that are still queued or running, collect
        the ones that finished, and queue the rest for submission."""
        latest = {record.name: record for record in sorted(self._records.values(),
                                                           key=lambda r: r.submitted_at)}
        queued = self._cli.queued(record.task for record in latest.values())
        self._drop_other_commands(jobs, latest, queued)
        wanted = {job.name for job in jobs}
        for record in list(self._records.values()):
            if record.task in queued:
                continue
            outcome = read_outcome(self._outcome_path(record.token))
            if latest[record.name] is not record or (
                    record.name not in wanted and (outcome is None or outcome.returncode == 0)):
                # Superseded by a newer submission of the same job, or not asked for and
                # finished well (the runner found its result): nothing left to collect.
                self._forget(record)
        finished = []
        for job in jobs:
            record = latest.get(job.name)
            if record is None or record.token not in self._records:
                self._queue.append(job)
                continue
            self._tracked[record.token] = replace(job, attempt=record.attempt)
            if record.task in queued:
                logger.info("%s: adopted Slurm task %s (%s)", job.name, record.task,
                            queued[record.task].lower())
            else:
                finished.append(record.token)
        self._finish(finished, results, on_finish, queued={})

    def _drop_other_commands(self, jobs: list[Job], latest: dict[str, Submission],
                             queued: dict[str, str]) -> None:
        """An earlier run's submission of a job whose command this run changed (other
        options, under --overwrite): cancelled when still queued or running, never collected;
        the job is submitted again."""
        for job in jobs:
            record = latest.get(job.name)
            if record is None or not record.argv or record.argv == tuple(job.argv):
                continue
            if record.task in queued:
                self._cli.cancel([record.task])
                logger.warning("%s: cancelled Slurm task %s, which an earlier run submitted "
                               "with another command (other options)", job.name, record.task)
            for each in [r for r in self._records.values() if r.name == job.name]:
                self._forget(each)
            del latest[job.name]

    def _collect(self, results: list[JobResult], on_finish: OnFinish | None) -> None:
        """Results of tracked jobs whose task left the queue, or whose command ended well
        while the rest of its task still runs."""
        queued = self._cli.queued(self._records[token].task for token in self._tracked)
        done = []
        for token in self._tracked:
            if self._records[token].task not in queued:
                done.append(token)
                continue
            outcome = read_outcome(self._outcome_path(token))
            if outcome is not None and outcome.returncode is not None and outcome.returncode >= 0:
                done.append(token)
        self._finish(done, results, on_finish, queued)

    def _finish(self, tokens: list[str], results: list[JobResult], on_finish: OnFinish | None,
                queued: dict[str, str]) -> None:
        states: dict[str, TaskState | None] = {}
        for token in tokens:
            record, job = self._records[token], self._tracked[token]
            if record.task not in queued and record.task not in states:
                states[record.task] = self._cli.final_state(record.task, self._slurm_log(record))
            result = self._result(record, job, states.get(record.task))
            del self._tracked[token]
            self._forget(record)
            results.append(result)
            logger.info("%s: %s", result.name, result.describe())
            for retry in (on_finish(result) if on_finish else None) or ():
                self._queue.append(retry)
        self._save()

    def _result(self, record: Submission, job: Job, state: TaskState | None) -> JobResult:
        outcome = read_outcome(self._outcome_path(record.token))
        log = self._slurm_log(record)
        now = self._clock()
        if outcome is None:
            if state is not None and state.state == "FAILED" and not log.exists():
                self._unwritable(record, state)
            outcome = Outcome(None, now, now, "")
        returncode, detail = outcome.returncode, ""
        if outcome.error:
            returncode, detail = 1, outcome.error
        elif (returncode is None or returncode < 0) and not outcome.timed_out:
            detail = self._ended_by(record, state, outcome)
            if (returncode is None and not outcome.signal and state is not None
                    and not state.ended_by_scheduler):
                # killed (transient: retried), else the task failed before running it
                returncode = -state.killed_by if state.killed_by else 1
            returncode = -signal.SIGTERM if returncode is None else returncode
        return JobResult(job=job, returncode=returncode, gpus=outcome.gpus,
                         threads=outcome.threads, pid=outcome.pid, start=outcome.start,
                         end=outcome.end, started_at=outcome.start, log_path=job.log_path,
                         detail=detail, timed_out=outcome.timed_out)

    def _ended_by(self, record: Submission, state: TaskState | None, outcome: Outcome) -> str:
        """Why a job ended by a signal, or never started: Slurm's word where it has one."""
        log = self._slurm_log(record)
        where = f"Slurm task {record.task}, log {log}"
        started = outcome.returncode is not None
        if state is not None and state.ended_by_scheduler:
            text = SCHEDULER_ENDED[state.state]
            if state.state == "TIMEOUT":
                text += f" (--slurm_time {self.options.time_min} min)"
            return f"{text}{'' if started else ' before this job started'} ({where})"
        if outcome.signal:
            return (f"the task got {outcome.signal} (scancel, the time limit or preemption; "
                    f"Slurm no longer says which) ({where})")
        if started:
            return ""  # killed by something else on the node (the kernel's OOM killer)
        if state is not None and state.killed_by:
            number = state.killed_by
            name = signal.Signals(number).name if number in set(signal.Signals) else number
            return (f"the task was killed by {name} (the kernel's OOM killer, or kill), its job "
                    f"unfinished ({where}: {last_lines(log) or 'empty'})")
        if state is None:
            return f"the Slurm task ended without a trace of how ({where})"
        return (f"the Slurm task ended ({state.state}, exit {state.exit_code or '?'}) before "
                f"running the job ({where}: {last_lines(log) or 'empty'})")

    def _unwritable(self, record: Submission, state: TaskState) -> None:
        """Slurm could not start the task, and left no log: the node could not write it."""
        mine = [token for token in self._tracked if self._records[token].submitted_at
                >= self._started]
        self._cli.cancel(self._records[token].task for token in mine)
        for token in mine:
            self._forget(self._records[token])
            del self._tracked[token]
        self._save()
        raise InputError(
            f"Slurm could not start task {record.task} ({record.name}): {state.state}, reason "
            f"{state.reason or 'none given'}, and it wrote no log to {self._slurm_log(record)}. "
            f"The compute nodes must be able to write {self.state_dir} (put --output_dir on a "
            f"filesystem they share); cancelled the {len(mine)} job(s) this run submitted")

    def _cancel_tracked(self, results: list[JobResult], on_finish: OnFinish | None) -> None:
        tasks = {self._records[token].task for token in self._tracked}
        logger.warning("cancelling %d job(s) on Slurm: %s", len(self._tracked),
                       shlex.join(["scancel", *sorted(tasks)]))
        self._cli.cancel(tasks)
        now = self._clock()
        for token, job in list(self._tracked.items()):
            result = JobResult(job=job, returncode=-signal.SIGTERM, gpus=(), threads=None, pid=0,
                               start=now, end=now, started_at=now, log_path=job.log_path,
                               stopped=True, detail="cancelled on exit (--cancel_on_exit)")
            del self._tracked[token]
            self._forget(self._records[token])
            results.append(result)
            for retry in (on_finish(result) if on_finish else None) or ():
                self._queue.append(retry)
        self._save()

    # ----- submission ------------------------------------------------------------------------

    def _submit(self) -> None:
        """Submit the queue: one array per distinct start delay, ``models_per_task`` a task."""
        by_delay: dict[int, list[Job]] = {}
        for job in self._queue:
            delay = 0 if job.not_before is None else max(0, int(job.not_before - self.now() + 1))
            by_delay.setdefault(delay, []).append(job)
        for delay, group in sorted(by_delay.items()):
            self._submit_array(group, delay)  # raises with the unsubmitted jobs still queued
            submitted = {id(job) for job in group}
            self._queue = [job for job in self._queue if id(job) not in submitted]

    def _submit_array(self, jobs: list[Job], delay: int) -> None:
        from submitit.core.utils import FailedJobError

        per_task = self.options.models_per_task
        chunks = [jobs[i:i + per_task] for i in range(0, len(jobs), per_task)]
        tokens = [[uuid.uuid4().hex for _ in chunk] for chunk in chunks]
        tasks = [[TaskCommand(job.name, job.argv, job.env, job.log_path, self._outcome_path(t),
                              job.timeout)
                  for job, t in zip(chunk, chunk_tokens, strict=True)]
                 for chunk, chunk_tokens in zip(chunks, tokens, strict=True)]
        cpu_only = self.options.gpus_per_task == 0
        task_fn = functools.partial(run_commands, gpus=() if cpu_only else None,
                                    threads=self.options.cpus_per_task if cpu_only else None,
                                    worker_script=self.worker_script)
        try:
            submitted = self._executor(delay).map_array(task_fn, tasks)
        except FailedJobError as exc:
            raise submission_error(str(exc)) from None
        now = self._clock()
        for sjob, chunk, chunk_tokens in zip(submitted, chunks, tokens, strict=True):
            for job, token in zip(chunk, chunk_tokens, strict=True):
                self._records[token] = Submission(job.name, str(sjob.job_id), token,
                                                  job.attempt, now, tuple(job.argv))
                self._tracked[token] = job
        self._save()
        logger.info("submitted %d job(s) as %d Slurm task(s) (job %s)%s", len(jobs),
                    len(chunks), str(submitted[0].job_id).split("_")[0],
                    f", starting in {delay} s" if delay else "")

    def _executor(self, delay: int):
        import submitit

        o = self.options
        executor = submitit.SlurmExecutor(folder=self.state_dir / "submitit")
        # submitit always asks Slurm for a SIGUSR2 before the time limit, sent to the task;
        # Slurm may send it up to a minute earlier than asked (sbatch(1)), so under a short
        # limit it can come at once, before the task's Python has set itself to ignore it, and
        # kill the task. It goes to the batch shell alone ("B:"), which ignores it (as does
        # srun, started from it), so the task never sees it: ``signal`` below replaces the
        # one submitit writes.
        params = dict(job_name=o.job_name, time=o.time_min, cpus_per_task=o.cpus_per_task,
                      array_parallelism=o.array_parallelism,
                      setup=["trap '' USR2", *o.setup,
                             f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}"
                             "${PYTHONPATH:+:$PYTHONPATH}"])
        optional = dict(partition=o.partition, account=o.account, qos=o.qos,
                        constraint=o.constraint, mem=o.mem_gb,
                        gpus_per_node=o.gpus_per_task or None)
        params.update({key: value for key, value in optional.items() if value is not None})
        additional = {"signal": f"B:USR2@{min(SIGNAL_DELAY_S, o.time_min * 30)}",
                      **dict(o.additional)}
        if delay:
            additional["begin"] = f"now+{delay}"
        params["additional_parameters"] = additional
        executor.update_parameters(**params)
        return executor

    # ----- files -----------------------------------------------------------------------------

    def _outcome_path(self, token: str) -> Path:
        return self.state_dir / "outcomes" / f"{token}.json"

    def _slurm_log(self, record: Submission) -> Path:
        return self.state_dir / "submitit" / f"{record.task}_0_log.err"

    def _forget(self, record: Submission) -> None:
        self._records.pop(record.token, None)
        self._outcome_path(record.token).unlink(missing_ok=True)

    def _save(self) -> None:
        rows = [asdict(record) for record in self._records.values()]
        write_text_atomic(self.state_dir / STATE_FILE,
                          json.dumps({"submissions": rows}, indent=1))
