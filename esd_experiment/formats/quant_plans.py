"""Where each quantized format keeps its weights: the plans ``quantized.dequantizing_reader``
follows, and ``QUANT_FORMATS``, the registry of formats by ``quant_method``.

A plan reads only headers and tiny metadata tensors (bitsandbytes' quant state,
compressed-tensors' ``weight_shape``): for every quantized module it names the stored parts,
the dequantized shape, the ``storage`` string and the decoding function (from
``formats/dequantize.py``). A missing part or a shape that does not fit is a
``CorruptCheckpointError`` naming the tensor; an option that is not read, an
``UnsupportedFormatError`` naming it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from esd_experiment.core.errors import CorruptCheckpointError
from esd_experiment.formats.checkpoint import TensorReader, natural_key
from esd_experiment.formats.dequantize import (
    Grid,
    bnb_nested_absmax,
    dequantize_awq,
    dequantize_bnb4,
    dequantize_gptq,
    dequantize_packed,
    dequantize_scaled,
    e8m0_scales,
    grid_label,
    scale_grid,
    unpack_bits,
)
from esd_experiment.formats.quant_config import (
    FP8_DTYPES,
    CTGroup,
    awq_options,
    ct_groups,
    fp8_block,
    gptq_options,
    refuse,
)


@dataclass(frozen=True)
class Packed:
    """One quantized weight: its stored parts (role -> stored name) and how to decode them."""

    name: str
    parts: Mapping[str, str]
    shape: tuple[int, ...]
    storage: str
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Helpers of the format plans.

def require(names: set[str], module: str, roles: Mapping[str, str], what: str, model_id: str,
            optional: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role -> stored name of a module's parts; a missing required part is named."""
    parts = {}
    for role, suffix in {**roles, **(optional or {})}.items():
        if module + suffix in names:
            parts[role] = module + suffix
        elif role in roles:
            present = sorted(n for n in names if n.startswith(module + "."))
            raise CorruptCheckpointError(
                f"{model_id}: {what} layer {module} has no {module}{suffix} (found "
                f"{', '.join(present) or 'nothing'}); the checkpoint is incomplete or damaged")
    return parts


def expect_shape(reader: TensorReader, name: str, shape: tuple[int, ...], why: str,
                 model_id: str) -> None:
    if tuple(reader.shape(name)) != tuple(shape):
        raise CorruptCheckpointError(
            f"{model_id}: {name} has shape {tuple(reader.shape(name))}, expected "
            f"{tuple(shape)} ({why})")


def modules_with(names: set[str], suffix: str) -> list[str]:
    return sorted((n[: -len(suffix)] for n in names if n.endswith(suffix)), key=natural_key)


def small_json(reader: TensorReader, name: str, model_id: str) -> dict:
    """A JSON object stored as a uint8 tensor (bitsandbytes' quant state)."""
    try:
        data = json.loads(bytes(reader.get(name).reshape(-1).to(torch.uint8).tolist()))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{model_id}: {name} is not a JSON quant state: "
                                     f"{exc}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{model_id}: {name} is not a JSON object")
    return data


def match_target(target: str, module: str) -> bool:
    """A compressed-tensors target that names modules (``re:`` pattern or exact name)."""
    return bool(re.match(target[3:], module)) if target.startswith("re:") else target == module


def matrix_shape(reader: TensorReader, name: str, model_id: str) -> tuple[int, int]:
    shape = tuple(reader.shape(name))
    if len(shape) > 2:
        raise refuse(model_id, f"packed weight {name} of shape {shape} (fused experts)",
                     "packed weights are read as matrices")
    if len(shape) != 2:
        raise CorruptCheckpointError(f"{model_id}: {name} has shape {shape}; a packed weight "
                                     f"is two-dimensional")
    return shape[0], shape[1]


