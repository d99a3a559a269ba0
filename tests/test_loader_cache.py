"""What opening a hub model downloads, and what cleaning up after it removes."""

from __future__ import annotations

import os
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

from errors import ShapeMismatchError, TransientError, UnsupportedFormatError
from model_loader import HubClient, ModelRequest, cleanup_cache, open_model
from tests.loader_fixtures import (
    FakeHub,
    llama,
    save_adapter,
    save_model,
    stream,
    write_hub_cache,
    write_safetensors,
)

SHA_A = "a" * 40
SHA_B = "b" * 40


def test_quantized_hub_model_is_refused_before_any_weight_download(tmp_path):
    src = write_safetensors(tmp_path / "repo", {"w.qweight": torch.zeros(4, 4, dtype=torch.int32)},
                            {"model_type": "llama", "quantization_config": {"quant_method": "awq"}})
    hub = FakeHub(tmp_path / "cache")
    hub.add("org/quant", src, SHA_A)
    with pytest.raises(UnsupportedFormatError, match="org/quant.*awq"):
        open_model(ModelRequest("org/quant"), hub=hub)
    assert hub.downloaded == [("org/quant", "config.json")]


def test_downloads_only_what_the_analysis_reads(tmp_path):
    src = write_safetensors(tmp_path / "repo", {"w.weight": torch.ones(2, 2)})
    torch.save({"w.weight": torch.ones(2, 2)}, src / "pytorch_model.bin")
    for extra in ("README.md", "tf_model.h5", "training_args.bin", "tokenizer.json"):
        (src / extra).write_text("x")
    hub = FakeHub(tmp_path / "cache")
    hub.add("org/model", src, SHA_A)
    loaded = open_model(ModelRequest("org/model"), hub=hub)
    assert sorted(n for _, n in hub.downloaded) == ["config.json", "model.safetensors"]
    assert loaded.revision == SHA_A


def test_cleanup_removes_downloaded_files_and_keeps_shared_blobs(tmp_path):
    cache = tmp_path / "cache"
    hub = FakeHub(cache)
    first = write_safetensors(tmp_path / "r1", {"w.weight": torch.ones(2, 2)})
    second = tmp_path / "r2"
    second.mkdir()
    (second / "config.json").write_bytes((first / "config.json").read_bytes())  # same blob
    save_file({"w.weight": torch.zeros(2, 2)}, str(second / "model.safetensors"))
    hub.add("org/model", first, SHA_A)
    hub.add("org/model", second, SHA_B, refs=("v2",))
    kept = open_model(ModelRequest("org/model@v2"), hub=hub)
    loaded = open_model(ModelRequest("org/model"), hub=hub)
    assert loaded.cache_paths() and all(p.exists() for p in loaded.cache_paths())
    cleanup_cache(loaded)
    repo = cache / "models--org--model"
    assert not (repo / "snapshots" / SHA_A).exists()
    assert torch.equal(stream(kept)["w.weight"], torch.zeros(2, 2))  # shared config blob kept
    cleanup_cache(kept)
    assert not repo.exists()


def cache_files(cache) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture
def mismatched_adapter_hub(tmp_path):
    """org/adapter names org/base as its base, but org/base is wider: opening it fails after
    both were downloaded."""
    hub = FakeHub(tmp_path / "cache")
    adapter = save_adapter(llama(), tmp_path / "adapter", "org/base", r=4,
                           target_modules=["q_proj"])
    hub.add("org/adapter", adapter, SHA_A)
    hub.add("org/base", save_model(llama(hidden_size=48), tmp_path / "wider"), SHA_B)
    return hub


def test_failed_open_with_cleanup_removes_only_what_it_downloaded(mismatched_adapter_hub):
    hub = mismatched_adapter_hub
    open_model(ModelRequest("org/base"), hub=hub)  # cached before: must survive the cleanup
    before = cache_files(hub.cache)
    with pytest.raises(ShapeMismatchError, match="org/adapter"):
        open_model(ModelRequest("org/adapter"), hub=hub, cleanup_on_error=True)
    assert ("org/adapter", "adapter_model.safetensors") in hub.downloaded
    assert cache_files(hub.cache) == before
    assert not (hub.cache / "models--org--adapter").exists()


def test_failed_open_keeps_downloads_unless_asked(mismatched_adapter_hub):
    hub = mismatched_adapter_hub
    with pytest.raises(ShapeMismatchError):
        open_model(ModelRequest("org/adapter"), hub=hub)
    assert any(name.endswith("model.safetensors") for name in cache_files(hub.cache))
    hub.downloaded.clear()
    with pytest.raises(ShapeMismatchError):
        open_model(ModelRequest("org/adapter", source_model="org/base"), hub=hub,
                   cleanup_on_error=True)
    assert hub.downloaded == []  # all cached already, so the cleanup removed nothing
    assert any(name.endswith("model.safetensors") for name in cache_files(hub.cache))


def test_download_failing_part_way_is_cleaned_up(tmp_path):
    folder = save_model(llama(), tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    hub = FakeHub(tmp_path / "cache")
    hub.add("org/model", folder, SHA_A)
    hub.fail_at("org/model", shards[1], httpx2.ReadTimeout("read timed out"))
    with pytest.raises(TransientError, match="org/model.*network"):
        open_model(ModelRequest("org/model"), hub=hub, cleanup_on_error=True)
    assert ("org/model", shards[0]) in hub.downloaded
    assert cache_files(hub.cache) == set()


def test_hub_client_records_files_of_a_failed_download(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    src = write_safetensors(tmp_path / "repo", {"w.weight": torch.ones(2, 2)})
    info = SimpleNamespace(sha=SHA_A, siblings=[SimpleNamespace(rfilename=n)
                                                for n in ("config.json", "model.safetensors")])
    monkeypatch.setattr(HfApi, "model_info", lambda self, *a, **k: info)

    def fetch_config_then_time_out(repo_id, **kwargs):
        write_hub_cache(cache, repo_id, SHA_A, src)  # the whole snapshot arrives ...
        (cache / "models--org--name" / "snapshots" / SHA_A / "model.safetensors").unlink()
        raise httpx2.ReadTimeout("read timed out")  # ... but for the weights

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch_config_then_time_out)
    hub = HubClient(cache_dir=str(cache), offline=False)
    with pytest.raises(TransientError, match="org/name.*network"):
        open_model(ModelRequest("org/name"), hub=hub, cleanup_on_error=True)
    assert not (cache / "models--org--name" / "snapshots").exists()


def test_cleanup_never_touches_local_directories(tmp_path):
    folder = save_model(llama(), tmp_path / "local-model")
    before = sorted(os.listdir(folder))
    cleanup_cache(open_model(ModelRequest(str(folder))))
    assert sorted(os.listdir(folder)) == before
