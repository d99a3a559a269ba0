"""Adapters: the streamed per-tensor merge against peft's own merge_and_unload()."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import ResNetConfig, ResNetForImageClassification

from esd_experiment.adapters.lora_merge import pattern_key, tied_weights, unsupported_variant
from esd_experiment.core.errors import (
    AdapterBaseError,
    NoWeightsError,
    ShapeMismatchError,
    UnsupportedFormatError,
)
from esd_experiment.formats.checkpoint import FLOAT_DTYPE_NAMES
from esd_experiment.loader.opener import HubClient, ModelRequest, open_model
from tests.loader_fixtures import (
    bert,
    gpt2,
    llama,
    peft_merged,
    save_adapter,
    save_model,
    set_adapter_base,
    write_hub_cache,
)

# Both sides add scale * B @ A to the same float32 weights; only matmul blocking may differ.
MERGE_TOLERANCE = 1e-6
SHA_ADAPTER = "c" * 40
SHA_BASE = "d" * 40
SHA_BASE_V2 = "e" * 40


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Saved base models and the in-memory models they were saved from."""
    root = tmp_path_factory.mktemp("bases")
    models = {"llama": llama(), "gpt2": gpt2(), "bert": bert(),
              "llama_bias": llama(attention_bias=True),
              "llama_tied": llama(tie_word_embeddings=True)}
    dirs = {name: save_model(model, root / name) for name, model in models.items()}
    models["llama_bf16"] = llama().to(torch.bfloat16)
    dirs["llama_bf16"] = save_model(models["llama_bf16"], root / "llama_bf16")
    return models, dirs


def assert_matches_peft(ours: dict, ref: dict, tied=()) -> None:
    assert set(ours) <= set(ref), sorted(set(ours) - set(ref))
    assert set(ref) - set(ours) <= set(tied), sorted(set(ref) - set(ours))
    for name, tensor in ours.items():
        diff = (tensor.to(torch.float32) - ref[name].to(torch.float32)).abs().max().item()
        assert diff <= MERGE_TOLERANCE, (name, diff)


LORA_CASES = {
    "q_v": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True,
                             target_modules=["q_proj", "v_proj", "down_proj"])),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                               rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
                               alpha_pattern={r"layers\.1\..*o_proj": 3})),
    "gpt2_fan_in_fan_out": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                         target_modules=["c_attn", "attn.c_proj"])),
    "gpt2_conv1d_forced": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"])),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                      modules_to_save=["lm_head"])),
    "untied_lm_head": ("llama_tied", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                          modules_to_save=["lm_head"])),
    "tied_lm_head_lora": ("llama_tied", dict(r=4, lora_alpha=8,
                                             target_modules=["q_proj", "lm_head"])),
    "gpt2_tied_lm_head_lora": ("gpt2", dict(r=4, lora_alpha=8,
                                            target_modules=["c_attn", "lm_head"])),
    "lora_bias": ("llama_bias", dict(r=4, lora_alpha=8, lora_bias=True,
                                     target_modules=["q_proj", "k_proj"])),
    "bert_seq_cls": ("bert", dict(r=4, lora_alpha=8, task_type="SEQ_CLS",
                                  target_modules=["query", "value"])),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_merge_matches_peft_with_source_model(bases, tmp_path, case):
    models, dirs = bases
    base_name, lora_kwargs = LORA_CASES[case]
    adapter = save_adapter(models[base_name], tmp_path / "adapter", None, **lora_kwargs)
    loaded = open_model(ModelRequest(str(adapter), "LoRA", str(dirs[base_name])))
    assert loaded.is_adapter and loaded.source_model == str(dirs[base_name])
    assert loaded.revision is None and loaded.base_revision is None
    ours = dict(loaded.iter_tensors())
    ref = peft_merged(dirs[base_name], adapter, seq_cls=base_name == "bert")
    tied = ("lm_head.weight",) if base_name in ("gpt2", "llama_tied") else ()
    assert_matches_peft(ours, ref, tied=tied)
    changed = [n for n in ours if not torch.equal(
        ours[n].to(torch.float32), models[base_name].state_dict()[n].to(torch.float32))]
    assert changed, "the adapter changed nothing: the test would not see a wrong merge"


