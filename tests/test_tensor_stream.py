"""The shard fetcher on its own: downloads one ahead of the reader, and whether the reader is
waiting for the network; the worker's CPU share that follows it."""

import contextlib
import threading
import time
from pathlib import Path

import pytest

import esd_lapack
from esd_worker import CpuShare
from tensor_stream import MAX_HELD, ShardFetcher

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
