"""Streaming the tensors of opened models: shards fetched ahead, each read once for every
model that needs it, released as soon as it is done.

``ShardFetcher`` hands out a checkpoint's files in reading order, downloading them in the
background ahead of the reader, so the analysis of one shard overlaps the download of the
next; under --cleanup_cache, where each is deleted once read, it keeps at most two shards on
disk at once (the one read and the next). A download that writes its file in order hands the
file over as it grows (``read_growing``), so the tensors at a shard's start are read, and
analysed, while the rest of it downloads. Under --cleanup_cache, a shard downloaded ahead of
the reader may wait in memory rather than on disk (up to ``AHEAD_MEMORY_BYTES`` in all), so
the downloads go on while the analysis catches up.

``stream_models(models)`` reads every base checkpoint once, whatever number of models (a base
and its adapters) are computed from it: each base tensor is read, then handed to each model,
which yields its own tensor (the base's, or the base merged with the adapter's delta). A model
that fails is reported once (``StreamItem.error``) and dropped; the others go on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esd_experiment.formats.checkpoint import natural_key, read_range

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Files held at once while streaming with --cleanup_cache (downloaded or downloading, not yet
# released): the one being read and the next one, which downloads meanwhile.
MAX_HELD = 2
# How often a reader waiting for the bytes of a tensor checks the file that downloads them
# (huggingface_hub writes 10 MB at a time: tens of milliseconds at hub speeds).
GROWING_POLL_S = 0.02
# Under --cleanup_cache, the bytes of downloaded shards the reader has not reached yet that a
# stream may hold in memory in place of the disk, when the next download waits for a slot:
# the memory it may add to keep the network busy. Small shards (tens of MB) arrive two by
# two during the worker's start-up; without it the network would then idle until the first
# is analysed. A shard larger than this waits on disk as before.
AHEAD_MEMORY_BYTES = 256 << 20


class ShardFetcher:
    """A checkpoint's files, fetched in ``order`` ahead of the reader, from the moment the
    fetcher is made: back to back, or, with ``max_held`` (``MAX_HELD`` under --cleanup_cache,
    where each file is deleted once read), as soon as fewer than that many files are held.

    ``download(file)`` returns a file's local path (fetching it); ``release(file)`` is called
    once the reader is done with it (deleting it under ``--cleanup_cache``). ``waiting()``
    gives a context the fetcher enters while the reader has to wait for a download (the
    worker reports its stage as ``download`` then). Downloads run on one background thread.
    ``network_bound`` says whether the network is what the reader waits for now.

    With ``memory`` (bytes) and ``max_held``, when the next download waits for a slot, a file
    that is whole and that the reader has not asked for yet is moved to memory (read, then
    released on disk) if it fits: its reads are then served from memory. Only the files named
    by ``in_memory_ok`` move, those the reader reads with ``read_growing`` alone.
    """

    def __init__(self, order: Sequence[str], download: Callable[..., Path],
                 release: Callable[[str], object] | None = None,
                 waiting: Callable[[], AbstractContextManager] = nullcontext,
                 max_held: int | None = MAX_HELD, growing: bool = False, memory: int = 0,
                 start: bool = True):
        self.order = list(order)
        # Without ``start`` nothing downloads until ``reorder`` gives the reader's order, or
        # the reader asks for a file.
        self._idle = not start
        self.max_held = max_held
        self.memory = memory
        self._movable: set[str] = set()     # files the reader can read from memory
        self._in_memory: dict[str, bytearray] = {}
        self._moving: dict[str, int] = {}   # being read into memory now: {file: size}
        self._asked_for: set[str] = set()   # files the reader has asked for
        self._movers: list[threading.Thread] = []
        self._download, self._release, self._waiting = download, release, waiting
        # With ``growing``, download(file, on_growing) may hand over the file it writes in
        # order while it downloads (``read_growing`` reads from it): {file: open descriptor}
        self._growing_ok = growing
        self._growing: dict[str, int] = {}
        self._futures: dict[str, Future] = {}
        self._released: set[str] = set()
        self._lock = threading.Lock()
        self._queue: list[str] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_asked: str | None = None
        self._asked = False        # whether the reader has asked for anything yet
        self._last_waited = False  # whether it waited for the network the last time it asked
        self._top_up()  # the first shards download while the rest of the job is set up

    def in_memory_ok(self, files: Iterable[str]) -> None:
        """``files`` are read through ``read_growing`` only: they may wait in memory."""
        with self._lock:
            self._movable.update(files)
        self._top_up()

    def path(self, file: str) -> Path:
        """The local path of ``file``, waiting for its download."""
        if self._memory_copy(file) is not None:
            raise RuntimeError(f"{file} is held in memory and can only be read by its "
                               f"tensors' spans: its bytes disagree with the header read from "
                               f"the hub")
        future = self._start(file)
        self._wake()
        if file != self._last_asked:
            self._last_asked = file
            self._note_wait(not future.done())
        if not future.done():
            with self._waiting():
                future.result()
        return future.result()

    def _note_wait(self, waited: bool) -> None:
        """Record whether the reader waited for the network this time. The first time does
        not count: every stream waits for its first bytes, whatever bounds the job."""
        self._last_waited = waited and self._asked
        self._asked = True

    @property
    def network_bound(self) -> bool:
        """True when the reader had to wait for the download the last time it asked for a
        file (``path``) or a tensor's bytes (``read_growing``), not the first time, and a
        download is running now: the analysis outpaces the network. False while the
        downloads wait for the reader (``max_held`` files held) or are all done."""
        if not self._last_waited:
            return False
        with self._lock:
            return any(f.running() for f in self._futures.values())

    def read_growing(self, file: str, begin: int, end: int,
                     note: bool = True) -> bytearray | memoryview | None:
        """Bytes ``[begin, end)`` of ``file`` read while it downloads, once the download has
        written them (waiting meanwhile, and for the download to start); None when the
        download ends first or does not hand its file over (``path`` then gives it whole).
        ``note=False``: a read that says nothing of the pace (a file's header). A file moved
        to memory is read from there."""
        if not self._growing_ok:
            return None
        held = self._memory_copy(file)
        if held is not None:
            if note:
                self._note_wait(False)
            return memoryview(held)[begin:end]
        future = self._start(file)
        self._wake()
        fd: int | None = None
        with ExitStack() as waiting:
            try:
                waited = False
                while True:  # for the download to hand its file over, then for the bytes
                    if fd is None:
                        fd = self._growing_fd(file)
                    if fd is not None and os.fstat(fd).st_size >= end:
                        break
                    if future.done():
                        return None
                    if not waited:
                        waiting.enter_context(self._waiting())
                        waited = True
                    time.sleep(GROWING_POLL_S)
                if note:
                    self._note_wait(waited)
                with open(fd, "rb", buffering=0, closefd=False) as fh:
                    return read_range(fh, begin, end - begin)
            finally:
                if fd is not None:
                    os.close(fd)

    def _growing_fd(self, file: str) -> int | None:
        """A descriptor of the file ``file``'s download writes (the caller closes it)."""
        with self._lock:
            fd = self._growing.get(file)
            return None if fd is None else os.dup(fd)  # the download's end closes its own

    def _grow(self, file: str, path: Path) -> None:
        """The download of ``file`` writes ``path`` in order, from its first byte."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        with self._lock:
            old = self._growing.pop(file, None)
            self._growing[file] = fd
        if old is not None:
            os.close(old)

    def _done_growing(self, file: str) -> None:
        with self._lock:
            fd = self._growing.pop(file, None)
        if fd is not None:
            os.close(fd)  # under --cleanup_cache an open descriptor would keep a deleted file

    def _memory_copy(self, file: str) -> bytearray | None:
        """``file``'s bytes once moved to memory (waiting for a move under way); marks it as
        asked for, so that it is not moved from now on."""
        while True:
            with self._lock:
                self._asked_for.add(file)
                if file not in self._moving:
                    return self._in_memory.get(file)
            time.sleep(GROWING_POLL_S)

    def _held_on_disk(self) -> list[str]:
        return [f for f in self._futures if f not in self._released and f not in self._in_memory]

    def _to_move(self) -> tuple[str, int] | None:
        """A whole file the reader has not asked for, and its size, that fits in the memory
        left by the files in memory and those on their way there (under the lock)."""
        used = sum(len(b) for b in self._in_memory.values()) + sum(self._moving.values())
        for file in self._held_on_disk():
            future = self._futures[file]
            if (file not in self._movable or file in self._asked_for or file in self._moving
                    or not future.done() or future.cancelled() or future.exception()):
                continue
            try:
                size = future.result().stat().st_size
            except OSError:  # gone from disk: read (and failed) from there
                continue
            if used + size <= self.memory:
                return file, size
        return None

    def _move_to_memory(self, file: str) -> None:
        """Read ``file`` into memory, then release it on disk."""
        path = self._futures[file].result()
        try:
            with open(path, "rb", buffering=0) as fh:
                data = read_range(fh, 0, os.fstat(fh.fileno()).st_size)
            if data is None:
                raise OSError(f"{path} shrank while it was read")
        except OSError as exc:  # stays on disk, read from there
            logger.debug("could not move %s to memory: %s", file, exc)
            with self._lock:
                self._moving.pop(file, None)
                self._movable.discard(file)
            return
        with self._lock:
            self._in_memory[file] = data
            self._moving.pop(file, None)
        if self._release is not None:
            self._release(file)
        logger.debug("%s (%d bytes) waits in memory for the reader", file, len(data))

    def reorder(self, order: Sequence[str]) -> None:
        """Fetch in ``order`` from now on (files it leaves out follow, as before): for a reader
        that takes the files in another order than the fetcher was made with (a fine-tune read
        in its source's pass). Downloads queued and not asked for yet go back in line; one
        running goes on."""
        with self._lock:
            self._idle = False
            self.order = list(dict.fromkeys([*order, *self.order]))
            for file in [f for f in self._queue if f not in self._asked_for]:
                self._queue.remove(file)
                self._futures.pop(file).cancel()
        self._top_up()

    def _wake(self) -> None:
        """The reader has asked for a file: an idle fetcher starts its downloads."""
        if self._idle:
            with self._lock:
                self._idle = False
            self._top_up()

    def fetch_all(self) -> list[Path]:
        """Every file on disk (for readers that need the whole checkpoint at once)."""
        return [self.path(f) for f in self.order]

    def release(self, file: str) -> None:
        """The reader is done with ``file``: delete it (under --cleanup_cache) once it is
        downloaded (at once, or when a download it was read from while growing ends)."""
        with self._lock:
            if file in self._released:
                return
            self._released.add(file)
            if self._in_memory.pop(file, None) is not None:
                future = None  # released on disk when it moved
            else:
                future = self._futures.get(file)
                if future is not None and not future.done():
                    return  # _work releases it once the download ends
        if self._release is not None and future is not None and future.exception() is None:
            self._release(file)
        self._top_up()

    def close(self) -> None:
        """Start no more downloads, drop the queued ones, and wait for one in flight (so
        nothing writes to the cache after the job ends)."""
        with self._lock:
            self._closed = True
            for file in self._queue:
                self._futures.pop(file).cancel()
            self._queue.clear()
            thread = self._thread
        if thread is not None:
            thread.join()
        for mover in list(self._movers):
            mover.join()
        for file in list(self._growing):
            self._done_growing(file)
        with self._lock:
            self._in_memory.clear()

    def _top_up(self) -> None:
        """Start the next downloads in order while fewer than ``max_held`` files are held on
        disk. When the disk holds that many, move a file to memory where one may go: on a
        thread of its own, beside the download under way, so the network is not kept waiting
        for the copy; the next download starts once it is done."""
        while True:
            with self._lock:
                upcoming = next((f for f in self.order if f not in self._futures), None)
                if self._closed or self._idle or upcoming is None:
                    return
                if self.max_held is not None and len(self._held_on_disk()) >= self.max_held:
                    found = self._to_move() if self.memory else None
                    if found is not None:
                        moving, size = found
                        self._moving[moving] = size
                        mover = threading.Thread(target=self._move_then_top_up,
                                                 args=(moving,), name="shard-to-memory",
                                                 daemon=True)
                        self._movers.append(mover)
                        mover.start()
                    return
                self._start_locked(upcoming)  # under the lock: a reorder cannot come between

    def _move_then_top_up(self, file: str) -> None:
        self._move_to_memory(file)
        self._top_up()

    def _start(self, file: str) -> Future:
        with self._lock:
            return self._start_locked(file)

    def _start_locked(self, file: str) -> Future:
        future = self._futures.get(file)
        if future is None:
            future = self._futures[file] = Future()
            self._queue.append(file)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="shard-fetcher",
                                                daemon=True)
                self._thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                file = self._queue.pop(0)
                future = self._futures[file]
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if self._growing_ok:
                    path = self._download(file, lambda p, file=file: self._grow(file, p))
                else:
                    path = self._download(file)
            except BaseException as exc:  # handed to the reader, which raises it
                self._done_growing(file)
                future.set_exception(exc)
                continue
            self._done_growing(file)
            with self._lock:
                future.set_result(path)
                released = file in self._released
            if released and self._release is not None:  # read whole while it downloaded
                self._release(file)
            self._top_up()


def read_order(reader) -> list[str]:
    """``reader.names`` shard by shard: by the last file each tensor needs (``files_of``), so
    every file is read in one stretch and can be released after it; within a file, in the
    order its bytes lie where the reader knows it (``data_offset``: the order a download
    writes them, which safetensors sorts by dtype and by name as text, ``layers.10`` before
    ``layers.2``), else in natural order."""
    position = {f: i for i, f in enumerate(reader.files)}
    offset = getattr(reader, "data_offset", lambda name: None)

    def key(name: str) -> tuple:
        file = max((position.get(f, 0) for f in reader.files_of(name)), default=0)
        at = offset(name)
        return (file, 1, natural_key(name)) if at is None else (file, 0, at)

    return sorted(reader.names, key=key)


@dataclass
class StreamItem:
    """One tensor of one model, or (``error`` set) the end of that model's stream."""

    model: Any
    name: str = ""
    tensor: torch.Tensor | None = None
    storage: str = ""
    error: BaseException | None = None


def stream_models(models: Iterable) -> Iterator[StreamItem]:
    """The tensors of every model, each base checkpoint read once for all models built on it.

    Each model offers ``checkpoint`` (its base: ``reader`` and ``fetcher``, shared by the
    models opened from one base; None for a model streamed on its own), ``outputs_by_source()``
    (``{base tensor name or None: [output names]}``), ``output(name, base_value)`` and
    ``output_storage(name)``, or ``own_stream()`` when it has no checkpoint. A failure of the
    base itself (a damaged shard, a download) ends every model of that base.
    """
    passes: dict[int, list] = {}
    for model in models:
        if model.checkpoint is None:
            yield from _own_stream(model)
        else:
            passes.setdefault(id(model.checkpoint), []).append(model)
    for group in passes.values():
        yield from _shared_pass(group)


def _own_stream(model) -> Iterator[StreamItem]:
    try:
        for name, tensor, storage in model.own_stream():
            yield StreamItem(model, name, tensor, storage)
    except Exception as exc:
        yield StreamItem(model, error=exc)


def _shared_pass(models: list) -> Iterator[StreamItem]:
    checkpoint = models[0].checkpoint
    reader, fetcher = checkpoint.reader, checkpoint.fetcher
    plans = {id(m): m.outputs_by_source() for m in models}
    order = read_order(reader)
    last_use = {}
    for index, name in enumerate(order):
        for file in reader.files_of(name):
            last_use[file] = index
    active = list(models)
    try:
        for index, name in enumerate(order):
            users = [m for m in active if name in plans[id(m)]]
            if users:
                try:
                    base_value = reader.get(name)
                except Exception as exc:
                    for m in active:
                        yield StreamItem(m, error=exc)
                    return
                for model in users:
                    failed = yield from _outputs(model, plans[id(model)][name], base_value)
                    if failed:
                        active.remove(model)
                del base_value
            if fetcher is not None:
                for file in reader.files_of(name):
                    if last_use[file] == index:
                        fetcher.release(file)
        for model in list(active):
            yield from _outputs(model, plans[id(model)].get(None, ()), None)
    finally:
        reader.close()
        if fetcher is not None:
            fetcher.close()
        for model in models:
            model.close()


def _outputs(model, names: Sequence[str], base_value) -> Iterator[StreamItem]:
    """A model's tensors made from one base tensor; returns True when the model failed."""
    for out in names:
        try:
            tensor = model.output(out, base_value)
            storage = model.output_storage(out)
        except Exception as exc:
            yield StreamItem(model, error=exc)
            return True
        yield StreamItem(model, out, tensor, storage)
    return False
