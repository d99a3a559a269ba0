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


def adapter_vocabulary(model, adapter: dict, adapter_config: dict[str, Any]) -> int | None:
    """The rows of the input embedding the adapter (its tensors ``adapter``) saves for ``model``
    (its saved weight, or its embedding LoRA's ``lora_embedding_A``, ``(r, vocab)``), or
    trains (past its largest ``trainable_token_indices``); None when it names none."""
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # a model without token embeddings (ResNet)
        return None
    names = [n for n, m in model.named_modules() if m is embedding]
    if not names:
        return None
    prefix = f"{ADAPTER_PREFIX}{names[0]}."
    lora = f"{prefix}lora_embedding_A"
    # the embedding's whole weight, under any wrapper (save_embedding_layers, modules_to_save,
    # a trainable-tokens adapter's base_layer), or its LoRA's A; not the trained tokens' rows
    rows = [value.shape[1] if key.startswith(lora) else value.shape[0]
            for key, value in adapter.items()
            if key.startswith(prefix) and value.ndim == 2 and (key.startswith(lora) or (
                key.endswith(".weight") and ".lora_" not in key))]
    if rows:
        return max(rows)
    tokens = (adapter_config.get("trainable_token_indices")
              or adapter_config.get("token_indices") or [])  # LoRA's, or TrainableTokens'
    trained = [max(i) + 1 for i in (tokens.values() if isinstance(tokens, dict) else [tokens])
               if i]
    rows = model.get_input_embeddings().weight.shape[0]
    return max(trained) if trained and max(trained) > rows else None


def _resize_to_adapter(model, rows: int | None, model_id: str) -> None:
    """Resize ``model``'s embeddings to ``rows`` tokens, as the adapter's trainer did; the
    rows the adapter does not give stay 0 (a trainer's were random: not determined), which
    leaves every nonzero eigenvalue of the head's ``WᵀW`` as the determined rows give it."""
    old = None if rows is None else model.get_input_embeddings().weight.shape[0]
    if old is None or rows == old:
        return
    logger.info("%s: the adapter's vocabulary has %d tokens; resizing the base's %d to it",
                model_id, rows, old)
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None and rows > old:
                layer.weight[old:] = 0


def merged_with_peft(base_dir: Path, adapter_dir: Path, adapter_config: dict[str, Any],
                     base_config: dict[str, Any], *, model_id: str, variant: str,
                     trust_remote_code: bool) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Merge with ``PeftModel.merge_and_unload()`` and stream the merged weights as
    ``(name, tensor, storage)``.

    The base is built by transformers in float32 (so the merge is float32 arithmetic), the
    merged model is saved to a temporary safetensors directory and freed, and that copy is
    streamed like any checkpoint; the whole base model is in memory while it is merged.
    """
    from peft.utils import load_peft_weights

    with tempfile.TemporaryDirectory(prefix="esd-peft-merge-") as tmp:
        model_cls = _model_class(adapter_config, base_config)
        try:
            adapter = load_peft_weights(str(adapter_dir), device="cpu")
            labels = _labels(adapter, adapter_config)
            model, loading, unloaded = _merged(model_cls, base_dir, adapter_dir, adapter_config,
                                               adapter, trust_remote_code, model_id, labels)
            if unloaded and not adapter_config.get("task_type") and model.base_model is model:
                import transformers  # a bare base: the adapter of its causal LM, as peft's default

                model_cls = transformers.AutoModelForCausalLM
                del model  # one model in memory at a time
                gc.collect()
                model, loading, unloaded = _merged(model_cls, base_dir, adapter_dir,
                                                   adapter_config, adapter, trust_remote_code,
                                                   model_id, labels)
            if unloaded:
                raise ValueError(f"{len(unloaded)} adapter tensor(s) load into no module of it "
                                 f"({', '.join(sorted(unloaded)[:4])})")
            model.save_pretrained(tmp, safe_serialization=True)
            saved = {_whole_name(k) for k in adapter}
        except (ValueError, KeyError, IndexError, AttributeError, TypeError, RuntimeError,
                OSError, NotImplementedError, ImportError) as exc:
            error = ShapeMismatchError if "size mismatch" in str(exc) else UnsupportedFormatError
            raise error(f"{model_id}: the {variant} adapter could not be merged by peft into "
                        f"{model_cls.__name__}: {type(exc).__name__}: {exc}") from None
        del model
        gc.collect()
        # The task model's layers the base lacks start at random: not determined, unless the
        # adapter saves them whole (a classifier head in modules_to_save).
        unseeded = sorted(set(loading.get("missing_keys") or ()) - saved)
        if unseeded:
            logger.warning("%s: %d tensor(s) of the %s that %s lacks are initialised at random "
                           "(the adapter does not save them), so not determined: left out: %s",
                           model_id, len(unseeded), model_cls.__name__, base_dir.name,
                           ", ".join(unseeded[:8]))
        files = sorted(p.name for p in Path(tmp).iterdir())
        reader = CheckpointReader(Path(tmp), select_weight_files(files, model_id), model_id)
        for name, tensor, storage in reader.iter_tensors():
            if name not in unseeded:
                yield name, tensor, storage


def _labels(adapter: dict, adapter_config: dict[str, Any]) -> dict[str, int]:
    """``{"num_labels": n}`` for a classifier adapter, from the head it saves (``score``,
    ``classifier``, RoBERTa's ``classifier.out_proj``), as its trainer built the model."""
    if str(adapter_config.get("task_type") or "").upper() not in ("SEQ_CLS", "TOKEN_CLS"):
        return {}
    heads = [v.shape[0] for k, v in adapter.items() if v.ndim == 2 and _whole_name(k).endswith(
        ("score.weight", "classifier.weight", "classifier.out_proj.weight"))]
    return {"num_labels": heads[0]} if heads else {}


def _merged(model_cls, base_dir: Path, adapter_dir: Path, adapter_config: dict[str, Any],
            adapter: dict, trust_remote_code: bool, model_id: str, labels: dict[str, int]):
    """``(merged model, its base's loading info, the adapter's keys that loaded nowhere)``."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    model, loading = model_cls.from_pretrained(
        str(base_dir), dtype=torch.float32, trust_remote_code=trust_remote_code,
        output_loading_info=True, **labels)
    _resize_to_adapter(model, adapter_vocabulary(model, adapter, adapter_config), model_id)
    own = set(model.state_dict())  # a weight the adapter saves whole loads under its name
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    unloaded = {k for k in set(adapter) - set(get_peft_model_state_dict(peft_model))
                if _whole_name(k) not in own}
    return peft_model.merge_and_unload(), loading, unloaded


def _whole_name(key: str) -> str:
    """The model's name of a tensor an adapter file saves whole (``modules_to_save``, a saved
    embedding), from its key there."""
    parts = key.removeprefix(ADAPTER_PREFIX).split(".")
    return ".".join(p for p in parts if p not in ("modules_to_save", "default", "base_layer",
                                                  "original_module"))
