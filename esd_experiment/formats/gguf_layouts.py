"""Matrices llama.cpp's converter stores in another layout than the Hugging Face checkpoint,
and how each goes back, as transformers loads them (the entries of its ``TENSOR_PROCESSORS``):

- ``llama``: the rows of ``attn_q`` and ``attn_k``, which the converter permutes within each
  head (``LlamaModel.permute``), by the head counts of the file's metadata;
- ``bloom``: the rows of ``attn_qkv``, stored by Bloom head by head as (q, k, v) and regrouped
  by the converter as all q, all k, all v (``BloomModel.modify_tensors``);
- ``gpt2``: ``attn_qkv``, ``attn_output``, ``ffn_up`` and ``ffn_down``, which it transposes
  from GPT-2's ``Conv1D`` (in, out).

The eigenvalues depend on none of these, but ``W - W_source`` against a Hugging Face
checkpoint (--delta) and a custom metric's ``W`` do. Without the head counts a matrix is kept
as stored, as transformers keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# architecture -> (the change, the tensors, the metadata keys of the head count of each
# ``which``: the first one present; a file without head_count_kv has as many as head_count)
_BY_HEADS = {
    "llama": ("unpermute", re.compile(r"^blk\.\d+\.attn_(?P<which>[qk])\.weight$"),
              {"q": ("llama.attention.head_count",),
               "k": ("llama.attention.head_count_kv", "llama.attention.head_count")}),
    "bloom": ("regroup", re.compile(r"^blk\.\d+\.attn_(?P<which>qkv)\.weight$"),
              {"qkv": ("bloom.attention.head_count",)}),
}
_TRANSPOSED = {"gpt2": re.compile(r"^blk\.\d+\.(attn_qkv|attn_output|ffn_up|ffn_down)\.weight$")}
# rows per head group: a permuted head holds pairs of rows, a regrouped one q, k and v
_ROWS_PER_HEAD = {"unpermute": 2, "regroup": 3}


@dataclass(frozen=True)
class Relayout:
    """How one stored matrix is read back in the Hugging Face layout."""

    kind: str       # "unpermute", "regroup" or "transpose"
    heads: int = 0  # the head count of "unpermute" and "regroup"

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return stored[::-1] if self.kind == "transpose" else stored

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "transpose":
            return w.T.contiguous()
        rows, rest = w.shape[0], w.shape[1:]
        if self.kind == "unpermute":  # within each head, rows stored (pair, half) -> (half, pair)
            split = w.reshape(self.heads, rows // self.heads // 2, 2, *rest).transpose(1, 2)
        else:  # rows stored (q/k/v, head, row) -> (head, q/k/v, row)
            split = w.reshape(3, self.heads, rows // self.heads // 3, *rest).transpose(0, 1)
        return split.reshape(w.shape).contiguous()


def relayouts(architecture: str, metadata: Mapping[str, object],
              matrices: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, Relayout]:
    """{tensor: its ``Relayout``} for the ``matrices`` ({tensor: (GGUF name, stored shape)})
    the converter of ``architecture`` stored in another layout; the others are absent."""
    out: dict[str, Relayout] = {}
    transposed = _TRANSPOSED.get(architecture)
    by_heads = _BY_HEADS.get(architecture)
    for name, (gguf_name, shape) in matrices.items():
        if len(shape) != 2:
            continue
        if transposed is not None and transposed.match(gguf_name):
            out[name] = Relayout("transpose")
        match = by_heads[1].match(gguf_name) if by_heads is not None else None
        if match is None:
            continue
        kind, _, keys = by_heads
        heads = next((metadata[k] for k in keys[match["which"]] if k in metadata), None)
        if isinstance(heads, int) and heads > 0 \
                and shape[0] % (_ROWS_PER_HEAD[kind] * heads) == 0:
            out[name] = Relayout(kind, heads)
    return out