EMBED = "model.embed_tokens.weight"


def _tied_head_adapter(bases, tmp_path, **lora_kwargs):
    models, dirs = bases
    adapter = save_adapter(models["llama_tied"], tmp_path / "adapter", None, r=4, lora_alpha=8,
                           **lora_kwargs)
    return adapter, peft_merged(dirs["llama_tied"], adapter)


def test_lora_on_tied_lm_head_lands_in_the_embedding(bases, tmp_path):
    """The base stores only the embedding; peft merges the head's LoRA into that one shared
    tensor, so the merged model's embedding and lm_head are both E + scale * B @ A."""
    models, dirs = bases
    adapter, ref = _tied_head_adapter(bases, tmp_path, target_modules=["lm_head"])
    ours = dict(open_model(ModelRequest(str(adapter), "lora", str(dirs["llama_tied"])))
                .iter_tensors())
    assert "lm_head.weight" not in ours  # a tied weight is yielded once, as for the base
    assert torch.equal(ref["lm_head.weight"], ref[EMBED])
    assert_matches_peft(ours, ref, tied=("lm_head.weight",))
    assert not torch.equal(ours[EMBED], models["llama_tied"].state_dict()[EMBED])


def test_tied_lm_head_of_a_class_transformers_lacks_found_by_name(bases, tmp_path):
    _, dirs = bases
    adapter, ref = _tied_head_adapter(bases, tmp_path, target_modules=["lm_head"])
    custom = Path(shutil.copytree(dirs["llama_tied"], tmp_path / "custom-base"))
    config = json.loads((custom / "config.json").read_text())
    config.update(architectures=["MyTiedForCausalLM"], model_type="my_tied")
    (custom / "config.json").write_text(json.dumps(config))
    ours = dict(open_model(ModelRequest(str(adapter), "lora", str(custom))).iter_tensors())
    assert_matches_peft(ours, ref, tied=("lm_head.weight",))


def test_lora_on_tied_embedding_and_head_merges_through_peft(bases, tmp_path, caplog):
    _, dirs = bases
    adapter, ref = _tied_head_adapter(bases, tmp_path, target_modules=["embed_tokens", "lm_head"])
    caplog.set_level("INFO", logger="esd_experiment.adapters.adapter_files")
    ours = dict(open_model(ModelRequest(str(adapter), "lora", str(dirs["llama_tied"])))
                .iter_tensors())
    assert "merging with peft" in caplog.text  # two changes of one tied tensor: peft's merge
    assert "two LoRA modules on the tied weight" in caplog.text or "which the base ties" in caplog.text
    assert_matches_peft(ours, ref, tied=("lm_head.weight",))


def test_tied_weights_from_config():
    assert tied_weights({"architectures": ["LlamaForCausalLM"]}) == {"lm_head.weight": EMBED}
    assert tied_weights({"architectures": ["LlamaForCausalLM"],
                         "tie_word_embeddings": False}) == {}
    assert tied_weights({"architectures": ["NoSuchModelClass"]}) == {"lm_head.weight": ""}


def test_float_dtype_names_match_net_esd():
    from esd_experiment.estimator import net_esd

    assert FLOAT_DTYPE_NAMES == {str(d).removeprefix("torch.") for d in net_esd.FLOAT_DTYPES}
    assert {"float32", "bfloat16"} <= FLOAT_DTYPE_NAMES and "int8" not in FLOAT_DTYPE_NAMES


def test_lora_into_integer_base_tensor_is_refused(bases, tmp_path):
    models, dirs = bases
    adapter = save_adapter(models["llama"], tmp_path / "adapter", None, r=4,
                           target_modules=["q_proj"])
    base = Path(shutil.copytree(dirs["llama"], tmp_path / "int-base"))
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, str(base / "model.safetensors"))
    with pytest.raises(UnsupportedFormatError, match=f"{name}.*int8, not floating point"):
        open_model(ModelRequest(str(adapter), "lora", str(base)))


