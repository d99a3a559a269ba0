"""Where a job's layers are computed: each tensor's eigensolve on the next free device, the
next tensors read meanwhile (``on_devices``), and the CPU threads the estimator takes while a
download bounds the job (``CpuShare``)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from esd_experiment.estimator import lapack as esd_lapack
from esd_experiment.estimator.options import ESDConfig

if TYPE_CHECKING:  # the estimator (and torch) is imported when a model is analysed
    from esd_experiment.estimator.net_esd import LayerResult
    from esd_experiment.formats.stream import ShardFetcher

logger = logging.getLogger(__name__)


def on_devices(fn: Callable[[object, str], object], items: Iterable,
               devices: Sequence[str]) -> Iterator[tuple[object, object]]:
    """``(item, fn(item, device))`` for each item, in order, each computed on the next free
    device's thread; any exception ``fn`` raises is returned as the value. At most
    ``2 * len(devices)`` items are held at once."""
    todo: queue.Queue = queue.Queue(maxsize=len(devices))
    done: dict[int, object] = {}
    cond = threading.Condition()

    def work(device: str) -> None:
        while (job := todo.get()) is not None:
            index, item = job
            try:
                value = fn(item, device)
            except BaseException as exc:  # handed to the consumer with its item (any: a
                value = exc               # thread that died would leave it waiting forever)
            with cond:
                done[index] = value
                cond.notify_all()

    threads = [threading.Thread(target=work, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    held: dict[int, object] = {}
    next_index, produced = 0, 0
    stream = iter(items)
    try:
        while True:
            while produced - next_index < 2 * len(devices):
                item = next(stream, _END)
                if item is _END:
                    break
                held[produced] = item
                todo.put((produced, item))
                produced += 1
            if next_index == produced:
                return
            with cond:
                cond.wait_for(lambda i=next_index: i in done)
                value = done.pop(next_index)
            yield held.pop(next_index), value
            next_index += 1
    finally:
        # Stop the threads and wait for them: a thread left inside torch when the process
        # exits aborts it (SIGABRT), which would read as a transient failure.
        while True:
            try:
                todo.get_nowait()
            except queue.Empty:
                break
        for _ in threads:
            todo.put(None)
        for t in threads:
            t.join()


_END = object()


def parallel_layer_results(named_tensors: Iterable[tuple], config: ESDConfig,
                           devices: Sequence[str]) -> Iterator[LayerResult]:
    """Like ``net_esd.iter_layer_results``, each tensor on the next free device's thread; rows
    come back in stream order with consecutive ``layer_id``s. The first failure is raised."""
    layer_id = 0
    for _, value in on_devices(lambda item, dev: layer_results(item, config, dev),
                               named_tensors, devices):
        if isinstance(value, BaseException):
            raise value
        for result in value:
            result.row["layer_id"] = layer_id
            layer_id += 1
            yield result


def layer_results(item: tuple, config: ESDConfig, device: str) -> list[LayerResult]:
    """The result rows of one ``(name, tensor, storage)`` on ``device``."""
    from esd_experiment.estimator.net_esd import iter_layer_results

    return list(iter_layer_results([item], replace(config, device=device)))


class CpuShare:
    """The cores the CPU estimator takes while a model streams from the hub.

    While the reader waits for downloads, the network bounds the job and the eigensolver has
    time to spare: it then leaves one core to the download (the HTTP client's thread, and
    whatever else moves the bytes) rather than competing with it for every core. Once the
    reader finds its files already downloaded, or the last one has arrived, the estimator
    takes every core again. Set before each matrix, on the thread that solves it.
    """

    def __init__(self, fetchers: Sequence[ShardFetcher | None]):
        self.fetchers = [f for f in fetchers if f is not None]
        self.full: int | None = None  # the BLAS threads the process started with
        self.current: int | None = None

    def before_solve(self, device: str) -> None:
        if not self.fetchers or device != "cpu":
            return

        if self.full is None:
            self.full = self.current = esd_lapack.blas_threads()
        bound = any(f.network_bound for f in self.fetchers)
        wanted = max(1, self.full - 1) if bound else self.full
        if wanted != self.current:
            esd_lapack.set_blas_threads(wanted)
            logger.debug("BLAS on %d thread(s) while %s", wanted,
                         "the download bounds the job" if bound else "the analysis does")
            self.current = wanted
