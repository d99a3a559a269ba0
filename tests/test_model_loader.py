"""Model ids, streaming, checkpoint formats, the hub cache and error mapping of model_loader."""

from __future__ import annotations

import json
import os

import httpx2
import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub import errors as hf_errors

from esd_experiment.core.errors import (
    CorruptCheckpointError,
    GatedModelError,
    InputError,
    ModelNotFoundError,
    NoWeightsError,
    TransientError,
    UnsupportedFormatError,
    is_network_error,
    is_transient,
)
from esd_experiment.formats.checkpoint import natural_key
from esd_experiment.loader.opener import (
    HubClient,
    ModelRequest,
    open_model,
    parse_model_id,
    scrub,
)
from tests.loader_fixtures import (
    FailingHub,
    http_error,
    llama,
    save_model,
    stream,
    write_hub_cache,
    write_safetensors,
    write_sharded,
)

SHA_A = "a" * 40
SHA_B = "b" * 40
TOKEN = "hf_" + "Zq9" * 12  # token-shaped secret that must never be echoed


def local(path) -> ModelRequest:
    return ModelRequest(str(path))


# --- model ids ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("org/name", ("org/name", None)),
    ("org/name@main", ("org/name", "main")),
    (f"  org/name@{SHA_A} ", ("org/name", SHA_A)),
    ("gpt2", ("gpt2", None)),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
])
def test_parse_model_id(text, expected):
    assert parse_model_id(text) == expected


def test_parse_model_id_keeps_local_directory_with_at(tmp_path):
    folder = tmp_path / "runs@v2"
    folder.mkdir()
    assert parse_model_id(str(folder)) == (str(folder), None)


@pytest.mark.parametrize("text, cause", [
    ("", "empty"), ("   ", "empty"), ("org/name@", "revision"), ("bad id/x", "neither"),
    ("org/na--me", "neither"),
])
def test_parse_model_id_rejects(text, cause):
    with pytest.raises(InputError, match=cause):
        parse_model_id(text)


# --- streaming ----------------------------------------------------------------------------

def test_sharded_checkpoint_streams_shard_by_shard_in_natural_order(tmp_path):
    """Each shard is read in one stretch (so it can be released after it), its tensors in
    natural order; the worker orders the rows by layer afterwards."""
    torch.manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.weight": torch.randn(4, 3) for i in range(12)}
    tensors["model.embed_tokens.weight"] = torch.randn(5, 3)
    names = sorted(tensors)  # lexicographic: layers.10 lands in shard 1 next to layers.1
    shards = {"model-00001-of-00002.safetensors": {k: tensors[k] for k in names[:7]},
              "model-00002-of-00002.safetensors": {k: tensors[k] for k in names[7:]}}
    folder = write_sharded(tmp_path / "sharded", shards)
    got = list(open_model(local(folder)).iter_tensors())
    got_names = [n for n, _ in got]
    expected = [n for shard in shards.values() for n in sorted(shard, key=natural_key)]
    assert got_names == expected
    assert got_names.index("model.layers.2.mlp.weight") < got_names.index(
        "model.layers.10.mlp.weight") < got_names.index("model.layers.4.mlp.weight")
    for name, tensor in got:
        assert torch.equal(tensor, tensors[name])


