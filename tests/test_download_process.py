"""Hub downloads in a forked process of their own (esd_experiment/hub/download.py), against the hub
stand-in with the real huggingface_hub client: the file read while the process writes it,
failures crossing the process as the project's errors, and the process's end (closed, killed,
or its worker killed)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from esd_experiment.core.errors import (
    GatedModelError,
    ModelNotFoundError,
    NetworkError,
    TransientError,
)
from esd_experiment.hub import download as download_process
from esd_experiment.hub.cache import CacheSession
from esd_experiment.hub.download import DownloadProcess, Request
from esd_experiment.loader.opener import HubClient, ModelRequest, open_model
from tests.loader_fixtures import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 60  # a forked process's download from 127.0.0.1 takes well under a second unloaded
TOKEN = "hf_" + "Qx7" * 12
# A file of three 8 MiB float32 tensors sent at 8 MB/s: its first tensor is on disk after
# about 1.3 s (huggingface_hub writes 10 MB at a time) and the whole file after 3 s.
TENSOR = (2048, 1024)
RATE = 8e6


def three_tensors(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    tensors = {f"{n}.weight": torch.randn(TENSOR) for n in ("a", "b", "c")}
    return write_safetensors(tmp_path / "repo", tensors), tensors


@contextlib.contextmanager
def process_client(hub, token: str | None = None, monkeypatch=None):
    """A HubClient whose shard downloads run in a forked process, ended at the block's end.
    With ``monkeypatch``, huggingface_hub's download fails in this process once the process
    is forked (the process keeps the real one): what still downloads here fails the test."""
    client = HubClient(token=token, cache_dir=str(hub.cache), offline=False,
                       download_process=True)
    client.start_download_process()
    assert client._process is not None, "this machine forks: the process must start"
    if monkeypatch is not None:
        def here(*args, **kwargs):
            raise AssertionError(f"downloaded in the worker's own process: {args}")

        monkeypatch.setattr("huggingface_hub.hf_hub_download", here)
    try:
        yield client
    finally:
        client.close()


def blob_name(commit: str, filename: str) -> str:
    """What the cache names a file's blob (its LFS sha256), as the hub's listing gives it."""
    from huggingface_hub import HfApi

    info = HfApi().model_info("org/model", revision=commit, files_metadata=True)
    return next(s.lfs.sha256 for s in info.siblings if s.rfilename == filename)


def shard_in_flight(hub, client: HubClient, commit: str) -> tuple[threading.Thread, list]:
    """The shard's download (stalled by the test) under way on a thread of its own, as the
    shard fetcher runs it; the TransientError it ends with, once the client is closed."""
    ended: list[TransientError] = []

    def fetch() -> None:
        try:
            client.download("org/model", commit, "model.safetensors", background=True)
        except TransientError as exc:
            ended.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not any(s.filename == "model.safetensors" and s.method == "GET" for s in hub.log):
        assert time.monotonic() < deadline, "the shard's download never started"
        time.sleep(0.02)
    return thread, ended


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return state != "Z"


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return found


def test_a_shard_is_read_while_the_download_process_writes_it(hub, tmp_path, monkeypatch):
    """The process downloads the shard (none is downloaded in the worker's own process) and
    hands the file it writes to the worker, which reads each tensor as soon as its bytes are
    in; the tensors are those published."""
    folder, tensors = three_tensors(tmp_path)
    size = (folder / "model.safetensors").stat().st_size
    commit = hub.add_repo("org/model", folder)
    hub.throttle(RATE, repo_id="org/model", filename="model.safetensors")

    def sent() -> int:
        return max((s.nbytes for s in hub.log if s.filename == "model.safetensors"
                    and s.method == "GET" and s.range is None), default=0)

    read, sent_at_first = {}, None
    # The small files download in the worker's own thread: in the cache first, so that
    # everything the block below downloads is the process's.
    HubClient(cache_dir=str(hub.cache), offline=False).download("org/model", commit,
                                                                "config.json")
    with process_client(hub, monkeypatch=monkeypatch) as client, \
            CacheSession(hub.cache, cleanup=True) as session:
        assert client._process.pid in children(os.getpid())
        loaded = open_model(ModelRequest("org/model"), hub=client, session=session)
        for name, tensor in loaded.iter_tensors():
            if sent_at_first is None:
                sent_at_first = sent()
            read[name] = tensor
        pid = client._process.pid
    assert not alive(pid), "closed with the client"
    assert sent_at_first < size, "the first tensor waited for the whole shard"
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(read[name], tensor), name


def test_a_lock_the_worker_releases_by_closing_is_not_kept_by_the_process(hub, tmp_path):
    """A cache lease is an flock that closing its descriptor releases: the process must not
    hold a copy of the descriptor, or the lease would outlive its release."""
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    lease = tmp_path / "lease"
    held = os.open(lease, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    with process_client(hub) as client:
        # A download through the process: it is past its start, its descriptors closed.
        client.download("org/model", commit, "config.json", background=True)
        pid = client._process.pid
        open_files = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(lease) not in open_files
        os.close(held)
        other = os.open(lease, os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a copy holds it
        finally:
            os.close(other)


def test_failures_cross_the_process_as_the_projects_errors(hub, tmp_path, monkeypatch):
    """What stops a download in the process reaches the worker as the error the worker's own
    download would raise: named after the file, network failures told apart, and the token
    nowhere; the process goes on serving the next download."""
    from huggingface_hub.utils import _http

    # huggingface_hub's own retries of a refused connection wait 23 s in all (1, 2, 4, 8, 8):
    # not what is tested here. The process forked below inherits the wait-free clock.
    clock = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    clock["sleep"] = lambda seconds: None
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**clock))
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    gated = hub.add_repo("org/gated", folder, gated=True)
    with process_client(hub, token=TOKEN) as client:
        with pytest.raises(ModelNotFoundError, match=r"org/model@.* \(absent.safetensors\)"):
            client.download("org/model", commit, "absent.safetensors", background=True,
                            label=f"org/model@{commit} (absent.safetensors)")
        with pytest.raises(GatedModelError, match="access refused") as refused:
            client.download("org/gated", gated, "model.safetensors", background=True,
                            label="org/gated")
        assert TOKEN not in str(refused.value)
        hub.down()
        try:
            with pytest.raises(NetworkError, match="org/model"):
                client.download("org/model", commit, "model.safetensors", background=True,
                                label="org/model")
        finally:
            hub.up()
        path = client.download("org/model", commit, "model.safetensors", background=True)
        assert path.read_bytes() == (folder / "model.safetensors").read_bytes()


def test_an_exception_that_cannot_be_pickled_crosses_as_its_type_and_text():
    class Holding(Exception):
        def __init__(self, text):
            super().__init__(text)
            self.lock = threading.Lock()

    request = Request("org/model", "w.safetensors", "abc", None, TOKEN,
                      "org/model@abc (w.safetensors)")
    crossed = download_process._portable(Holding(f"failed with {TOKEN}"), request)
    assert type(crossed) is RuntimeError
    assert str(crossed).startswith("org/model@abc (w.safetensors): Holding: failed with")
    assert TOKEN not in str(crossed)


def test_a_killed_download_process_fails_the_download_naming_the_file(hub, tmp_path):
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    hub.stall(WAIT_S, filename="model.safetensors", after_bytes=200_000)
    with process_client(hub) as client:
        pid = client._process.pid
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(TransientError, match=r"org/model \(w\).*killed by SIGKILL"):
            client.download("org/model", commit, "model.safetensors", background=True,
                            label="org/model (w)")
        with pytest.raises(TransientError, match="download process ended"):
            client.download("org/model", commit, "config.json", background=True,
                            label="org/model (config)")


def test_closing_in_the_middle_of_a_download_ends_it_at_once(hub, tmp_path):
    """The job is over: nothing waits for the download, and the thread that waited for it
    gets an error instead of hanging."""
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    hub.stall(WAIT_S, filename="model.safetensors", after_bytes=200_000)
    client = HubClient(cache_dir=str(hub.cache), offline=False, download_process=True)
    client.start_download_process()
    pid = client._process.pid
    waiter, errors = shard_in_flight(hub, client, commit)
    started = time.monotonic()
    client.close()
    closed_in = time.monotonic() - started
    waiter.join(WAIT_S)
    assert closed_in < download_process.EXIT_WAIT_S, "killed at once, not waited for"
    assert not alive(pid)
    assert len(errors) == 1 and "download process" in str(errors[0])


def test_the_download_process_dies_with_its_worker(hub, tmp_path):
    """A worker killed with SIGKILL (no chance to close anything) takes its download process
    with it; a rerun then downloads the file whole and completes."""
    folder, _ = three_tensors(tmp_path)
    hub.add_repo("org/model", folder)
    hub.stall(WAIT_S, filename="model.safetensors", after_bytes=200_000)
    out = tmp_path / "out"
    env = {**hub.env(hub.cache), "HF_HUB_DOWNLOAD_TIMEOUT": str(WAIT_S)}
    worker = [sys.executable, str(ROOT / "esd_worker.py"), "--model_id", "org/model",
              "--output_dir", str(out), "--device", "cpu", "--cleanup_cache"]
    proc = subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT_S
        while not any(s.filename == "model.safetensors" and s.method == "GET"
                      and s.range is None for s in hub.log):
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode()[-3000:])
            assert time.monotonic() < deadline, "the worker never started its download"
            time.sleep(0.05)
        (downloader,) = children(proc.pid)  # the download process, downloading
        proc.kill()
        proc.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while alive(downloader):
            assert time.monotonic() < deadline, "the download process outlived its worker"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.stderr.close()
    hub.clear_faults()
    rerun = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=WAIT_S * 3)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = (out / "org--model.csv").read_text().splitlines()
    assert len(rows) == 1 + 3, "a header and the three tensors' rows"


def test_a_hand_over_that_fails_leaves_the_download_and_the_next_one_whole(hub, tmp_path):
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    etag = blob_name(commit, "model.safetensors")
    with process_client(hub) as client:
        def refuse(path):
            raise OSError(f"cannot open {path}")

        path = client.download("org/model", commit, "model.safetensors", background=True, etag=etag,
                               on_growing=refuse)
        assert path.read_bytes() == (folder / "model.safetensors").read_bytes()
        config = client.download("org/model", commit, "config.json", background=True)
        assert config.read_bytes() == (folder / "config.json").read_bytes(), \
            "the next answer is the next file's"


def test_a_request_left_before_its_answer_refuses_the_next_one(hub, tmp_path):
    """An interrupt between a request and its answer leaves that answer in the pipe: a later
    download must not take it for its own."""
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    hub.stall(2.0, filename="model.safetensors", after_bytes=200_000)
    etag = blob_name(commit, "model.safetensors")
    with process_client(hub) as client:
        original = client._process._hand_over

        def hand_over(on_growing, path):
            original(on_growing, path)
            raise KeyboardInterrupt  # as a Ctrl-C reaching the waiting thread

        client._process._hand_over = hand_over
        with pytest.raises(KeyboardInterrupt):
            client.download("org/model", commit, "model.safetensors", background=True, etag=etag,
                            on_growing=lambda path: None)
        with pytest.raises(TransientError, match="interrupted before the process answered"):
            client.download("org/model", commit, "config.json", background=True,
                            label="org/model (config)")


def test_an_os_error_of_the_download_keeps_its_cause_and_the_process_serves_on(hub, tmp_path):
    """A full disk or a cache that cannot be written is the download's failure, not the
    process's end: raised as it is (deterministic, not worth a retry), and the next download
    runs."""
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    process = DownloadProcess()
    try:
        with pytest.raises(NotADirectoryError):
            process.download(Request("org/model", "config.json", commit, str(blocked / "cache"),
                                     None, "org/model (config.json)"))
        path = process.download(Request("org/model", "config.json", commit, str(hub.cache),
                                         None, "org/model (config.json)"))
        assert path.read_bytes() == (folder / "config.json").read_bytes()
    finally:
        process.close()


def test_a_small_file_does_not_wait_behind_a_shard_in_flight(hub, tmp_path):
    """The shard fetcher's downloads go to the process; the others (config, an adapter's
    files) run on the caller's thread, so that they do not queue behind a shard."""
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    hub.stall(WAIT_S, filename="model.safetensors", after_bytes=200_000)
    with process_client(hub) as client:
        shard, _ = shard_in_flight(hub, client, commit)
        path = client.download("org/model", commit, "config.json")
        assert path.read_bytes() == (folder / "config.json").read_bytes()
        assert shard.is_alive(), "the config was fetched while the shard was in flight"
    shard.join(WAIT_S)  # closing the client ended the shard's download


def test_switched_off_or_stuck_at_its_start_the_downloads_stay_on_a_thread(hub, tmp_path,
                                                                         monkeypatch):
    folder, _ = three_tensors(tmp_path)
    commit = hub.add_repo("org/model", folder)
    monkeypatch.setenv(download_process.ENV_SWITCH, "0")
    client = HubClient(cache_dir=str(hub.cache), offline=False, download_process=True)
    client.start_download_process()
    assert client._process is None, "ESD_DOWNLOAD_PROCESS=0"
    monkeypatch.delenv(download_process.ENV_SWITCH)

    def stuck(keep):  # as a fork that copied a lock another thread held
        time.sleep(WAIT_S)

    monkeypatch.setattr(download_process, "_drop_inherited", stuck)
    monkeypatch.setattr(download_process, "START_WAIT_S", 0.5)
    client = HubClient(cache_dir=str(hub.cache), offline=False, download_process=True)
    before = children(os.getpid())
    client.start_download_process()
    assert client._process is None, "a process that never said it was ready is not used"
    assert children(os.getpid()) <= before, "and it is gone"
    path = client.download("org/model", commit, "model.safetensors", background=True)
    assert path.read_bytes() == (folder / "model.safetensors").read_bytes()