def test_base_found_through_adapter_config(bases, tmp_path):
    models, dirs = bases
    adapter = save_adapter(models["llama"], tmp_path / "adapter", str(dirs["llama"]),
                           r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    loaded = open_model(ModelRequest(str(adapter)))  # no relation, no source_model
    assert loaded.is_adapter and loaded.source_model == str(dirs["llama"])
    assert_matches_peft(dict(loaded.iter_tensors()), peft_merged(dirs["llama"], adapter))


def test_bf16_base_merges_in_float32(bases, tmp_path):
    models, dirs = bases
    adapter = save_adapter(models["llama_bf16"].float(), tmp_path / "adapter", None,
                           r=4, lora_alpha=8, target_modules=["q_proj"])
    ours = dict(open_model(ModelRequest(str(adapter), source_model=str(dirs["llama_bf16"])))
                .iter_tensors())
    assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert ours["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16
    assert_matches_peft(ours, peft_merged(dirs["llama_bf16"], adapter))


def _rewrite(path, rename) -> None:
    with safe_open(str(path), "pt") as f:
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in tensors.items() if k}, str(path))


@pytest.mark.parametrize("name", ["default", "mine"])
def test_keys_match_across_prefixes_and_adapter_names(bases, tmp_path, name):
    """Base saved as the bare model (no ``model.``), adapter keys with the adapter's name
    (``.default``, or its own, as a PeftModel's ``state_dict`` holds them) and without
    ``base_model.model.``: still matched."""
    models, dirs = bases
    adapter = save_adapter(models["llama"], tmp_path / "adapter", None,
                           r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ref = peft_merged(dirs["llama"], adapter)
    bare = save_model(copy.deepcopy(models["llama"]), tmp_path / "bare")
    _rewrite(bare / "model.safetensors",
             lambda k: None if k == "lm_head.weight" else k.removeprefix("model."))
    _rewrite(adapter / "adapter_model.safetensors", lambda k: k.removeprefix(
        "base_model.model.").replace(".lora_A.", f".lora_A.{name}.").replace(
        ".lora_B.", f".lora_B.{name}."))
    ours = dict(open_model(ModelRequest(str(adapter), "adapter", str(bare))).iter_tensors())
    assert "layers.0.self_attn.q_proj.weight" in ours
    assert_matches_peft({f"model.{k}": v for k, v in ours.items()}, ref, tied=("lm_head.weight",))


def test_adapter_model_bin(bases, tmp_path):
    models, dirs = bases
    adapter = save_adapter(models["llama"], tmp_path / "adapter", str(dirs["llama"]), r=4,
                           lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, adapter / "adapter_model.bin")
    ref = peft_merged(dirs["llama"], adapter)
    (adapter / "adapter_model.safetensors").unlink()
    assert_matches_peft(dict(open_model(ModelRequest(str(adapter))).iter_tensors()), ref)


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_variants_merge_through_peft_fallback(bases, tmp_path, kind, caplog):
    models, dirs = bases
    if kind == "dora":
        config = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                            target_modules=["q_proj", "v_proj"])
    else:
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                           feedforward_modules=["down_proj"])
    peft_model = get_peft_model(copy.deepcopy(models["llama"]), config)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:  # IA3 starts at ones, DoRA's magnitude at the norms
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "adapter")
    set_adapter_base(tmp_path / "adapter", str(dirs["llama"]))
    assert unsupported_variant(json.loads((tmp_path / "adapter" / "adapter_config.json")
                                          .read_text())) == ("DoRA (use_dora)" if kind == "dora"
                                                             else "IA3")
    caplog.set_level("INFO", logger="esd_experiment.adapters.adapter_files")
    ours = dict(open_model(ModelRequest(str(tmp_path / "adapter"))).iter_tensors())
    assert "merging with peft" in caplog.text
    ref = peft_merged(dirs["llama"], tmp_path / "adapter")
    assert_matches_peft(ours, ref)
    assert not torch.equal(ours["model.layers.0.self_attn.v_proj.weight"],
                           models["llama"].state_dict()["model.layers.0.self_attn.v_proj.weight"])


