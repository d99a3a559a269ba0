"""A ``TensorReader`` over tensors already in memory: an ``nn.Module``'s weights, or a PEFT
adapter's, read by the same stream, merge and estimator as a checkpoint on disk.

``module_tensors(module)`` gives a module's state dict as ``save_pretrained`` stores it: a
tensor shared under several names (tied embeddings and heads) once, under its first name, and
a transformers model's under the names and in the splits of its checkpoint (transformers 5
reverts on save the conversion it loads by: a Mixtral's fused expert stacks as each expert's
``w1``, ``w3`` and ``w2``), so that a module gives the rows of its checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from esd_experiment.formats.checkpoint import natural_key, stream_tensors

if TYPE_CHECKING:
    import torch

# The one "file" an in-memory reader holds (the stream releases files as it passes them).
IN_MEMORY = "<memory>"


class TensorDictReader:
    """``TensorReader`` over ``{name: tensor}``; names in natural order, nothing copied."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)
        self.names = tuple(sorted(self._tensors, key=natural_key))
        self.files = (IN_MEMORY,)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> str:
        return str(self._tensors[name].dtype).removeprefix("torch.")

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


def module_tensors(module: torch.nn.Module, as_saved: bool = True) -> dict[str, torch.Tensor]:
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
    return _as_saved(module, out) if as_saved else out


def _as_saved(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict:
    """``tensors`` as ``save_pretrained`` writes them: transformers' conversion of the model
    reverted (views of the module's tensors); unchanged for another module, or where the
    installed transformers has no such conversion."""
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    if not isinstance(module, PreTrainedModel):
        return tensors
    return dict(revert_weight_conversion(module, tensors))
