"""A ``peft.PeftModel`` in memory, opened as the CLI opens the same adapter from its files.

The base's weights (``base_layer`` and ``original_module`` unwrapped, under the names and in
the splits of the base's checkpoint, which the adapter's keys find as they find them on disk)
and the adapter's state dict (``get_peft_model_state_dict``: the tensors ``save_pretrained``
writes to ``adapter_model.safetensors``) go through the same ``MergePlan``
as an adapter read from disk, so the merged weights are the CLI's, tensor for tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

from esd_experiment.adapters.lora_merge import (
    CONV1D_MODEL_TYPES,
    LoraSettings,
    MergePlan,
    NeedsPeftMerge,
    unsupported_variant,
)
from esd_experiment.core.errors import InputError, UnsupportedFormatError
from esd_experiment.core.ids import Source
from esd_experiment.formats.model import Checkpoint, LoadedModel
from esd_experiment.formats.tensor_dict import (
    TensorDictReader,
    module_tensors,
    saved_config,
    saved_layout,
)
from esd_experiment.formats.weight_forms import WeightFormsReader

# What peft adds to the base's parameter names: the wrapped layer of a LoRA module, the kept
# original of a ``modules_to_save`` module; its own parameters (LoRA factors, saved copies).
_WRAPPED = re.compile(r"\.(base_layer|original_module)(?=\.)")
_PEFT_OWN = re.compile(r"\.(lora_\w+|modules_to_save)(\.|$)")


def is_peft_model(module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def open_peft_model(peft_model, model_id: str, source_model: str) -> LoadedModel:
    """The merged model of ``peft_model``'s active adapter, as a ``LoadedModel`` whose stream
    is that of the CLI for the adapter's files over the base's."""
    from peft import get_peft_model_state_dict

    name = peft_model.active_adapter
    if not isinstance(name, str):
        raise InputError(f"{model_id}: several active adapters ({', '.join(name)}): activate "
                         "one (set_adapter) to analyse it merged")
    adapter_config = peft_model.peft_config[name].to_dict()
    adapter_config = {k: (v.value if hasattr(v, "value") else v)  # enums as written to JSON
                      for k, v in adapter_config.items()}
    variant = unsupported_variant(adapter_config)
    base_model = peft_model.get_base_model()
    config = getattr(base_model, "config", None)
    source_model = source_model or str(adapter_config.get("base_model_name_or_path")
                                       or getattr(config, "_name_or_path", "") or "")
    base_config = saved_config(base_model) or {}
    held = module_tensors(base_model, as_saved=False)
    base = WeightFormsReader(TensorDictReader(saved_layout(base_model, {  # as saved, and read
        _WRAPPED.sub("", k): v for k, v in held.items() if not _PEFT_OWN.search(k)})),
        base_config, source_model or "base")  # as the CLI reads the base's checkpoint
    adapter = TensorDictReader(get_peft_model_state_dict(peft_model, adapter_name=name))
    if variant is None:
        try:
            plan = MergePlan(base, adapter, LoraSettings.from_config(adapter_config, model_id),
                             model_id=model_id, base_id=source_model or "its base",
                             base_config=base_config,
                             conv1d=base_config.get("model_type") in CONV1D_MODEL_TYPES,
                             task_type=str(adapter_config.get("task_type") or ""))
        except NeedsPeftMerge as reason:
            variant = str(reason)
    if variant is not None:
        raise UnsupportedFormatError(
            f"{model_id}: a {variant} adapter is merged by peft alone: analyse "
            "peft_model.merge_and_unload() instead")
    checkpoint = Checkpoint(Source(source_model or "base", None, Path("."), ()), base,
                            base_config, None)
    return LoadedModel(model_id, None, source_model, None, True, checkpoint, plan)
