"""Dequantization of quantized weight formats: pure functions, tensors in, float32 out.

No file I/O and no checkpoint names: ``formats/quant_plans.py`` finds the stored parts of each weight
and calls these. One function per stored layout:

- ``dequantize_gptq``: GPTQ ``qweight``/``qzeros``/``scales``/``g_idx`` (2, 3, 4, 8 bits).
- ``dequantize_awq``: AutoAWQ GEMM (4 bits, AWQ's packing order).
- ``dequantize_scaled``: float8 or int8 numbers times scales per tensor, channel, group or
  block (FP8 ``weight_scale_inv``/``weight_scale``, FBGEMM, compressed-tensors int- and
  float-quantized, bitsandbytes 8-bit).
- ``e8m0_scales``: scales stored as E8M0 exponent bytes (MXFP8 block scales).
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
        return _unpack_words(words, torch.arange(32 // bits, dtype=torch.int32) * bits,
                             mask)[..., :count]
    # 32 values fill ``bits`` words exactly: unpack run by run, value k of every run at once.
    pad = -words.shape[-1] % bits
    w = torch.nn.functional.pad(words.to(torch.int64) & 0xFFFFFFFF, (0, pad))
    w = w.unflatten(-1, (-1, bits))
    out = torch.empty((*w.shape[:-1], 32), dtype=torch.int32)
    for k in range(32):
        word, off = divmod(k * bits, 32)
        v = w[..., word] >> off
        if off + bits > 32:  # the value continues in the next word
            v = v | (w[..., word + 1] << (32 - off))
        out[..., k] = v & mask
    return out.flatten(-2)[..., :count]


def _unpack_words(words: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """``(word >> shift) & mask`` for each shift, flattened word by word."""
    # Arithmetic shifts of negative words only fill bits that the mask drops.
    return ((words.unsqueeze(-1) >> shifts) & mask).flatten(-2)


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

    def apply_(self, out: torch.Tensor, t: torch.Tensor, r0: int,
               op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """``op(out, t)`` in place, ``out`` being rows ``r0:r0 + len(out)`` of the matrix and
        ``t`` broadcast over the cells it covers through views (a per-column gather only for
        an explicit ``g_idx``), so no scale-sized copy of the chunk is made."""
        rows, cols = out.shape
        if self.kind == "tensor":
            op(out, t.reshape(1, 1))
        elif self.kind == "channel":
            op(out, t.reshape(-1, 1)[r0:r0 + rows])
        elif self.kind == "group" and self.g_idx is not None:
            op(out, t[r0:r0 + rows][:, self.g_idx])
        elif self.kind == "group":
            _runs_(out, t[r0:r0 + rows], self.size[0], op)
        elif self.kind == "block":
            br, bc = self.size
            per_row = t[r0 // br:(r0 + rows - 1) // br + 1].repeat_interleave(br, dim=0)
            _runs_(out, per_row[r0 % br:r0 % br + rows], bc, op)
        else:
            _runs_(out.view(1, -1), t.reshape(1, -1), self.size[0], op, start=r0 * cols)


def _runs_(out: torch.Tensor, t: torch.Tensor, run: int,
           op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], start: int = 0) -> None:
    """``op`` on runs of ``run`` consecutive columns of ``out`` with one value of ``t`` each:
    column c (counted from ``start``) uses ``t[:, (start + c) // run]``; partial runs at both
    ends (edge blocks, a flat chunk starting inside a block) included."""
    cols = out.shape[1]
    head = min(cols, (-start) % run)
    first = start // run
    if head:
        op(out[:, :head], t[:, first:first + 1])
        first += 1
    full = (cols - head) // run
    if full:
        body = out[:, head:head + full * run].unflatten(1, (full, run))
        op(body, t[:, first:first + full].unsqueeze(-1))
    tail = head + full * run
    if tail < cols:
        op(out[:, tail:], t[:, first + full:first + full + 1])


def dequantize_grid(rows: int, cols: int, values: Callable[[int, int], torch.Tensor],
                    scale: torch.Tensor, grid: Grid, zero: torch.Tensor | None = None,
                    chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """``(values - zero) * scale`` as float32 ``(rows, cols)``, ``values(r0, r1)`` giving the
    stored numbers of rows ``r0:r1``; filled in chunks of whole rows (a multiple of 32, so
    packed words never straddle two chunks), each converted, shifted and scaled in place."""
    out = torch.empty((rows, cols), dtype=torch.float32)
    scale = scale.to(torch.float32).contiguous()
    zero = zero.to(torch.float32).contiguous() if zero is not None else None
    step = max(32, chunk_elems // max(cols, 1) // 32 * 32)
    for r0 in range(0, rows, step):
        chunk = out[r0:r0 + step]
        chunk.copy_(values(r0, r0 + chunk.shape[0]))
        if zero is not None:
            grid.apply_(chunk, zero, r0, torch.Tensor.sub_)  # small integers: exact
        grid.apply_(chunk, scale, r0, torch.Tensor.mul_)
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
    size = math.ceil(in_features / scales.shape[0])
    in_order = torch.equal(g_idx, torch.arange(in_features) // size)  # no act-order: views
    return dequantize_grid(
        out_features, in_features,
        lambda r0, r1: unpack_bits(qweight[:, r0:r1].T.contiguous(), bits, in_features),
        scales.T, Grid("group", (size,)) if in_order else Grid("group", g_idx=g_idx), zeros.T)


def _unpack_awq(words: torch.Tensor, count: int) -> torch.Tensor:
    shifts = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32) * 4  # column k's nibble
    return _unpack_words(words, shifts, 15)[..., :count]


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
    lead = tuple(weight.shape[:-2])
    rows, cols = weight.shape[-2:]
    w = weight.reshape(-1, rows, cols)
    out = torch.empty(w.shape, dtype=torch.float32)
    scales, zeros = _per_matrix(scale, lead), _per_matrix(zero, lead)
    for e in range(w.shape[0]):
        out[e] = dequantize_grid(
            rows, cols, lambda r0, r1, e=e: w[e, r0:r1],
            scales[e] if scales is not None else scale, grid,
            zeros[e] if zeros is not None else zero)
    return out.reshape(weight.shape)


def _per_matrix(t: torch.Tensor | None, lead: tuple[int, ...]) -> torch.Tensor | None:
    """``t`` with one entry per matrix of the leading dimensions ``lead``, when it has them
    (the same test as ``scale_grid``); None when ``t`` is shared by every matrix."""
    if t is None or not lead or tuple(t.shape[:len(lead)]) != lead:
        return None
    return t.reshape(math.prod(lead), *t.shape[len(lead):])


def e8m0_scales(exponents: torch.Tensor) -> torch.Tensor:
    """E8M0 scales stored as bytes (MXFP8, MXFP4): byte b is ``2**(b - 127)`` and 255 is NaN,
    as the OCP MX specification defines them and transformers decodes them; float32."""
    return exponents.contiguous().view(torch.float8_e8m0fnu).to(torch.float32)


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
    pairs = torch.stack([qmap.repeat_interleave(16), qmap.repeat(16)], dim=-1)  # byte -> 2
    cols = shape[-1] if shape else 1
    rows = math.prod(shape) // cols if cols else 0

    def values(r0: int, r1: int) -> torch.Tensor:
        e0, e1 = r0 * cols, r1 * cols  # e0 is even: chunks are multiples of 32 rows
        byte = data[e0 // 2:(e1 + 1) // 2]
        return pairs[byte.int()].flatten()[:e1 - e0].view(r1 - r0, cols)

    out = dequantize_grid(rows, cols, values, absmax, Grid("flat", (blocksize,)))
    return out.reshape(shape)


def scale_grid(wshape: tuple[int, ...], sshape: tuple[int, ...], strategy: str | None,
               group: int | None = None, block: tuple[int, int] | None = None) -> Grid | None:
    """The grid a scale of shape ``sshape`` forms over a weight of shape ``wshape``, for a
    declared ``strategy`` (or inferred from the shapes when None); None if it does not fit."""
    rows, cols = wshape[-2:]
    lead = tuple(wshape[:-2])
    per_matrix = bool(lead) and tuple(sshape[:len(lead)]) == lead  # as _per_matrix decides
    inner = tuple(sshape[len(lead):]) if per_matrix else tuple(sshape)
    if strategy in (None, "block") and block:
        br, bc = block
        if inner == (math.ceil(rows / br), math.ceil(cols / bc)):
            return Grid("block", (br, bc))
    if math.prod(inner) == 1 and strategy in (None, "tensor"):
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
