"""The worker side of a pooled job slot: a long-lived process that runs one job after another.

``serve(main, result_fd)`` reads jobs from stdin (the jobs themselves see /dev/null there),
one JSON line each (``{"argv": [...], "log": "<path>"}``), and runs ``main(argv)`` in this process with its stdout and stderr (the
file descriptors 1 and 2, so C libraries' output too) appended to the job's log for the
job's duration. After each job it writes ``{"status": <exit code>, "rss_mb": <resident
MB>}`` to ``result_fd`` and puts back what a job may have changed in the process: the
working directory, the environment, the root logger's handlers and level. When stdin ends
(the dispatcher retired the worker, or the dispatcher is gone) it returns 0. A worker whose
dispatcher dies while a job runs (a cluster task killed by the OOM killer or ``kill -9``)
exits within ``PARENT_POLL_S``: nobody would read its job's status, and a retry elsewhere
would run beside it.

The exit code of a job is ``main``'s return value, or the ``SystemExit`` code it raised, or
1 for any other exception (its traceback goes to the job's log). A job that ends the process
(``os._exit``, a signal, a segfault) writes no status: the dispatcher reads the process's own
exit status instead, as for a job run in a process of its own. See docs/workers.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

Main = Callable[[Sequence[str]], int | None]
# Seconds between checks that the process which started the worker is still its parent.
PARENT_POLL_S = 1.0
# The exit status of a worker whose dispatcher is gone (EX_TEMPFAIL: nobody reads it).
ORPHANED = 75


def exit_code(value: object) -> int:
    """``SystemExit``'s rules: None is 0, an int is itself, anything else is printed and 1."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def output_to(path: Path | None) -> None:
    """Point file descriptors 1 and 2 at ``path`` (appended), or at /dev/null for None."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def run_one(main: Main, argv: Sequence[str], log: Path) -> int:
    """Run one job with its output in ``log``; its exit code."""
    output_to(log)
    try:
        return exit_code(main(list(argv)))
    except SystemExit as exc:
        return exit_code(exc.code)
    except BaseException:  # noqa: BLE001  (the job fails, the worker reports it)
        traceback.print_exc()
        return 1
    finally:
        output_to(None)


def resident_mb() -> float:
    """This process's resident set now (not its peak), in MB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_memory() -> None:
    """Give back what the last job left: Python garbage, torch's cached CUDA blocks (only
    when the job used CUDA: the check does not start CUDA), and free heap pages.

    What survives the collection (the modules the jobs imported, their caches) is frozen out
    of later collections: a full collection over torch's and transformers' objects costs
    0.1-0.2 s a job, while the next job's garbage is all new. An object frozen here that
    later becomes garbage in a cycle stays; the worker's MAX_JOBS and MAX_RSS_MB bound that."""
    gc.collect()
    gc.freeze()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _ProcessState:
    """What a job may change in the process and the next job must not see."""

    def __init__(self):
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        root = logging.getLogger()
        self.handlers, self.level = list(root.handlers), root.level

    def restore(self) -> None:
        os.chdir(self.cwd)
        if dict(os.environ) != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        root = logging.getLogger()
        for handler in root.handlers:
            if handler not in self.handlers:
                root.removeHandler(handler)
                handler.close()
        root.handlers = list(self.handlers)
        root.setLevel(self.level)


def _exit_when_orphaned(parent: int) -> None:
    """Leave the process (``os._exit``) once ``parent`` is no longer its parent."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        print(f"worker {os.getpid()}: the process that started it (pid {parent}) is gone; "
              "stopping", file=sys.stderr, flush=True)
        os._exit(ORPHANED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(main: Main, result_fd: int) -> int:
    """Run the jobs read from stdin until it ends; see the module doc."""
    results = os.fdopen(result_fd, "w", buffering=1)
    # Jobs come in on a descriptor of their own; a job that reads stdin reads /dev/null, as
    # it would in a process of its own, not the jobs after it.
    jobs = os.fdopen(os.dup(0), "r")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    state = _ProcessState()
    output_to(None)
    _exit_when_orphaned(os.getppid())
    for line in jobs:
        job = json.loads(line)
        status = run_one(main, job["argv"], Path(job["log"]))
        state.restore()
        release_memory()
        results.write(json.dumps({"status": status, "rss_mb": resident_mb()}) + "\n")
    return 0
