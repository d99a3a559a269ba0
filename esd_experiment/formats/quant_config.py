"""What each quantized format's ``quantization_config`` may say, checked from ``config.json``
alone before any weight is downloaded: the options read, and a one-line refusal naming the
option for the rest. The registry (``quantized``) and the plans (``quant_plans``) both use it."""

from __future__ import annotations

from dataclasses import dataclass

from esd_experiment.core.errors import UnsupportedFormatError

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


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
