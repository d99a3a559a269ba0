"""What reading a hub model downloads, in what order, and what ``--cleanup_cache`` removes:
against the hub stand-in (tests/hub_server.py) with the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

from esd_experiment.core.errors import (
    CorruptCheckpointError,
    ModelNotFoundError,
    ShapeMismatchError,
    UnsupportedFormatError,
)
from esd_experiment.hub.cache import CacheSession, sweep
from esd_experiment.loader.opener import HubClient, ModelRequest, open_model
from tests.loader_fixtures import (
    llama,
    save_adapter,
    save_model,
    stream,
    write_safetensors,
    write_sharded,
)

ROOT = Path(__file__).resolve().parents[1]
KILL_WAIT_S = 60  # the child reaches its stalled download in a few seconds on a loaded machine
DOWNLOAD_WAIT_S = 30  # a few small shards from 127.0.0.1: well under a second when unloaded


def client(hub) -> HubClient:
    return HubClient(cache_dir=str(hub.cache), offline=False)


def full_gets(hub, repo_id: str) -> list[str]:
    """Files of ``repo_id`` downloaded whole (range requests read headers only)."""
    return [s.filename for s in hub.log if s.method == "GET" and s.repo_id == repo_id
            and s.filename and s.range is None and s.status == 200]


def cache_files(cache: Path) -> set[str]:
    """Files of the repositories in the cache (not the cache's own bookkeeping)."""
    return {str(p.relative_to(cache)) for p in cache.glob("models--*/**/*")
            if p.is_file() or p.is_symlink()}


def sharded(tmp_path: Path, name: str = "sharded") -> Path:
    return save_model(llama(), tmp_path / name, max_shard_size="20KB")


def test_quantized_hub_model_is_refused_before_any_weight_download(hub, tmp_path):
    src = write_safetensors(tmp_path / "repo", {"w.qweight": torch.zeros(4, 4, dtype=torch.int32)},
                            {"model_type": "llama", "quantization_config": {"quant_method": "xyz"}})
    hub.add_repo("org/quant", src)
    with pytest.raises(UnsupportedFormatError, match="org/quant.*xyz"):
        open_model(ModelRequest("org/quant"), hub=client(hub))
    assert full_gets(hub, "org/quant") == ["config.json"]
    assert hub.request_count(filename="model.safetensors") == 0


def test_downloads_only_what_the_analysis_reads(hub, tmp_path):
    src = write_safetensors(tmp_path / "repo", {"w.weight": torch.ones(2, 2)})
    torch.save({"w.weight": torch.ones(2, 2)}, src / "pytorch_model.bin")
    for extra in ("README.md", "tf_model.h5", "training_args.bin", "tokenizer.json"):
        (src / extra).write_text("x")
    commit = hub.add_repo("org/model", src)
    loaded = open_model(ModelRequest("org/model"), hub=client(hub))
    assert torch.equal(stream(loaded)["w.weight"], torch.ones(2, 2))
    assert sorted(full_gets(hub, "org/model")) == ["config.json", "model.safetensors"]
    assert loaded.revision == commit


def test_sharded_model_streams_shard_by_shard_and_cleanup_keeps_two_on_disk(hub, tmp_path):
    folder = sharded(tmp_path)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 4
    hub.add_repo("org/big", folder)
    snapshot_shards = []
    with CacheSession(hub.cache, cleanup=True) as session:
        loaded = open_model(ModelRequest("org/big"), hub=client(hub), session=session)
        for name, tensor in loaded.iter_tensors():
            present = {p.name for p in hub.cache.rglob("model-*.safetensors")}
            snapshot_shards.append(len(present))
            assert torch.equal(tensor, llama().state_dict()[name])
    assert max(snapshot_shards) <= 2, "the shard being read and the next one"
    assert sorted(full_gets(hub, "org/big")) == sorted(shards + ["config.json",
                                                                 "model.safetensors.index.json"])
    assert cache_files(hub.cache) == set(), "everything this run fetched is gone"


def test_cleanup_keeps_what_was_cached_before_and_shared_blobs(hub, tmp_path):
    first = write_safetensors(tmp_path / "r1", {"w.weight": torch.ones(2, 2)})
    second = write_safetensors(tmp_path / "r2", {"w.weight": torch.zeros(2, 2)})
    old = hub.add_repo("org/model", second, branches=("v2",))
    hub.add_repo("org/model", first)
    stream(open_model(ModelRequest("org/model@v2"), hub=client(hub)))  # the user's cache
    before = cache_files(hub.cache)
    with CacheSession(hub.cache, cleanup=True) as session:
        loaded = open_model(ModelRequest("org/model"), hub=client(hub), session=session)
        assert torch.equal(stream(loaded)["w.weight"], torch.ones(2, 2))
    assert cache_files(hub.cache) == before, "config.json's blob is shared with v2 and stays"
    kept = open_model(ModelRequest(f"org/model@{old}"), hub=HubClient(
        cache_dir=str(hub.cache), offline=True))
    assert torch.equal(stream(kept)["w.weight"], torch.zeros(2, 2))


def test_cleanup_waits_for_the_last_job_reading_the_repository(hub, tmp_path):
    hub.add_repo("org/base", sharded(tmp_path))
    with CacheSession(hub.cache, cleanup=True) as reader_b:
        with CacheSession(hub.cache, cleanup=True) as reader_a:
            stream(open_model(ModelRequest("org/base"), hub=client(hub), session=reader_a))
            reader_b.lease("org/base")  # a second job starts on the same base
        assert cache_files(hub.cache), "job A found job B reading and left the files"
        loaded = open_model(ModelRequest("org/base@main"), hub=client(hub), session=reader_b)
        assert set(stream(loaded)) == set(llama().state_dict())
        served = hub.bytes_served("org/base")
    assert hub.bytes_served("org/base") == served
    assert cache_files(hub.cache) == set(), "the last job cleaned up"


def test_failed_open_with_cleanup_removes_only_what_it_downloaded(hub, tmp_path):
    adapter = save_adapter(llama(), tmp_path / "adapter", "org/base", r=4,
                           target_modules=["q_proj"])
    hub.add_repo("org/adapter", adapter)
    hub.add_repo("org/base", save_model(llama(hidden_size=48), tmp_path / "wider"))
    stream(open_model(ModelRequest("org/base"), hub=client(hub)))  # cached before the run
    before = cache_files(hub.cache)
    with CacheSession(hub.cache, cleanup=True) as session:
        with pytest.raises(ShapeMismatchError, match="org/adapter"):
            open_model(ModelRequest("org/adapter"), hub=client(hub), session=session)
    assert "adapter_model.safetensors" in full_gets(hub, "org/adapter")
    assert cache_files(hub.cache) == before


def test_shard_missing_from_the_hub_fails_the_model_naming_the_file(hub, tmp_path):
    folder = sharded(tmp_path)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 4  # under --cleanup_cache the last is not fetched before the first two
    hub.add_repo("org/model", folder)
    with CacheSession(hub.cache, cleanup=True) as session:
        loaded = open_model(ModelRequest("org/model"), hub=client(hub), session=session)
        hub.remove_file("org/model", shards[-1])
        with pytest.raises(ModelNotFoundError, match=f"org/model.*{shards[-1]}"):
            stream(loaded)


def test_without_cleanup_shards_download_back_to_back_ahead_of_the_reader(hub, tmp_path):
    """Without --cleanup_cache every file stays in the cache anyway, so no download waits for
    the reader: all shards arrive while nothing has been read yet."""
    folder = sharded(tmp_path)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 4
    hub.add_repo("org/model", folder)
    loaded = open_model(ModelRequest("org/model"), hub=client(hub))
    deadline = time.monotonic() + DOWNLOAD_WAIT_S
    while len([p for p in hub.cache.rglob("model-*.safetensors")]) < len(shards):
        assert time.monotonic() < deadline, "the shards did not all download ahead"
        time.sleep(0.01)
    assert set(stream(loaded)) == set(llama().state_dict())


def test_a_cache_filled_online_serves_the_same_ids_offline(hub, tmp_path):
    """Files are fetched by commit; the cache still records which commit ``main`` and a tag
    were, as huggingface_hub does, so ``HF_HUB_OFFLINE=1`` (the way out of an outage) finds
    ``org/model`` and ``org/model@v1`` without their commits."""
    old = hub.add_repo("org/model", write_safetensors(tmp_path / "r1", {"w.weight": torch.zeros(2, 2)}),
                       tags=("v1",))
    new = hub.add_repo("org/model", write_safetensors(tmp_path / "r2", {"w.weight": torch.ones(2, 2)}))
    for request in (ModelRequest("org/model"), ModelRequest("org/model@v1")):
        stream(open_model(request, hub=client(hub)))
    offline = HubClient(cache_dir=str(hub.cache), offline=True)
    for request, commit, value in ((ModelRequest("org/model"), new, 1.0),
                                   (ModelRequest("org/model@v1"), old, 0.0)):
        loaded = open_model(request, hub=offline)
        assert loaded.revision == commit
        assert torch.equal(stream(loaded)["w.weight"], torch.full((2, 2), value))


def test_cleanup_records_no_ref_to_the_snapshot_it_deletes(hub, tmp_path):
    """A ref left by a run under --cleanup_cache would name a snapshot that is gone, hiding
    the one the user's cache had for that branch."""
    old = hub.add_repo("org/model", write_safetensors(tmp_path / "r1", {"w.weight": torch.zeros(2, 2)}))
    stream(open_model(ModelRequest("org/model"), hub=client(hub)))  # the user's cache: main = old
    hub.add_repo("org/model", write_safetensors(tmp_path / "r2", {"w.weight": torch.ones(2, 2)}))
    with CacheSession(hub.cache, cleanup=True) as session:
        stream(open_model(ModelRequest("org/model"), hub=client(hub), session=session))
    kept = open_model(ModelRequest("org/model"), hub=HubClient(cache_dir=str(hub.cache),
                                                                offline=True))
    assert kept.revision == old
    assert torch.equal(stream(kept)["w.weight"], torch.zeros(2, 2))


# huggingface_hub writes a download 10 MB at a time: a file of three 8 MB tensors, sent at
# 8 MB/s, has its first tensor on disk after about 1.3 s and the whole file after 3 s.
GROWING_TENSOR = (2048, 1024)   # float32: 8 MiB
GROWING_RATE = 8e6              # bytes/s


@pytest.mark.parametrize("cleanup", [False, True], ids=["kept", "cleanup"])
def test_a_shard_is_read_while_it_downloads(hub, tmp_path, cleanup):
    """A tensor is read as soon as its own bytes are in, not once its whole shard is: the
    analysis of a shard overlaps its own download, not only the next one's."""
    torch.manual_seed(0)
    tensors = {f"{n}.weight": torch.randn(GROWING_TENSOR) for n in ("a", "b", "c")}
    folder = write_safetensors(tmp_path / "repo", tensors)
    size = (folder / "model.safetensors").stat().st_size
    hub.add_repo("org/model", folder)
    hub.throttle(GROWING_RATE, repo_id="org/model", filename="model.safetensors")

    def sent() -> int:
        return max((s.nbytes for s in hub.log if s.filename == "model.safetensors"
                    and s.method == "GET" and s.range is None), default=0)

    read, sent_at_first = {}, None
    with CacheSession(hub.cache, cleanup=cleanup) as session:
        loaded = open_model(ModelRequest("org/model"), hub=client(hub), session=session)
        for name, tensor in loaded.iter_tensors():
            if sent_at_first is None:
                sent_at_first = sent()
            read[name] = tensor
    assert sent_at_first < size, "the first tensor waited for the whole shard"
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(read[name], tensor), name
    assert (cache_files(hub.cache) == set()) == cleanup


def test_killed_download_leaves_nothing_a_sweep_does_not_remove_and_rerun_completes(
        hub, tmp_path):
    # Shards larger than the 100 kB a header read asks for, so only the download stalls.
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.weight": torch.randn(200, 200, generator=g)
               for i in range(6)}
    folder = write_sharded(tmp_path / "model", {
        f"model-0000{k + 1}-of-00003.safetensors": dict(list(tensors.items())[2 * k:2 * k + 2])
        for k in range(3)})
    second = "model-00002-of-00003.safetensors"
    hub.add_repo("org/model", folder)
    hub.stall(KILL_WAIT_S, filename=second, after_bytes=200_000)
    marker = tmp_path / "stalled"
    script = textwrap.dedent(f"""
        import sys, pathlib
        sys.path.insert(0, {str(ROOT)!r})
        from esd_experiment.hub.cache import CacheSession
        from esd_experiment.loader.opener import ModelRequest, open_model
        with CacheSession({str(hub.cache)!r}, cleanup=True) as session:
            model = open_model(ModelRequest("org/model"), session=session)
            for name, _ in model.iter_tensors():
                pathlib.Path({str(marker)!r}).write_text(name)
    """)
    env = {**hub.env(hub.cache), "HF_HUB_DOWNLOAD_TIMEOUT": str(KILL_WAIT_S)}  # stays stalled
    child = subprocess.Popen([sys.executable, "-c", script], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + KILL_WAIT_S
    partial = hub.cache / "models--org--model" / "blobs"
    while not (list(partial.glob("*.incomplete")) and marker.exists()) \
            and time.monotonic() < deadline:
        if child.poll() is not None:
            pytest.fail(child.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    assert marker.exists(), "the first shard was analysed while the second one downloads"
    child.kill()
    child.wait()
    assert cache_files(hub.cache), "the killed job left its downloads behind"
    hub.clear_faults()
    assert sweep(hub.cache) == ["models--org--model"]
    assert cache_files(hub.cache) == set()
    loaded = open_model(ModelRequest("org/model"), hub=client(hub))
    assert set(stream(loaded)) == set(tensors), "a rerun completes"


def test_cleanup_never_touches_local_directories(tmp_path):
    folder = save_model(llama(), tmp_path / "local-model")
    before = sorted(os.listdir(folder))
    with CacheSession(tmp_path / "cache", cleanup=True) as session:
        stream(open_model(ModelRequest(str(folder)), session=session))
    assert sorted(os.listdir(folder)) == before


def test_shards_downloaded_ahead_wait_in_memory_and_the_downloads_go_on(hub, tmp_path,
                                                                       monkeypatch):
    """Under --cleanup_cache, with two shards on disk and the reader not started (the worker
    still importing), a whole shard waits in memory instead, and the next download starts;
    without memory for it, the downloads stop at two shards."""
    from esd_experiment.formats import stream as tensor_stream

    hub.add_repo("org/big", sharded(tmp_path))
    expected = llama().state_dict()
    for memory, moved in ((tensor_stream.AHEAD_MEMORY_BYTES, True), (0, False)):
        monkeypatch.setattr(tensor_stream, "AHEAD_MEMORY_BYTES", memory)
        monkeypatch.setattr("esd_experiment.loader.opener.AHEAD_MEMORY_BYTES", memory)
        with CacheSession(hub.cache, cleanup=True) as session:
            loaded = open_model(ModelRequest("org/big"), hub=client(hub), session=session)
            fetcher = loaded.checkpoint.fetcher
            shards = fetcher.order
            deadline = time.monotonic() + DOWNLOAD_WAIT_S
            while len(full_gets(hub, "org/big")) < (len(shards) if moved else 2) + 2:
                assert time.monotonic() < deadline, "the downloads stopped"
                time.sleep(0.01)
            time.sleep(0.2)  # time enough for a download past the two-shard bound to start
            on_disk = {Path(p).name for p in cache_files(hub.cache)} & set(shards)
            assert len(on_disk) <= 2, on_disk
            started = [f for f in full_gets(hub, "org/big") if f in shards]
            assert len(started) == (len(shards) if moved else 2), started
            got = dict(loaded.iter_tensors())
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in expected), "bit-identical"
        assert cache_files(hub.cache) == set()
        hub.log.clear()


def _raw_safetensors(path: Path, spans: dict[str, tuple[int, int]], data_len: int) -> Path:
    """A safetensors file of 2x2 float32 tensors at the given data spans, written byte by
    byte (safetensors' own writer would never make a damaged one)."""
    header = json.dumps({name: {"dtype": "F32", "shape": [2, 2], "data_offsets": list(span)}
                         for name, span in spans.items()}).encode()
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(range(data_len)))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


