"""Checkpoints in the layouts their published repositories use, not the layout the installed
transformers writes.

Each architecture lists its tensors as the ``model.safetensors.index.json`` of its public
checkpoints names them (Mixtral's per-expert ``block_sparse_moe.experts.E.w1``, DBRX's 2-D
fused ``ffn.experts.mlp.w1``, gpt-oss's 3-D ``mlp.experts.gate_up_proj``, LLaVA's
``language_model.model.layers``, ...), at a scaled-down size: hidden 32, two blocks, four
experts. The file is written with safetensors directly, beside a ``config.json`` built by the
architecture's transformers config class. Each tensor carries what it is (``Tensor.kind``),
which the test turns into the rows it expects, independently of the project's name rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

SEED = 0
H = 32         # hidden size
F = 32         # feed-forward (and expert) size
KV = 16        # key/value width (2 heads of 8)
V = 64         # vocabulary
E = 4          # experts
LAYERS = 2

# Tensor kinds: a row each ("linear", "embedding", "lm_head", "expert": one matrix;
# "conv": one pooled row), E rows ("stack3d": (E, a, b); "stack2d": (E * a, b)), or none,
# for a reason the test names ("norm", "bias").
ROW_KINDS = ("linear", "embedding", "lm_head", "expert", "conv", "stack3d", "stack2d")
SKIPPED = {"norm": "a 1-D norm or scale vector (metrics.md section 1: 1-D tensors)",
           "bias": "a bias (1-D, or gpt-oss's per-expert biases stacked 2-D)"}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    kind: str


@dataclass
class Published:
    name: str
    config: dict = field(repr=False)
    tensors: list[Tensor] = field(repr=False)
    values: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    # longname prefixes of the model's repeated blocks: the rows that carry a block number
    stacks: tuple[str, ...] = ()
    # its class defines a block's MLP before its attention (JetMoE): depth order is the
    # class's order (docs/outputs.md), so the MLP's rows come first
    mlp_first: bool = False


def _t(name: str, *shape: int, kind: str = "linear") -> Tensor:
    return Tensor(name, tuple(shape), kind)


def _attn(p: str, o: str = "o_proj", q: int = H, kv: int = KV, bias: bool = False,
          norms: tuple[str, ...] = ()) -> list[Tensor]:
    out = [_t(f"{p}.q_proj.weight", q, H), _t(f"{p}.k_proj.weight", kv, H),
           _t(f"{p}.v_proj.weight", kv, H)]
    if bias:
        out += [_t(f"{p}.{x}_proj.bias", n, kind="bias") for x, n in (("q", q), ("k", kv),
                                                                       ("v", kv))]
    out += [_t(f"{p}.{o}.weight", H, q)] + [_t(f"{p}.{n}.weight", 8, kind="norm")
                                           for n in norms]
    return out


def _glu(p: str, f: int = F, names=("gate_proj", "up_proj", "down_proj"),
         kind: str = "linear") -> list[Tensor]:
    g, u, d = names
    return [_t(f"{p}.{g}.weight", f, H, kind=kind), _t(f"{p}.{u}.weight", f, H, kind=kind),
            _t(f"{p}.{d}.weight", H, f, kind=kind)]


def _experts(p: str, names=("gate_proj", "up_proj", "down_proj")) -> list[Tensor]:
    return [t for e in range(E) for t in _glu(f"{p}.{e}", names=names, kind="expert")]


def _norms(p: str, *names: str, size: int = H) -> list[Tensor]:
    return [_t(f"{p}.{n}.weight", size, kind="norm") for n in names]


def _decoder(prefix: str, layer: Callable[[str, int], list[Tensor]], head: str | None,
             embed: str = "embed_tokens") -> list[Tensor]:
    """A causal LM: embeddings, LAYERS blocks from ``layer(block prefix, i)``, norm, head."""
    out = [_t(f"{prefix}.{embed}.weight", V, H, kind="embedding")]
    for i in range(LAYERS):
        p = f"{prefix}.layers.{i}"
        out += layer(p, i) + _norms(p, "input_layernorm", "post_attention_layernorm")
    out += _norms(prefix, "norm")
    return out + ([_t(f"{head}.weight", V, H, kind="lm_head")] if head else [])


def _mixtral_layer(p: str, i: int) -> list[Tensor]:
    return (_attn(f"{p}.self_attn") + [_t(f"{p}.block_sparse_moe.gate.weight", E, H)]
            + _experts(f"{p}.block_sparse_moe.experts", ("w1", "w3", "w2")))


def _qwen2_moe_layer(p: str, i: int) -> list[Tensor]:
    return (_attn(f"{p}.self_attn", bias=True) + [_t(f"{p}.mlp.gate.weight", E, H)]
            + _experts(f"{p}.mlp.experts") + _glu(f"{p}.mlp.shared_expert")
            + [_t(f"{p}.mlp.shared_expert_gate.weight", 1, H)])


def _qwen3_moe_layer(p: str, i: int) -> list[Tensor]:
    return (_attn(f"{p}.self_attn", norms=("q_norm", "k_norm"))
            + [_t(f"{p}.mlp.gate.weight", E, H)] + _experts(f"{p}.mlp.experts"))


def _deepseek_v3_layer(p: str, i: int) -> list[Tensor]:
    a = f"{p}.self_attn"
    mla = [_t(f"{a}.q_a_proj.weight", 16, H), _t(f"{a}.q_a_layernorm.weight", 16, kind="norm"),
           _t(f"{a}.q_b_proj.weight", 4 * 24, 16), _t(f"{a}.kv_a_proj_with_mqa.weight", 16 + 8, H),
           _t(f"{a}.kv_a_layernorm.weight", 16, kind="norm"),
           _t(f"{a}.kv_b_proj.weight", 4 * (16 + 16), 16), _t(f"{a}.o_proj.weight", H, 4 * 16)]
    if i == 0:  # first_k_dense_replace = 1: a dense MLP
        return mla + _glu(f"{p}.mlp")
    return (mla + [_t(f"{p}.mlp.gate.weight", E, H),
                   _t(f"{p}.mlp.gate.e_score_correction_bias", E, kind="norm")]
            + _experts(f"{p}.mlp.experts") + _glu(f"{p}.mlp.shared_experts"))


def _gpt_oss_layer(p: str, i: int) -> list[Tensor]:
    x = f"{p}.mlp.experts"
    return (_attn(f"{p}.self_attn", bias=True) + [_t(f"{p}.self_attn.sinks", 4, kind="norm")]
            + [_t(f"{p}.mlp.router.weight", E, H), _t(f"{p}.mlp.router.bias", E, kind="bias"),
               _t(f"{x}.gate_up_proj", E, H, 2 * F, kind="stack3d"),
               _t(f"{x}.gate_up_proj_bias", E, 2 * F, kind="bias"),
               _t(f"{x}.down_proj", E, F, H, kind="stack3d"),
               _t(f"{x}.down_proj_bias", E, H, kind="bias")])


def _parallel_experts(p: str, f: int = F) -> list[Tensor]:
    """IBM's ParallelExperts (JetMoE, GraniteMoE): 3-D (E, out, in) stacks named
    ``input_linear`` / ``output_linear`` beside a ``router.layer``."""
    return [_t(f"{p}.input_linear.weight", E, 2 * f, H, kind="stack3d"),
            _t(f"{p}.output_linear.weight", E, H, f, kind="stack3d"),
            _t(f"{p}.router.layer.weight", E, H)]


def _jetmoe_layer(p: str, i: int) -> list[Tensor]:
    """JetMoE (jetmoe/jetmoe-8b): mixtures of experts for attention and MLP alike; the
    MLP's stacks have no 'expert' in their names (``mlp.input_linear``)."""
    a = f"{p}.self_attention"
    return ([_t(f"{a}.kv_proj.weight", 2 * KV, H), _t(f"{a}.experts.bias", H, kind="bias")]
            + _parallel_experts(f"{a}.experts", f=KV // 2)
            + [_t(f"{p}.mlp.bias", H, kind="bias")] + _parallel_experts(f"{p}.mlp"))


def _granitemoe_layer(p: str, i: int) -> list[Tensor]:
    return _attn(f"{p}.self_attn") + _parallel_experts(f"{p}.block_sparse_moe")


def _dbrx() -> list[Tensor]:
    out = [_t("transformer.wte.weight", V, H, kind="embedding")]
    for i in range(LAYERS):
        p = f"transformer.blocks.{i}"
        out += [*_norms(f"{p}.norm_attn_norm", "norm_1"),
                _t(f"{p}.norm_attn_norm.attn.Wqkv.weight", H + 2 * KV, H),
                _t(f"{p}.norm_attn_norm.attn.out_proj.weight", H, H),
                *_norms(f"{p}.norm_attn_norm", "norm_2"),
                _t(f"{p}.ffn.router.layer.weight", E, H)]
        out += [_t(f"{p}.ffn.experts.mlp.{w}", E * F, H, kind="stack2d") for w in ("w1", "v1",
                                                                                    "w2")]
    return out + _norms("transformer", "norm_f") + [_t("lm_head.weight", V, H, kind="lm_head")]


def _siglip_tower(p: str) -> list[Tensor]:
    """A SigLIP/CLIP vision tower as Gemma 3 and LLaVA publish it (patch 8 of a 16 image)."""
    out = [_t(f"{p}.embeddings.patch_embedding.weight", H, 3, 8, 8, kind="conv"),
           _t(f"{p}.embeddings.position_embedding.weight", 4, H, kind="embedding")]
    for i in range(LAYERS):
        q = f"{p}.encoder.layers.{i}"
        out += (_norms(q, "layer_norm1") + _attn(f"{q}.self_attn", o="out_proj", kv=H)
                + _norms(q, "layer_norm2")
                + [_t(f"{q}.mlp.fc1.weight", F, H), _t(f"{q}.mlp.fc2.weight", H, F)])
    return out + _norms(p, "post_layernorm")


def _gemma3() -> list[Tensor]:
    lm = _decoder("language_model.model", lambda p, i: (
        _attn(f"{p}.self_attn", norms=("q_norm", "k_norm")) + _glu(f"{p}.mlp")
        + _norms(p, "pre_feedforward_layernorm", "post_feedforward_layernorm")), None)
    return (lm + _siglip_tower("vision_tower.vision_model")  # tied head: not stored
            + [_t("multi_modal_projector.mm_input_projection_weight", H, H),
               *_norms("multi_modal_projector", "mm_soft_emb_norm")])


def _llava() -> list[Tensor]:
    lm = _decoder("language_model.model", lambda p, i: _attn(f"{p}.self_attn") + _glu(
        f"{p}.mlp"), "language_model.lm_head")
    return (_siglip_tower("vision_tower.vision_model")
            + [_t("multi_modal_projector.linear_1.weight", H, H),
               _t("multi_modal_projector.linear_2.weight", H, H)] + lm)


def _qwen2_vl() -> list[Tensor]:
    vis = [_t("visual.patch_embed.proj.weight", H, 3, 2, 4, 4, kind="conv")]
    for i in range(LAYERS):
        p = f"visual.blocks.{i}"
        vis += (_norms(p, "norm1", "norm2")
                + [_t(f"{p}.attn.qkv.weight", 3 * H, H), _t(f"{p}.attn.proj.weight", H, H),
                   _t(f"{p}.mlp.fc1.weight", F, H), _t(f"{p}.mlp.fc2.weight", H, F)])
    vis += _norms("visual.merger", "ln_q") + [_t("visual.merger.mlp.0.weight", 4 * H, 4 * H),
                                               _t("visual.merger.mlp.2.weight", H, 4 * H)]
    return vis + _decoder("model", lambda p, i: _attn(f"{p}.self_attn", bias=True) + _glu(
        f"{p}.mlp"), "lm_head")


def _t5() -> list[Tensor]:
    out = [_t("shared.weight", V, H, kind="embedding")]
    for side in ("encoder", "decoder"):
        for i in range(LAYERS):
            p = f"{side}.block.{i}.layer"
            parts = ["SelfAttention"] + (["EncDecAttention"] if side == "decoder" else [])
            for j, att in enumerate(parts):
                out += [_t(f"{p}.{j}.{att}.{x}.weight", H, H) for x in "qkvo"]
                if i == 0 and j == 0:
                    out.append(_t(f"{p}.0.SelfAttention.relative_attention_bias.weight", 32, 4,
                                  kind="embedding"))
                out += _norms(f"{p}.{j}", "layer_norm")
            j = len(parts)
            out += [_t(f"{p}.{j}.DenseReluDense.wi.weight", F, H),
                    _t(f"{p}.{j}.DenseReluDense.wo.weight", H, F), *_norms(f"{p}.{j}",
                                                                           "layer_norm")]
        out += _norms(side, "final_layer_norm")
    return out + [_t("lm_head.weight", V, H, kind="lm_head")]


def _whisper() -> list[Tensor]:
    enc = [_t("model.encoder.conv1.weight", H, 8, 3, kind="conv"),
           _t("model.encoder.conv2.weight", H, H, 3, kind="conv"),
           _t("model.encoder.embed_positions.weight", 16, H, kind="embedding")]
    dec = [_t("model.decoder.embed_tokens.weight", V, H, kind="embedding"),
           _t("model.decoder.embed_positions.weight", 32, H, kind="embedding")]
    for side, out in (("encoder", enc), ("decoder", dec)):
        for i in range(LAYERS):
            p = f"model.{side}.layers.{i}"
            out += _attn(f"{p}.self_attn", o="out_proj", kv=H) + _norms(p, "self_attn_layer_norm")
            if side == "decoder":
                out += (_attn(f"{p}.encoder_attn", o="out_proj", kv=H)
                        + _norms(p, "encoder_attn_layer_norm"))
            out += [_t(f"{p}.fc1.weight", F, H), _t(f"{p}.fc2.weight", H, F),
                    *_norms(p, "final_layer_norm")]
        out += _norms(f"model.{side}", "layer_norm")
    return enc + dec  # proj_out is tied to decoder.embed_tokens: not stored


def _internlm2_layer(p: str, i: int) -> list[Tensor]:
    """InternLM2 (remote code, unknown to transformers): fused wqkv, a head called output."""
    return [_t(f"{p}.attention.wqkv.weight", H + 2 * KV, H), _t(f"{p}.attention.wo.weight", H, H),
            *_glu(f"{p}.feed_forward", names=("w1", "w3", "w2"))]


def _internlm2() -> list[Tensor]:
    out = [_t("model.tok_embeddings.weight", V, H, kind="embedding")]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        out += _norms(p, "attention_norm") + _internlm2_layer(p, i) + _norms(p, "ffn_norm")
    return out + _norms("model", "norm") + [_t("output.weight", V, H, kind="lm_head")]


_DEC = dict(hidden_size=H, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=V, head_dim=8)
_VISION = dict(hidden_size=H, intermediate_size=F, num_hidden_layers=LAYERS,
               num_attention_heads=4, image_size=16, patch_size=8)


def _config(cls: str, arch: str, **kwargs) -> dict:
    config = getattr(transformers, cls)(**kwargs).to_dict()
    config["architectures"] = [arch]
    return config


# name -> (tensors, config, repeated block prefixes)
LAYOUTS: dict[str, Callable[[], Published]] = {
    "mixtral": lambda: Published("mixtral", _config(
        "MixtralConfig", "MixtralForCausalLM", num_local_experts=E, **_DEC),
        _decoder("model", _mixtral_layer, "lm_head"), stacks=("model.layers",)),
    "phimoe": lambda: Published("phimoe", _config(
        "PhimoeConfig", "PhimoeForCausalLM", num_local_experts=E, **_DEC),
        _decoder("model", _mixtral_layer, "lm_head"), stacks=("model.layers",)),
    "qwen2_moe": lambda: Published("qwen2_moe", _config(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=E, moe_intermediate_size=F,
        shared_expert_intermediate_size=F, **_DEC),
        _decoder("model", _qwen2_moe_layer, "lm_head"), stacks=("model.layers",)),
    "qwen3_moe": lambda: Published("qwen3_moe", _config(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_experts=E, moe_intermediate_size=F,
        **_DEC), _decoder("model", _qwen3_moe_layer, "lm_head"), stacks=("model.layers",)),
    "olmoe": lambda: Published("olmoe", _config(
        "OlmoeConfig", "OlmoeForCausalLM", num_experts=E, **_DEC),
        _decoder("model", _qwen3_moe_layer, "lm_head"), stacks=("model.layers",)),
    "deepseek_v3": lambda: Published("deepseek_v3", _config(
        "DeepseekV3Config", "DeepseekV3ForCausalLM", hidden_size=H, intermediate_size=F,
        moe_intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=V, n_routed_experts=E, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1, num_experts_per_tok=2),
        _decoder("model", _deepseek_v3_layer, "lm_head"), stacks=("model.layers",)),
    "gpt_oss": lambda: Published("gpt_oss", _config(
        "GptOssConfig", "GptOssForCausalLM", num_local_experts=E, **_DEC),
        _decoder("model", _gpt_oss_layer, "lm_head"), stacks=("model.layers",)),
    "jetmoe": lambda: Published("jetmoe", _config(
        "JetMoeConfig", "JetMoeForCausalLM", hidden_size=H, num_hidden_layers=LAYERS,
        num_key_value_heads=2, kv_channels=KV // 2, intermediate_size=F, num_local_experts=E,
        num_experts_per_tok=2, vocab_size=V, tie_word_embeddings=False),
        _decoder("model", _jetmoe_layer, "lm_head"), stacks=("model.layers",), mlp_first=True),
    "granitemoe": lambda: Published("granitemoe", _config(
        "GraniteMoeConfig", "GraniteMoeForCausalLM", num_local_experts=E, **_DEC),
        _decoder("model", _granitemoe_layer, "lm_head"), stacks=("model.layers",)),
    "dbrx": lambda: Published("dbrx", _config(
        "DbrxConfig", "DbrxForCausalLM", d_model=H, n_layers=LAYERS, n_heads=4, vocab_size=V,
        attn_config=dict(kv_n_heads=2, rope_theta=500000.0), ffn_config=dict(ffn_hidden_size=F,
                                                        moe_num_experts=E)),
        _dbrx(), stacks=("transformer.blocks",)),
    "gemma3": lambda: Published("gemma3", _config(
        "Gemma3Config", "Gemma3ForConditionalGeneration", text_config=_DEC,
        vision_config=_VISION, mm_tokens_per_image=4), _gemma3(),
        stacks=("language_model.model.layers", "vision_tower.vision_model.encoder.layers")),
    "llava": lambda: Published("llava", _config(
        "LlavaConfig", "LlavaForConditionalGeneration", text_config=dict(
            model_type="llama", **_DEC), vision_config=dict(model_type="clip_vision_model",
                                                           **_VISION)), _llava(),
        stacks=("language_model.model.layers", "vision_tower.vision_model.encoder.layers")),
    "qwen2_vl": lambda: Published("qwen2_vl", _config(
        "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", **_DEC, vision_config=dict(
            depth=LAYERS, embed_dim=H, hidden_size=H, num_heads=4, patch_size=4,
            temporal_patch_size=2, spatial_merge_size=2)), _qwen2_vl(),
        stacks=("model.layers", "visual.blocks")),
    "internlm2": lambda: Published("internlm2", {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "hidden_size": H, "intermediate_size": F, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V},
        _internlm2(), stacks=("model.layers",)),
    "t5": lambda: Published("t5", _config(
        "T5Config", "T5ForConditionalGeneration", d_model=H, d_ff=F, d_kv=8, num_heads=4,
        num_layers=LAYERS, vocab_size=V, tie_word_embeddings=False), _t5(),
        stacks=("encoder.block", "decoder.block")),
    "whisper": lambda: Published("whisper", _config(
        "WhisperConfig", "WhisperForConditionalGeneration", d_model=H, encoder_layers=LAYERS,
        decoder_layers=LAYERS, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=F, decoder_ffn_dim=F, vocab_size=V, num_mel_bins=8,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=3), _whisper(),
        stacks=("model.encoder.layers", "model.decoder.layers")),
}


def build(name: str, root: Path) -> tuple[Published, Path]:
    """The architecture's tensors (random, seeded) saved as ``model.safetensors`` with its
    ``config.json`` under ``root / name``."""
    model = LAYOUTS[name]()
    gen = torch.Generator().manual_seed(SEED)
    model.values = {t.name: torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5
                    for t in model.tensors}
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.values, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(model.config, indent=1, default=str))
    return model, path
