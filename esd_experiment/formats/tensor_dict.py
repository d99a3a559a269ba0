"""A ``TensorReader`` over tensors already in memory: an ``nn.Module``'s weights, or a PEFT
adapter's, read by the same stream, merge and estimator as a checkpoint on disk.

``module_tensors(module)`` gives a module's state dict as ``save_pretrained`` stores it: a
tensor shared under several names (tied embeddings and heads) once, under its first name, and
a transformers model's under the names and in the splits of its checkpoint (transformers 5
reverts on save the conversion it loads by: a Mixtral's fused expert stacks as each expert's
``w1``, ``w3`` and ``w2``), so that a module gives the rows of its checkpoint.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from esd_experiment.formats.checkpoint import natural_key, stream_tensors

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The one "file" an in-memory reader holds (the stream releases files as it passes them).
IN_MEMORY = "<memory>"


class TensorDictReader:
    """``TensorReader`` over ``{name: tensor}``; names in natural order, nothing copied. A
    ``SavedLayout`` makes its tensors when they are read: their shapes and dtypes come from
    its ``described`` meta tensors."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors if isinstance(tensors, SavedLayout) else dict(tensors)
        self._described = getattr(self._tensors, "described", self._tensors)
        self.names = tuple(sorted(self._described, key=natural_key))
        self.files = (IN_MEMORY,)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._described.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._described[name].shape)

    def dtype(self, name: str) -> str:
        return str(self._described[name].dtype).removeprefix("torch.")

    def storage(self, name: str) -> str:
        return self.dtype(name)

    def files_of(self, name: str) -> tuple[str, ...]:
        return self.files

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    def close(self) -> None:
        pass

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        return stream_tensors(self)


def module_tensors(module: torch.nn.Module, as_saved: bool = True) -> Mapping[str, torch.Tensor]:
    """The module's state dict, each stored tensor once (the first name of a tied group), as a
    checkpoint written by ``save_pretrained`` holds it (``as_saved``; else under the module's
    own names, as an adapter trained on it names them)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in module.state_dict(keep_vars=False).items():
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device: its values are not loaded")
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return saved_layout(module, out) if as_saved else out


def saved_config(module: torch.nn.Module) -> dict | None:
    """The module's ``config.json`` as ``save_pretrained`` writes it (its class recorded as
    ``architectures`` when the config, built by hand, names none); None without a config."""
    config = getattr(module, "config", None)
    out = config.to_dict() if hasattr(config, "to_dict") else None
    if out and not out.get("architectures"):
        out["architectures"] = [type(module).__name__]
    return out


def saved_layout(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Mapping:
    """``tensors`` as ``save_pretrained`` writes them (``SavedLayout``); unchanged for another
    module than a transformers model, or where the installed transformers cannot revert its
    conversion."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return tensors
    if not isinstance(module, PreTrainedModel):
        return tensors
    try:
        return SavedLayout(module, tensors)
    except Exception as exc:  # noqa: BLE001  (an older transformers, an op meta cannot run)
        logger.info("%s: its weights are read under its modules' names (%s: %s)",
                    type(module).__name__, type(exc).__name__, exc)
        return tensors


class SavedLayout(Mapping):
    """A transformers model's tensors as ``save_pretrained`` writes them: the conversion it
    loads by reverted (renamed; fused stacks split, a Mixtral's ``gate_up_proj`` into each
    expert's ``w1`` and ``w3``), made one repeated block (``model.layers.3``) at a time when
    read, so that a split that copies holds one block's copies, never the model's.
    ``described``: the same names as meta tensors (shapes and dtypes, no values)."""

    def __init__(self, module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]):
        from transformers.core_model_loading import revert_weight_conversion

        self._revert = lambda part: dict(revert_weight_conversion(module, part))
        self._blocks: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            block = _BLOCK.match(name)
            self._blocks.setdefault(block[1] if block else "", {})[name] = tensor
        self.described: dict[str, torch.Tensor] = {}
        self._block_of: dict[str, str] = {}
        for key, part in self._blocks.items():
            for name, meta in self._revert({n: t.to("meta") for n, t in part.items()}).items():
                self.described[name], self._block_of[name] = meta, key
        self._made: tuple[str | None, dict] = (None, {})
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._block_of[name]
        with self._lock:
            if self._made[0] != key:
                self._made = (None, {})  # the last block's copies freed before the next's
                self._made = (key, self._revert(self._blocks[key]))
            return self._made[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.described)

    def __len__(self) -> int:
        return len(self.described)


_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # a name's repeated block: model.layers.3
