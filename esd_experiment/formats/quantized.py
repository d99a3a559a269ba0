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
  (by the pure functions of ``formats/dequantize.py``). Every quantized module is checked when the
  reader is built, from headers and tiny metadata tensors: a missing ``scales``, an FP8
  weight without its scale or a part whose shape does not fit raises
  ``CorruptCheckpointError`` naming the tensor and the cause.

``QUANT_FORMATS`` is the registry: ``quant_method`` -> (option check, plan of the quantized
weights in ``formats/quant_plans.py``, summary). A new format is one check here, one plan there and
one line in the table. This module imports neither torch nor the dequantizers, so the runner
and ``--dry_run`` can check configs and list the formats (``supported_formats``) without them.

``storage`` strings: ``gptq-4bit-g128`` (``-act`` with ``desc_act``), ``awq-4bit-g128``,
``float8_e4m3fn+block128`` (``+block128x64`` when not square, ``+channel``, ``+tensor``,
``+g32``), ``int4+g128`` / ``int8+channel`` (compressed-tensors integers), ``bnb-nf4-b64``
(``+nested`` with double quantization), ``bnb-int8``; unquantized tensors keep their dtype name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esd_experiment.core.errors import CorruptCheckpointError, UnsupportedFormatError
from esd_experiment.formats.checkpoint import TensorReader, natural_key, stream_tensors
from esd_experiment.formats.quant_config import (
    check_awq,
    check_bnb,
    check_ct,
    check_fp8,
    check_gptq,
)

if TYPE_CHECKING:  # torch and the plans are imported when a reader is built
    import torch

    from esd_experiment.formats.quant_plans import Packed

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
        from esd_experiment.formats import quant_plans

        return getattr(quant_plans, name)(reader, quant, model_id)

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
