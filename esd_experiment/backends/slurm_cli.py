"""Slurm's command-line tools as the Slurm backend uses them: squeue, scontrol, sacct, scancel.

Every call goes through one ``SlurmCLI`` object (the commands are its ``run`` parameter, so a
test can count or refuse them). How a task ended is read, in order of trust, from
``scontrol show job`` (slurmctld remembers finished jobs for ``MinJobAge``, 300 s by
default), from ``sacct`` (where accounting is on), and from the task's own Slurm log, where
slurmstepd writes ``*** JOB 12 ON node CANCELLED AT ... DUE TO TIME LIMIT ***``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from esd_experiment.core.errors import InputError, TransientError

logger = logging.getLogger(__name__)

# A scheduler command that does not answer within this is treated as a failed query.
COMMAND_TIMEOUT_S = 60.0
# How much of a task's Slurm log is read for its cause and quoted in a failure.
LOG_TAIL_BYTES = 16 * 1024
# Task states in which a task is still queued or running (squeue's long names).
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                           "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING",
                           "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
# States in which Slurm itself ended the task; what happened, in words.
SCHEDULER_ENDED = {
    "TIMEOUT": "Slurm ended the task at its time limit",
    "CANCELLED": "the task was cancelled (scancel)",
    "PREEMPTED": "Slurm preempted the task",
    "NODE_FAIL": "the task's node failed",
    "BOOT_FAIL": "the task's node failed to boot",
    "DEADLINE": "the task reached its deadline",
    "OUT_OF_MEMORY": "Slurm killed the task for exceeding its memory (--slurm_mem_gb)",
}
_CANCEL_LINE = re.compile(r"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+(?: DUE TO ([A-Z ]+?))? \*\*\*")
_DUE_TO = {"TIME LIMIT": "TIMEOUT", "PREEMPTION": "PREEMPTED", "NODE FAILURE": "NODE_FAIL"}
_OOM_LINE = re.compile(r"oom[-_ ]kill", re.IGNORECASE)
# sbatch messages that mean Slurm could not be reached, not that the request is wrong.
_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out",
                "temporarily unable", "Communication connection failure")

Run = Callable[[Sequence[str]], subprocess.CompletedProcess]
# A GRES list as sinfo's %G prints it: "gpu:2", "gpu:a100:4(S:0-1),shard:8", "(null)".
_GRES_PLACES = re.compile(r"\([^)]*\)")


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, check=False)


@dataclass(frozen=True)
class TaskState:
    """What Slurm says about a task that left the queue: ``state`` as squeue/sacct name it
    (``TIMEOUT``, ``CANCELLED``, ``FAILED``, ...), ``reason`` and ``exit_code`` (``0:53``)."""

    state: str
    reason: str = ""
    exit_code: str = ""
    source: str = ""

    @property
    def ended_by_scheduler(self) -> bool:
        return self.state in SCHEDULER_ENDED

    @property
    def killed_by(self) -> int | None:
        """The signal that ended the task's script, from ``exit_code`` (``0:9``, or a shell's
        ``137:0`` for a child killed by signal 9), or None."""
        code, _, sig = self.exit_code.partition(":")
        if sig.isdigit() and int(sig):
            return int(sig)
        if code.isdigit() and 128 < int(code) < 128 + 65:
            return int(code) - 128
        return None


def require_sbatch() -> None:
    """InputError naming the missing tool when Slurm's commands are not on PATH."""
    missing = [tool for tool in ("sbatch", "squeue", "scancel", "srun") if not shutil.which(tool)]
    if missing:
        raise InputError(f"--backend slurm needs Slurm's {', '.join(missing)} on PATH, and "
                         f"{'it is' if len(missing) == 1 else 'they are'} not: run on a login "
                         "node of the cluster (or load its Slurm module)")


def submission_error(message: str) -> Exception:
    """sbatch refused a submission: an InputError carrying its message (unknown partition,
    account, QOS, a request no node can satisfy), or a TransientError when Slurm was down."""
    text = " ".join(message.split()) or "sbatch failed without a message"
    if any(marker.lower() in text.lower() for marker in _UNREACHABLE):
        return TransientError(f"Slurm could not be reached; nothing was submitted: {text}")
    return InputError(f"sbatch refused the jobs; nothing was submitted: {text}")


