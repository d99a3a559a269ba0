"""A zoo of tiny random transformers models, and their checkpoints in two on-disk layouts.

One model per architecture family the loader must read (decoders, mixtures of experts,
encoders, encoder-decoders, speech, vision, convolutional, state-space), each built from its
transformers config at hidden size 32 (or a few channels), one or two layers and a vocabulary
of 96, with a fixed seed. Every model is written twice:

- ``safetensors``: transformers' own ``save_pretrained`` with ``save_original_format=False``,
  so the file holds the live model's parameter names (Mixtral's fused 3-D experts as
  transformers 5 holds them, not the per-expert names it converts back to by default) and
  tied weights once.
- ``bin``: transformers 4's sharded ``.bin`` layout (``save_pretrained(...,
  safe_serialization=False)`` of a model over ``max_shard_size``): the whole ``state_dict``
  with its aliasing kept, split by huggingface_hub's ``split_torch_state_dict_into_shards``
  (the function transformers 4 called, which puts tensors sharing a storage in one shard),
  each shard ``torch.save``d, and ``pytorch_model.bin.index.json`` whose ``weight_map`` lists
  every key, tied ones included.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from torch.nn.utils import parametrize

SEED = 0
HIDDEN = 32
FFN = 64
VOCAB = 96
EXPERTS = 4
LAYOUTS = ("safetensors", "bin")
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_PATTERN = "pytorch_model{suffix}.bin"   # transformers 4's WEIGHTS_NAME with its shard suffix
BIN_SHARDS = 3                               # aim: >= 2 shards, as a large model would have

# Decoder-only sizes shared by the causal LMs (4 query heads of 8, 2 key-value heads).
DECODER = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
# Token ids inside the small vocabulary (the defaults of GPT-2 and OLMo point past it).
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

_SPEECH_ENCODER = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=40, conv_dim=(16, 16),
                       conv_kernel=(3, 2), conv_stride=(2, 2), num_conv_pos_embeddings=4,
                       num_conv_pos_embedding_groups=2)
_HIFIGAN = dict(upsample_initial_channel=16, upsample_rates=[2, 2],
                upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
                resblock_dilation_sizes=[[1, 3]])
_ENC_DEC = dict(d_model=HIDDEN, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, encoder_layers=1,
                decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                vocab_size=VOCAB, **TOKENS)


@dataclass
class ZooModel:
    """A built model and what the oracle must be told beyond the module tree.

    ``expert_stacks``: regexes over parameter names of 2-D stacks of expert matrices (DBRX's
    ``w1``/``v1``/``w2``, ``(E * ffn, hidden)``), with their number of experts; 3-D expert
    stacks need no hint. ``heads``: vocabulary heads that transformers does not register as
    output embeddings (a CTC head), so the oracle knows them as ``lm_head``.
    """

    name: str
    family: str
    model: torch.nn.Module = field(repr=False)
    expert_stacks: dict[str, int] = field(default_factory=dict)
    heads: tuple[str, ...] = ()


def _build(cls_name: str, config_name: str, **config) -> torch.nn.Module:
    torch.manual_seed(SEED)
    cfg = getattr(transformers, config_name)(**config)
    return getattr(transformers, cls_name)(cfg).eval()


def _dbrx() -> torch.nn.Module:
    cfg = transformers.DbrxConfig(
        d_model=HIDDEN, n_layers=1, n_heads=4, vocab_size=VOCAB, max_seq_len=64,
        attn_config=dict(kv_n_heads=2),
        ffn_config=dict(ffn_hidden_size=FFN, moe_num_experts=EXPERTS, moe_top_k=2))
    # transformers 5.24's DbrxAttention reads attn_config.rope_theta, which the config lacks.
    cfg.attn_config.rope_theta = 10000.0
    torch.manual_seed(SEED)
    return transformers.DbrxForCausalLM(cfg).eval()


def _hubert_legacy_weight_norm() -> torch.nn.Module:
    """HuBERT with its positional convolution under the old ``torch.nn.utils.weight_norm``,
    stored as ``weight_g``/``weight_v`` like the wav2vec2/HuBERT checkpoints of transformers 4."""
    model = _build("HubertForCTC", "HubertConfig", **_SPEECH_ENCODER)
    conv = model.hubert.encoder.pos_conv_embed.conv
    dim = conv.parametrizations.weight[0].dim
    parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    with warnings.catch_warnings():  # deprecated on purpose: it is the layout being tested
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(conv, name="weight", dim=dim)
    return model


# name -> (family, builder). Each builder seeds torch itself.
BUILDERS: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
    "llama": ("decoder", lambda: _build("LlamaForCausalLM", "LlamaConfig", **DECODER)),
    "gpt2": ("decoder", lambda: _build(  # HF Conv1D (in, out) weights; lm_head tied to wte
        "GPT2LMHeadModel", "GPT2Config", n_embd=HIDDEN, n_layer=1, n_head=4, vocab_size=VOCAB,
        n_positions=64, **TOKENS)),
    "falcon": ("decoder", lambda: _build(  # fused query_key_value; lm_head tied
        "FalconForCausalLM", "FalconConfig", hidden_size=HIDDEN, num_hidden_layers=1,
        num_attention_heads=4, vocab_size=VOCAB, **TOKENS)),
    "mixtral": ("moe", lambda: _build(  # fused 3-D gate_up_proj / down_proj
        "MixtralForCausalLM", "MixtralConfig", num_local_experts=EXPERTS,
        num_experts_per_tok=2, **DECODER)),
    "qwen2_moe": ("moe", lambda: _build(  # fused experts plus a shared expert and its gate
        "Qwen2MoeForCausalLM", "Qwen2MoeConfig", moe_intermediate_size=FFN // 2,
        shared_expert_intermediate_size=FFN, num_experts=EXPERTS, num_experts_per_tok=2,
        **DECODER)),
    "dbrx": ("moe", _dbrx),
    "gpt_oss": ("moe", lambda: _build(  # 3-D (E, in, out) experts with 2-D stacked biases
        "GptOssForCausalLM", "GptOssConfig", head_dim=8, num_local_experts=EXPERTS,
        num_experts_per_tok=2, **DECODER)),
    "bert": ("encoder", lambda: _build(
        "BertForMaskedLM", "BertConfig", hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64)),
    "albert": ("encoder", lambda: _build(  # nn.Linear embedding_hidden_mapping_in
        "AlbertForMaskedLM", "AlbertConfig", embedding_size=16, hidden_size=HIDDEN,
        intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64, **TOKENS)),
    "electra": ("encoder", lambda: _build(  # nn.Linear embeddings_project
        "ElectraForMaskedLM", "ElectraConfig", embedding_size=16, hidden_size=HIDDEN,
        intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64)),
    "t5": ("encoder-decoder", lambda: _build(  # shared = encoder/decoder embed_tokens = lm_head
        "T5ForConditionalGeneration", "T5Config", d_model=HIDDEN, d_ff=FFN, d_kv=8,
        num_layers=1, num_heads=4, vocab_size=VOCAB)),
    "bart": ("encoder-decoder", lambda: _build(
        "BartForConditionalGeneration", "BartConfig", max_position_embeddings=64,
        **_ENC_DEC)),
    "wav2vec2": ("speech", lambda: _build(  # pos_conv under parametrizations.weight_norm
        "Wav2Vec2ForCTC", "Wav2Vec2Config", **_SPEECH_ENCODER)),
    "hubert": ("speech", _hubert_legacy_weight_norm),
    "whisper": ("speech", lambda: _build(  # Conv1d front end; proj_out tied to embed_tokens
        "WhisperForConditionalGeneration", "WhisperConfig", num_mel_bins=8,
        max_source_positions=16, max_target_positions=32, decoder_start_token_id=3,
        **_ENC_DEC)),
    "hifigan": ("speech", lambda: _build(  # ConvTranspose1d upsampler.N, no "conv" in name
        "SpeechT5HifiGan", "SpeechT5HifiGanConfig", model_in_dim=8, **_HIFIGAN)),
    "vits": ("speech", lambda: _build(  # Conv1d "project", weight-normed wavenet in_layers
        "VitsModel", "VitsConfig", hidden_size=HIDDEN, num_hidden_layers=1,
        num_attention_heads=4, ffn_dim=FFN, vocab_size=40, flow_size=8, spectrogram_bins=9,
        prior_encoder_num_flows=1, prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1, duration_predictor_filter_channels=16,
        duration_predictor_num_flows=1, depth_separable_num_layers=1, **_HIFIGAN)),
    "vit": ("vision", lambda: _build(
        "ViTForImageClassification", "ViTConfig", hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=4,
        num_labels=3)),
    "resnet": ("convolutional", lambda: _build(
        "ResNetForImageClassification", "ResNetConfig", embedding_size=16,
        hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=3)),
    "convnext": ("convolutional", lambda: _build(  # depthwise 7x7 Conv2d, Linear pointwise
        "ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[16, 32],
        depths=[1, 1], num_stages=2, num_labels=3)),
    "mamba": ("state-space", lambda: _build(  # A_log, D, depthwise conv1d, dt_proj (32, 1)
        "MambaForCausalLM", "MambaConfig", hidden_size=HIDDEN, state_size=4,
        num_hidden_layers=1, vocab_size=VOCAB, expand=2, conv_kernel=4, **TOKENS)),
}
# What the module tree alone does not say (see ZooModel).
EXPERT_STACKS = {"dbrx": {r"\.ffn\.experts\.mlp\.(w1|v1|w2)$": EXPERTS}}
HEADS = {"wav2vec2": ("lm_head",), "hubert": ("lm_head",)}


def build(name: str) -> ZooModel:
    family, builder = BUILDERS[name]
    return ZooModel(name, family, builder(), EXPERT_STACKS.get(name, {}), HEADS.get(name, ()))


def save_safetensors(model: torch.nn.Module, path: Path) -> Path:
    """transformers' ``save_pretrained``, keeping the live parameter names."""
    model.save_pretrained(path, save_original_format=False)
    return path


