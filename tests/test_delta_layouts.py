"""The delta view over checkpoints whose layout differs from their source's (tied and untied
heads, expert layouts, GGUF): each fine-tune tensor is read once for its result and its delta,
whichever source tensors it pairs with."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch

from tests.loader_fixtures import llama, save_model, write_safetensors
from tests.test_delta import counted_reads, fused_mixtral


@pytest.mark.parametrize("layout", ["tied_source", "per_expert_fine_tune"])
def test_each_fine_tune_tensor_is_read_once_when_one_source_tensor_serves_several(
        tmp_path, monkeypatch, layout):
    """One source tensor paired with several fine-tune tensors (the embedding of a tied source
    with the fine-tune's embedding and lm_head; a fused expert stack with each expert's
    matrices): the fine-tune's tensors are read once each, for its result and its delta (a
    second read would find a shard that --cleanup_cache deleted after the first)."""
    from esd_experiment.run import worker as esd_worker
    from tests.zoo_published import build

    if layout == "tied_source":
        save_model(llama(tie_word_embeddings=True), tmp_path / "source")
        save_model(llama(seed=1), tmp_path / "ft")
    else:
        published, per_expert = build("mixtral", tmp_path)
        write_safetensors(tmp_path / "source", fused_mixtral(published.values),
                          published.config)
        (tmp_path / "ft").symlink_to(per_expert)
    reads = counted_reads(monkeypatch)
    ft = str(tmp_path / "ft")
    assert esd_worker.main([*map(str, ["--model_id", ft, "--source_model", tmp_path / "source",
                                       "--output_dir", tmp_path / "out", "--device", "cpu",
                                       "--delta"])]) == 0
    mine = {name: n for (model, name), n in reads.items() if model == ft}
    assert mine and max(mine.values()) == 1, Counter(mine).most_common(3)


def mixtral_as_gguf(values: dict, path):
    """A published Mixtral's tensors as llama.cpp converts it (arch llama; attn_q/attn_k rows
    permuted; the experts of a block stacked per projection, ffn_gate_exps = [w1_e], ffn_up_exps
    = [w3_e], ffn_down_exps = [w2_e]; the router ffn_gate_inp), F32."""
    from tests.test_gguf import LLAMA_META, T, llama_permute, write_gguf
    from tests.zoo_published import LAYERS, E, F, H, V

    def arr(t):
        return np.ascontiguousarray(t.numpy())

    tensors = {"token_embd.weight": values["model.embed_tokens.weight"],
               "output.weight": values["lm_head.weight"],
               "output_norm.weight": values["model.norm.weight"]}
    for i in range(LAYERS):
        p, moe = f"model.layers.{i}", f"model.layers.{i}.block_sparse_moe"
        b = f"blk.{i}"
        tensors.update({
            f"{b}.attn_q.weight": llama_permute(values[f"{p}.self_attn.q_proj.weight"].numpy(),
                                                4, 4),
            f"{b}.attn_k.weight": llama_permute(values[f"{p}.self_attn.k_proj.weight"].numpy(),
                                                4, 2),
            f"{b}.attn_v.weight": values[f"{p}.self_attn.v_proj.weight"],
            f"{b}.attn_output.weight": values[f"{p}.self_attn.o_proj.weight"],
            f"{b}.attn_norm.weight": values[f"{p}.input_layernorm.weight"],
            f"{b}.ffn_norm.weight": values[f"{p}.post_attention_layernorm.weight"],
            f"{b}.ffn_gate_inp.weight": values[f"{moe}.gate.weight"]})
        for gguf, part in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            tensors[f"{b}.ffn_{gguf}_exps.weight"] = torch.stack(
                [values[f"{moe}.experts.{e}.{part}.weight"] for e in range(E)])
    meta = {**LLAMA_META, "embedding_length": H, "feed_forward_length": F, "vocab_size": V,
            "expert_count": E, "expert_used_count": 2}
    return write_gguf(path, {n: (arr(t) if isinstance(t, torch.Tensor) else
                                 np.ascontiguousarray(t), T.F32) for n, t in tensors.items()},
                      metadata=meta)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("gguf_side", ["fine_tune", "source"])
def test_a_gguf_mixtral_against_the_published_per_expert_checkpoint(tmp_path, caplog,
                                                                   gguf_side, layout):
    """llama.cpp's Mixtral (ffn_gate_exps/ffn_up_exps/ffn_down_exps stacks) against the
    published per-expert names, or transformers' fused stacks, either way round: every expert
    matrix gives its ΔW row (numpy on the difference of the published matrices); the router,
    too small for a row, is named as left out."""
    import logging

    from esd_experiment import analyze
    from tests.test_delta import EIGEN_RTOL, gram_evals
    from tests.zoo_published import LAYERS, E, build

    published, _ = build("mixtral", tmp_path)
    gen = torch.Generator().manual_seed(9)
    tuned = {n: v + 0.01 * torch.randn(v.shape, generator=gen)
             for n, v in published.values.items()}
    as_layout = fused_mixtral if layout == "fused" else dict
    if gguf_side == "fine_tune":
        ft = mixtral_as_gguf(tuned, tmp_path / "ft.gguf")
        source = write_safetensors(tmp_path / "source", as_layout(published.values),
                                   published.config)
    else:
        ft = write_safetensors(tmp_path / "ft", as_layout(tuned), published.config)
        source = mixtral_as_gguf(published.values, tmp_path / "source.gguf")
    with caplog.at_level(logging.WARNING, logger="esd_experiment"):
        rows = analyze(str(ft), base=str(source), device="cpu")
    experts = [n for n in rows["longname"] if "exps" in n or ".experts." in n]
    assert len(experts) == LAYERS * 3 * E
    assert len(rows) == 2 + LAYERS * (4 + 3 * E)
    for name in experts:  # named as the fine-tune names it, per-expert or a stack's slice
        row = rows.set_index("longname").loc[name]
        layer, rest = name.split(".ffn_") if "exps" in name else (name, "")
        if rest:
            kind, e = rest.split("_exps[")
            part = {"gate": "w1", "up": "w3", "down": "w2"}[kind]
            name = f"{layer}.block_sparse_moe.experts.{e.rstrip(']')}.{part}"
        ref = gram_evals((tuned[f"{name}.weight"].double()
                          - published.values[f"{name}.weight"].double()).numpy())
        assert row["norm"] == pytest.approx(ref.sum(), rel=EIGEN_RTOL), name
        assert row["spectral_norm"] == pytest.approx(ref.max(), rel=EIGEN_RTOL), name
    assert np.isfinite(rows["norm"]).all()
    (line,) = [r.getMessage() for r in caplog.records if "no delta row" in r.getMessage()]
    assert f"{LAYERS} of its" in line and "gate" in line


def test_a_source_that_is_one_gguf_file_of_a_hub_repository(hub, tmp_path):
    """A source_model written as the results name one GGUF file of a repository,
    ``org/name#<gguf_file>``, opens that file: the fine-tune's delta against it (numpy on the
    difference of the Hugging Face matrices); without it, a repository of several GGUF files
    is refused in one line that says how to name one."""
    import shutil

    from safetensors.torch import load_file

    from esd_experiment import analyze
    from esd_experiment.core.errors import ESDError
    from tests.test_delta import EIGEN_RTOL, gram_evals
    from tests.test_gguf import llama_as_gguf

    hf_dir, gguf = llama_as_gguf(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(gguf, repo / "tiny.F32.gguf")
    shutil.copy(gguf, repo / "tiny.other.gguf")
    hub.add_repo("org/tiny-GGUF", repo)
    save_model(llama(seed=4), tmp_path / "ft")
    rows = analyze(str(tmp_path / "ft"), base="org/tiny-GGUF#tiny.F32.gguf",
                   cache_dir=str(hub.cache), device="cpu").set_index("longname")
    assert len(rows) == 16
    assert (rows["source_model"] == "org/tiny-GGUF#tiny.F32.gguf").all()
    mine, theirs = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "ft", hf_dir))
    for name, row in rows.iterrows():
        ref = gram_evals((mine[f"{name}.weight"].double()
                          - theirs[f"{name}.weight"].double()).numpy())
        assert row["norm"] == pytest.approx(ref.sum(), rel=EIGEN_RTOL), name
    with pytest.raises(ESDError) as refused:
        analyze(str(tmp_path / "ft"), base="org/tiny-GGUF", cache_dir=str(hub.cache))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "ft"))
    assert "org/tiny-GGUF#" in message


def test_a_tied_fine_tune_of_an_untied_source_has_its_lm_head_delta(tmp_path):
    """A fine-tune that ties lm_head to its embedding stores the embedding alone; its lm_head
    is that embedding, so ΔW = its embedding - the source's lm_head, the row WeightWatcher's
    base_model= gives. Through the checkpoints and the modules alike."""
    from tests.test_delta import heavy_tailed, on_grid

    base = llama(tie_word_embeddings=False)
    rng = np.random.default_rng(9)
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(on_grid(param))
    ft = llama(tie_word_embeddings=True)
    ft.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for param in ft.parameters():
            if param.ndim == 2:
                param.add_(on_grid(heavy_tailed(*param.shape, rng)))
    assert ft.lm_head.weight is ft.model.embed_tokens.weight
    lm_head_delta_as_weightwatcher(ft, base, tmp_path)


def test_an_untied_fine_tune_of_a_tied_source_has_its_lm_head_delta(tmp_path):
    """A source that ties lm_head to its embedding stores the embedding alone; the fine-tune
    that unties them has ΔW = lm_head - the source's embedding, as WeightWatcher's base_model=
    subtracts the source's (tied) lm_head. Through the checkpoints and the modules alike."""
    from tests.test_delta import heavy_tailed, on_grid

    base = llama(tie_word_embeddings=True)
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(on_grid(param))
    ft = llama(tie_word_embeddings=False)
    ft.load_state_dict(base.state_dict(), strict=False)
    rng = np.random.default_rng(8)
    with torch.no_grad():
        ft.lm_head.weight.copy_(base.model.embed_tokens.weight)
        for param in ft.parameters():
            if param.ndim == 2:
                param.add_(on_grid(heavy_tailed(*param.shape, rng)))
    lm_head_delta_as_weightwatcher(ft, base, tmp_path)


