"""Jobs, their results, and the default process launcher.

A job is one command line with its own log file. The launcher starts it in a new session
(its own process group), so a signal sent to the job reaches every process the job spawned,
and a Ctrl-C typed at the runner's terminal reaches only the runner, which then stops the jobs.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# How much of the log's end is read per step when looking for the last lines.
_TAIL_CHUNK = 64 * 1024


def _line_breaks(data: bytes) -> int:
    return data.count(b"\n") + data.count(b"\r")


@dataclass(frozen=True)
class Allocation:
    """What one job was given: its GPUs (empty in CPU mode) and, in CPU mode, its thread count."""

    gpus: tuple[int, ...]
    threads: int | None


@dataclass(frozen=True)
class Job:
    """One command to run.

    ``argv`` is a list of strings, or a callable that receives the job's ``Allocation`` and
    returns one (to put the GPU ids or the thread count on the command line).
    ``env`` holds extra variables for the child; the dispatcher's own variables
    (``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER`` and, in CPU mode, the thread counts)
    take precedence. ``not_before`` is a time on the dispatcher's clock
    (``Dispatcher.now()``) before which the job is not started; ``timeout`` bounds how long
    one run may take (the job's process group then gets SIGTERM, SIGKILL after the grace
    period, and its result says ``timed_out``). ``attempt`` and ``payload``
    are the caller's: the dispatcher only carries them to the ``JobResult``.
    """

    name: str
    argv: Sequence[str] | Callable[[Allocation], Sequence[str]]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    not_before: float | None = None
    attempt: int = 1
    payload: object = None
    timeout: float | None = None  # seconds a run may take; then SIGTERM, SIGKILL after grace

    def __post_init__(self):
        object.__setattr__(self, "log_path", Path(self.log_path))
        if isinstance(self.argv, (str, bytes)):
            raise ValueError(f"job {self.name!r}: argv must be a list of arguments, not a string")
        if not callable(self.argv) and len(self.argv) == 0:
            raise ValueError(f"job {self.name!r} has an empty command line")

    def command(self, allocation: Allocation) -> list[str]:
        """The command line to run with ``allocation``."""
        argv = self.argv(allocation) if callable(self.argv) else self.argv
        argv = [str(arg) for arg in argv]
        if not argv:
            raise ValueError(f"job {self.name!r}: its argv builder returned an empty command line")
        return argv


@dataclass(frozen=True)
class JobResult:
    """How one run of one job ended. ``start``/``end`` are on the dispatcher's clock,
    ``started_at`` is wall-clock time (seconds since the epoch). ``returncode`` is negative
    when a signal ended the job (``-9``: SIGKILL). ``stopped`` marks jobs the dispatcher
    itself terminated because it was stopped. ``detail`` is what a cluster backend knows
    beyond the exit code (``Slurm cancelled the task at its time limit``)."""

    job: Job
    returncode: int
    gpus: tuple[int, ...]
    threads: int | None
    pid: int
    start: float
    end: float
    started_at: float
    log_path: Path
    stopped: bool = False
    detail: str = ""
    timed_out: bool = False

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.stopped

    @property
    def duration(self) -> float:
        return self.end - self.start

    def describe(self) -> str:
        """``exit code 3`` or ``killed by SIGTERM``, plus ``(stopped by the dispatcher)`` and
        the backend's ``detail``."""
        if self.returncode < 0:
            try:
                text = f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                text = f"killed by signal {-self.returncode}"
        else:
            text = f"exit code {self.returncode}"
        text += " (stopped by the dispatcher)" if self.stopped else ""
        if self.timed_out:
            text += f" (timed out after {self.job.timeout:g} s)"
        return f"{text}: {self.detail}" if self.detail else text

    def tail(self, n_lines: int = 20) -> list[str]:
        """The last ``n_lines`` lines of the job's log, without line ends."""
        if n_lines < 1:
            raise ValueError(f"n_lines must be at least 1, got {n_lines}")
        with open(self.log_path, "rb") as f:
            pos = f.seek(0, os.SEEK_END)
            data = b""
            while pos > 0 and _line_breaks(data.rstrip(b"\r\n")) < n_lines:
                step = min(_TAIL_CHUNK, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
        # splitlines() also splits on the carriage returns progress bars write.
        return data.decode("utf-8", errors="replace").splitlines()[-n_lines:]


class ProcessHandle(Protocol):
    """What the dispatcher needs from a started job."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...

    def send_signal(self, signum: int) -> None: ...


Launcher = Callable[[Sequence[str], Mapping[str, str], Path], ProcessHandle]


class GroupProcess:
    """A child started in its own session; signals go to its whole process group."""

    def __init__(self, popen: subprocess.Popen):
        self._popen = popen
        self.pid = popen.pid

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self) -> int:
        """Wait for the child to exit, kill what it left in its process group, then reap it.

        Until it is reaped, the exited child keeps its pid, and so its group id, reserved:
        the group can be killed without hitting an unrelated process. Background processes a
        job leaves behind would otherwise keep holding the GPU that is about to be granted
        to the next job.
        """
        if self._popen.returncode is None:
            try:
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
                os.killpg(self.pid, signal.SIGKILL)
            except (ChildProcessError, ProcessLookupError):
                pass  # reaped by a poll() meanwhile; its group cannot be addressed safely
        return self._popen.wait()

    def send_signal(self, signum: int) -> None:
        # The group id is the child's pid (setsid). Once the child is reaped its pid may be
        # reused, so the group is only signalled while the child is known to be unreaped.
        if self._popen.returncode is not None:
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass  # the whole group has already exited


def open_log(log_path: Path, argv: Sequence[str], env: Mapping[str, str], note: str = ""):
    """``log_path`` opened for appending, its parent made, with the run's header line written:
    the time, the GPUs and the command line (and ``note``, such as the worker that runs it)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    header = (
        f"# {stamp} start{note}: CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r} "
        f"{shlex.join(argv)}\n"
    )
    log = open(log_path, "ab")  # noqa: SIM115  (the caller closes it)
    log.write(header.encode())
    log.flush()
    return log


def launch_in_session(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> GroupProcess:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``.

    A header line with the time, the GPUs and the command line opens each run's output.
    """
    with open_log(log_path, argv, env) as log:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    return GroupProcess(popen)


class StopState:
    """Why a backend stopped: the part of the backend interface (``stopped``,
    ``stop_reason``, ``stop_signum``) that the local dispatcher and the cluster backends
    share. The first ``_note_stop`` wins; a stopped backend stays stopped."""

    _stop_reason: str | None = None
    _stop_signum: int | None = None

    @property
    def stopped(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @property
    def stop_signum(self) -> int | None:
        """The signal that stopped the backend (``install_signal_handlers``), if any."""
        return self._stop_signum

    def _note_stop(self, reason: str, signum: int | None) -> None:
        if self._stop_reason is None:
            self._stop_signum, self._stop_reason = signum, reason
