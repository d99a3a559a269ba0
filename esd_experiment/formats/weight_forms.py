"""Weights stored in a form other than the layer's matrix, presented as the matrix.

``WeightFormsReader`` wraps a checkpoint reader (``checkpoint_io.CheckpointReader`` or any
reader of the same interface) and changes two kinds of tensors, leaving every other one as
it is:

- Weight normalisation (``torch.nn.utils.weight_norm`` as ``weight_g``/``weight_v``, or the
  parametrization ``parametrizations.weight.original0``/``original1``): the layer's weight is
  ``g * v / ||v||``, the norm taken over every dimension in which ``g`` has size 1, exactly as
  torch computes it; it is yielded as ``<module>.weight`` in float32.
- Fused expert stacks stored as 2-D matrices (DBRX's ``experts.mlp.w1``/``v1``/``w2``, all
  experts' rows one after the other): reshaped, as a view, to ``(experts, rows, columns)``
  with the expert count from ``config.json``, so that each expert gets its own result row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esd_experiment.core.errors import CorruptCheckpointError
from esd_experiment.core.naming import is_expert_stack, is_weight_name
from esd_experiment.formats.checkpoint import natural_key, stream_tensors

if TYPE_CHECKING:
    import torch

# config.json keys that hold a mixture-of-experts layer's expert count (DBRX nests it in
# ffn_config, multimodal models in text_config).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "moe_num_experts", "n_routed_experts")
_NESTED_CONFIGS = ("ffn_config", "text_config")
# (the name of g, the name of v beside it): torch's legacy weight_norm and its parametrization.
_WEIGHT_NORM = (
    (re.compile(r"^(?P<module>.+)\.weight_g$"), "weight_v"),
    (re.compile(r"^(?P<module>.+)\.parametrizations\.weight\.original0$"),
     "parametrizations.weight.original1"),
)


def expert_count(config: Mapping[str, Any]) -> int | None:
    """The number of experts of a mixture-of-experts model's config; None for other models."""
    for scope in (config, *(config.get(k) for k in _NESTED_CONFIGS)):
        if isinstance(scope, Mapping):
            for key in _EXPERT_COUNT_KEYS:
                value = scope.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                    return value
    return None


@dataclass(frozen=True)
class _WeightNorm:
    g: str
    v: str


@dataclass(frozen=True)
class _ExpertStack:
    stored: str
    experts: int


class WeightFormsReader:
    """A reader whose weight-normalised and 2-D fused-expert tensors read as matrices."""

    def __init__(self, reader, config: Mapping[str, Any], model_id: str):
        self.reader, self.model_id = reader, model_id
        self.files, self.aliases = reader.files, getattr(reader, "aliases", {})
        self._forms: dict[str, _WeightNorm | _ExpertStack] = {}
        hidden: set[str] = set()
        stored = set(reader.names)
        for name in reader.names:
            for pattern, v_suffix in _WEIGHT_NORM:
                match = pattern.match(name)
                if match is None:
                    continue
                v = f"{match['module']}.{v_suffix}"
                if v not in stored:
                    raise CorruptCheckpointError(
                        f"{model_id}: weight-normalised {name!r} has no {v_suffix} partner")
                self._forms[f"{match['module']}.weight"] = _WeightNorm(name, v)
                hidden.update((name, v))
        experts = expert_count(config)
        for name in reader.names:
            if experts and self._is_flat_stack(name, experts):
                self._forms[name] = _ExpertStack(name, experts)
        self.names = tuple(sorted((stored - hidden) | set(self._forms), key=natural_key))

    def _is_flat_stack(self, name: str, experts: int) -> bool:
        """A 2-D matrix of all experts' rows: inside an experts module, not one expert's own
        ``nn.Linear`` (``experts.3.w1.weight``), rows a multiple of the expert count."""
        shape = self.reader.shape(name)
        parts = name.split(".")
        # A router inside a mixture-of-experts module (Mixtral's block_sparse_moe.gate) has
        # no experts part: it is a matrix of its own.
        at = next((i for i, p in enumerate(parts) if "expert" in p.lower()), None)
        after = parts[at + 1:] if at is not None and is_expert_stack(name) else []
        return (len(shape) == 2 and bool(after) and not name.endswith("weight")
                and is_weight_name(name) and not any(p.isdigit() for p in after)
                and shape[0] % experts == 0)

    @property
    def nbytes(self) -> int:
        return self.reader.nbytes

    def shape(self, name: str) -> tuple[int, ...]:
        form = self._forms.get(name)
        if isinstance(form, _WeightNorm):
            return self.reader.shape(form.v)
        if isinstance(form, _ExpertStack):
            rows, cols = self.reader.shape(form.stored)
            return (form.experts, rows // form.experts, cols)
        return self.reader.shape(name)

    def dtype(self, name: str) -> str:
        form = self._forms.get(name)
        return "float32" if isinstance(form, _WeightNorm) else self.reader.dtype(
            form.stored if isinstance(form, _ExpertStack) else name)

    def storage(self, name: str) -> str:
        form = self._forms.get(name)
        if isinstance(form, _WeightNorm):
            return f"{self.reader.storage(form.v)}+weight_norm"
        return self.reader.storage(form.stored if isinstance(form, _ExpertStack) else name)

    def files_of(self, name: str) -> tuple[Path, ...]:
        form = self._forms.get(name)
        if isinstance(form, _WeightNorm):
            return tuple(dict.fromkeys(self.reader.files_of(form.g) + self.reader.files_of(form.v)))
        return self.reader.files_of(form.stored if isinstance(form, _ExpertStack) else name)

    def get(self, name: str) -> torch.Tensor:
        form = self._forms.get(name)
        if isinstance(form, _WeightNorm):
            return weight_norm(self.reader.get(form.g), self.reader.get(form.v))
        if isinstance(form, _ExpertStack):
            stack = self.reader.get(form.stored)
            return stack.reshape(form.experts, stack.shape[0] // form.experts, stack.shape[1])
        return self.reader.get(name)

    def close(self) -> None:
        self.reader.close()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        return stream_tensors(self)


def weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``g * v / ||v||`` in float32, the norm over the dimensions where ``g`` has size 1
    (torch's ``_weight_norm``; a 0-d or all-ones ``g`` normalises over the whole tensor)."""
    import torch

    g, v = g.to(torch.float32), v.to(torch.float32)
    dims = [d for d in range(v.ndim) if g.ndim != v.ndim or g.shape[d] == 1]
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return v * (g / norm)
