"""The shard fetcher on its own: downloads one ahead of the reader, and whether the reader is
waiting for the network; the worker's CPU share that follows it."""

import contextlib
import threading
import time
from pathlib import Path

import pytest

from esd_experiment.estimator import lapack as esd_lapack
from esd_experiment.formats import stream as tensor_stream
from esd_experiment.formats.stream import MAX_HELD, ShardFetcher
from esd_experiment.run.devices import CpuShare

WAIT_S = 10  # generous bound on a thread's step on a loaded CI machine; never reached when well


class GatedDownloads:
    """A download function whose files arrive when the test opens their gate."""

    def __init__(self, files):
        self.gates = {f: threading.Event() for f in files}
        self.started: list[str] = []

    def __call__(self, file):
        self.started.append(file)
        assert self.gates[file].wait(WAIT_S), f"{file} was never let through"
        return Path("/shards") / file


def wait_until(condition):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def read_in_thread(fetcher, file, got):
    reader = threading.Thread(target=lambda: got.setdefault(file, fetcher.path(file)))
    reader.start()
    return reader


def test_a_reordered_fetcher_fetches_the_reader_s_order_and_keeps_its_running_download():
    """``reorder`` (a fine-tune read in its source's pass): the download under way goes on,
    the one queued behind it goes back in line, and the files come in the new order, never
    more than ``MAX_HELD`` on disk."""
    files = ["s1", "s2", "s3", "s4"]
    downloads = GatedDownloads(files)
    fetcher = ShardFetcher(files, downloads, release=lambda f: None)
    wait_until(lambda: downloads.started == ["s1"])  # s2 queued behind it
    fetcher.reorder(["s4", "s1", "s2", "s3"])
    for gate in downloads.gates.values():
        gate.set()
    wait_until(lambda: downloads.started == ["s1", "s4"])
    assert fetcher.path("s4") == Path("/shards/s4") and fetcher.path("s1") == Path("/shards/s1")
    time.sleep(0.05)
    assert downloads.started == ["s1", "s4"], "two held: the next waits for a release"
    fetcher.release("s1")
    wait_until(lambda: downloads.started == ["s1", "s4", "s2"])
    fetcher.release("s2")
    wait_until(lambda: downloads.started == ["s1", "s4", "s2", "s3"])
    fetcher.close()


@pytest.mark.parametrize("wake", ["reorder", "ask"])
def test_an_idle_fetcher_waits_for_the_reader_s_order_or_its_first_file(wake):
    """``start=False``: nothing downloads until ``reorder`` gives the order, or until the
    reader asks for a file, which comes first, the prefetch after it."""
    files = ["s1", "s2", "s3"]
    downloads = GatedDownloads(files)
    for gate in downloads.gates.values():
        gate.set()
    fetcher = ShardFetcher(files, downloads, release=lambda f: None, start=False)
    time.sleep(0.05)
    assert downloads.started == [], "an idle fetcher downloads nothing"
    if wake == "reorder":
        fetcher.reorder(["s3", "s1", "s2"])
        wait_until(lambda: downloads.started == ["s3", "s1"])
    else:
        assert fetcher.path("s2") == Path("/shards/s2")
        wait_until(lambda: downloads.started == ["s2", "s1"])
    fetcher.close()


def test_fetcher_says_when_the_reader_waits_for_the_network():
    files = ["s1", "s2", "s3"]
    downloads = GatedDownloads(files)
    waiting = threading.Event()
    fetcher = ShardFetcher(files, downloads, waiting=lambda: contextlib.nullcontext(waiting.set()))
    assert not fetcher.network_bound  # nothing asked yet
    wait_until(lambda: downloads.started == ["s1"])  # the first download starts at once
    got = {}
    reader = read_in_thread(fetcher, "s1", got)
    assert waiting.wait(WAIT_S)
    assert not fetcher.network_bound, "every stream waits for its first file: that says nothing"
    downloads.gates["s1"].set()
    reader.join(WAIT_S)
    assert got["s1"] == Path("/shards/s1")
    wait_until(lambda: downloads.started == ["s1", "s2"])  # one ahead: s2 while s1 is read
    assert not fetcher.network_bound
    reader = read_in_thread(fetcher, "s2", got)  # s1 analysed before s2 is in
    wait_until(lambda: fetcher.network_bound)
    downloads.gates["s2"].set()
    reader.join(WAIT_S)
    # s2 is in, s3 waits until s1 is released: the downloads wait for the reader now
    assert downloads.started == ["s1", "s2"] and MAX_HELD == 2
    assert not fetcher.network_bound
    fetcher.release("s1")
    wait_until(lambda: downloads.started == files)
    assert fetcher.network_bound  # the reader waited for s2, and s3 downloads
    downloads.gates["s3"].set()
    wait_until(lambda: not fetcher.network_bound)  # nothing left to download
    fetcher.release("s2")
    assert fetcher.path("s3") == Path("/shards/s3")  # in before the reader asked
    assert not fetcher.network_bound
    fetcher.close()


