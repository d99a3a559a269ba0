"""Merging an adapter with peft itself, for what ``lora_merge.MergePlan`` does not cover
(DoRA, IA3, LoHa, LoKr, LoRA on convolutions, two changes of one tied tensor, ...).

transformers builds the base model, resized to the adapter's vocabulary when the adapter
saves a larger embedding (a vocabulary resized for added tokens, as its trainer resized it),
peft merges, and the merged weights are streamed back from a temporary safetensors copy.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from esd_experiment.adapters.lora_merge import _TASK_CLASSES, ADAPTER_PREFIX
from esd_experiment.core.errors import ShapeMismatchError, UnsupportedFormatError
from esd_experiment.formats.checkpoint import CheckpointReader, select_weight_files

logger = logging.getLogger(__name__)


def _model_class(adapter_config: dict[str, Any], base_config: dict[str, Any]):
    import transformers

    name = _TASK_CLASSES.get(str(adapter_config.get("task_type") or "").upper())
    if name is None:
        archs = base_config.get("architectures") or []
        name = archs[0] if archs and hasattr(transformers, str(archs[0])) else "AutoModel"
    return getattr(transformers, name)


def adapter_vocabulary(model, adapter_dir: Path) -> int | None:
    """The rows of the input embedding the adapter in ``adapter_dir`` saves for ``model``
    (its saved weight, or its embedding LoRA's ``lora_embedding_A``, ``(r, vocab)``); None
    when it saves none."""
    from peft.utils import load_peft_weights

    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # a model without token embeddings (ResNet)
        return None
    names = [n for n, m in model.named_modules() if m is embedding]
    if not names:
        return None
    prefix = f"{ADAPTER_PREFIX}{names[0]}."
    rows = [value.shape[-1] if key.endswith("lora_embedding_A") else value.shape[0]
            for key, value in load_peft_weights(str(adapter_dir), device="cpu").items()
            if key.startswith(prefix) and value.ndim == 2
            and (".lora_" not in key or key.endswith("lora_embedding_A"))]
    return max(rows) if rows else None


def merged_with_peft(base_dir: Path, adapter_dir: Path, adapter_config: dict[str, Any],
                     base_config: dict[str, Any], *, model_id: str, variant: str,
                     trust_remote_code: bool) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Merge with ``PeftModel.merge_and_unload()`` and stream the merged weights as
    ``(name, tensor, storage)``.

    The base is built by transformers in float32 (so the merge is float32 arithmetic), the
    merged model is saved to a temporary safetensors directory and freed, and that copy is
    streamed like any checkpoint; the whole base model is in memory while it is merged.
    """
    from peft import PeftModel

    model_cls = _model_class(adapter_config, base_config)
    with tempfile.TemporaryDirectory(prefix="esd-peft-merge-") as tmp:
        try:
            model = model_cls.from_pretrained(str(base_dir), dtype=torch.float32,
                                              trust_remote_code=trust_remote_code)
            rows = adapter_vocabulary(model, adapter_dir)
            if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
                logger.info("%s: the adapter's vocabulary has %d tokens; resizing the base's "
                            "embeddings to it", model_id, rows)
                model.resize_token_embeddings(rows, mean_resizing=False)
            merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
        except (ValueError, KeyError, AttributeError, TypeError, RuntimeError, OSError,
                NotImplementedError, ImportError) as exc:
            error = ShapeMismatchError if "size mismatch" in str(exc) else UnsupportedFormatError
            raise error(f"{model_id}: the {variant} adapter could not be merged by peft into "
                        f"{model_cls.__name__}: {type(exc).__name__}: {exc}") from None
        del model, merged
        gc.collect()
        files = sorted(p.name for p in Path(tmp).iterdir())
        reader = CheckpointReader(Path(tmp), select_weight_files(files, model_id), model_id)
        yield from reader.iter_tensors()