def lm_head_delta_as_weightwatcher(ft, base, tmp_path) -> None:
    """``ft``'s delta against ``base``, saved and as modules, has the lm_head row and
    WeightWatcher's base_model= numbers on every layer both give."""
    from esd_experiment import analyze
    from tests.test_delta import WW_CONFIG, compare, ww

    save_model(base, tmp_path / "base")
    save_model(ft, tmp_path / "ft")
    theirs = ww.WeightWatcher(model=ft, base_model=base).analyze()
    assert "lm_head" in set(theirs["longname"])
    for ours in (analyze(str(tmp_path / "ft"), base=str(tmp_path / "base"), device="cpu",
                         **WW_CONFIG),
                 analyze(ft, base=base, device="cpu", **WW_CONFIG)):
        assert "lm_head" in set(ours["longname"])
        compare(ours, theirs, sorted(set(ours["longname"]) & set(theirs["longname"])))


def test_an_adapter_that_saves_the_head_of_a_tied_base_has_its_lm_head_delta(tmp_path):
    """A base that ties lm_head to its embedding stores the embedding alone; an adapter with
    modules_to_save=["lm_head"] trains a copy of it, so the merged model's lm_head minus the
    base's (the embedding) is the row's ΔW. Oracle: peft's merge minus the base, numpy's
    eigenvalues; through the adapter's files and the PeftModel alike."""
    from peft import PeftModel

    from esd_experiment import analyze
    from tests.loader_fixtures import save_adapter
    from tests.test_delta import EIGEN_RTOL, gram_evals

    base = llama(tie_word_embeddings=True)
    save_model(base, tmp_path / "base")
    save_adapter(base, tmp_path / "lora", str(tmp_path / "base"), r=4, lora_alpha=8,
                 target_modules=["q_proj"], modules_to_save=["lm_head"])
    original = copy.deepcopy(base).double()
    merged = PeftModel.from_pretrained(copy.deepcopy(original),
                                       str(tmp_path / "lora")).merge_and_unload()
    update = merged.lm_head.weight - original.model.embed_tokens.weight
    peft_model = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "lora"))
    ref = gram_evals(update.detach().numpy())
    assert ref.max() > 0
    for ours in (analyze(str(tmp_path / "lora"), delta=True, device="cpu"),
                 analyze(peft_model, delta=True, device="cpu")):
        row = ours.set_index("longname").loc["lm_head"]
        assert row["norm"] == pytest.approx(ref.sum(), rel=EIGEN_RTOL)
        assert row["spectral_norm"] == pytest.approx(ref.max(), rel=EIGEN_RTOL)


