"""Tiny models, adapters, hub caches and a fake hub for the model loader's tests.

Everything is built on disk inside the test's temporary directory; nothing reaches the
network. Models are transformers' own classes at hidden size 32 with 2 layers, adapters are
made and saved by peft itself, so the loader is checked against the real file layouts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import httpx2
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

HIDDEN = 32
VOCAB = 96


def llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  tie_word_embeddings=False)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                        num_labels=3)
    return BertForSequenceClassification(config).eval()


def save_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def save_adapter(base_model, path: Path, base_ref: str | None, seed: int = 1,
                 save_embedding_layers: bool | str = "auto", **lora_kwargs) -> Path:
    """A peft LoRA adapter of a copy of ``base_model`` with random (nonzero) A and B."""
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    with torch.no_grad():  # modules_to_save copies start equal to the base: make them differ
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(path, save_embedding_layers=save_embedding_layers)
    set_adapter_base(path, base_ref)
    return path


def set_adapter_base(path: Path, base_ref: str | None) -> None:
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_ref
    cfg_path.write_text(json.dumps(cfg))


def peft_merged(base_dir: Path, adapter_dir: Path, seq_cls: bool = False) -> dict:
    """What peft's merge_and_unload() makes of the base (loaded in float32) and adapter."""
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    base = cls.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def write_safetensors(path: Path, tensors: dict, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


def write_sharded(path: Path, shards: dict[str, dict], config: dict | None = None) -> Path:
    """A sharded safetensors checkpoint: shard file name -> its tensors, plus the index."""
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / shard))
        weight_map.update({k: shard for k in tensors})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


def write_hub_cache(cache: Path, repo_id: str, commit: str, files_from: Path,
                    refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``files_from`` out as huggingface_hub does: blobs, snapshot links, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for src in sorted(files_from.iterdir()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / src.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def http_error(cls, status: int, message: str):
    """A huggingface_hub HTTP error as the hub client raises it."""
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(message, response=httpx2.Response(status, request=request))


class FailingHub:
    """A hub client whose every listing raises ``exc``: for the mapping of client exceptions
    to the project's errors, apart from HTTP (the hub stand-in covers the HTTP side)."""

    offline = False
    token = None

    def __init__(self, exc: BaseException):
        self.exc = exc

    def list_files(self, repo_id: str, revision: str | None):
        raise self.exc


def stream(model) -> dict[str, torch.Tensor]:
    """Every tensor a loaded model streams, by name."""
    return dict(model.iter_tensors())