def test_lora_on_convolutions_merges_through_peft_fallback(tmp_path):
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    base = save_model(ResNetForImageClassification(config).eval(), tmp_path / "resnet")
    adapter = save_adapter(ResNetForImageClassification.from_pretrained(str(base)),
                           tmp_path / "adapter", str(base), r=2, target_modules=["convolution"])
    ours = dict(open_model(ModelRequest(str(adapter))).iter_tensors())
    merged = PeftModel.from_pretrained(ResNetForImageClassification.from_pretrained(str(base)),
                                       str(adapter)).merge_and_unload()
    assert_matches_peft(ours, merged.state_dict())
    name = "resnet.embedder.embedder.convolution.weight"
    assert ours[name].ndim == 4 and not torch.equal(
        ours[name], ResNetForImageClassification.from_pretrained(str(base)).state_dict()[name])


def test_pattern_key_matches_like_peft():
    keys = ["layers.0.self_attn.q_proj", "v_proj", r"layers\.1\..*o_proj"]
    assert pattern_key(keys, "model.layers.0.self_attn.q_proj") == keys[0]
    assert pattern_key(keys, "model.layers.10.self_attn.q_proj") is None
    assert pattern_key(keys, "model.layers.3.self_attn.v_proj") == "v_proj"
    assert pattern_key(keys, "model.layers.1.self_attn.o_proj") == keys[2]


# --- adapter errors -----------------------------------------------------------------------

def test_missing_source_model_names_what_was_tried(bases, tmp_path):
    models, _ = bases
    adapter = save_adapter(models["llama"], tmp_path / "my-adapter", None, r=4,
                           target_modules=["q_proj"])
    missing = str(tmp_path / "no" / "such-base")
    with pytest.raises(AdapterBaseError) as info:
        open_model(ModelRequest(str(adapter), "lora", missing))
    assert "my-adapter" in str(info.value) and "source_model" in str(info.value)
    assert missing in str(info.value) and "no such local directory" in str(info.value)


def test_no_base_anywhere(bases, tmp_path):
    models, _ = bases
    adapter = save_adapter(models["llama"], tmp_path / "orphan", None, r=4,
                           target_modules=["q_proj"])
    with pytest.raises(AdapterBaseError, match="orphan.*Tried nothing.*source_model"):
        open_model(ModelRequest(str(adapter)))


def test_adapter_config_base_missing_from_hub(bases, tmp_path, hub):
    models, _ = bases
    adapter = save_adapter(models["llama"], tmp_path / "adapter", "org/deleted-base", r=4,
                           target_modules=["q_proj"])
    with pytest.raises(AdapterBaseError, match="base_model_name_or_path 'org/deleted-base'"
                                               ".*not found"):
        open_model(ModelRequest(str(adapter)),
                   hub=HubClient(cache_dir=str(hub.cache), offline=False))


def test_shape_mismatch_names_base_and_tensor(bases, tmp_path):
    models, _ = bases
    adapter = save_adapter(models["llama"], tmp_path / "adapter", None, r=4,
                           target_modules=["q_proj"])
    wider = save_model(llama(hidden_size=48, num_attention_heads=4), tmp_path / "wider-base")
    with pytest.raises(ShapeMismatchError) as info:
        open_model(ModelRequest(str(adapter), "lora", str(wider)))
    assert "wider-base" in str(info.value) and "q_proj" in str(info.value)


