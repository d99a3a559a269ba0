"""One cluster task's commands, run on the node that Slurm or Ray gave it.

A task runs its jobs' commands one after another, each in its own session with its output
appended to the job's log (as the local dispatcher does) or, given the runner's worker script,
in a long-lived worker (``task_workers``: the task's models share one process), and records
how each ended in an outcome file (JSON, written atomically) beside the submitting side's
state, so that the outcome outlives the process that submitted it: a rerun collects it.

A SIGTERM or SIGINT (scancel, the time limit, preemption, a Ray cancel) is passed on to the
running command's process group, SIGKILL follows after the grace period, and the commands not
started yet are recorded as not started. SIGUSR2, which submitit asks Slurm to send before
the time limit, goes to the batch shell alone, which ignores it (``backend_slurm``); should it
reach the task all the same, the task and its commands ignore it too (an ignored signal stays
ignored across exec): it would kill the worker early, while Slurm's own SIGTERM at the limit
ends it and marks the task's log with the cause.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from esd_experiment.backends.task_workers import Ending, close_launcher, task_launcher
from esd_experiment.core.paths import write_text_atomic
from gputracker.dispatcher import THREAD_VARS
from gputracker.jobs import Allocation, GroupProcess, Launcher

# Signals that end a task (scancel, time limit, preemption: SIGTERM; a Ray cancel: SIGINT).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Sent by Slurm before the time limit when asked (submitit always asks): ignored.
_WARN_SIGNAL = getattr(signal, "SIGUSR2", None)
# How often a task checks whether its command has exited (the latency a job end may add).
_WAIT_STEP_S = 0.05


@dataclass(frozen=True)
class TaskCommand:
    """One job as it travels to the node: ``argv`` as in ``gputracker.Job`` (a list, or a
    callable given the node's ``Allocation``), extra ``env``, its log and its outcome file
    (None: the outcome only travels back as ``run_commands``' return value), and
    ``timeout``, the seconds it may run (``gputracker.Job.timeout``: SIGTERM to its process
    group, SIGKILL after the grace period; counted from its start on the node, not in the
    queue)."""

    name: str
    argv: Sequence[str] | Callable[[Allocation], Sequence[str]]
    env: Mapping[str, str]
    log_path: Path
    outcome_path: Path | None = None
    timeout: float | None = None

    def command(self, allocation: Allocation) -> list[str]:
        argv = self.argv(allocation) if callable(self.argv) else self.argv
        argv = [str(arg) for arg in argv]
        if not argv:
            raise ValueError(f"job {self.name!r} has an empty command line")
        return argv


@dataclass(frozen=True)
class Outcome:
    """How one command ended on its node. Times are wall-clock (seconds since the epoch).

    ``returncode`` is None when the command never started: ``signal`` then names what stopped
    the task first, ``error`` what kept it from starting. ``timed_out``: the task stopped it
    at its ``timeout``."""

    returncode: int | None
    start: float
    end: float
    host: str
    pid: int = 0
    gpus: tuple[int, ...] = ()
    threads: int | None = None
    signal: str = ""
    error: str = ""
    task: str = field(default="")  # the scheduler's name for the task ("1234_5")
    timed_out: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def read_outcome(path: Path) -> Outcome | None:
    """The outcome recorded at ``path``; None when there is none (yet). Written atomically,
    so a file that exists is complete; one that does not parse is reported, not skipped."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return Outcome(None, 0.0, 0.0, "", error=f"unreadable outcome {path}: {exc}")
    record["gpus"] = tuple(record.get("gpus") or ())
    return Outcome(**record)


def visible_gpus(env: Mapping[str, str]) -> tuple[int, ...]:
    """The GPU indices in ``CUDA_VISIBLE_DEVICES``; () when unset, empty or not indices."""
    value = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    try:
        return tuple(int(part) for part in value.split(",")) if value else ()
    except ValueError:
        return ()  # UUIDs or MIG names: the child still gets the variable as it is


def slurm_task_id(env: Mapping[str, str]) -> str:
    """Slurm's name for the running task (``1234_5`` in an array, ``1234`` otherwise)."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def child_env(command: TaskCommand, gpus: tuple[int, ...] | None, threads: int | None,
              base: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: ``base`` (the node's), the job's own variables, then the
    GPUs (None: leave the scheduler's ``CUDA_VISIBLE_DEVICES`` alone) and thread counts."""
    env = {**base, **command.env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    if threads is not None:
        env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    return env


class _Stopper:
    """Signal handlers that pass a stop on to the running command's process group."""

    def __init__(self, grace_period: float):
        self.grace_period = grace_period
        self.received = ""
        self.current: GroupProcess | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only allows handlers on the main thread; the caller stops us then
        for signum in _STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._stop)
        if _WARN_SIGNAL is not None:
            self._previous[_WARN_SIGNAL] = signal.signal(_WARN_SIGNAL, signal.SIG_IGN)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _stop(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        self.terminate(self.current)

    def terminate(self, handle: GroupProcess | None) -> None:
        if handle is None:
            return
        handle.send_signal(signal.SIGTERM)
        timer = threading.Timer(self.grace_period, handle.send_signal, (signal.SIGKILL,))
        timer.daemon = True
        timer.start()


def run_commands(commands: Sequence[TaskCommand], *, gpus: tuple[int, ...] | None = None,
                 threads: int | None = None, task: str = "", grace_period: float = 10.0,
                 worker_script: Path | None = None) -> list[Outcome]:
    """Run ``commands`` in order on this node; returns how each ended (also recorded in its
    outcome file).

    ``gpus``: the GPUs the scheduler gave the task (None: read ``CUDA_VISIBLE_DEVICES`` and
    leave it as it is); ``threads``: the thread count for a CPU-only task; ``task``: the
    scheduler's name for it (default: Slurm's, from the environment), recorded in each
    outcome and log header; ``worker_script``: the commands ``[python, worker_script, ...]``
    run in long-lived workers (``task_workers``), the others in a process each.
    """
    stopper = _Stopper(grace_period)
    stopper.install()
    host = socket.gethostname()
    task = task or slurm_task_id(os.environ)
    launcher = task_launcher(worker_script)
    try:
        outcomes = []
        for command in commands:
            if stopper.received:
                now = time.time()
                outcomes.append(_record(command, Outcome(None, now, now, host,
                                                         signal=stopper.received, task=task)))
                continue
            outcomes.append(_run_one(command, gpus, threads, task, host, stopper, launcher))
        return outcomes
    finally:
        close_launcher(launcher)
        stopper.restore()


def _run_one(command: TaskCommand, gpus: tuple[int, ...] | None, threads: int | None,
             task: str, host: str, stopper: _Stopper, launcher: Launcher) -> Outcome:
    start = time.time()
    given = visible_gpus(os.environ) if gpus is None else gpus
    try:
        argv = command.command(Allocation(given, threads))
        env = child_env(command, gpus, threads, os.environ)
        command.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(command.log_path, "a", encoding="utf-8") as log:
            log.write(f"# task {task or '-'} on {host}\n")
        handle = launcher(argv, env, command.log_path)
    except (OSError, ValueError) as exc:
        return _record(command, Outcome(None, start, time.time(), host, gpus=given,
                                        threads=threads, task=task,
                                        error=f"could not start {command.name}: {exc}"))
    stopper.current = handle
    # A job in a long-lived worker ends when the worker reports it, not when a process exits.
    ending = None if isinstance(handle, GroupProcess) else Ending(handle)
    code: int | None = None
    timed_out = False
    try:
        deadline = None if command.timeout is None else start + command.timeout
        code = _wait(handle, deadline) if ending is None else ending.wait(deadline)
        if code is None:  # past its timeout: stopped as a scancel stops the task
            timed_out = True
            stopper.terminate(handle)
            code = _wait(handle) if ending is None else ending.wait()
    except BaseException:  # a Ray cancel (KeyboardInterrupt): the command must not outlive us
        stopper.terminate(handle)
        code = handle.wait() if ending is None else ending.wait()
        raise
    finally:
        stopper.current = None
        outcome = _record(command, Outcome(code, start, time.time(), host, pid=handle.pid,
                                           gpus=given, threads=threads, task=task,
                                           signal=stopper.received, timed_out=timed_out))
    return outcome


def _wait(handle: GroupProcess, deadline: float | None = None) -> int | None:
    """``handle.wait()``, entered only once the command has exited: until then the wait is
    a sleep loop, because a Ray cancel arrives as a Python-level interrupt that a thread
    blocked in a system call would not see. None once ``deadline`` (``time.time()``) has
    passed with the command still running."""
    while True:
        try:
            if os.waitid(os.P_PID, handle.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG):
                break
        except ChildProcessError:
            break
        if deadline is not None and time.time() >= deadline:
            return None
        time.sleep(_WAIT_STEP_S)
    return handle.wait()


def _record(command: TaskCommand, outcome: Outcome) -> Outcome:
    if command.outcome_path is not None:
        command.outcome_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(command.outcome_path, outcome.to_json())
    return outcome