def save_sharded_bin(model: torch.nn.Module, path: Path, shards: int = BIN_SHARDS) -> Path:
    """transformers 4's ``save_pretrained(safe_serialization=False)`` of a model larger than
    ``max_shard_size``: the state dict minus ``_keys_to_ignore_on_save``, aliases kept (4.x
    dropped tied duplicates only for safetensors), sharded with tied tensors together."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in state.values()}
    split = split_torch_state_dict_into_shards(
        state, filename_pattern=BIN_PATTERN, max_shard_size=sum(storages.values()) // shards + 1)
    if len(split.filename_to_tensors) < 2 or set(split.tensor_to_filename) != set(state):
        raise AssertionError(f"{type(model).__name__}: expected >= 2 shards listing every key, "
                             f"got {sorted(split.filename_to_tensors)}")
    for filename, keys in split.filename_to_tensors.items():
        # .contiguous() returns the same tensor when it already is: aliases stay aliases, and
        # torch.save writes each shared storage once.
        torch.save({k: state[k].contiguous() for k in keys}, path / filename)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (path / BIN_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


@dataclass
class Zoo:
    """Every model, the checkpoint directory of each (model, layout), and the build time."""

    models: dict[str, ZooModel] = field(repr=False)
    paths: dict[tuple[str, str], Path] = field(repr=False)
    seconds: float


def build_zoo(root: Path, names: list[str] | None = None) -> Zoo:
    """Build, save and shard every model of ``BUILDERS`` (or ``names``) under ``root``."""
    start = time.perf_counter()
    models, paths = {}, {}
    for name in names or list(BUILDERS):
        zoo_model = models[name] = build(name)
        paths[name, "safetensors"] = save_safetensors(zoo_model.model, root / name / "st")
        paths[name, "bin"] = save_sharded_bin(zoo_model.model, root / name / "bin")
    return Zoo(models, paths, time.perf_counter() - start)
