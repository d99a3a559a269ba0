"""Dequantization of quantized weight formats: pure functions, tensors in, float32 out.

No file I/O and no checkpoint names: ``quantized.py`` finds the stored parts of each weight and
calls these. One function per stored layout:

- ``dequantize_gptq``: GPTQ ``qweight``/``qzeros``/``scales``/``g_idx`` (2, 3, 4, 8 bits).
- ``dequantize_awq``: AutoAWQ GEMM (4 bits, AWQ's packing order).
- ``dequantize_scaled``: float8 or int8 numbers times scales per tensor, channel, group or
  block (FP8 ``weight_scale_inv``/``weight_scale``, FBGEMM, compressed-tensors int- and
  float-quantized, bitsandbytes 8-bit).
- ``dequantize_packed``: compressed-tensors ``pack-quantized`` int32 words.
- ``dequantize_bnb4`` (with ``bnb_nested_absmax``): bitsandbytes nf4/fp4.

Precision: each weight is ``(q - z) * s`` with ``q - z`` exact and one float32 rounding of the
product. Memory: the output is allocated once and filled in row chunks of ``CHUNK_ELEMS``
entries, so the peak is one float32 copy of the tensor plus a few chunks of temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

CHUNK_ELEMS = 1 << 20          # output entries per chunk: 4 MiB of float32
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ packs columns 0,2,4,6,1,3,5,7 per word



def unpack_bits(words: torch.Tensor, bits: int, count: int, dense: bool = True) -> torch.Tensor:
    """The unsigned ``bits``-bit integers packed in the int32 ``words`` of the last dimension.

    ``dense``: value k occupies bits ``[k*bits, (k+1)*bits)`` of the words read as one
    little-endian bit stream (GPTQ, including its 3-bit layout, and compressed-tensors).
    ``dense=False``: each word holds ``32 // bits`` values from its low bits up and wastes the
    rest (compressed-tensors before 0.10 at 3, 5, 6, 7 bits). Both agree for 1, 2, 4, 8 bits.
    Returns int32 ``(..., count)``.
    """
    mask = (1 << bits) - 1
    if 32 % bits == 0 or not dense:
        shifts = torch.arange(32 // bits, dtype=torch.int32) * bits
        # Arithmetic shifts of negative words only fill bits that the mask drops.
        return ((words.unsqueeze(-1) >> shifts) & mask).flatten(-2)[..., :count]
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)
    start = torch.arange(count, dtype=torch.int64) * bits
    idx, off = start // 32, start % 32
    pair = w[..., idx] | (w[..., idx + 1] << 32)  # 64 bits from the value's first word on
    return ((pair >> off) & mask).to(torch.int32)


@dataclass(frozen=True)
class Grid:
    """How a scale (or zero point) tensor covers the rows and columns of a weight matrix.

    ``tensor``: one value, shape (1,). ``channel``: one per row, (rows, 1).
    ``group``: (rows, groups), column c in group ``g_idx[c]`` or ``c // size[0]``.
    ``block``: (ceil(rows / size[0]), ceil(cols / size[1])), edge blocks partial.
    ``flat``: (ceil(rows * cols / size[0]),) over the row-major flattened matrix.
    """

    kind: str
    size: tuple[int, ...] = ()
    g_idx: torch.Tensor | None = None

    def expand(self, t: torch.Tensor, r0: int, r1: int, cols: int) -> torch.Tensor:
        """The part of ``t`` covering rows ``r0:r1``, broadcastable to ``(r1 - r0, cols)``."""
        if self.kind == "tensor":
            return t.reshape(1, 1)
        if self.kind == "channel":
            return t.reshape(-1, 1)[r0:r1]
        if self.kind == "group":
            groups = self.g_idx if self.g_idx is not None else torch.arange(cols) // self.size[0]
            return t[r0:r1][:, groups]
        if self.kind == "block":
            br, bc = self.size
            rows = t[r0 // br:(r1 - 1) // br + 1].repeat_interleave(br, dim=0)
            return rows[r0 % br:r0 % br + r1 - r0].repeat_interleave(bc, dim=1)[:, :cols]
        block = torch.arange(r0 * cols, r1 * cols) // self.size[0]
        return t[block].view(r1 - r0, cols)


def dequantize_grid(rows: int, cols: int, values: Callable[[int, int], torch.Tensor],
                    scale: torch.Tensor, grid: Grid, zero: torch.Tensor | None = None,
                    chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """``(values - zero) * scale`` as float32 ``(rows, cols)``, ``values(r0, r1)`` giving the
    stored numbers of rows ``r0:r1``; filled in chunks of whole rows (a multiple of 32, so
    packed words never straddle two chunks)."""
    out = torch.empty((rows, cols), dtype=torch.float32)
    scale = scale.to(torch.float32)
    zero = zero.to(torch.float32) if zero is not None else None
    step = max(32, chunk_elems // max(cols, 1) // 32 * 32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        q = values(r0, r1).to(torch.float32)
        if zero is not None:
            q.sub_(grid.expand(zero, r0, r1, cols))  # small integers: exact
        out[r0:r1] = q.mul_(grid.expand(scale, r0, r1, cols))
    return out


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """GPTQ: ``W[o, i] = scales[g, o] * (q[i, o] - (z[g, o] + zero_offset))``, ``g = g_idx[i]``.

    ``qweight`` (in * bits / 32, out) packs the input dimension, ``qzeros`` (groups,
    out * bits / 32) the output one, both as dense bit streams. ``zero_offset`` is 1 for the
    ``gptq`` (v1) checkpoint format, which stores zero points minus one, 0 for ``gptq_v2``.
    Returns float32 ``(out, in)``, the ``nn.Linear`` layout.
    """
    in_features, out_features = g_idx.numel(), qweight.shape[1]
    zeros = unpack_bits(qzeros, bits, out_features) + zero_offset
    return dequantize_grid(
        out_features, in_features,
        lambda r0, r1: unpack_bits(qweight[:, r0:r1].T, bits, in_features),
        scales.T, Grid("group", g_idx=g_idx), zeros.T)


def _unpack_awq(words: torch.Tensor, count: int) -> torch.Tensor:
    vals = unpack_bits(words, 4, words.shape[-1] * 8)
    return vals.unflatten(-1, (-1, 8))[..., list(AWQ_REVERSE_ORDER)].flatten(-2)[..., :count]


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """AWQ (AutoAWQ GEMM, 4 bits): ``W[o, i] = scales[i // group_size, o] * (q[i, o] - z)``.

    ``qweight`` (in, out / 8) and ``qzeros`` (groups, out / 8) pack the output dimension,
    eight values per word in AWQ's order (columns 0, 2, 4, 6, 1, 3, 5, 7 from the low bits).
    Returns float32 ``(out, in)``.
    """
    in_features, out_features = qweight.shape[0], scales.shape[1]
    zeros = _unpack_awq(qzeros, out_features)

    def values(r0: int, r1: int) -> torch.Tensor:  # rows of W are columns of qweight
        return _unpack_awq(qweight[:, r0 // 8:(r1 + 7) // 8], r1 - r0 + r0 % 8)[:, r0 % 8:].T

    return dequantize_grid(out_features, in_features, values, scales.T,
                           Grid("group", (group_size,)), zeros.T)


def dequantize_scaled(weight: torch.Tensor, scale: torch.Tensor, grid: Grid,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
    """``(weight - zero) * scale`` for weights stored as float8 or int8 numbers with scales over
    their last two dimensions; leading dimensions (fused experts) are dequantized one by one,
    with their own scales when the scale has them. Returns float32 of ``weight``'s shape."""
    lead = weight.shape[:-2]
    rows, cols = weight.shape[-2:]
    w = weight.reshape(-1, rows, cols)
    out = torch.empty(w.shape, dtype=torch.float32)
    per = math.prod(lead) if lead else 1
    scales = scale.reshape(per, *scale.shape[len(lead):]) if scale.ndim > 2 else None
    zeros = zero.reshape(per, *zero.shape[len(lead):]) if zero is not None and zero.ndim > 2 \
        else None
    for e in range(w.shape[0]):
        out[e] = dequantize_grid(
            rows, cols, lambda r0, r1, e=e: w[e, r0:r1],
            scales[e] if scales is not None else scale, grid,
            zeros[e] if zeros is not None else zero)
    return out.reshape(weight.shape)


def dequantize_packed(packed: torch.Tensor, bits: int, shape: tuple[int, int],
                      scale: torch.Tensor, grid: Grid,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors ``pack-quantized``: signed ``bits``-bit integers stored with an
    offset of ``2**(bits-1)`` in int32 words packed along the input dimension
    (``weight_packed`` (rows, words)); ``(q - zero) * scale`` as float32 ``shape``."""
    rows, cols = shape
    dense = packed.shape[-1] == math.ceil(cols * bits / 32)
    offset = 1 << (bits - 1)
    return dequantize_grid(
        rows, cols, lambda r0, r1: unpack_bits(packed[r0:r1], bits, cols, dense) - offset,
        scale, grid, zero)


def bnb_nested_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor,
                      nested_quant_map: torch.Tensor, nested_blocksize: int,
                      offset: float) -> torch.Tensor:
    """bitsandbytes double quantization: the uint8 absmax codes back to float32 scales,
    ``nested_quant_map[code] * nested_absmax[block] + offset``, as bitsandbytes computes them."""
    codes = nested_quant_map.to(torch.float32)[absmax.reshape(-1).long()]
    blocks = torch.arange(codes.numel()) // nested_blocksize
    return codes * nested_absmax.to(torch.float32)[blocks] + torch.tensor(offset,
                                                                         dtype=torch.float32)


def dequantize_bnb4(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                    blocksize: int, shape: tuple[int, ...]) -> torch.Tensor:
    """bitsandbytes 4-bit (nf4/fp4): the flattened weight's element e is
    ``quant_map[code_e] * absmax[e // blocksize]``, two codes per byte, the first in the high
    nibble. ``packed`` is the stored weight in any dtype (``bnb_4bit_quant_storage``)."""
    data = packed.reshape(-1).view(torch.uint8)
    qmap = quant_map.to(torch.float32)
    cols = shape[-1] if shape else 1
    rows = math.prod(shape) // cols if cols else 0

    def values(r0: int, r1: int) -> torch.Tensor:
        e0, e1 = r0 * cols, r1 * cols  # e0 is even: chunks are multiples of 32 rows
        byte = data[e0 // 2:(e1 + 1) // 2]
        codes = torch.stack([byte >> 4, byte & 15], dim=-1).flatten()[:e1 - e0]
        return qmap[codes.long()].view(r1 - r0, cols)

    out = dequantize_grid(rows, cols, values, absmax, Grid("flat", (blocksize,)))
    return out.reshape(shape)



def scale_grid(wshape: tuple[int, ...], sshape: tuple[int, ...], strategy: str | None,
               group: int | None = None, block: tuple[int, int] | None = None) -> Grid | None:
    """The grid a scale of shape ``sshape`` forms over a weight of shape ``wshape``, for a
    declared ``strategy`` (or inferred from the shapes when None); None if it does not fit."""
    rows, cols = wshape[-2:]
    lead = tuple(wshape[:-2])
    inner = tuple(sshape[len(lead):]) if tuple(sshape[:len(lead)]) == lead and len(sshape) > \
        len(lead) else tuple(sshape)
    if strategy in (None, "block") and block:
        br, bc = block
        if inner == (math.ceil(rows / br), math.ceil(cols / bc)):
            return Grid("block", (br, bc))
    if math.prod(sshape) == 1 and strategy in (None, "tensor"):
        return Grid("tensor")
    if strategy in (None, "group") and group and inner == (rows, math.ceil(cols / group)):
        return Grid("group", (group,))
    if strategy in (None, "channel") and inner in ((rows, 1), (rows,)):
        return Grid("channel")
    return None


def grid_label(grid: Grid) -> str:
    if grid.kind == "block":
        br, bc = grid.size
        return f"block{br}" if br == bc else f"block{br}x{bc}"
    if grid.kind == "group":
        return f"g{grid.size[0]}" if grid.size else "gidx"
    return grid.kind
