"""The hub stand-in (tests/hub_server.py) against the real, unpatched huggingface_hub client,
and the project's loader against it: endpoints, cache layout, errors, retries, resumes and the
injected faults, each checked by what the client does."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    list_repo_files,
    model_info,
    snapshot_download,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.hf_api import RepoFolder
from safetensors.torch import load_file

from esd_experiment.core.errors import GatedModelError, ModelNotFoundError
from esd_experiment.loader.opener import HubClient, ModelRequest, open_model
from tests.loader_fixtures import llama, save_model, stream

MIB = 1024 * 1024
TOKEN = "hf_" + "a" * 32
EMPTY_JSON_GIT_OID = "9e26dfeeb6e641a33dae4961196235bdb965b21b"  # `git hash-object` of "{}"
# huggingface_hub reads a download in chunks of this size and, after a dropped connection,
# resumes (Range) from the last whole chunk it wrote: a partial chunk is fetched again.
CLIENT_CHUNK = constants.DOWNLOAD_CHUNK_SIZE
STALL_S = 5.0           # far longer than the client timeouts the stall tests set
FAST_TIMEOUT_S = 0.5    # the client timeout the stall tests set
# 1 MB at 2 MB/s takes 0.5 s; the bound leaves 0.1 s for rounding in the pacing
THROTTLE_RATE, THROTTLE_SIZE, THROTTLE_MIN_S = 2_000_000, 1_000_000, 0.4


def repo_folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gets(hub, filename: str) -> list[tuple[int, str | None, int]]:
    return [(s.status, s.range, s.nbytes) for s in hub.log
            if s.method == "GET" and s.filename == filename]


def test_model_info_and_tree_per_branch_tag_and_commit(hub, tmp_path):
    first = hub.add_repo("org/name", repo_folder(tmp_path / "v1", {
        "config.json": b"{}", "model.safetensors": b"a" * 100}), tags=["v1.0"])
    second = hub.add_repo("org/name", repo_folder(tmp_path / "v2", {
        "config.json": b'{"v": 2}', "model.safetensors": b"b" * 200, "sub/extra.txt": b"x"}),
        branches=["main", "dev"])
    api = HfApi()
    assert first != second and len(second) == 40
    assert api.model_info("org/name").sha == model_info("org/name", revision="dev").sha == second
    assert api.model_info("org/name", revision="v1.0").sha == first
    old = api.model_info("org/name", revision=first, files_metadata=True)
    assert old.sha == first and old.gated is False and old.private is False
    config, weights = old.siblings
    assert (config.rfilename, config.size, config.blob_id, config.lfs) == (
        "config.json", 2, EMPTY_JSON_GIT_OID, None)
    assert (weights.rfilename, weights.size, weights.lfs.size, weights.lfs.sha256) == (
        "model.safetensors", 100, 100, sha256(b"a" * 100))
    assert list_repo_files("org/name") == ["config.json", "model.safetensors", "sub/extra.txt"]
    assert list_repo_files("org/name", revision="v1.0") == ["config.json", "model.safetensors"]
    top = list(api.list_repo_tree("org/name"))
    assert [(type(e), e.path) for e in top][-1] == (RepoFolder, "sub")
    assert [e.path for e in api.list_repo_tree("org/name", "sub")] == ["sub/extra.txt"]

    hub.tree_page_size = 1  # the client follows the Link: rel="next" pages
    assert list_repo_files("org/name", revision="dev") == [
        "config.json", "model.safetensors", "sub/extra.txt"]
    assert hub.request_count(path="/api/models/org/name/tree/dev") == 4  # 3 files, 1 folder


def test_snapshot_download_lays_out_a_sharded_model_once(hub, tmp_path):
    folder = save_model(llama(), tmp_path / "llama", max_shard_size="20KB")
    sha = hub.add_repo("org/llama", folder)
    cache = tmp_path / "fresh"
    snapshot = Path(snapshot_download("org/llama", cache_dir=cache))
    repo = cache / "models--org--llama"
    assert snapshot == repo / "snapshots" / sha
    assert (repo / "refs" / "main").read_text() == sha
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len([n for n in files if n.endswith(".safetensors")]) > 2
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(files)
    blobs = set()
    for name, data in files.items():
        blob = sha256(data) if name.endswith(".safetensors") else git_oid(data)
        assert os.readlink(snapshot / name) == f"../../blobs/{blob}"
        assert (snapshot / name).read_bytes() == data
        blobs.add(blob)
    assert {p.name for p in (repo / "blobs").iterdir()} == blobs
    total = sum(len(d) for d in files.values())
    assert hub.bytes_served("org/llama") == total
    assert all(hub.request_count(method="GET", filename=n) == 1 for n in files)

    snapshot_download("org/llama", cache_dir=cache)  # cached: no file fetched again
    assert hub.bytes_served("org/llama") == total


def test_download_resumes_with_range_after_a_dropped_connection(hub, tmp_path):
    data = os.urandom(CLIENT_CHUNK + MIB)
    hub.add_repo("org/big", repo_folder(tmp_path / "big", {"model.safetensors": data}))
    cut = CLIENT_CHUNK + MIB // 2
    hub.drop(cut, filename="model.safetensors")  # skips the HEAD, which has no body
    assert Path(hf_hub_download("org/big", "model.safetensors")).read_bytes() == data
    assert gets(hub, "model.safetensors") == [
        (200, None, cut), (206, f"bytes={CLIENT_CHUNK}-", MIB)]
    assert hub.bytes_served("org/big", "model.safetensors") == cut + MIB


def test_server_errors_are_retried_where_the_client_retries(hub, tmp_path):
    hub.add_repo("org/name", repo_folder(tmp_path / "r", {"config.json": b"{}"}))
    hub.fail(503, path="/api/models/org/name")  # model_info makes one request
    with pytest.raises(hf_errors.HfHubHTTPError) as err:
        HfApi().model_info("org/name")
    assert err.value.response.status_code == 503
    assert HfApi().model_info("org/name").siblings[0].rfilename == "config.json"

    hub.fail(500, path="/api/models/org/name/tree")  # listings go through http_backoff
    assert list_repo_files("org/name") == ["config.json"]
    assert hub.request_count(path="/api/models/org/name/tree/main") == 2

    hub.fail(502, method="HEAD", times=2)  # metadata: once without retries, then with
    assert Path(hf_hub_download("org/name", "config.json")).read_bytes() == b"{}"
    assert hub.request_count(method="HEAD", status=502) == 2
    assert hub.request_count(method="HEAD", status=200) == 1

    hub.fail(503, method="GET", filename="config.json")  # the body GET is not retried on 5xx
    with pytest.raises(hf_errors.HfHubHTTPError) as err:
        hf_hub_download("org/name", "config.json", cache_dir=tmp_path / "other")
    assert err.value.response.status_code == 503


def test_rate_limit_waits_for_retry_after(hub, tmp_path):
    hub.add_repo("org/name", repo_folder(tmp_path / "r", {"config.json": b"{}"}))
    hub.fail(429, retry_after=1, method="GET", filename="config.json")
    start = time.monotonic()
    assert Path(hf_hub_download("org/name", "config.json")).read_bytes() == b"{}"
    # the client sleeps Retry-After + 1 s; without the header it would wait 1 s
    assert time.monotonic() - start >= 2.0
    assert [g[0] for g in gets(hub, "config.json")] == [429, 200]


def test_gated_repo_needs_an_authorized_token(hub, tmp_path):
    hub.add_repo("org/gated", repo_folder(tmp_path / "r", {"config.json": b"{}"}), gated=True,
                 authorized=[TOKEN])
    assert HfApi().model_info("org/gated").gated == "auto"  # the metadata stays public
    with pytest.raises(hf_errors.GatedRepoError) as anonymous:
        hf_hub_download("org/gated", "config.json")
    with pytest.raises(hf_errors.GatedRepoError) as refused:
        hf_hub_download("org/gated", "config.json", token="hf_" + "b" * 32)
    assert anonymous.value.response.status_code == 401
    assert refused.value.response.status_code == 403
    assert Path(hf_hub_download("org/gated", "config.json", token=TOKEN)).read_bytes() == b"{}"


def test_missing_repo_revision_and_file_raise_the_client_errors(hub, tmp_path):
    folder = repo_folder(tmp_path / "r", {"config.json": b"{}"})
    hub.add_repo("org/name", folder)
    hub.add_repo("org/private", folder, private=True, authorized=[TOKEN])
    for call in (lambda: model_info("org/absent"),
                 lambda: hf_hub_download("org/absent", "config.json"),
                 lambda: model_info("org/private"),
                 lambda: model_info("org/private", token="hf_" + "b" * 32)):
        with pytest.raises(hf_errors.RepositoryNotFoundError) as err:
            call()
        assert type(err.value) is hf_errors.RepositoryNotFoundError
    assert model_info("org/private", token=TOKEN).private is True
    with pytest.raises(hf_errors.RevisionNotFoundError):
        model_info("org/name", revision="nope")
    with pytest.raises(hf_errors.RevisionNotFoundError):
        hf_hub_download("org/name", "config.json", revision="nope")
    with pytest.raises(hf_errors.RemoteEntryNotFoundError):
        hf_hub_download("org/name", "absent.json")


def test_stalled_transfers_end_at_the_client_timeouts(hub, tmp_path, monkeypatch):
    data = os.urandom(200_000)
    hub.add_repo("org/name", repo_folder(tmp_path / "r", {"model.safetensors": data}))
    hub.stall(STALL_S, method="HEAD")
    start = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        get_hf_file_metadata(hf_hub_url("org/name", "model.safetensors"), timeout=FAST_TIMEOUT_S)
    assert time.monotonic() - start < STALL_S

    # a body stalled mid-file: the read timeout fires and the client fetches it again
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", FAST_TIMEOUT_S)
    hub.stall(STALL_S, after_bytes=50_000)  # the HEAD has no body: not stalled
    start = time.monotonic()
    assert Path(hf_hub_download("org/name", "model.safetensors")).read_bytes() == data
    assert time.monotonic() - start < STALL_S
    assert (200, None, len(data)) in gets(hub, "model.safetensors")


def test_throttled_bandwidth_per_file_and_global(hub, tmp_path):
    files = {"a.bin": os.urandom(THROTTLE_SIZE), "b.bin": os.urandom(THROTTLE_SIZE)}
    hub.add_repo("org/name", repo_folder(tmp_path / "r", files))
    hub.throttle(THROTTLE_RATE, repo_id="org/name", filename="a.bin")
    for name in files:
        start = time.monotonic()
        assert Path(hf_hub_download("org/name", name)).read_bytes() == files[name]
        assert time.monotonic() - start >= THROTTLE_MIN_S
        hub.throttle(None, repo_id="org/name", filename="a.bin")
        hub.throttle(THROTTLE_RATE)  # all bodies, for b.bin


def test_file_vanishing_after_the_listing(hub, tmp_path):
    hub.add_repo("org/name", repo_folder(tmp_path / "r", {"config.json": b"{}", "w.bin": b"1"}))
    hub.remove_file("org/name", "w.bin", after_listings=1)
    assert list_repo_files("org/name") == ["config.json", "w.bin"]
    with pytest.raises(hf_errors.RemoteEntryNotFoundError):
        hf_hub_download("org/name", "w.bin")
    assert list_repo_files("org/name") == ["config.json"]


def test_hub_down_refuses_connections_then_comes_back(hub, tmp_path):
    hub.add_repo("org/name", repo_folder(tmp_path / "r", {"config.json": b"{}"}))
    hub.down()
    with pytest.raises(httpx2.ConnectError):
        model_info("org/name")
    hub.up()
    assert model_info("org/name").sha

    hub.down(for_seconds=0.5)  # the download's metadata retries outlast the outage
    start = time.monotonic()
    assert Path(hf_hub_download("org/name", "config.json")).read_bytes() == b"{}"
    assert time.monotonic() - start >= 0.5
    assert hub.request_count(method="HEAD", filename="config.json") == 1


def test_subprocess_downloads_through_the_environment(hub, tmp_path):
    hub.add_repo("org/name", repo_folder(tmp_path / "r", {"config.json": b'{"x": 1}'}))
    cache = tmp_path / "worker-cache"
    code = ("from huggingface_hub import hf_hub_download\n"
            "print(hf_hub_download('org/name', 'config.json'))")
    out = subprocess.run([sys.executable, "-c", code], env=hub.env(cache), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.is_relative_to(cache) and path.read_bytes() == b'{"x": 1}'
    assert hub.bytes_served("org/name", "config.json") == len(b'{"x": 1}')


def test_project_loader_streams_the_model_from_the_hub(hub, tmp_path):
    folder = save_model(llama(), tmp_path / "llama", max_shard_size="20KB")
    sha = hub.add_repo("org/llama", folder)
    cache = str(tmp_path / "cache")
    loaded = open_model(ModelRequest("org/llama"), cache_dir=cache,
                        hub=HubClient(cache_dir=cache, offline=False))
    saved = {}
    for shard in folder.glob("*.safetensors"):
        saved.update(load_file(shard))
    got = stream(loaded)
    assert loaded.revision == sha and set(got) == set(saved)
    assert all(torch.equal(got[name], tensor) for name, tensor in saved.items())
    read = [p for p in folder.iterdir() if p.name != "generation_config.json"]
    whole = sum(s.nbytes for s in hub.log if s.method == "GET" and s.filename and s.range is None)
    assert whole == sum(p.stat().st_size for p in read), "every file it reads, once"
    headers = {s.filename for s in hub.log if s.range is not None}
    assert headers == {p.name for p in folder.glob("*.safetensors")}, \
        "the shard headers come first, with range requests"


def test_project_loader_maps_gated_and_missing_repos(hub, tmp_path):
    folder = save_model(llama(), tmp_path / "llama")
    hub.add_repo("org/gated", folder, gated=True)
    cache = str(tmp_path / "cache")
    client = HubClient(cache_dir=cache, offline=False)
    with pytest.raises(GatedModelError, match="org/gated"):
        open_model(ModelRequest("org/gated"), cache_dir=cache, hub=client)
    with pytest.raises(ModelNotFoundError, match="org/absent: repository not found"):
        open_model(ModelRequest("org/absent"), cache_dir=cache, hub=client)
    with pytest.raises(ModelNotFoundError, match="org/gated@nope: revision not found"):
        open_model(ModelRequest("org/gated@nope"), cache_dir=cache, hub=client)
    assert hub.bytes_served() == 0


def test_a_test_with_the_stand_in_reaches_only_127_0_0_1(hub):
    with pytest.raises(AssertionError, match="only the hub stand-in"):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)  # TEST-NET-1: never routed
    assert constants.ENDPOINT == hub.endpoint and not constants.HF_HUB_OFFLINE


def test_a_test_without_the_stand_in_stays_offline():
    assert not constants.ENDPOINT.startswith("http://127.0.0.1")
    with pytest.raises(AssertionError, match="reached for the network"):
        HfApi().model_info("org/name")