def test_adapter_tensors_matching_nothing_are_an_error(bases, tmp_path):
    models, dirs = bases
    adapter = save_adapter(models["gpt2"], tmp_path / "gpt2-adapter", None, r=4,
                           target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(ShapeMismatchError, match="gpt2-adapter: 4 adapter tensor.*match no "
                                                 "tensor of the base model.*c_attn"):
        open_model(ModelRequest(str(adapter), "lora", str(dirs["llama"])))


def test_marked_adapter_without_adapter_config(bases):
    _, dirs = bases
    with pytest.raises(NoWeightsError, match="marked as an adapter.*'LoRA'.*adapter_config"):
        open_model(ModelRequest(str(dirs["llama"]), "LoRA"))


# --- adapters from the hub ----------------------------------------------------------------

def test_adapter_and_base_from_offline_cache_record_both_commits(bases, tmp_path):
    models, dirs = bases
    cache = tmp_path / "hub"
    write_hub_cache(cache, "org/base", SHA_BASE, dirs["llama"])
    other = save_model(llama(seed=5), tmp_path / "other-base")
    write_hub_cache(cache, "org/base", SHA_BASE_V2, other, refs=("v2",))
    adapter = save_adapter(models["llama"], tmp_path / "adapter", "org/base", r=4,
                           lora_alpha=8, target_modules=["q_proj", "v_proj"])
    write_hub_cache(cache, "org/adapter", SHA_ADAPTER, adapter)
    loaded = open_model(ModelRequest("org/adapter"), cache_dir=str(cache))
    assert (loaded.revision, loaded.source_model, loaded.base_revision) == (
        SHA_ADAPTER, "org/base", SHA_BASE)
    assert_matches_peft(dict(loaded.iter_tensors()), peft_merged(dirs["llama"], adapter))
    pinned = open_model(ModelRequest("org/adapter", source_model="org/base@v2"),
                        cache_dir=str(cache))
    assert pinned.base_revision == SHA_BASE_V2


def test_adapter_config_revision_pins_the_base(bases, tmp_path):
    models, dirs = bases
    cache = tmp_path / "hub"
    write_hub_cache(cache, "org/base", SHA_BASE, dirs["llama"])
    write_hub_cache(cache, "org/base", SHA_BASE_V2, dirs["llama"], refs=("v2",))
    adapter = save_adapter(models["llama"], tmp_path / "adapter", "org/base", r=4,
                           target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["revision"] = "v2"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = open_model(ModelRequest(str(adapter)), cache_dir=str(cache))
    assert loaded.base_revision == SHA_BASE_V2


def test_adapter_downloads_only_adapter_files(bases, tmp_path, hub):
    models, dirs = bases
    adapter = save_adapter(models["llama"], tmp_path / "adapter", "org/base", r=4,
                           target_modules=["q_proj"])
    (adapter / "training_args.bin").write_bytes(b"x")
    (adapter / "optimizer.pt").write_bytes(b"x")
    hub.add_repo("org/adapter", adapter)
    hub.add_repo("org/base", dirs["llama"])
    loaded = open_model(ModelRequest("org/adapter", "peft"),
                        hub=HubClient(cache_dir=str(hub.cache), offline=False))
    assert dict(loaded.iter_tensors())
    whole = sorted((s.repo_id, s.filename) for s in hub.log if s.method == "GET"
                   and s.filename and s.range is None and s.status == 200)
    assert whole == [
        ("org/adapter", "adapter_config.json"), ("org/adapter", "adapter_model.safetensors"),
        ("org/base", "config.json"), ("org/base", "model.safetensors")]


def test_seq_cls_lora_on_a_causal_base_has_no_lm_head(bases, tmp_path):
    """The merged model peft builds for a SEQ_CLS adapter is the sequence classifier: its
    ``score`` head comes from the adapter, and the base's ``lm_head`` is not part of it."""
    from transformers import AutoModelForSequenceClassification

    _, dirs = bases
    classifier = AutoModelForSequenceClassification.from_pretrained(str(dirs["llama"]))
    adapter = save_adapter(classifier, tmp_path / "adapter", str(dirs["llama"]), r=4,
                           lora_alpha=8, task_type="SEQ_CLS", target_modules=["q_proj"])
    ours = dict(open_model(ModelRequest(str(adapter), "lora", str(dirs["llama"])))
                .iter_tensors())
    ref = peft_merged(dirs["llama"], adapter, seq_cls=True)
    assert "lm_head.weight" not in ours and "score.weight" in ours
    assert_matches_peft(ours, ref)


def test_modules_to_save_on_a_tied_embedding_keeps_the_original_head(bases, tmp_path):
    """peft trains a copy of a saved module: the tied GPT-2 ``lm_head`` keeps the original
    embedding, so the merged model holds two different matrices and both get a row."""
    models, dirs = bases
    adapter = save_adapter(models["gpt2"], tmp_path / "adapter", str(dirs["gpt2"]), r=4,
                           lora_alpha=8, target_modules=["c_attn"], modules_to_save=["wte"])
    ours = dict(open_model(ModelRequest(str(adapter))).iter_tensors())
    ref = peft_merged(dirs["gpt2"], adapter)
    assert not torch.equal(ref["lm_head.weight"], ref["transformer.wte.weight"])
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(ours)
    assert_matches_peft(ours, ref)


def module_name(arch: str, name: str, state: dict) -> str:
    """A published multimodal tensor's name in the installed transformers' module: the layout
    of 4.52 (tests/test_delta_layouts.py), whose CLIP/SigLIP vision towers transformers 5
    holds without their ``vision_model.``."""
    from tests.test_delta_layouts import in_module_layout

    new = in_module_layout(arch, name)
    return new if new in state else new.replace(".vision_tower.vision_model.", ".vision_tower.")


@pytest.mark.parametrize("arch", ["gemma3", "llava", "qwen2_vl"])
def test_an_adapter_in_the_module_layout_merges_into_its_published_base(tmp_path, arch):
    """An adapter trained on a multimodal model as transformers builds it keys its tensors by
    the module's names (``model.language_model.layers...`` since 4.52; transformers 5's
    vision towers without ``vision_model.``); its published base names them otherwise
    (``language_model.model.layers``, Qwen2-VL's ``model.layers``,
    ``vision_tower.vision_model.encoder``). Each LoRA lands in the base tensor of its module:
    peft's merge_and_unload() of the model holding the published weights is the oracle."""
    import transformers

    from tests.zoo_published import build

    published, base_dir = build(arch, tmp_path)
    config = transformers.AutoConfig.for_model(**published.config)
    model = getattr(transformers, published.config["architectures"][0])(config)
    state = model.state_dict()
    held = [n for n, v in published.values.items() if module_name(arch, n, state) in state
            and state[module_name(arch, n, state)].shape == v.shape]
    with torch.no_grad():  # the published weights, where the module holds them
        for name in held:
            state[module_name(arch, name, state)].copy_(published.values[name])
    targets = [n for n in held if n.endswith(("q_proj.weight", "v_proj.weight"))]
    assert len(targets) == (4 if arch == "qwen2_vl" else 8)  # the towers' attention too
    adapter = save_adapter(model, tmp_path / "lora", str(base_dir), r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    for name in published.values:
        if name in targets:
            torch.testing.assert_close(ours[name], merged[module_name(arch, name, state)],
                                       rtol=MERGE_TOLERANCE, atol=MERGE_TOLERANCE)
            assert not torch.equal(ours[name], published.values[name])
        else:
            assert torch.equal(ours[name], published.values[name]), name


def test_a_vit_adapter_of_transformers_5_merges_into_its_published_base(tmp_path):
    """transformers 5 loads a published ViT (``encoder.layer.N.attention.attention.query``)
    into modules of other names (``vit.layers.N.attention.q_proj``), which peft's image
    classification recipe (LoRA on q and v, the classifier saved) keys its adapter by. Each
    LoRA lands in its published tensor: peft's merge_and_unload() is the oracle."""
    import transformers

    hidden, layers = 32, 2
    config = transformers.ViTConfig(hidden_size=hidden, intermediate_size=64,
                                    num_hidden_layers=layers, num_attention_heads=4,
                                    image_size=16, patch_size=8)
    gen = torch.Generator().manual_seed(0)
    published = {"embeddings.cls_token": (1, 1, hidden), "embeddings.position_embeddings":
                 (1, 5, hidden), "embeddings.patch_embeddings.projection.weight": (hidden, 3, 8, 8),
                 "layernorm.weight": (hidden,), "pooler.dense.weight": (hidden, hidden)}
    for i in range(layers):  # google/vit-base-patch16-224-in21k's names
        for part, shape in (("attention.attention.query", (hidden, hidden)),
                            ("attention.attention.key", (hidden, hidden)),
                            ("attention.attention.value", (hidden, hidden)),
                            ("attention.output.dense", (hidden, hidden)),
                            ("intermediate.dense", (64, hidden)), ("output.dense", (hidden, 64))):
            published[f"encoder.layer.{i}.{part}.weight"] = shape
        for norm in ("layernorm_before", "layernorm_after"):
            published[f"encoder.layer.{i}.{norm}.weight"] = (hidden,)
    published = {n: 0.1 * torch.randn(s, generator=gen) for n, s in published.items()}
    base = tmp_path / "vit"
    base.mkdir()
    save_file(published, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({**config.to_dict(),
                                                  "architectures": ["ViTModel"]}))
    model = transformers.ViTForImageClassification.from_pretrained(str(base), num_labels=3)
    assert torch.equal(model.vit.layers[0].attention.q_proj.weight,
                       published["encoder.layer.0.attention.attention.query.weight"])
    adapter = save_adapter(model, tmp_path / "lora", str(base), r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    for i in range(layers):
        for old, new in (("query", "q_proj"), ("value", "v_proj"), ("key", "k_proj")):
            name = f"encoder.layer.{i}.attention.attention.{old}.weight"
            torch.testing.assert_close(ours[name], merged[f"vit.layers.{i}.attention.{new}.weight"],
                                       rtol=MERGE_TOLERANCE, atol=MERGE_TOLERANCE)
            assert torch.equal(ours[name], published[name]) == (old == "key"), name
    torch.testing.assert_close(ours["classifier.weight"], merged["classifier.weight"])


def test_a_thinker_adapter_merges_into_its_omni_base_beside_the_talker(tmp_path):
    """Qwen2.5-Omni publishes its text model as ``thinker.model.layers.N`` beside the
    speech model's ``talker.model.layers.N``; an adapter trained on the thinker alone keys
    ``model.layers.N``, which names a layer of both. The shapes tell them apart (the talker
    is narrower): each LoRA lands in the thinker's tensor, peft's merge_and_unload() the
    oracle, and the talker is left as it is."""
    import transformers

    def qwen2(hidden: int, seed: int):
        torch.manual_seed(seed)
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))

    thinker, talker = qwen2(32, 0), qwen2(16, 1)
    published = {f"thinker.{n}": v.clone() for n, v in thinker.state_dict().items()}
    published.update({f"talker.{n}": v.clone() for n, v in talker.state_dict().items()})
    base = tmp_path / "omni"
    base.mkdir()
    save_file({n: v.contiguous() for n, v in published.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni",
                                                  "architectures": ["Qwen2_5OmniModel"]}))
    adapter = save_adapter(thinker, tmp_path / "lora", str(base), r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    merged = PeftModel.from_pretrained(thinker, str(adapter)).merge_and_unload().state_dict()
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    assert set(ours) == set(published)
    for name, value in published.items():
        if name.startswith("thinker.") and name.endswith(("q_proj.weight", "v_proj.weight",
                                                          "down_proj.weight")):
            torch.testing.assert_close(ours[name], merged[name.removeprefix("thinker.")],
                                       rtol=MERGE_TOLERANCE, atol=MERGE_TOLERANCE)
            assert not torch.equal(ours[name], value)
        else:
            assert torch.equal(ours[name], value), name
