"""Quantized checkpoints (GPTQ, AWQ, FP8, bitsandbytes, compressed-tensors) read as float32
weight matrices, one tensor at a time.

Entry points, in the order a loader calls them:

- ``quantization_format(config, model_id)``: the ``quant_method`` of ``config.json``'s
  ``quantization_config`` (None when unquantized), checked before any weight is downloaded;
  a method or option no reader handles raises ``UnsupportedFormatError`` naming it.
- ``dequantizing_reader(reader, quantization_config, model_id)``: wraps a reader of the
  stored tensors (a ``checkpoint_io.CheckpointReader`` over the safetensors shards) in a
  ``DequantizingReader`` with the ``checkpoint_io.TensorReader`` interface: each quantized
  module appears once, as ``<module>.weight``, and ``get`` returns it dequantized to float32
  (by the pure functions of ``dequantize.py``). Every quantized module is checked when the
  reader is built, from headers and tiny metadata tensors: a missing ``scales``, an FP8
  weight without its scale or a part whose shape does not fit raises
  ``CorruptCheckpointError`` naming the tensor and the cause.

``QUANT_FORMATS`` is the registry: ``quant_method`` -> (option check, plan of the quantized
weights in ``quant_plans.py``, summary). A new format is one check here, one plan there and
one line in the table. This module imports neither torch nor the dequantizers, so the runner
and ``--dry_run`` can check configs and list the formats (``supported_formats``) without them.

``storage`` strings: ``gptq-4bit-g128`` (``-act`` with ``desc_act``), ``awq-4bit-g128``,
``float8_e4m3fn+block128`` (``+block128x64`` when not square, ``+channel``, ``+tensor``,
``+g32``), ``int4+g128`` / ``int8+channel`` (compressed-tensors integers), ``bnb-nf4-b64``
(``+nested`` with double quantization), ``bnb-int8``; unquantized tensors keep their dtype name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esd_experiment.core.errors import CorruptCheckpointError, UnsupportedFormatError
from esd_experiment.formats.checkpoint import TensorReader, natural_key, stream_tensors

if TYPE_CHECKING:  # torch and the plans are imported when a reader is built
    import torch

    from esd_experiment.formats.quant_plans import Packed

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")

__all__ = ["QUANT_FORMATS", "DequantizingReader", "dequantizing_reader", "quantization_format",
           "supported_formats"]


# ---------------------------------------------------------------------------------------------
# The reader.

class DequantizingReader:
    """A ``TensorReader`` over a quantized checkpoint: unquantized tensors pass through, each
    quantized module is one float32 ``<module>.weight``; its parts are read only by ``get``."""

    def __init__(self, base: TensorReader, packed: list[Packed], model_id: str):
        self.base, self.model_id = base, model_id
        self._packed = {p.name: p for p in packed}
        parts = {part for p in packed for part in p.parts.values()}
        kept = [n for n in base.names if n not in parts]
        self.names = tuple(sorted(set(kept) | set(self._packed), key=natural_key))
        self.files = base.files

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def shape(self, name: str) -> tuple[int, ...]:
        packed = self._packed.get(name)
        return packed.shape if packed else self.base.shape(name)

    def dtype(self, name: str) -> str:
        return "float32" if name in self._packed else self.base.dtype(name)

    def storage(self, name: str) -> str:
        packed = self._packed.get(name)
        return packed.storage if packed else self.base.storage(name)

    def files_of(self, name: str) -> tuple[str, ...]:
        packed = self._packed.get(name)
        if packed is None:
            return self.base.files_of(name)
        found = {f for part in packed.parts.values() for f in self.base.files_of(part)}
        return tuple(f for f in self.base.files if f in found)

    def get(self, name: str) -> torch.Tensor:
        packed = self._packed.get(name)
        if packed is None:
            return self.base.get(name)
        tensors = {role: self.base.get(part) for role, part in packed.parts.items()}
        try:
            out = packed.decode(tensors)
        except (IndexError, RuntimeError, ValueError) as exc:  # values the headers cannot show
            raise CorruptCheckpointError(
                f"{self.model_id}: cannot dequantize {name} ({packed.storage}) from "
                f"{', '.join(packed.parts.values())}: {str(exc).splitlines()[0][:300]}") from None
        if tuple(out.shape) != packed.shape:
            raise CorruptCheckpointError(
                f"{self.model_id}: {name} dequantizes to shape {tuple(out.shape)}, its "
                f"quantization metadata says {packed.shape}")
        return out

    def close(self) -> None:
        self.base.close()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        return stream_tensors(self)


# ---------------------------------------------------------------------------------------------
# Options of each format, checked from config.json alone.


def refuse(model_id: str, what: str, hint: str = "") -> UnsupportedFormatError:
    return UnsupportedFormatError(f"{model_id}: {what} is not read{'; ' + hint if hint else ''}")



def int_option(quant: dict, keys: tuple[str, ...], default: int | None, what: str,
               model_id: str) -> int | None:
    for key in keys:
        if quant.get(key) is not None:
            try:
                return int(quant[key])
            except (TypeError, ValueError):
                raise UnsupportedFormatError(f"{model_id}: {what} {key}={quant[key]!r} is not "
                                             f"an integer") from None
    return default



GPTQ_BITS = (2, 3, 4, 8)
GPTQ_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # v1 stores zero points minus one


def gptq_options(quant: dict, model_id: str) -> tuple[int, int, int]:
    bits = int_option(quant, ("bits",), None, "GPTQ", model_id)
    if bits not in GPTQ_BITS:
        raise refuse(model_id, f"GPTQ with bits={bits}", "GPTQ is read at 2, 3, 4 and 8 bits")
    group = int_option(quant, ("group_size",), -1, "GPTQ", model_id)
    fmt = str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()
    if fmt not in GPTQ_ZERO_OFFSET:
        raise refuse(model_id, f"GPTQ checkpoint_format {fmt!r}",
                     "the gptq and gptq_v2 layouts are read; use a repository in either")
    return bits, group, GPTQ_ZERO_OFFSET[fmt]


def check_gptq(quant: dict, model_id: str) -> None:
    gptq_options(quant, model_id)



def awq_options(quant: dict, model_id: str) -> int:
    bits = int_option(quant, ("bits", "w_bit"), 4, "AWQ", model_id)
    if bits != 4:
        raise refuse(model_id, f"AWQ with bits={bits}", "AWQ is read at 4 bits (GEMM packing)")
    group = int_option(quant, ("group_size", "q_group_size"), 128, "AWQ", model_id)
    if group is None or group <= 0:
        raise refuse(model_id, f"AWQ with group_size={group}", "AWQ groups are positive")
    version = str(quant.get("version") or "gemm").lower()
    if version != "gemm":
        raise refuse(model_id, f"AWQ version {version!r}", "only the GEMM layout is read")
    if quant.get("zero_point") is False:
        raise refuse(model_id, "AWQ without zero points")
    return group


def check_awq(quant: dict, model_id: str) -> None:
    awq_options(quant, model_id)



def fp8_block(quant: dict, model_id: str) -> tuple[int, int] | None:
    block = quant.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        raise refuse(model_id, f"FP8 weight_block_size={block!r}",
                     "a block size is two positive integers")
    return int(block[0]), int(block[1])



def check_fp8(quant: dict, model_id: str) -> None:
    fp8_block(quant, model_id)



def check_bnb(quant: dict, model_id: str) -> None:
    if not any(quant.get(k) for k in ("load_in_4bit", "load_in_8bit", "_load_in_4bit",
                                      "_load_in_8bit")):
        raise refuse(model_id, "a bitsandbytes config with neither load_in_4bit nor load_in_8bit")



CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized",
              "mxfp8-quantized", "dense", "mixed-precision")
CT_STRATEGIES = ("tensor", "channel", "group", "block")


@dataclass(frozen=True)
class CTGroup:
    targets: tuple[str, ...]
    type: str
    bits: int
    strategy: str
    group_size: int | None
    block: tuple[int, int] | None
    symmetric: bool


def ct_groups(quant: dict, model_id: str) -> list[CTGroup]:
    """The weight quantization of each config group; formats and options not read refused."""
    top = str(quant.get("format") or "dense").lower()
    if top not in CT_FORMATS:
        raise refuse(model_id, f"compressed-tensors format {top!r}",
                     f"formats read: {', '.join(CT_FORMATS[:-1])}")
    sparsity = quant.get("sparsity_config") or {}
    if isinstance(sparsity, dict) and str(sparsity.get("format") or "dense").lower() != "dense":
        raise refuse(model_id, f"compressed-tensors sparsity format {sparsity.get('format')!r}")
    if quant.get("transform_config"):
        raise refuse(model_id, "compressed-tensors with a transform_config (rotated weights)")
    groups = []
    for name, group in (quant.get("config_groups") or {}).items():
        fmt = str(group.get("format") or top).lower()
        w = group.get("weights") or {}
        if fmt not in CT_FORMATS or (fmt == "mixed-precision" and w):
            raise refuse(model_id, f"compressed-tensors format {fmt!r} (group {name})",
                         f"formats read: {', '.join(CT_FORMATS[:-1])}")
        if not w:
            continue  # activations only: the weights are stored as they are
        typ, bits = str(w.get("type", "int")), int(w.get("num_bits", 8))
        strategy = str(w.get("strategy") or "tensor")
        if not ((typ == "int" and 1 <= bits <= 8) or (typ == "float" and bits == 8)):
            raise refuse(model_id, f"compressed-tensors {typ}{bits} weights (group {name})",
                         "1- to 8-bit integers and float8 are read")
        if strategy not in CT_STRATEGIES:
            raise refuse(model_id, f"compressed-tensors {strategy} strategy (group {name})")
        block = w.get("block_structure")
        if isinstance(block, str):
            block = [int(b) for b in block.lower().split("x")]
        groups.append(CTGroup(tuple(group.get("targets") or ()), typ, bits, strategy,
                               w.get("group_size"), tuple(block) if block else None,
                               bool(w.get("symmetric", True))))
    return groups



def check_ct(quant: dict, model_id: str) -> None:
    ct_groups(quant, model_id)


# ---------------------------------------------------------------------------------------------
# The registry.

@dataclass(frozen=True)
class QuantFormat:
    """A registry entry: ``check(qconfig, model_id)`` refuses options the reader cannot read
    (before any download); ``plan(reader, qconfig, model_id)`` lists the quantized weights."""

    check: Callable[[dict, str], None]
    plan: Callable[[TensorReader, dict, str], list[Packed]]
    summary: str  # what is read, for --dry_run and the README


def method_of(quant: dict) -> str:
    method = str(quant.get("quant_method") or "").strip().lower()
    if not method and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
        return "bitsandbytes"  # configs written before transformers recorded quant_method
    return method


def _plan(name: str) -> Callable[[TensorReader, dict, str], list[Packed]]:
    """The plan ``quant_plans.<name>``, imported when first used (it needs torch)."""
    def plan(reader: TensorReader, quant: dict, model_id: str) -> list[Packed]:
        return getattr(importlib.import_module("esd_experiment.formats.quant_plans"), name)(reader, quant, model_id)

    return plan


# quant_method -> its reader. A new format: one check, one plan, one line here.
QUANT_FORMATS: dict[str, QuantFormat] = {
    "gptq": QuantFormat(
        check_gptq, _plan("plan_gptq"),
        "2, 3, 4, 8 bits; gptq and gptq_v2 layouts; desc_act (g_idx)"),
    "awq": QuantFormat(check_awq, _plan("plan_awq"), "4 bits, GEMM layout"),
    "fp8": QuantFormat(
        check_fp8, _plan("plan_fp8"),
        "float8_e4m3fn/e5m2 with weight_scale_inv block scales (weight_block_size, partial "
        "edge blocks; float32 or E8M0 bytes) or weight_scale"),
    "fbgemm_fp8": QuantFormat(check_fp8, _plan("plan_fp8"),
                              "float8 with per-channel weight_scale"),
    "bitsandbytes": QuantFormat(
        check_bnb, _plan("plan_bnb"),
        "4-bit nf4/fp4 with their quant state, nested (double) quantization; 8-bit (row-major "
        "SCB)"),
    "compressed-tensors": QuantFormat(
        check_ct, _plan("plan_ct"),
        "pack-quantized, int-quantized, float-quantized, naive-quantized, mxfp8-quantized "
        "(E8M0 byte scales); tensor, channel, group and block scales"),
}


def quantization_format(config: Mapping, model_id: str) -> str | None:
    """The ``quant_method`` of ``config.json`` (None: not quantized), its options checked.

    Call it on ``config.json`` before downloading weights: an unknown method, or options no
    reader handles (GPTQ marlin format, AWQ GEMV, sparse compressed-tensors...), raise
    ``UnsupportedFormatError`` naming them.
    """
    quant = config.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise UnsupportedFormatError(f"{model_id}: quantization_config is a "
                                     f"{type(quant).__name__}, not an object; not read")
    method = method_of(quant)
    if method not in QUANT_FORMATS:
        raise UnsupportedFormatError(
            f"{model_id}: quantized checkpoint ({method or 'no quant_method'}) is not read; "
            f"the formats read are {', '.join(QUANT_FORMATS)} and GGUF. Analyse the "
            f"unquantized original model instead")
    QUANT_FORMATS[method].check(quant, model_id)
    return method


def dequantizing_reader(reader: TensorReader, quantization_config: dict,
                        model_id: str) -> DequantizingReader:
    """``reader`` with each quantized module read as one float32 ``<module>.weight``.

    Raises ``UnsupportedFormatError`` for a method or option that is not read, and
    ``CorruptCheckpointError`` naming the tensor when a module lacks a part or a part's shape
    does not fit (checked here, from headers and small metadata tensors only).
    """
    method = quantization_format({"quantization_config": quantization_config}, model_id)
    if method is None:
        raise UnsupportedFormatError(f"{model_id}: empty quantization_config")
    packed = QUANT_FORMATS[method].plan(reader, quantization_config, model_id)
    if not packed and method != "compressed-tensors":  # whose schemes may leave weights as is
        raise CorruptCheckpointError(
            f"{model_id}: config.json declares {method} quantization, but no tensor of the "
            f"checkpoint is stored that way; the weights are from another revision or damaged")
    return DequantizingReader(reader, packed, model_id)


def supported_formats() -> list[str]:
    """One line per checkpoint format read (for ``--dry_run`` and the README)."""
    from esd_experiment.formats.gguf_file import readable_types

    lines = ["safetensors and PyTorch .bin: float16, bfloat16, float32, float64 weights",
             f"GGUF (.gguf, split files): {', '.join(readable_types())}"]
    return lines + [f"{method}: {fmt.summary}" for method, fmt in QUANT_FORMATS.items()]