class Bound:
    def __init__(self, value):
        self.network_bound = value


@pytest.fixture
def blas_two_threads():
    before = esd_lapack.blas_threads()
    esd_lapack.set_blas_threads(2)
    if esd_lapack.blas_threads() != 2:
        esd_lapack.set_blas_threads(before)
        pytest.skip("this BLAS was started with a single thread (OPENBLAS_NUM_THREADS=1?)")
    try:
        yield
    finally:
        esd_lapack.set_blas_threads(before)


def test_cpu_share_leaves_a_core_to_the_download_only_while_it_bounds(blas_two_threads):
    fetcher = Bound(False)
    share = CpuShare([None, fetcher])
    share.before_solve("cpu")
    assert esd_lapack.blas_threads() == 2
    fetcher.network_bound = True
    share.before_solve("cpu")
    assert esd_lapack.blas_threads() == 1
    share.before_solve("cuda:0")  # a GPU solve leaves the CPU's BLAS as it is
    assert esd_lapack.blas_threads() == 1
    fetcher.network_bound = False
    share.before_solve("cpu")
    assert esd_lapack.blas_threads() == 2


def test_cpu_share_without_downloads_changes_nothing(blas_two_threads):
    share = CpuShare([None])  # a local checkpoint has no fetcher
    share.before_solve("cpu")
    assert share.full is None and esd_lapack.blas_threads() == 2


class GrowingDownloads:
    """Downloads that write their file in steps the test lets through, handing the file over
    as it is made (as huggingface_hub's HTTP download does), then renaming it into place."""

    def __init__(self, folder: Path, contents: dict[str, bytes], step: int):
        self.folder, self.contents, self.step = folder, contents, step
        self.steps = {f: threading.Semaphore(0) for f in contents}
        self.handed = {f: threading.Event() for f in contents}

    def __call__(self, file, on_growing):
        partial = self.folder / f"{file}.incomplete"
        data = self.contents[file]
        with open(partial, "wb", buffering=0) as fh:
            on_growing(partial)
            self.handed[file].set()
            for start in range(0, len(data), self.step):
                assert self.steps[file].acquire(timeout=WAIT_S), f"{file} stalled"
                fh.write(data[start:start + self.step])
        final = self.folder / file
        partial.rename(final)
        return final


def test_a_file_is_read_while_it_downloads_and_released_once_it_is_in(tmp_path):
    contents = {"s1": bytes(range(256)) * 4, "s2": b"\x07" * 512}
    downloads = GrowingDownloads(tmp_path, contents, step=256)
    released = []
    fetcher = ShardFetcher(["s1", "s2"], downloads, release=released.append, growing=True)
    assert downloads.handed["s1"].wait(WAIT_S)
    got = []
    reader = threading.Thread(target=lambda: got.append(fetcher.read_growing("s1", 200, 300)))
    reader.start()
    downloads.steps["s1"].release()  # bytes 0-255 are in: 200-300 is not whole yet
    time.sleep(0.1)
    assert not got, "read bytes the download had not written"
    downloads.steps["s1"].release()
    reader.join(WAIT_S)
    assert bytes(got[0]) == contents["s1"][200:300]
    fetcher.release("s1")  # done with s1 while it still downloads: deleted once it is in
    assert released == []
    for _ in range(2):
        downloads.steps["s1"].release()
    wait_until(lambda: released == ["s1"])
    assert fetcher.read_growing("s1", 0, 10) is None  # in whole: read the file itself
    assert fetcher.path("s1") == tmp_path / "s1"
    for _ in range(2):
        downloads.steps["s2"].release()
    assert fetcher.path("s2").read_bytes() == contents["s2"]
    fetcher.close()


def test_a_download_that_fails_ends_the_wait_for_its_bytes(tmp_path):
    handed, fail = threading.Event(), threading.Event()

    def failing(file, on_growing):
        partial = tmp_path / "s1.incomplete"
        partial.write_bytes(b"\x01" * 10)
        on_growing(partial)
        handed.set()
        assert fail.wait(WAIT_S)
        raise ConnectionError("dropped")

    fetcher = ShardFetcher(["s1"], failing, growing=True)
    assert handed.wait(WAIT_S)
    assert bytes(fetcher.read_growing("s1", 2, 6)) == b"\x01" * 4
    threading.Timer(0.1, fail.set).start()
    assert fetcher.read_growing("s1", 0, 100) is None  # the download ended before byte 100
    with pytest.raises(ConnectionError):
        fetcher.path("s1")
    fetcher.close()