def stored_bytes(reader: TensorReader, name: str, model_id: str) -> int:
    dtype = getattr(torch, reader.dtype(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"{model_id}: {name} has dtype {reader.dtype(name)}, "
                                     f"which torch does not know")
    return math.prod(reader.shape(name)) * dtype.itemsize


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale as numbers: bytes are E8M0 exponents (MXFP8 in the fp8 and
    compressed-tensors formats), never multipliers themselves."""
    return e8m0_scales(scale) if scale.dtype == torch.uint8 else scale


def _decode_scaled(t: dict[str, torch.Tensor], grid: Grid) -> torch.Tensor:
    return dequantize_scaled(t["weight"], scale_values(t["scale"]), grid, t.get("zero"))


# ---------------------------------------------------------------------------------------------
# GPTQ and AWQ.

def _decode_gptq(t: dict[str, torch.Tensor], bits: int, group: int, offset: int,
                 in_features: int) -> torch.Tensor:
    if "g_idx" in t:
        g_idx = t["g_idx"].long()
    else:
        g_idx = torch.arange(in_features) // group if group > 0 else \
            torch.zeros(in_features, dtype=torch.long)
    groups = t["scales"].shape[0]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx holds group indices outside 0..{groups - 1}")
    return dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, bits, offset)


def plan_gptq(reader: TensorReader, quant: dict, model_id: str) -> list[Packed]:
    bits, group, offset = gptq_options(quant, model_id)
    names = set(reader.names)
    storage = f"gptq-{bits}bit-{f'g{group}' if group > 0 else 'channel'}" + \
        ("-act" if quant.get("desc_act") else "")
    # With desc_act the inputs' groups are permuted: g_idx is the only record of the order.
    g_idx = {"g_idx": ".g_idx"}
    roles = {"qweight": ".qweight", "qzeros": ".qzeros", "scales": ".scales"}
    plans = []
    for module in modules_with(names, ".qweight"):
        parts = require(names, module, roles | g_idx if quant.get("desc_act") else roles,
                        "GPTQ", model_id, optional=g_idx)
        words, out_f = matrix_shape(reader, parts["qweight"], model_id)
        if words * 32 % (bits * 32 // math.gcd(bits, 32)):  # 3 bits: 32 values fill 3 words
            raise CorruptCheckpointError(f"{model_id}: {parts['qweight']} has {words} rows, "
                                         f"which do not hold whole {bits}-bit inputs")
        in_f = words * 32 // bits
        groups = math.ceil(in_f / group) if group > 0 else 1
        expect_shape(reader, parts["scales"], (groups, out_f),
                     f"{groups} group(s) of {in_f} inputs, {out_f} outputs", model_id)
        expect_shape(reader, parts["qzeros"], (groups, math.ceil(out_f * bits / 32)),
                     f"{out_f} {bits}-bit zero points per group", model_id)
        if "g_idx" in parts:
            expect_shape(reader, parts["g_idx"], (in_f,), "one group index per input", model_id)
        decode = lambda t, in_f=in_f: _decode_gptq(t, bits, group, offset, in_f)  # noqa: E731
        plans.append(Packed(module + ".weight", parts, (out_f, in_f), storage, decode))
    return plans


def plan_awq(reader: TensorReader, quant: dict, model_id: str) -> list[Packed]:
    group = awq_options(quant, model_id)
    names = set(reader.names)
    plans = []
    for module in modules_with(names, ".qweight"):
        parts = require(names, module, {"qweight": ".qweight", "qzeros": ".qzeros",
                                        "scales": ".scales"}, "AWQ", model_id)
        in_f, words = matrix_shape(reader, parts["qweight"], model_id)
        out_f, groups = words * 8, math.ceil(in_f / group)
        expect_shape(reader, parts["scales"], (groups, out_f),
                     f"{groups} groups of {group} inputs, {out_f} outputs", model_id)
        expect_shape(reader, parts["qzeros"], (groups, words), "packed like qweight", model_id)
        decode = lambda t: dequantize_awq(  # noqa: E731
            t["qweight"], t["qzeros"], t["scales"], group)
        plans.append(Packed(module + ".weight", parts, (out_f, in_f), f"awq-4bit-g{group}",
                            decode))
    return plans


# ---------------------------------------------------------------------------------------------
# FP8 (fp8 block scales, per-tensor or per-channel scales, FBGEMM).

def plan_fp8(reader: TensorReader, quant: dict, model_id: str) -> list[Packed]:
    """Every float8 tensor ``X`` with its scale ``X_scale_inv`` (block scales, DeepSeek-V3 and
    Qwen3-FP8; despite the name they multiply) or ``X_scale`` (per tensor or channel). Block
    scales stored as bytes (MXFP8, ``uint8``) are E8M0 exponents, decoded by ``e8m0_scales``."""
    block = fp8_block(quant, model_id)
    names = set(reader.names)
    plans = []
    for name in sorted(names, key=natural_key):
        dtype = reader.dtype(name)
        if dtype not in FP8_DTYPES:
            continue
        scale = next((name + s for s in ("_scale_inv", "_scale") if name + s in names), None)
        if scale is None:
            raise CorruptCheckpointError(
                f"{model_id}: FP8 weight {name} ({dtype}) has no {name}_scale_inv or "
                f"{name}_scale; its stored values mean nothing without their scales")
        shape = tuple(reader.shape(name))
        grid = scale_grid(shape, tuple(reader.shape(scale)), None, block=block) \
            if len(shape) >= 2 else None
        if grid is None:
            raise CorruptCheckpointError(
                f"{model_id}: {scale} has shape {tuple(reader.shape(scale))}, which is no "
                f"per-tensor, per-channel or {block or 'block'} scale of {name} {shape}")
        plans.append(Packed(name, {"weight": name, "scale": scale}, shape,
                            f"{dtype}+{grid_label(grid)}",
                            lambda t, grid=grid: _decode_scaled(t, grid)))
    return plans


# ---------------------------------------------------------------------------------------------
# bitsandbytes.

BNB4_PARTS = {"absmax": ".weight.absmax", "quant_map": ".weight.quant_map"}
BNB4_NESTED = {"nested_absmax": ".weight.nested_absmax",
               "nested_quant_map": ".weight.nested_quant_map"}
BNB4_STATE = ".weight.quant_state.bitsandbytes__"
BNB8_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


def _plan_bnb4(reader: TensorReader, names: set[str], module: str,
               model_id: str) -> Packed:
    states = [module + BNB4_STATE + q for q in ("nf4", "fp4") if module + BNB4_STATE + q in names]
    if len(states) != 1:
        raise CorruptCheckpointError(
            f"{model_id}: bitsandbytes 4-bit layer {module} has {len(states)} quant_state "
            f"tensors ({module}{BNB4_STATE}nf4 or fp4); exactly one is needed")
    state = small_json(reader, states[0], model_id)
    try:
        qtype, blocksize = str(state["quant_type"]), int(state["blocksize"])
        shape = tuple(int(d) for d in state["shape"])
        nested = "nested_blocksize" in state
        nested_bs = int(state["nested_blocksize"]) if nested else 0
        offset = float(state["nested_offset"]) if nested else 0.0
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{model_id}: {states[0]} lacks or garbles {exc}") from None
    if qtype not in ("nf4", "fp4") or blocksize <= 0 or (nested and nested_bs <= 0):
        raise CorruptCheckpointError(f"{model_id}: {states[0]} says quant_type={qtype!r}, "
                                     f"blocksize={blocksize}; not a bitsandbytes 4-bit state")
    roles = {"weight": ".weight", **BNB4_PARTS, **(BNB4_NESTED if nested else {})}
    parts = {**require(names, module, roles, "bitsandbytes 4-bit", model_id), "state": states[0]}
    n = math.prod(shape)
    stored = stored_bytes(reader, parts["weight"], model_id)
    if stored != math.ceil(n / 2):
        raise CorruptCheckpointError(f"{model_id}: {parts['weight']} holds {stored} bytes; "
                                     f"{n} 4-bit values of shape {shape} need {math.ceil(n / 2)}")
    expect_shape(reader, parts["absmax"], (math.ceil(n / blocksize),),
                 f"one per {blocksize} values", model_id)
    expect_shape(reader, parts["quant_map"], (16,), "the 16 4-bit codes", model_id)
    if nested:
        expect_shape(reader, parts["nested_quant_map"], (256,), "the 256 8-bit codes", model_id)
        expect_shape(reader, parts["nested_absmax"],
                     (math.ceil(math.ceil(n / blocksize) / nested_bs),),
                     f"one per {nested_bs} absmax values", model_id)

    def decode(t: dict[str, torch.Tensor]) -> torch.Tensor:
        absmax = bnb_nested_absmax(t["absmax"], t["nested_absmax"], t["nested_quant_map"],
                                   nested_bs, offset) if nested else t["absmax"]
        return dequantize_bnb4(t["weight"], absmax, t["quant_map"], blocksize, shape)

    storage = f"bnb-{qtype}-b{blocksize}" + ("+nested" if nested else "")
    return Packed(module + ".weight", parts, shape, storage, decode)


def _plan_bnb8(reader: TensorReader, names: set[str], module: str, model_id: str) -> Packed:
    parts = require(names, module, {"weight": ".weight", "scb": ".SCB"}, "bitsandbytes 8-bit",
                    model_id, optional={"format": ".weight_format"})
    if reader.dtype(parts["weight"]) != "int8":
        raise CorruptCheckpointError(f"{model_id}: {parts['weight']} is "
                                     f"{reader.dtype(parts['weight'])}; bitsandbytes 8-bit "
                                     f"weights are int8")
    rows, _ = matrix_shape(reader, parts["weight"], model_id)
    expect_shape(reader, parts["scb"], (rows,), "one absmax per row", model_id)
    if "format" in parts:
        code = int(reader.get(parts["format"]).reshape(-1)[0])
        if code != 0:
            raise refuse(model_id, f"bitsandbytes 8-bit weight_format "
                         f"{BNB8_FORMATS.get(code, code)} of {module}",
                         "only the row-major format is read")
    decode = lambda t: dequantize_scaled(  # noqa: E731  (bitsandbytes: CB * SCB / 127)
        t["weight"], t["scb"].to(torch.float32) / 127, Grid("channel"))
    return Packed(module + ".weight", parts, reader.shape(parts["weight"]), "bnb-int8", decode)


def plan_bnb(reader: TensorReader, quant: dict, model_id: str) -> list[Packed]:
    names = set(reader.names)
    aux = (*BNB4_PARTS.values(), *BNB4_NESTED.values(), BNB4_STATE + "nf4", BNB4_STATE + "fp4")
    four = {n[: -len(s)] for n in names for s in aux if n.endswith(s)}
    plans = [_plan_bnb4(reader, names, m, model_id) for m in sorted(four, key=natural_key)]
    plans += [_plan_bnb8(reader, names, m, model_id) for m in modules_with(names, ".SCB")]
    return plans


# ---------------------------------------------------------------------------------------------
# compressed-tensors.

def _ct_group_of(module: str, groups: list[CTGroup], typ: str, model_id: str) -> CTGroup:
    """The config group quantizing ``module``: one naming it (``re:`` or exact), else one
    targeting a class (``Linear``), among those storing ``typ`` numbers."""
    fits = [g for g in groups if g.type == typ]
    named = [g for g in fits if any(match_target(t, module) for t in g.targets)]
    by_class = [g for g in fits if any(t[:1].isupper() and "." not in t for t in g.targets)]
    if not (named or by_class):
        raise CorruptCheckpointError(f"{model_id}: {module} holds {typ} weights that no "
                                     f"config_groups entry of quantization_config describes")
    return (named or by_class)[0]


def _decode_ct(t: dict[str, torch.Tensor], g: CTGroup, grid: Grid,
               shape: tuple[int, ...] | None) -> torch.Tensor:
    zero, scale = t.get("zero"), scale_values(t["scale"])
    if "g_idx" in t:
        grid = Grid("group", g_idx=t["g_idx"].long())
    if shape is None:
        return dequantize_scaled(t["weight"], scale, grid, zero)
    if zero is not None and zero.dtype == torch.int32 and zero.shape[0] != shape[0]:
        dense = zero.shape[0] == math.ceil(shape[0] * g.bits / 32)  # packed along the rows
        zero = unpack_bits(zero.T, g.bits, shape[0], dense).T - (1 << (g.bits - 1))
    return dequantize_packed(t["weight"], g.bits, shape, scale, grid, zero)


def _plan_ct_module(reader: TensorReader, names: set[str], module: str, packed: bool,
                    groups: list[CTGroup], model_id: str) -> Packed:
    stored = module + (".weight_packed" if packed else ".weight")
    dtype = reader.dtype(stored)
    g = _ct_group_of(module, groups, "float" if dtype in FP8_DTYPES else "int", model_id)
    roles = {"weight": stored[len(module):], "scale": ".weight_scale"}
    if packed:
        roles["shape"] = ".weight_shape"
    parts = require(names, module, roles, f"compressed-tensors {g.type}{g.bits}", model_id,
                    optional={"zero": ".weight_zero_point", "g_idx": ".weight_g_idx"})
    if packed:
        shape = tuple(int(v) for v in reader.get(parts["shape"]).reshape(-1).tolist())
        rows, words = matrix_shape(reader, stored, model_id)
        if len(shape) != 2 or rows != shape[0] or words not in (
                math.ceil(shape[1] * g.bits / 32), math.ceil(shape[1] / (32 // g.bits))):
            raise CorruptCheckpointError(f"{model_id}: {stored} {(rows, words)} does not hold "
                                         f"{g.bits}-bit values of weight_shape {shape}")
    else:
        shape = tuple(reader.shape(stored))
    grid = scale_grid(shape, tuple(reader.shape(parts["scale"])), g.strategy, g.group_size,
                      g.block) if len(shape) >= 2 else None
    if grid is None:
        raise CorruptCheckpointError(
            f"{model_id}: {parts['scale']} has shape {tuple(reader.shape(parts['scale']))}, "
            f"which is no {g.strategy} scale of {module} {shape}")
    if not g.symmetric and g.strategy in ("group", "channel") and "zero" not in parts:
        raise CorruptCheckpointError(f"{model_id}: asymmetric layer {module} has no "
                                     f"{module}.weight_zero_point")
    number = dtype if g.type == "float" else f"int{g.bits}"
    decode = lambda t: _decode_ct(t, g, grid, shape if packed else None)  # noqa: E731
    return Packed(module + ".weight", parts, shape, f"{number}+{grid_label(grid)}", decode)


def plan_ct(reader: TensorReader, quant: dict, model_id: str) -> list[Packed]:
    groups = ct_groups(quant, model_id)
    names = set(reader.names)
    plans = [_plan_ct_module(reader, names, m, True, groups, model_id)
             for m in modules_with(names, ".weight_packed")]
    for module in modules_with(names, ".weight"):
        if reader.dtype(module + ".weight") in ("int8", *FP8_DTYPES):
            if module + ".weight_scale" not in names:
                raise CorruptCheckpointError(
                    f"{model_id}: {module}.weight is stored as {reader.dtype(module + '.weight')} "
                    f"without {module}.weight_scale; its values mean nothing without it")
            plans.append(_plan_ct_module(reader, names, module, False, groups, model_id))
    if groups and not plans:
        raise CorruptCheckpointError(
            f"{model_id}: quantization_config quantizes weights ({groups[0].type}"
            f"{groups[0].bits}), but no tensor of the checkpoint is stored that way")
    return plans