# The module layout of multimodal models that transformers 4.52-4.57 save (and that later
# models publish): the published names renamed by those versions' _checkpoint_conversion_mapping
# (LLaVA/Gemma 3: "^language_model.model" -> "model.language_model", "^vision_tower" ->
# "model.vision_tower", "^language_model.lm_head" -> "lm_head"; Qwen2-VL: "^visual" ->
# "model.visual", "^model" -> "model.language_model").
MODULE_LAYOUT = {
    "llava": ((r"^language_model\.model\.", "model.language_model."),
              (r"^language_model\.lm_head\.", "lm_head."),
              (r"^vision_tower\.", "model.vision_tower."),
              (r"^multi_modal_projector\.", "model.multi_modal_projector.")),
    "gemma3": ((r"^language_model\.model\.", "model.language_model."),
               (r"^vision_tower\.", "model.vision_tower."),
               (r"^multi_modal_projector\.", "model.multi_modal_projector.")),
    "qwen2_vl": ((r"^model\.", "model.language_model."), (r"^visual\.", "model.visual.")),
}


def in_module_layout(arch: str, name: str) -> str:
    import re

    for old, new in MODULE_LAYOUT[arch]:
        name, done = re.subn(old, new, name)
        if done:
            break
    return name


@pytest.mark.parametrize("arch", sorted(MODULE_LAYOUT))
@pytest.mark.parametrize("module_side", ["fine_tune", "source"])
def test_a_multimodal_checkpoint_in_the_module_layout_pairs_with_the_published_one(
        tmp_path, caplog, arch, module_side):
    """A multimodal fine-tune saved from transformers' modules (model.language_model.layers,
    model.visual, ...) against its published source (language_model.model.layers, or
    Qwen2-VL's model.layers), either way round: every weight gives its ΔW row, and no line
    says a weight was left out (numpy on the difference of the published tensors)."""
    import logging

    from esd_experiment import analyze
    from tests.test_delta import EIGEN_RTOL, gram_evals
    from tests.zoo_published import ROW_KINDS, build

    published, source = build(arch, tmp_path)
    gen = torch.Generator().manual_seed(5)
    tuned = {n: v + 0.01 * torch.randn(v.shape, generator=gen)
             for n, v in published.values.items()}
    renamed = {in_module_layout(arch, n): n for n in published.values}
    assert len(renamed) == len(published.values) and any(a != b for a, b in renamed.items())
    if module_side == "fine_tune":
        ft = write_safetensors(tmp_path / "ft", {m: tuned[p] for m, p in renamed.items()},
                               published.config)
        name_of = {p: m for m, p in renamed.items()}
    else:
        ft = write_safetensors(tmp_path / "ft", tuned, published.config)
        source = write_safetensors(tmp_path / "src", {m: published.values[p]
                                                      for m, p in renamed.items()},
                                   published.config)
        name_of = {p: p for p in published.values}
    with caplog.at_level(logging.WARNING, logger="esd_experiment"):
        rows = analyze(str(ft), base=str(source), device="cpu").set_index("longname")
    assert not [r for r in caplog.records if "no delta row" in r.getMessage()]
    weights = [t for t in published.tensors if t.kind in ROW_KINDS]
    assert sorted(rows.index) == sorted(name_of[t.name].removesuffix(".weight")
                                        for t in weights)
    checked = 0
    for t in weights:
        row = rows.loc[name_of[t.name].removesuffix(".weight")]
        if len(t.shape) != 2 or row["status"] == "too_small":
            continue  # a convolution (one pooled row), or too few eigenvalues to have a norm
        checked += 1
        ref = gram_evals((tuned[t.name].double() - published.values[t.name].double()).numpy())
        assert row["norm"] == pytest.approx(ref.sum(), rel=EIGEN_RTOL), t.name
        assert row["spectral_norm"] == pytest.approx(ref.max(), rel=EIGEN_RTOL), t.name
    assert checked >= len([t for t in weights if t.kind == "linear"])


