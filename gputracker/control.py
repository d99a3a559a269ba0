"""Running the dispatcher beside the caller: a thread wrapper and signal handlers.

``install_signal_handlers`` turns SIGINT/SIGTERM into ``Dispatcher.stop()``; the handler only
sets flags, and ``run()`` (on whichever thread runs it) does the killing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Sequence

from gputracker.dispatcher import Dispatcher, OnFinish
from gputracker.jobs import Job, JobResult


class DispatchThread(threading.Thread):
    """Runs ``dispatcher.run(jobs, on_finish)`` on its own thread.

    Use it as a context manager: leaving the block waits for the thread; leaving it by an
    exception first stops the dispatcher, so no job outlives the block.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        jobs: Iterable[Job] = (),
        on_finish: OnFinish | None = None,
        name: str = "gputracker-dispatch",
    ):
        super().__init__(name=name)
        self.dispatcher = dispatcher
        self._jobs = list(jobs)
        self._on_finish = on_finish
        self.results: list[JobResult] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.results = self.dispatcher.run(self._jobs, self._on_finish)
        except BaseException as exc:  # re-raised on the caller's thread by result()
            self.error = exc

    def submit(self, job: Job) -> None:
        self.dispatcher.submit(job)

    def stop(self, reason: str = "stop requested", timeout: float | None = None) -> None:
        """Stop the dispatcher and wait for its thread (the jobs are gone when this returns)."""
        self.dispatcher.stop(reason)
        self.join(timeout)

    def result(self, timeout: float | None = None) -> list[JobResult]:
        """Wait for the run; its results, or the exception it raised."""
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"dispatch still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.results

    def __enter__(self) -> DispatchThread:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.is_alive():
            self.stop(f"leaving the DispatchThread block on {exc_type.__name__}")
        self.join()


def install_signal_handlers(
    dispatcher: Dispatcher, signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)
) -> Callable[[], None]:
    """Make SIGINT/SIGTERM stop ``dispatcher``; a second signal skips the grace period.

    Call it from the main thread. The handler only sets flags; ``run()`` (on whichever
    thread runs it) does the killing and returns; ``dispatcher.stop_signum`` is the signal.
    Returns a function that puts the previous handlers back.
    """
    received = []

    def handler(signum, frame):
        received.append(signum)
        dispatcher.stop(f"received {signal.Signals(signum).name}", signum, force=len(received) > 1)

    previous = {signum: signal.signal(signum, handler) for signum in signums}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore
