"""Weights stored in other forms than one plain matrix each: tied tensors listed several times
in a sharded ``.bin`` index, fused expert stacks, 1-D and transposed convolutions, weight
normalisation, and a full model that carries a stray ``adapter_config.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    DbrxConfig,
    DbrxForCausalLM,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5ForConditionalGeneration,
    Wav2Vec2Config,
    Wav2Vec2Model,
)

from esd_experiment.estimator.net_esd import iter_layer_results
from esd_experiment.estimator.options import ESDConfig
from esd_experiment.loader.opener import ModelRequest, open_model
from tests.loader_fixtures import save_model, write_safetensors

# The loader rebuilds g * v / ||v|| in float32, as torch's weight_norm does: float32 rounding.
WEIGHT_NORM_TOLERANCE = 1e-6


def rows_of(folder: Path, **config) -> dict[str, dict]:
    loaded = open_model(ModelRequest(str(folder)))
    return {r.row["longname"]: r.row
            for r in iter_layer_results(loaded.iter_tensors(), ESDConfig(**config))}


def save_bin_sharded(state: dict[str, torch.Tensor], folder: Path, config: dict,
                     per_shard: int) -> Path:
    """transformers 4's sharded ``.bin`` layout: tied tensors keep sharing one storage inside
    their shard, and the index lists every state-dict key, the tied ones included."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        shard = f"pytorch_model-{k:05d}-of-{len(groups):05d}.bin"
        torch.save({n: state[n] for n in group}, folder / shard)
        weight_map.update(dict.fromkeys(group, shard))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def test_sharded_bin_with_tied_weights_listed_in_the_index_reads(tmp_path):
    model = tiny_t5()
    state = model.state_dict()
    shared = state["shared.weight"]
    assert state["encoder.embed_tokens.weight"].data_ptr() == shared.data_ptr()
    # Tied keys first, so they land in one shard as transformers 4 grouped them by storage.
    order = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    order += [n for n in state if n not in order]
    folder = save_bin_sharded({n: state[n] for n in order}, tmp_path / "t5",
                              model.config.to_dict(), per_shard=len(order) // 2)
    rows = rows_of(folder)
    assert "shared" in rows, "the tied embedding is analysed once, under its first name"
    assert not {"encoder.embed_tokens", "decoder.embed_tokens"} & set(rows)
    assert "encoder.block.0.layer.1.DenseReluDense.wi" in rows
    untied = {n.removesuffix(".weight") for n, t in state.items()
              if t.ndim == 2 and t.data_ptr() != shared.data_ptr()}
    assert untied <= set(rows)


def test_dbrx_fused_expert_stacks_give_one_row_per_expert(tmp_path):
    torch.manual_seed(0)
    config = DbrxConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=32, vocab_size=64,
                        attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
                        ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 3, "moe_top_k": 1})
    model = DbrxForCausalLM(config).eval()
    folder = save_model(model, tmp_path / "dbrx")
    rows = rows_of(folder)
    state = model.state_dict()
    for part in ("w1", "v1", "w2"):
        name = f"transformer.blocks.0.ffn.experts.mlp.{part}"
        stack = state[name]
        assert stack.ndim == 2 and stack.shape[0] == 3 * 24
        for e in range(3):
            row = rows[f"{name}[{e}]"]
            assert row["layer_type"] == "expert" and (row["N"], row["M"]) == (24, 16)
            expert = stack.reshape(3, 24, 16)[e].double()
            top = torch.linalg.svdvals(expert)[0].item() ** 2
            assert row["spectral_norm"] == pytest.approx(top, rel=1e-9)
        assert f"{name}[3]" not in rows


def test_transposed_and_1d_convolutions_without_conv_in_their_names(tmp_path):
    torch.manual_seed(0)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=16, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]])).eval()
    folder = save_model(vocoder, tmp_path / "hifigan")
    rows = rows_of(folder)
    weight = vocoder.state_dict()["upsampler.0.weight"]
    assert weight.ndim == 3  # ConvTranspose1d (in, out, kernel)
    row = rows["upsampler.0"]
    assert row["layer_type"] == "conv1d" and not any(n.startswith("upsampler.0[") for n in rows)
    assert row["num_evals"] == min(weight.shape[:2]) * weight.shape[2]


def test_weight_normalised_convolution_is_analysed_as_g_v_over_norm(tmp_path):
    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, conv_dim=(8, 8), conv_stride=(2, 2),
                            conv_kernel=(3, 3), num_conv_pos_embeddings=4,
                            num_conv_pos_embedding_groups=2)
    model = Wav2Vec2Model(config).eval()
    folder = save_model(model, tmp_path / "wav2vec2")
    stored = set(json.loads(json.dumps(list(model.state_dict()))))
    conv = "encoder.pos_conv_embed.conv"
    assert {f"{conv}.parametrizations.weight.original0",
            f"{conv}.parametrizations.weight.original1"} <= stored or \
        {f"{conv}.weight_g", f"{conv}.weight_v"} <= stored
    loaded = dict(open_model(ModelRequest(str(folder))).iter_tensors())
    actual = model.encoder.pos_conv_embed.conv.weight.detach()
    assert (loaded[f"{conv}.weight"] - actual).abs().max() <= WEIGHT_NORM_TOLERANCE
    rows = rows_of(folder)
    assert rows[conv]["layer_type"] == "conv1d" and rows[conv]["status"] == "ok"


def test_weight_norm_legacy_g_v_names(tmp_path):
    torch.manual_seed(1)
    v = torch.randn(6, 3, 5)
    g = torch.rand(1, 1, 5) + 0.5  # weight_norm(dim=2), as wav2vec2's pos_conv uses
    folder = write_safetensors(tmp_path / "wn", {"pos.conv.weight_g": g, "pos.conv.weight_v": v,
                                                 "pos.conv.bias": torch.zeros(6)})
    loaded = dict(open_model(ModelRequest(str(folder))).iter_tensors())
    expected = torch._weight_norm(v, g, 2)
    assert set(loaded) == {"pos.conv.weight", "pos.conv.bias"}
    assert (loaded["pos.conv.weight"] - expected).abs().max() <= WEIGHT_NORM_TOLERANCE


def test_full_model_with_a_stray_adapter_config_is_read_as_the_model(tmp_path):
    folder = write_safetensors(tmp_path / "full", {"layer.weight": torch.randn(12, 10)})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    loaded = open_model(ModelRequest(str(folder)))
    assert not loaded.is_adapter
    assert list(dict(loaded.iter_tensors())) == ["layer.weight"]