def test_a_file_whose_download_has_not_started_is_still_read_while_it_grows(tmp_path):
    contents = {"s1": b"\x01" * 512, "s2": b"\x02" * 512}
    downloads = GrowingDownloads(tmp_path, contents, step=256)
    fetcher = ShardFetcher(["s1", "s2"], downloads, growing=True)
    got = []
    reader = threading.Thread(target=lambda: got.append(fetcher.read_growing("s2", 0, 10)))
    reader.start()  # s2 waits behind s1's download
    for _ in range(2):
        downloads.steps["s1"].release()
    assert downloads.handed["s2"].wait(WAIT_S)
    downloads.steps["s2"].release()  # the first half of s2 only
    reader.join(WAIT_S)
    assert bytes(got[0]) == b"\x02" * 10
    assert not fetcher._futures["s2"].done(), "read before s2 was in whole"
    downloads.steps["s2"].release()
    assert fetcher.path("s2").read_bytes() == contents["s2"]
    fetcher.close()


def test_waits_for_a_tensors_bytes_say_when_the_network_bounds(tmp_path):
    """Read by tensor, the signal follows the pace: the first wait (the stream's first bytes)
    says nothing, nor does a header's read; a later wait means that the analysis caught up
    with the download; bytes found already written mean that the analysis is the slower."""
    downloads = GrowingDownloads(tmp_path, {"s1": bytes(range(256)) * 4}, step=256)
    fetcher = ShardFetcher(["s1"], downloads, growing=True)
    assert downloads.handed["s1"].wait(WAIT_S)

    def read_while(step, begin, end):
        got = []
        reader = threading.Thread(
            target=lambda: got.append(fetcher.read_growing("s1", begin, end)))
        reader.start()
        time.sleep(0.05)  # the reader finds the bytes missing and waits
        downloads.steps["s1"].release()
        reader.join(WAIT_S)
        assert bytes(got[0]) == bytes(range(256))[begin % 256:end % 256 or 256], step

    downloads.steps["s1"].release()  # bytes 0-255
    assert bytes(fetcher.read_growing("s1", 0, 8, note=False)) == bytes(range(8))
    read_while("first", 300, 400)  # waited for bytes 256-511: the first noted read
    assert not fetcher.network_bound
    read_while("second", 600, 700)  # waited again, and the download goes on
    assert fetcher.network_bound
    assert bytes(fetcher.read_growing("s1", 700, 760)) == bytes(range(700 - 512, 760 - 512))
    assert not fetcher.network_bound  # written before it was asked: the analysis is slower
    downloads.steps["s1"].release()
    fetcher.close()


class FileDownloads:
    """Downloads that write real files, each when the test opens its gate."""

    def __init__(self, folder: Path, contents: dict[str, bytes]):
        self.folder, self.contents = folder, contents
        self.gates = {f: threading.Event() for f in contents}
        self.started: list[str] = []

    def __call__(self, file, on_growing=None):
        self.started.append(file)
        assert self.gates[file].wait(WAIT_S), f"{file} was never let through"
        path = self.folder / file
        path.write_bytes(self.contents[file])
        return path


def test_a_whole_file_not_asked_for_yet_waits_in_memory_so_the_next_download_starts(tmp_path):
    contents = {f"s{i}": bytes([i]) * 1000 for i in range(1, 5)}
    downloads = FileDownloads(tmp_path, contents)
    deleted = []

    def release(file):
        deleted.append(file)
        (tmp_path / file).unlink()

    fetcher = ShardFetcher(list(contents), downloads, release, growing=True, memory=1500)
    fetcher.in_memory_ok(list(contents))
    for file in ("s1", "s2"):
        downloads.gates[file].set()
    wait_until(lambda: "s3" in downloads.started)
    assert deleted == ["s1"], "s1 left the disk for memory, s3 took its place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s2"]
    assert bytes(fetcher.read_growing("s1", 10, 20)) == b"\x01" * 10
    with pytest.raises(RuntimeError, match="s1 is held in memory"):
        fetcher.path("s1")
    assert fetcher.path("s2").read_bytes() == contents["s2"]  # asked for: it stays on disk
    downloads.gates["s3"].set()
    wait_until(lambda: (tmp_path / "s3").exists())
    time.sleep(0.2)  # time enough for a move, and a fourth download, to start
    assert downloads.started == ["s1", "s2", "s3"], "no memory left for s3: s4 waits"
    fetcher.release("s1")
    wait_until(lambda: "s4" in downloads.started)
    assert deleted == ["s1", "s3"], "s1 released on disk once, when it moved; s3 moved"
    downloads.gates["s4"].set()
    assert fetcher.path("s4").read_bytes() == contents["s4"]
    assert bytes(fetcher.read_growing("s3", 0, 1000)) == contents["s3"]
    fetcher.close()


def test_a_file_on_its_way_to_memory_counts_against_the_memory(tmp_path, monkeypatch):
    """While one file is being read into memory, a second that completes meanwhile does not
    move too when both would not fit: the memory counts the move under way."""
    contents = {f"s{i}": bytes([i]) * 1000 for i in range(1, 4)}
    downloads = FileDownloads(tmp_path, contents)
    copying, copied = threading.Event(), threading.Event()
    read_range = tensor_stream.read_range

    def slow_copy(fh, begin, size):  # a move reads on the mover's thread: held open there
        if threading.current_thread().name == "shard-to-memory":
            copying.set()
            assert copied.wait(WAIT_S), "the test never let the move finish"
        return read_range(fh, begin, size)

    monkeypatch.setattr(tensor_stream, "read_range", slow_copy)
    fetcher = ShardFetcher(list(contents), downloads, lambda f: None, growing=True,
                           memory=1500)
    fetcher.in_memory_ok(list(contents))
    downloads.gates["s1"].set()
    assert copying.wait(WAIT_S), "s1 never started moving"
    downloads.gates["s2"].set()
    wait_until(lambda: fetcher._futures["s2"].done())
    time.sleep(0.2)  # time enough for a second move, or a third download, to start
    assert set(fetcher._moving) == {"s1"}, "s2 moved too: 2000 bytes for a memory of 1500"
    assert downloads.started == ["s1", "s2"], "the disk still holds two files"
    copied.set()
    wait_until(lambda: "s3" in downloads.started)
    assert set(fetcher._in_memory) == {"s1"}
    downloads.gates["s3"].set()
    fetcher.close()


def test_no_file_moves_beyond_the_memory_or_once_the_reader_asked_for_it(tmp_path):
    contents = {f"s{i}": bytes([i]) * 1000 for i in range(1, 4)}
    for memory, asked in ((999, []), (5000, ["s1", "s2"])):
        downloads = FileDownloads(tmp_path, contents)
        fetcher = ShardFetcher(list(contents), downloads, lambda f: None, growing=True,
                               memory=memory)
        fetcher.in_memory_ok(list(contents))
        got: dict = {}
        readers = [read_in_thread(fetcher, file, got) for file in asked]
        wait_until(lambda f=fetcher, a=asked: len(f._asked_for) == len(a))
        for file in ("s1", "s2"):
            downloads.gates[file].set()
        wait_until(lambda: (tmp_path / "s2").exists())
        time.sleep(0.2)  # time enough for a move, and a third download, to start
        assert downloads.started == ["s1", "s2"], (memory, asked)
        assert all((tmp_path / f).exists() for f in ("s1", "s2"))
        downloads.gates["s3"].set()
        for reader in readers:
            reader.join(WAIT_S)
        fetcher.close()
        for file in contents:
            (tmp_path / file).unlink(missing_ok=True)


def test_a_shard_from_the_hub_is_read_in_the_order_its_bytes_arrive():
    """safetensors lays a file out by name as text (``layers.10`` before ``layers.2``): read
    in natural order, the reader would wait for ``layers.2`` while ``layers.10`` sat unread."""
    from esd_experiment.formats.checkpoint import CheckpointReader
    from esd_experiment.formats.stream import read_order

    names = ["model.layers.10.w.weight", "model.layers.2.w.weight", "model.norm.weight"]
    header = {n: ((4, 4), "float32") for n in names}
    spans = {n: (i * 64, (i + 1) * 64) for i, n in enumerate(sorted(names))}
    reader = CheckpointReader.from_headers(
        {"s1.safetensors": header, "s2.safetensors": {"lm_head.weight": ((4, 4), "float32")}},
        lambda shard: Path("/unused") / shard, "m", spans={"s1.safetensors": spans})
    assert read_order(reader) == [*sorted(names), "lm_head.weight"]
    local = CheckpointReader.from_headers({"s1.safetensors": header}, lambda s: Path(s), "m")
    assert read_order(local) == ["model.layers.2.w.weight", "model.layers.10.w.weight",
                                 "model.norm.weight"], "no offsets: natural order"