@pytest.mark.parametrize("cleanup", [False, True])  # with cleanup, tensors are read by span
@pytest.mark.parametrize("spans, data_len, named", [  # named: the tensors either may name
    ({"a.weight": (0, 16), "b.weight": (0, 16)}, 16, ("a.weight", "b.weight")),  # overlap
    ({"a.weight": (0, 16), "b.weight": (32, 48)}, 48, ("b.weight",)),  # gap
    ({"a.weight": (0, 16), "b.weight": (16, 32)}, 48, ()),  # bytes after the last tensor
])
def test_a_header_safetensors_refuses_locally_is_refused_from_the_hub(hub, tmp_path, cleanup,
                                                                       spans, data_len, named):
    folder = _raw_safetensors(tmp_path / "bad", spans, data_len)
    with pytest.raises(SafetensorError) as oracle:  # safetensors' own loader refuses it
        safe_open(str(folder / "model.safetensors"), framework="pt")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        stream(open_model(ModelRequest(str(folder))))
    hub.add_repo("org/bad", folder)
    with CacheSession(hub.cache, cleanup=cleanup) as session, pytest.raises(
            CorruptCheckpointError, match="org/bad.*model.safetensors") as remote:
        stream(open_model(ModelRequest("org/bad"), hub=client(hub), session=session))
    for message in (str(oracle.value), str(remote.value)) if named else ():
        assert any(name in message for name in named), message


def test_a_sound_raw_header_reads_the_same_locally_and_from_the_hub(hub, tmp_path):
    folder = _raw_safetensors(tmp_path / "good", {"a.weight": (0, 16), "b.weight": (16, 32)}, 32)
    hub.add_repo("org/good", folder)
    local = stream(open_model(ModelRequest(str(folder))))
    remote = stream(open_model(ModelRequest("org/good"), hub=client(hub)))
    assert local.keys() == remote.keys() == {"a.weight", "b.weight"}
    assert all(torch.equal(local[name], remote[name]) for name in local)