class SlurmCLI:
    def __init__(self, run: Run = run_command):
        self._run = run

    def queued(self, tasks: Iterable[str]) -> dict[str, str]:
        """The tasks among ``tasks`` (``1234_5`` or ``1234``) still in the queue: id -> state.

        Raises TransientError when squeue fails: a task must not be taken for finished
        because the controller did not answer."""
        tasks = sorted(set(tasks))
        if not tasks:
            return {}
        jobs = sorted({task.split("_")[0] for task in tasks})
        proc = self._run(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i|%T"])
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return {}  # every one of them has left the queue
            raise TransientError(f"squeue failed ({proc.returncode}): {proc.stderr.strip()}")
        listed = dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)
        return {task: listed[task] for task in tasks
                if task in listed and listed[task] in ACTIVE_STATES}

    def final_state(self, task: str, log: Path | None) -> TaskState | None:
        """How a task that left the queue ended, from scontrol, sacct or its Slurm log."""
        return self._scontrol(task) or self._sacct(task) or cause_from_log(log)

    def _scontrol(self, task: str) -> TaskState | None:
        try:
            proc = self._run(["scontrol", "-o", "show", "job", task])
        except (OSError, subprocess.TimeoutExpired):
            return None
        fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}
        if "JobState" not in fields:
            return None
        return TaskState(fields["JobState"], fields.get("Reason", ""),
                         fields.get("ExitCode", ""), "scontrol")

    def _sacct(self, task: str) -> TaskState | None:
        if not shutil.which("sacct"):
            return None
        try:
            proc = self._run(["sacct", "-n", "-X", "-P", "-j", task, "-o", "State,ExitCode,Reason"])
        except (OSError, subprocess.TimeoutExpired):
            return None
        lines = [line for line in proc.stdout.splitlines() if "|" in line]
        if proc.returncode != 0 or not lines:
            return None  # accounting off ("Slurm accounting storage is disabled")
        state, exit_code, reason = (lines[-1].split("|") + ["", ""])[:3]
        # "CANCELLED by 1000" -> CANCELLED
        return TaskState(state.split()[0] if state else "", reason, exit_code, "sacct")

    def partition_gpus(self, partition: str | None) -> int | None:
        """The most GPUs (``gpu`` GRES) one node of ``partition`` has (None: the cluster's
        default partition); None when sinfo cannot say (no such partition, no answer)."""
        argv = ["sinfo", "-h", "-o", "%P|%G", *(["-p", partition] if partition else [])]
        try:
            proc = self._run(argv)
        except (OSError, subprocess.TimeoutExpired):
            return None
        counts = [gpu_count(gres) for name, sep, gres in
                  (line.partition("|") for line in proc.stdout.splitlines())
                  if sep and (partition or name.endswith("*"))]
        return max(counts) if proc.returncode == 0 and counts else None

    def cancel(self, tasks: Iterable[str]) -> None:
        tasks = sorted(set(tasks))
        if tasks:
            proc = self._run(["scancel", *tasks])
            if proc.returncode != 0:
                logger.error("scancel %s failed: %s", " ".join(tasks), proc.stderr.strip())


def gpu_count(gres: str) -> int:
    """GPUs in one node's GRES list: ``gpu:a100:4(S:0-1),shard:8`` -> 4 (a bare ``gpu`` is
    one); 0 for ``(null)`` or a list without GPUs."""
    total = 0
    for item in _GRES_PLACES.sub("", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def read_tail(path: Path | None, limit: int = LOG_TAIL_BYTES) -> str:
    """The end of a log, or "" when it does not exist or cannot be read."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def cause_from_log(path: Path | None) -> TaskState | None:
    """The cancellation slurmstepd wrote into the task's log, if any."""
    text = read_tail(path)
    matches = _CANCEL_LINE.findall(text)
    if matches:
        due = matches[-1].strip()
        return TaskState(_DUE_TO.get(due, "CANCELLED"), due, "", "log")
    if _OOM_LINE.search(text):
        return TaskState("OUT_OF_MEMORY", "", "", "log")
    return None


def last_lines(path: Path | None, count: int = 3) -> str:
    lines = [line.strip() for line in read_tail(path).splitlines() if line.strip()]
    return " | ".join(lines[-count:])
