"""An opened model: its checkpoint, and how its tensors (merged, for an adapter) are made."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from esd_experiment.core.ids import Source
from esd_experiment.formats.stream import ShardFetcher, stream_models

if TYPE_CHECKING:
    import torch


@dataclass
class Checkpoint:
    """An opened full-model checkpoint: the reader of its tensors, the fetcher of its shards
    (None for a local directory) and its ``config.json``; shared by the models built on it."""

    source: Source
    reader: Any
    config: dict
    fetcher: ShardFetcher | None
    order: tuple[str, ...] = ()  # an in-memory module's tensor names, in definition order


@dataclass
class LoadedModel:
    """An opened model: its identity for the result rows, and how to make its tensors.

    A full model's tensors are its checkpoint's; an adapter's are its base checkpoint's merged
    with its delta (``plan``, a ``lora_merge.MergePlan``), or for adapter types only peft
    merges, the stream of a peft-merged copy (``checkpoint`` None).
    """

    model_id: str
    revision: str | None
    source_model: str
    base_revision: str | None
    is_adapter: bool
    checkpoint: Checkpoint | None
    plan: Any = None
    _own: Any = field(default=None, repr=False)

    def outputs_by_source(self) -> dict[str | None, list[str]]:
        """``{base tensor: [the output tensors made from it]}``; ``None``: from the adapter."""
        if self.plan is None:
            return {name: [name] for name in self.checkpoint.reader.names}
        out: dict[str | None, list[str]] = {}
        for name in self.plan.names:
            out.setdefault(self.plan.source_of(name), []).append(name)
        return out

    def output(self, name: str, base_value: torch.Tensor | None) -> torch.Tensor:
        if self.plan is None:
            return base_value if base_value is not None else self.checkpoint.reader.get(name)
        return self.plan.tensor(name, base_value)

    def output_storage(self, name: str) -> str:
        reader = self.plan if self.plan is not None else self.checkpoint.reader
        return reader.storage(name)

    def close(self) -> None:
        """Close the adapter file a merge reads (the base is closed by the pass)."""
        if self.plan is not None:
            self.plan.adapter.close()

    def own_stream(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        return self._own()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors (1-D ones included), shard by shard, merged for an adapter."""
        for item in stream_models([self]):
            if item.error is not None:
                raise item.error
            yield item.name, item.tensor