# Published checkpoints with two stacks whose names are one another's without their first
# component: the model's own, and (the source's config, the fine-tune's, widths).
TWO_STACKS = {
    # Llama 4: language_model.model.layers.N beside the vision tower's
    # vision_model.model.layers.N; a fine-tune of the text model alone names them
    # model.layers.N (the text-model wrapper tells them apart)
    "llama4": (("language_model", 32), ("vision_model", 16),
               {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4"},
               {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text"}),
    # Qwen2.5-Omni: thinker.model.layers.N beside the narrower speech model's
    # talker.model.layers.N (the shapes tell them apart)
    "qwen2_5_omni": (("thinker", 32), ("talker", 16),
                     {"architectures": ["Qwen2_5OmniModel"], "model_type": "qwen2_5_omni"},
                     {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}),
}


@pytest.mark.parametrize("published", sorted(TWO_STACKS))
def test_a_fine_tune_of_one_stack_pairs_with_it_beside_the_other(tmp_path, published):
    """A fine-tune of one stack alone (``model.layers.N``) against the published checkpoint
    of both: each of its layers pairs with its own stack's (numpy on the difference), none
    with the other's."""
    from esd_experiment import analyze
    from tests.test_delta import EIGEN_RTOL, gram_evals

    (own, width), (other, other_width), config, ft_config = TWO_STACKS[published]
    gen = torch.Generator().manual_seed(4)
    source = {}
    for part, size in ((own, width), (other, other_width)):
        source[f"{part}.model.embed_tokens.weight"] = torch.randn(64, size, generator=gen)
        for i in range(2):
            for proj in ("q_proj", "o_proj"):
                source[f"{part}.model.layers.{i}.self_attn.{proj}.weight"] = torch.randn(
                    size, size, generator=gen)
            source[f"{part}.model.layers.{i}.mlp.down_proj.weight"] = torch.randn(
                size, 2 * size, generator=gen)
    write_safetensors(tmp_path / "source", source, config)
    alone = {n.removeprefix(f"{own}."): v for n, v in source.items() if n.startswith(f"{own}.")}
    tuned = {n: v + 0.01 * torch.randn(v.shape, generator=gen) for n, v in alone.items()}
    write_safetensors(tmp_path / "ft", tuned, ft_config)
    rows = analyze(str(tmp_path / "ft"), base=str(tmp_path / "source"),
                   device="cpu").set_index("longname")
    assert sorted(rows.index) == sorted(n.removesuffix(".weight") for n in tuned)
    for name, value in tuned.items():
        ref = gram_evals((value.double() - alone[name].double()).numpy())
        assert rows.loc[name.removesuffix(".weight"), "spectral_norm"] == pytest.approx(
            ref.max(), rel=EIGEN_RTOL), name
