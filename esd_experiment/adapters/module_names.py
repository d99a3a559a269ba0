"""The names transformers' modules give a published checkpoint's tensors.

A model transformers builds can name its weights otherwise than the checkpoint it loads:
transformers 5 renames on load by the conversion mapping of the model and of its sub-models
(a CLIP or SigLIP vision tower loses its ``vision_model.`` prefix; ViT's
``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj``). An adapter
trained on that model names its targets by the module names, which the base checkpoint does
not hold. ``module_names`` maps the checkpoint's names to the module's by transformers' own
renaming, so that the adapter's keys find their base tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


def module_names(names: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """``{module name: checkpoint name}`` for each of ``names`` that the model class of
    ``config`` (its ``architectures``, built on the meta device: no memory, no remote code)
    loads under another name by renaming alone (a tensor that a converter fuses with others
    is left out). Empty where transformers lacks the class, its conversion mapping, or the
    class cannot take the config."""
    architectures = config.get("architectures") or [""]
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        model_class = getattr(transformers, str(architectures[0]), None)
        if model_class is None:
            return {}
        with torch.device("meta"):
            model = model_class(transformers.AutoConfig.for_model(**dict(config)))
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        held = model.state_dict()
        out = {}
        for name in names:
            new, fused = rename_source_key(name, renamings, converters,
                                           model.base_model_prefix, held)
            if fused is None and new != name and new in held:
                out[new] = name
        return out
    except Exception as exc:  # noqa: BLE001  (an older transformers, a config it cannot build)
        logger.debug("no module names for %s: %s: %s", architectures[0], type(exc).__name__,
                     exc)
        return {}