def test_real_sharded_save_pretrained_matches_model(tmp_path):
    model = llama()
    folder = save_model(model, tmp_path / "llama", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    loaded = open_model(local(folder))
    got = stream(loaded)
    assert set(got) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(got[name], tensor)
    assert loaded.revision is None and not loaded.is_adapter and loaded.checkpoint.fetcher is None


def test_bf16_stays_bf16_and_1d_tensors_are_yielded(tmp_path):
    folder = write_safetensors(tmp_path / "m", {
        "w.weight": torch.randn(4, 4, dtype=torch.bfloat16), "norm.weight": torch.ones(4)})
    got = stream(open_model(local(folder)))
    assert got["w.weight"].dtype == torch.bfloat16
    assert got["norm.weight"].shape == (4,)


def test_bin_checkpoint_loads_and_reads_tied_weights_once(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    embed = torch.randn(6, 4)
    state = {"transformer.wte.weight": embed, "h.0.w": torch.randn(4, 4), "lm_head.weight": embed}
    torch.save(state, folder / "pytorch_model.bin")
    torch.save({"x": torch.ones(1)}, folder / "training_args.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    got = stream(open_model(local(folder)))
    assert sorted(got) == ["h.0.w", "transformer.wte.weight"]
    assert torch.equal(got["transformer.wte.weight"], embed)


def test_safetensors_win_over_bin(tmp_path):
    folder = write_safetensors(tmp_path / "both", {"a.weight": torch.ones(2, 2)})
    torch.save({"b.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    assert list(stream(open_model(local(folder)))) == ["a.weight"]


def test_custom_code_config_streams_without_trust_remote_code(tmp_path):
    config = {"model_type": "my_custom_arch", "architectures": ["MyCustomForCausalLM"],
              "auto_map": {"AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"}}
    folder = write_safetensors(tmp_path / "custom", {"blocks.0.mix.weight": torch.randn(3, 5)},
                               config)
    (folder / "modeling_custom.py").write_text("raise RuntimeError('custom code was run')\n")
    got = stream(open_model(local(folder), trust_remote_code=False))
    assert list(got) == ["blocks.0.mix.weight"]


# --- damaged and unusable checkpoints -----------------------------------------------------

def test_truncated_safetensors_fails_at_open_naming_model_and_cause(tmp_path):
    folder = save_model(llama(), tmp_path / "trunc-model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CorruptCheckpointError) as info:
        open_model(local(folder))
    assert str(folder) in str(info.value)
    assert "model.safetensors" in str(info.value) and "truncated" in str(info.value)
    # A local directory has no cache to download it into again: its own copy is the one
    assert "cache" not in str(info.value) and "local directory" in str(info.value)


def test_file_damaged_after_open_fails_during_iteration(tmp_path):
    folder = save_model(llama(), tmp_path / "later")
    loaded = open_model(local(folder))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        stream(loaded)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_garbage_weight_file(tmp_path, filename):
    folder = tmp_path / "garbage"
    folder.mkdir()
    (folder / filename).write_bytes(b"not a checkpoint at all " * 20)
    with pytest.raises(CorruptCheckpointError, match=f"garbage.*{filename}.*damaged") as info:
        open_model(local(folder))
    assert "weights_only" not in str(info.value)


class _RunsCommand:
    """Pickles as a call to ``os.system``: what a malicious ``.bin`` would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipped", [True, False])
def test_bin_with_pickled_objects_is_refused_unexecuted(tmp_path, zipped):
    folder = tmp_path / "pickled-model"
    folder.mkdir()
    marker = tmp_path / "code-was-run"
    torch.save({"w.weight": torch.ones(2, 2), "extra": _RunsCommand(marker)},
               folder / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsupportedFormatError) as info:
        open_model(local(folder))
    message = str(info.value)
    assert not marker.exists()
    assert str(folder) in message and "pytorch_model.bin" in message
    assert "holds pickled objects other than tensors; refused for safety (the file was not " \
           "executed)" in message and "system" in message
    assert "weights_only" not in message and "arbitrary code" not in message


def test_index_naming_missing_tensor(tmp_path):
    folder = write_sharded(tmp_path / "idx", {"s1.safetensors": {"a": torch.ones(2)}})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "s1.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="idx.*1 tensor.*ghost.weight"):
        open_model(local(folder))


def test_a_tensor_in_two_shards_is_read_from_the_one_the_index_names(tmp_path):
    """A tensor stored twice (a head saved in both shards) is read where the index's
    weight_map says, as transformers loads it; with no shard named it is an error."""
    folder = write_sharded(tmp_path / "dup", {
        "s1.safetensors": {"a.weight": torch.ones(3, 3), "lm_head.weight": torch.ones(4, 3)},
        "s2.safetensors": {"lm_head.weight": 2 * torch.ones(4, 3), "b.weight": torch.ones(3, 3)},
        "s3.safetensors": {"lm_head.weight": 3 * torch.ones(4, 3), "c.weight": torch.ones(2, 2)},
    })
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard, value in (("s2.safetensors", 2.0), ("s1.safetensors", 1.0),
                         ("s3.safetensors", 3.0)):
        index["weight_map"]["lm_head.weight"] = shard
        index_path.write_text(json.dumps(index))
        reader = open_model(local(folder)).checkpoint.reader
        assert set(reader.names) >= {"a.weight", "b.weight", "lm_head.weight"}
        assert torch.equal(reader.get("lm_head.weight"), torch.full((4, 3), value))
        reader.close()
    del index["weight_map"]["lm_head.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="lm_head.weight.*stored 3 times.*no index"):
        open_model(local(folder))


def test_index_naming_missing_shard(tmp_path):
    folder = write_sharded(tmp_path / "idx2", {"s1.safetensors": {"a": torch.ones(2)}})
    (folder / "s1.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="idx2.*s1.safetensors is missing"):
        open_model(local(folder))


def test_empty_directory_has_no_weights(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    with pytest.raises(NoWeightsError, match="empty-model.*no safetensors or PyTorch .bin"):
        open_model(local(folder))


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such local directory"):
        open_model(local(tmp_path / "nowhere" / "model"))


@pytest.mark.parametrize("quant, named", [
    ({"quant_method": "hqq", "nbits": 4}, "hqq"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "GPTQ.*'marlin'"),
    ({"quant_method": "awq", "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}, "nvfp4"),
])
def test_quantized_checkpoint_not_read_is_refused_naming_method(tmp_path, quant, named):
    """Formats that esd_experiment/formats/quantized.py reads pass the config check (tests/test_quantized.py reads
    them); any other method or layout is refused, before weights are read, naming it."""
    packed = {"w.qweight": torch.zeros(4, 4, dtype=torch.int32)}
    folder = write_safetensors(tmp_path / "quant", packed,
                               {"model_type": "llama", "quantization_config": quant})
    with pytest.raises(UnsupportedFormatError, match=f"quant.*{named}"):
        open_model(local(folder))


# --- the hub cache, offline ---------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path):
    """org/name with two snapshots: main -> SHA_A (ones), tag v2 -> SHA_B (twos)."""
    cache = tmp_path / "hf_home" / "hub"
    for commit, value, refs in ((SHA_A, 1.0, ("main",)), (SHA_B, 2.0, ("v2",))):
        src = write_safetensors(tmp_path / f"src-{commit[0]}",
                                {"w.weight": torch.full((3, 3), value)})
        write_hub_cache(cache, "org/name", commit, src, refs)
    return cache


@pytest.mark.parametrize("model_id, commit, value", [
    ("org/name", SHA_A, 1.0), ("org/name@main", SHA_A, 1.0),
    (f"org/name@{SHA_B}", SHA_B, 2.0), ("org/name@v2", SHA_B, 2.0),
])
def test_offline_cache_resolves_revision_and_snapshot(hub_cache, monkeypatch, model_id,
                                                      commit, value):
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))
    loaded = open_model(ModelRequest(model_id), cache_dir=str(hub_cache))
    assert loaded.revision == commit and loaded.model_id == model_id
    assert torch.equal(stream(loaded)["w.weight"], torch.full((3, 3), value))


def test_hub_client_reads_offline_flag_from_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert HubClient().offline
    assert not HubClient(offline=False).offline


def test_offline_missing_repo_and_revision_name_cause(hub_cache):
    with pytest.raises(ModelNotFoundError, match="org/other.*HF_HUB_OFFLINE=1"):
        open_model(ModelRequest("org/other"), cache_dir=str(hub_cache))
    with pytest.raises(ModelNotFoundError, match="org/name@v9.*local hub cache"):
        open_model(ModelRequest("org/name@v9"), cache_dir=str(hub_cache))


def test_unreachable_hub_falls_back_to_cache(hub_cache, monkeypatch):
    def unreachable(*args, **kwargs):
        raise httpx2.ConnectError("connection refused")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    hub = HubClient(cache_dir=str(hub_cache), offline=False)
    listing = hub.list_files("org/name", None)
    assert (listing.commit, listing.files) == (SHA_A, ("config.json", "model.safetensors"))
    with pytest.raises(TransientError, match="org/absent.*network"):
        open_model(ModelRequest("org/absent"), hub=hub)


# --- hub error mapping and retry policy -----------------------------------------------

@pytest.mark.parametrize("exc, expected, cause", [
    (http_error(hf_errors.GatedRepoError, 403, f"403 gated; token {TOKEN}"),
     GatedModelError, "gated"),
    (http_error(hf_errors.RepositoryNotFoundError, 401, f"401 Bearer {TOKEN}"),
     ModelNotFoundError, "not found"),
    (http_error(hf_errors.RevisionNotFoundError, 404, "404 no such revision"),
     ModelNotFoundError, "revision not found"),
    (http_error(hf_errors.HfHubHTTPError, 403, f"forbidden for {TOKEN}"),
     GatedModelError, "access refused"),
    (http_error(hf_errors.HfHubHTTPError, 503, "service unavailable"),
     TransientError, "503"),
    (httpx2.ConnectTimeout("timed out"), TransientError, "network"),
    (hf_errors.LocalEntryNotFoundError("not cached"), ModelNotFoundError, "local hub cache"),
])
def test_hub_errors_are_mapped_and_scrubbed(tmp_path, monkeypatch, exc, expected, cause):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(expected) as info:
        open_model(ModelRequest("org/secret"), hub=FailingHub(exc), token=TOKEN)
    message = str(info.value)
    assert "org/secret" in message and cause in message
    assert TOKEN not in message and info.value.__cause__ is None
    assert is_transient(info.value) == (expected is TransientError)


def _chained(outer: type, inner: BaseException) -> BaseException:
    """``outer`` raised while handling ``inner``, as libraries wrap network errors."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer("wrapped") from exc
    except BaseException as exc:
        return exc


def _optional_kinds():
    """requests and urllib3 (older huggingface_hub, other HTTP stacks) when installed."""
    kinds = []
    try:
        import requests
    except ImportError:
        pass
    else:
        kinds += [("requests.ConnectionError", requests.ConnectionError("refused"), True),
                  ("requests.ReadTimeout", requests.ReadTimeout("timed out"), True)]
    try:
        import urllib3
    except ImportError:
        pass
    else:
        kinds += [
            ("urllib3.ProtocolError", urllib3.exceptions.ProtocolError("aborted"), True),
            ("urllib3.ReadTimeoutError", urllib3.exceptions.ReadTimeoutError(None, "/", "t"),
             True),
        ]
    try:
        import httpx
    except ImportError:
        pass
    else:
        kinds.append(("httpx.ConnectError", httpx.ConnectError("refused"), True))
    return kinds


def _network_kinds():
    kinds = [
        ("httpx2.ConnectError", httpx2.ConnectError("connection refused"), True),
        ("httpx2.RemoteProtocolError", httpx2.RemoteProtocolError("peer closed"), True),
        ("httpx2.ReadTimeout", httpx2.ReadTimeout("timed out"), True),
        ("TimeoutError (socket.timeout)", TimeoutError("timed out"), True),
        ("ConnectionResetError", ConnectionResetError("reset by peer"), True),
        ("not cached, from ConnectError", _chained(hf_errors.LocalEntryNotFoundError,
                                                   httpx2.ConnectError("refused")), True),
        ("RuntimeError from ReadTimeout", _chained(RuntimeError, httpx2.ReadTimeout("t")), True),
        ("OfflineModeIsEnabled", hf_errors.OfflineModeIsEnabled("offline"), False),
        ("not cached", hf_errors.LocalEntryNotFoundError("not cached"), False),
        ("httpx2.DecodingError", httpx2.DecodingError("bad gzip"), False),
        ("ValueError naming Timeout", ValueError("Timeout must be positive"), False),
        *_optional_kinds(),
    ]
    return [pytest.param(exc, network, id=name) for name, exc, network in kinds]


@pytest.mark.parametrize("exc, network", _network_kinds())
def test_loader_and_retry_policy_agree_on_network_errors(tmp_path, exc, network):
    """One predicate: what the loader maps to TransientError is what the worker retries."""
    assert is_network_error(exc) == network
    assert is_transient(exc) == network
    with pytest.raises(Exception) as info:
        open_model(ModelRequest("org/model"), hub=FailingHub(exc))
    assert isinstance(info.value, TransientError) == network
    assert is_transient(info.value) == network


def test_transient_keeps_oom_and_esd_flags():
    assert is_transient(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_network_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_transient(TransientError("hub 503"))
    not_found = _chained(ModelNotFoundError, httpx2.ConnectError("refused"))
    assert not is_transient(not_found)  # a named error decides for itself


def test_scrub_masks_given_env_and_token_shaped_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plainsecret")
    text = scrub(f"a {TOKEN} b plainsecret c Authorization: Bearer xyz d given", "given")
    assert TOKEN not in text and "plainsecret" not in text and "xyz" not in text
    assert "given" not in text and text.startswith("a hf_*** b *** c")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_copied_reads_keep_no_mapping_of_a_deleted_shard(tmp_path):
    """Under --cleanup_cache a shard is deleted once read, while its last tensors are still
    analysed: read mapped from the file, they would keep its disk space until then."""
    from esd_experiment.formats.checkpoint import CheckpointReader, read_header

    values = {"a.weight": torch.randn(64, 32), "b.weight": torch.randn(16, 8)}
    for copy, by_span in ((True, False), (True, True), (False, False)):
        path = write_safetensors(tmp_path / f"copy-{copy}-{by_span}", values) / "model.safetensors"
        spans = {}
        if by_span:  # as read from the hub; the download is over (read_growing gives None)
            size = int.from_bytes(path.read_bytes()[:8], "little")
            header = json.loads(path.read_bytes()[8:8 + size])
            spans = {path.name: {n: tuple(header[n]["data_offsets"]) for n in values}}
        reader = CheckpointReader.from_headers(
            {path.name: read_header(path, "m")}, lambda shard, p=path: p, "m",
            sizes={path.name: path.stat().st_size}, spans=spans,
            read_growing=(lambda *args: None) if by_span else None, copy=copy)
        read = {n: reader.get(n) for n in values}
        assert (reader._open is None) is by_span, "by span: the file is read, never mapped"
        reader.close()
        path.unlink()
        with open("/proc/self/maps", encoding="utf-8") as maps:
            mapped = str(path) in maps.read()
        assert mapped is not copy
        assert all(torch.equal(read[n], values[n]) for n in values)
        del read
