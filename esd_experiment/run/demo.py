"""A small local model zoo for the offline demo (``run_esd_experiment.py --demo``).

Builds, with random weights and fixed seeds, the kinds of model a real list holds: a
Llama-like and a GPT-2-like causal LM, a LoRA adapter of the Llama (named by ``source_model``
in the list) and a second one found through its ``adapter_config.json``, and a ResNet-like
model with convolutions. Each is saved as Hugging Face saves it (``config.json`` +
safetensors), and a model list naming them is written beside them.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path

from esd_experiment.core.paths import write_text_atomic

logger = logging.getLogger(__name__)

SEED = 0
HIDDEN = 64        # small enough to build in seconds, large enough that every matrix is fitted
VOCAB = 512
LIST_COLUMNS = ("model_id", "base_model_relation", "source_model")
DEMO_LIST = "demo_models.csv"  # written last: its presence means the zoo is complete


def _save(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_llama(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return _save(LlamaForCausalLM(config), path)


def build_gpt2(path: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED + 1)
    config = GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel(config), path)


def build_resnet(path: Path) -> Path:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(SEED + 2)
    config = ResNetConfig(embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], num_labels=10)
    return _save(ResNetForImageClassification(config), path)


def build_lora(base_path: Path, path: Path, seed: int, targets: tuple[str, ...]) -> Path:
    """A LoRA adapter of the model at ``base_path`` with non-zero (trained-looking) B matrices."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets),
                        init_lora_weights=False)  # random A and B: the merge changes W
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(path, safe_serialization=True)
    return path


def build_demo_zoo(root: Path) -> Path:
    """Build the zoo under ``root`` and return the path of its model list CSV."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the zoo's random configs trigger harmless advice
    hf_logging.disable_progress_bar()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    llama = build_llama(root / "tiny-llama")
    gpt2 = build_gpt2(root / "tiny-gpt2")
    resnet = build_resnet(root / "tiny-resnet")
    lora_listed = build_lora(llama, root / "tiny-llama-lora", SEED + 3, ("q_proj", "v_proj"))
    lora_found = build_lora(llama, root / "tiny-llama-lora-mlp", SEED + 4, ("up_proj", "down_proj"))
    rows = [
        (str(llama), "", ""),
        (str(gpt2), "", ""),
        (str(resnet), "", ""),
        (str(lora_listed), "adapter", str(llama)),   # base named in the list
        (str(lora_found), "lora", ""),               # base read from adapter_config.json
    ]
    list_path = root / DEMO_LIST
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(LIST_COLUMNS)
    writer.writerows(rows)
    write_text_atomic(list_path, buffer.getvalue())
    logger.info("demo zoo of %d models written to %s", len(rows), root)
    return list_path
