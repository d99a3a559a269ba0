"""Hub downloads in a process of their own, forked from the worker, so that the HTTP client
does not share the worker's interpreter lock with the analysis.

The client takes the lock for every socket read (16 KiB over HTTPS, a TLS record each): a
200 MB shard is about 12,000 hand-offs, each of which stalls the thread that imports torch
or runs the estimator's Python while the download goes on. A forked process pays no import
again (it is a copy of the worker with huggingface_hub loaded) and runs one call,
``hf_hub_download``; everything else stays in the worker: the cache lookup, the records
``--cleanup_cache`` keeps, the refs, the reading of a file while it grows.

One download at a time, as the shard fetcher asks for them. The process sends back three
kinds of message: ``growing`` (the temporary file the download writes, which the worker opens
before the download goes on), ``done`` (the file's path in the cache) and ``error`` (the
failure as the project's error, mapped where the whole exception is, with its cause, and
free of tokens). It ends with the worker: when its pipe closes, and through the kernel's
parent-death signal when the worker is killed.

``ESD_DOWNLOAD_PROCESS=0`` keeps downloads on a thread of the worker (platforms without
``fork``, or a debugger that must see them).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from esd_experiment.core.errors import TransientError

logger = logging.getLogger(__name__)

ENV_SWITCH = "ESD_DOWNLOAD_PROCESS"
_FALSE = {"0", "false", "no", "off"}
# Seconds a new download process has to say it is ready: a fork and the closing of the HTTP
# client take milliseconds; one stuck on a lock copied from the worker never is.
START_WAIT_S = 10.0
# Seconds the worker waits, once it closes the pipe, for an idle download process to exit
# before it kills it (one in the middle of a download is killed: nothing waits for it).
EXIT_WAIT_S = 2.0
# How often a download process checks that the worker is alive, where the kernel's
# parent-death signal is not available.
PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1
CLOSED = "the job's download process was closed"


def enabled() -> bool:
    """Whether downloads may run in a process of their own here: ``fork`` is there (Linux;
    macOS's system libraries are not safe to use in a forked child) and not switched off."""
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return False
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _FALSE


@dataclass(frozen=True)
class Request:
    """One ``hf_hub_download`` call, and what the process needs to report it."""

    repo_id: str
    filename: str
    revision: str
    cache_dir: str | None
    token: str | None
    label: str                 # names the file in an error: "org/model@rev (file)"
    blobs: str | None = None   # the repository's blobs folder, where a growing file is found
    etag: str | None = None


class DownloadProcess:
    """A forked process that runs one hub download at a time for this worker.

    Fork it from the thread that lives as long as the process (the main thread: the kernel's
    parent-death signal follows the thread that forked) and while no other thread of the
    worker is inside huggingface_hub (its fork hook closes the HTTP client, which takes the
    client's locks). A process that does not say it is ready within ``START_WAIT_S`` (stuck
    on such a lock) is killed, and ``OSError`` raised: the caller downloads on a thread.
    """

    def __init__(self) -> None:
        from multiprocessing import Pipe

        ours, theirs = Pipe()
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the download process: never returns into the worker's code
            code = 0
            try:
                ours.close()
                _drop_inherited(keep=theirs.fileno())
                _end_with(parent)
                theirs.send("ready")
                _serve(theirs)
            except BaseException:  # noqa: BLE001  (the worker sees the pipe close)
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._conn = ours
        self._lock = threading.Lock()
        self._ended: str | None = None  # why the process can no longer download
        try:
            ready = ours.poll(START_WAIT_S) and ours.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._ended = CLOSED
            ours.close()
            self._reap(kill=True)
            raise OSError(f"the download process did not start within {START_WAIT_S:g} s")
        logger.debug("download process %d started", pid)

    def download(self, request: Request,
                 on_growing: Callable[[Path], object] | None = None) -> Path:
        """The file ``request`` names, downloaded by the process; ``on_growing`` gets the
        file it writes as soon as it starts (the process waits until the worker has it). A
        failure of the download is raised as the process reported it; a process gone
        (killed, or closed with the job) as ``TransientError``."""
        with self._lock:
            if self._ended is not None:
                raise TransientError(f"{request.label}: {self._ended}")
            kind, value = self._exchange(request, on_growing)
        if kind == "done":
            return Path(value)
        if kind == "error":
            raise value
        raise TransientError(f"{request.label}: {value}") from None

    def _exchange(self, request: Request, on_growing) -> tuple[str, object]:
        """Send ``request`` and read the process's messages up to its answer (under the
        lock): ``("done", path)``, ``("error", exception)`` or ``("ended", why)``."""
        answered = False  # left before the process's answer: the pipe is out of step
        try:
            self._conn.send((request, on_growing is not None))
            while True:
                kind, value = self._conn.recv()
                if kind != "growing":
                    answered = True
                    return kind, value
                self._hand_over(on_growing, Path(value))
        except (EOFError, OSError):  # the pipe: the process is gone
            answered = True
            self._ended = f"the download process ended ({self._reap()})"
            self._conn.close()
            return "ended", self._ended
        finally:
            if not answered and self._ended is None:
                self._ended = "a download was interrupted before the process answered"

    def _hand_over(self, on_growing: Callable[[Path], object], path: Path) -> None:
        """Give the growing file to the worker's reader, then let the download go on. A
        reader that cannot take it reads the file once whole; the download goes on alike."""
        try:
            on_growing(path)
        except Exception as exc:  # noqa: BLE001
            logger.debug("the growing file %s could not be handed over: %s", path, exc)
        finally:
            self._conn.send("opened")

    def _reap(self, kill: bool = False, wait_s: float = EXIT_WAIT_S) -> str:
        """Wait up to ``wait_s`` for the process to end (killing it first with ``kill``, or
        once the wait is over), and say how it ended. A killed process's pipe closes a
        moment before it can be reaped."""
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return "exit status unknown"
            if pid:
                break
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                _, status = os.waitpid(self.pid, 0)
                return "stuck, killed"
            time.sleep(0.005)
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit code {os.waitstatus_to_exitcode(status)}"

    def close(self) -> None:
        """End the process: idle, it exits when it reads the pipe's end (killed if it does
        not within ``EXIT_WAIT_S``); in the middle of a download, which nothing waits for once
        the job ends, it is killed (the thread that waits for that download gets an error).
        Downloads asked for from now on are refused."""
        idle = self._lock.acquire(blocking=False)
        try:
            if self._ended == CLOSED:
                return
            ended, self._ended = self._ended, CLOSED
            if idle:
                self._conn.close()
        finally:
            if idle:
                self._lock.release()
        if ended is None or not ended.startswith("the download process ended"):
            self._reap(kill=not idle)


def _drop_inherited(keep: int) -> None:
    """Close every descriptor the worker had open but stdio and ``keep``: a lease's ``flock``
    that the worker releases by closing its descriptor must not live on in a copy here (nor a
    listening socket, nor a file the worker deletes). The objects copied from the worker
    are first frozen out of the garbage collector, so that none of their finalizers closes a
    descriptor number this process has since reused."""
    gc.freeze()
    os.closerange(3, keep)
    os.closerange(keep + 1, max(keep + 1, os.sysconf("SC_OPEN_MAX")))


def _serve(conn) -> None:
    """The download process's loop: one request, its messages, until the pipe closes."""
    while True:
        try:
            request, growing = conn.recv()
        except (EOFError, OSError):
            return
        try:
            path = _download(conn, request, growing)
        except Exception as exc:  # noqa: BLE001  (sent to the worker, which raises it)
            conn.send(("error", _portable(exc, request)))
        else:
            conn.send(("done", str(path)))


def _end_with(parent: int) -> None:
    """Die with the worker: the kernel's parent-death signal, else a polling thread."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def poll() -> None:
            while os.getppid() == parent:
                time.sleep(PARENT_POLL_S)
            os._exit(1)

        threading.Thread(target=poll, name="worker-watch", daemon=True).start()
    if os.getppid() != parent:  # the worker died before the signal was asked for
        os._exit(1)


def _download(conn, request: Request, growing: bool) -> Path:
    from esd_experiment.hub.client import fetch

    def hand_over(path: Path) -> None:
        conn.send(("growing", str(path)))
        conn.recv()  # the worker has opened it: the download may go on, and end

    return fetch(request.repo_id, request.filename, request.revision, request.cache_dir,
                 request.token, blobs=Path(request.blobs) if request.blobs else None,
                 etag=request.etag, on_growing=hand_over if growing else None)


def _portable(exc: Exception, request: Request) -> Exception:
    """``exc`` as the worker can receive it: mapped to the project's error here, where its
    causes are (whether the network failed is read along them); otherwise the exception
    itself if it survives pickling, else its type and text."""
    from esd_experiment.hub.client import hub_error, scrub

    mapped = hub_error(exc, request.label, False, request.token)
    try:
        return pickle.loads(pickle.dumps(mapped))
    except Exception:  # noqa: BLE001  (an exception holding a response, a lock, ...)
        text = scrub(f"{type(exc).__name__}: {exc}", request.token)
        return RuntimeError(f"{request.label}: {' '.join(text.split())[:600]}")
