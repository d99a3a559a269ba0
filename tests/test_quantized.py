"""Quantized safetensors checkpoints read through quantized.dequantizing_reader.

Oracles, per format:
- bitsandbytes (4-bit nf4/fp4, nested, and 8-bit): checkpoints made by transformers with
  bitsandbytes on the CPU, dequantized by bitsandbytes' own functions.
- compressed-tensors (pack-quantized, int-quantized, float-quantized): checkpoints compressed by
  compressed-tensors' ModelCompressor, decompressed by the same library.
- FP8 block scales: transformers' own FP8 dequantization (finegrained_fp8), and NumPy.
- GPTQ and AWQ: no library imports here (auto-gptq 0.7.1 needs transformers 4's
  ``no_init_weights``, autoawq needs ``datasets`` and CUDA kernels), so the checkpoints are
  packed by NumPy transcriptions of AutoGPTQ's ``QuantLinear.pack`` and AutoAWQ's
  ``WQLinear_GEMM`` packing loops, and the reference weights are computed in float64 from the
  integers the test drew: ``s * (q - z)``, independently of the code under test.
In every case the ESD rows over our reader must equal the rows over the oracle's weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esd_experiment.core.errors import CorruptCheckpointError, UnsupportedFormatError
from esd_experiment.estimator.net_esd import ESDConfig, iter_layer_results
from esd_experiment.formats.checkpoint import (
    CheckpointReader,
    select_weight_files,
)
from esd_experiment.formats.dequantize import unpack_bits
from esd_experiment.formats.quantized import (
    dequantizing_reader,
    quantization_format,
    supported_formats,
)
from esd_experiment.formats.stream import read_order
from tests.loader_fixtures import llama

# ESD rows over our weights vs the oracle's: one float32 rounding per weight moves eigenvalues
# by ~1e-7 relative; 1e-5 leaves room for the fit and the norms built from them.
ESD_RTOL = 1e-5
# A weight is its exact value (computed in float64) rounded once to float32.
ONE_ROUNDING = 2.0 ** -24
# bitsandbytes 8-bit: it multiplies by SCB then by 1/127, we by SCB/127: two roundings a side.
BNB8_RTOL = 4 * 2.0 ** -24


def esd_rows(stream) -> list[dict]:
    return [r.row for r in iter_layer_results(stream, ESDConfig())]


def assert_rows_close(ours: list[dict], ref: list[dict], rtol: float) -> None:
    assert [r["longname"] for r in ours] == [r["longname"] for r in ref]
    for a, b in zip(ours, ref, strict=True):
        for key, value in b.items():
            if isinstance(value, float) and np.isfinite(value):
                assert a[key] == pytest.approx(value, rel=rtol), (a["longname"], key)
            else:
                assert a[key] == value, (a["longname"], key)


def save_checkpoint(folder: Path, tensors: dict, quant: dict | None,
                    shards: list[list[str]] | None = None) -> Path:
    """config.json with ``quant`` as quantization_config, and safetensors (optionally sharded
    with an index, ``shards`` listing each shard's tensor names)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama"} | ({"quantization_config": quant} if quant else {})
    (folder / "config.json").write_text(json.dumps(config))
    if not shards:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i, names in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / shard))
        weight_map.update(dict.fromkeys(names, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def open_reader(folder: Path, model_id: str = "org/quant"):
    files = select_weight_files([p.name for p in folder.iterdir()], model_id)
    base = CheckpointReader(folder, files, model_id)
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    return dequantizing_reader(base, quant, model_id)


def assert_one_rounding(got: torch.Tensor, exact: np.ndarray) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == exact.shape
    err = np.abs(got.numpy().astype(np.float64) - exact)
    assert (err <= ONE_ROUNDING * np.abs(exact)).all()


def assert_esd_matches(reader, oracle: dict[str, torch.Tensor]) -> list[dict]:
    """Rows over the reader equal rows over the oracle's weights (others from the reader)."""
    ours = esd_rows(reader.iter_tensors())
    ref = esd_rows((n, oracle.get(n, reader.get(n)), reader.storage(n)) for n in reader.names)
    assert ours and all(r["status"] == "ok" for r in ours)
    assert_rows_close(ours, ref, ESD_RTOL)
    return ours


# --- bit unpacking ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dense", [True, False])
def test_unpack_bits_matches_bit_by_bit_reference(bits, dense):
    rng = np.random.default_rng(bits)
    count = 70
    values = rng.integers(0, 1 << bits, size=(3, count))
    per = 32 // bits
    n_words = math.ceil(count * bits / 32) if dense else math.ceil(count / per)
    words = np.zeros((3, n_words), dtype=np.uint64)
    for k in range(count):  # value k's bits, one at a time, where the layout puts them
        for b in range(bits):
            pos = k * bits + b if dense else (k // per) * 32 + (k % per) * bits + b
            words[:, pos // 32] |= ((values[:, k] >> b) & 1).astype(np.uint64) << np.uint64(
                pos % 32)
    packed = torch.from_numpy(words.astype(np.uint32).view(np.int32))
    assert torch.equal(unpack_bits(packed, bits, count, dense), torch.from_numpy(values).int())


# --- GPTQ and AWQ -----------------------------------------------------------------------------

def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ ``QuantLinear.pack`` (qlinear_cuda_old.py), its loop transcribed: values along
    axis 0 into int32 words, (n, m) -> (n * bits / 32, m)."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
            continue
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i))
        i += 10
        qweight[row] |= intweight[i] << 30
        row += 1
        qweight[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= intweight[i] << 31
        row += 1
        qweight[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return qweight.view(np.int32)


def gptq_layer(rng, bits: int, in_f: int, out_f: int, group: int, desc_act: bool, v2: bool):
    """Stored GPTQ tensors of one layer and its exact float64 weight (out, in)."""
    groups = in_f // group
    q = rng.integers(0, 1 << bits, size=(in_f, out_f))
    z = rng.integers(0 if v2 else 1, 1 << bits, size=(groups, out_f))
    s = rng.uniform(0.001, 0.02, size=(groups, out_f)).astype(np.float16)
    g_idx = rng.permutation(in_f) // group if desc_act else np.arange(in_f) // group
    stored_z = z if v2 else z - 1  # the v1 format stores zero points minus one
    tensors = {"qweight": autogptq_pack(q, bits), "qzeros": autogptq_pack(stored_z.T, bits).T,
               "scales": s, "g_idx": g_idx.astype(np.int32)}
    exact = (s.astype(np.float64)[g_idx] * (q - z[g_idx])).T
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, exact


@pytest.mark.parametrize("bits, desc_act, v2", [
    (2, False, False), (3, False, False), (3, True, True), (4, True, False), (8, True, True)])
def test_gptq_matches_reference(tmp_path, bits, desc_act, v2):
    rng = np.random.default_rng(bits)
    tensors, exact = {}, {}
    for name, (in_f, out_f) in {"model.layers.0.mlp.up_proj": (128, 96),
                                "model.layers.0.mlp.down_proj": (96, 128)}.items():
        parts, exact[name + ".weight"] = gptq_layer(rng, bits, in_f, out_f, 32, desc_act, v2)
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(128)
    tensors["model.embed_tokens.weight"] = torch.randn(50, 96, dtype=torch.bfloat16)
    quant = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": desc_act,
             "sym": False, "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    reader = open_reader(save_checkpoint(tmp_path / "gptq", tensors, quant))
    assert reader.names == ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.bias",
                            "model.layers.0.mlp.down_proj.weight",
                            "model.layers.0.mlp.up_proj.weight")
    storage = f"gptq-{bits}bit-g32" + ("-act" if desc_act else "")
    for name, w in exact.items():
        assert reader.storage(name) == storage and reader.dtype(name) == "float32"
        assert reader.shape(name) == w.shape
        assert_one_rounding(reader.get(name), w)
    rows = assert_esd_matches(reader, {n: torch.from_numpy(w).float() for n, w in exact.items()})
    assert [r["storage"] for r in rows] == ["bfloat16", storage, storage]


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def autoawq_pack(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ ``WQLinear_GEMM.from_linear`` packing, transcribed: 4-bit values along axis 1,
    eight per word in AWQ's order; (n, m) -> (n, m / 8)."""
    intweight = intweight.astype(np.uint32)
    packed = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(packed.shape[1]):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return packed.view(np.int32)


def test_awq_matches_reference(tmp_path):
    rng = np.random.default_rng(7)
    in_f, out_f, group = 128, 72, 32
    q = rng.integers(0, 16, size=(in_f, out_f))
    z = rng.integers(0, 16, size=(in_f // group, out_f))
    s = rng.uniform(0.001, 0.02, size=(in_f // group, out_f)).astype(np.float16)
    g = np.arange(in_f) // group
    exact = (s.astype(np.float64)[g] * (q - z[g])).T
    m = "model.layers.0.self_attn.o_proj"
    tensors = {f"{m}.qweight": torch.from_numpy(autoawq_pack(q)),
               f"{m}.qzeros": torch.from_numpy(autoawq_pack(z)), f"{m}.scales": torch.from_numpy(s)}
    quant = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
             "zero_point": True}
    reader = open_reader(save_checkpoint(tmp_path / "awq", tensors, quant))
    assert reader.names == (f"{m}.weight",) and reader.storage(f"{m}.weight") == "awq-4bit-g32"
    assert_one_rounding(reader.get(f"{m}.weight"), exact)
    assert_esd_matches(reader, {f"{m}.weight": torch.from_numpy(exact).float()})


# --- FP8 --------------------------------------------------------------------------------------

def fp8(rng, *shape, dtype=torch.float8_e4m3fn) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 50).to(dtype)


def block_expand(scale: np.ndarray, shape: tuple[int, int], block: tuple[int, int]):
    return np.repeat(np.repeat(scale, block[0], -2), block[1], -1)[..., :shape[0], :shape[1]]


def test_fp8_block_scales_with_partial_edge_blocks(tmp_path):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    rng = np.random.default_rng(3)
    block = (64, 128)
    w, experts = fp8(rng, 200, 300), fp8(rng, 3, 96, 160)
    s = torch.from_numpy(rng.uniform(1e-4, 1e-3, size=(4, 3)).astype(np.float32))
    se = torch.from_numpy(rng.uniform(1e-4, 1e-3, size=(3, 2, 2)).astype(np.float32))
    tensors = {"model.layers.0.mlp.down_proj.weight": w,
               "model.layers.0.mlp.down_proj.weight_scale_inv": s,
               "model.layers.0.mlp.experts.gate_up_proj": experts,
               "model.layers.0.mlp.experts.gate_up_proj_scale_inv": se,
               "lm_head.weight": torch.randn(64, 300, dtype=torch.bfloat16)}
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": list(block)}
    reader = open_reader(save_checkpoint(tmp_path / "fp8", tensors, quant))
    assert reader.storage("model.layers.0.mlp.down_proj.weight") == "float8_e4m3fn+block64x128"
    assert reader.storage("lm_head.weight") == "bfloat16"
    oracle = {}
    for name, weight, scale in (("model.layers.0.mlp.down_proj.weight", w, s),
                                ("model.layers.0.mlp.experts.gate_up_proj", experts, se)):
        exact = weight.double().numpy() * block_expand(scale.double().numpy(),
                                                       weight.shape[-2:], block)
        assert_one_rounding(reader.get(name), exact)
        oracle[name] = _dequantize_fp8_weight(weight, scale, list(block), torch.float32)
        assert torch.equal(reader.get(name), oracle[name])  # transformers' own dequantization
    rows = assert_esd_matches(reader, oracle)
    assert [r["longname"] for r in rows][-3:] == [f"model.layers.0.mlp.experts.gate_up_proj[{e}]"
                                                  for e in range(3)]


@pytest.mark.parametrize("method, scale_shape, dtype, label", [
    ("fbgemm_fp8", (80, 1), torch.float8_e4m3fn, "float8_e4m3fn+channel"),
    ("fp8", (), torch.float8_e4m3fn, "float8_e4m3fn+tensor"),
    ("fp8", (1,), torch.float8_e5m2, "float8_e5m2+tensor"),
])
def test_fp8_per_tensor_and_per_channel_scales(tmp_path, method, scale_shape, dtype, label):
    rng = np.random.default_rng(4)
    w = fp8(rng, 80, 120, dtype=dtype)
    s = torch.from_numpy(rng.uniform(1e-4, 1e-3, size=scale_shape).astype(np.float32))
    m = "model.layers.0.self_attn.q_proj"
    reader = open_reader(save_checkpoint(tmp_path / "f", {f"{m}.weight": w,
                                                          f"{m}.weight_scale": s},
                                         {"quant_method": method}))
    assert reader.names == (f"{m}.weight",) and reader.storage(f"{m}.weight") == label
    exact = w.double().numpy() * s.double().numpy().reshape(-1, 1)
    assert_one_rounding(reader.get(f"{m}.weight"), exact)
    assert_esd_matches(reader, {f"{m}.weight": torch.from_numpy(exact).float()})


@pytest.mark.parametrize("scale_shape, label", [((3, 40, 1), "channel"), ((3, 40), "channel"),
                                               ((3,), "tensor"), ((1,), "tensor")])
def test_fp8_fused_experts_with_their_own_scales(tmp_path, scale_shape, label):
    rng = np.random.default_rng(6)
    w = fp8(rng, 3, 40, 24)
    s = torch.from_numpy(rng.uniform(1e-4, 1e-3, size=scale_shape).astype(np.float32))
    name = "model.layers.0.mlp.experts.down_proj"
    reader = open_reader(save_checkpoint(tmp_path / "e", {name: w, name + "_scale": s},
                                         {"quant_method": "fp8"}))
    assert reader.storage(name) == f"float8_e4m3fn+{label}"
    exact = w.double().numpy() * s.double().numpy().reshape(scale_shape[0], -1, 1)
    assert_one_rounding(reader.get(name), exact)


# --- bitsandbytes (its own tooling and dequantization) -------------------------------------

@pytest.fixture(scope="module")
def bnb_checkpoints(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb")
    # Rows of 64: bitsandbytes' CPU 4-bit kernel mis-decodes blocks that straddle rows
    # (bitsandbytes 0.50.2; its default backend does not), and real layers never have them.
    llama(hidden_size=64, intermediate_size=128).save_pretrained(root / "src")
    configs = {"nf4-nested": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True),
               "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
               "int8": BitsAndBytesConfig(load_in_8bit=True)}
    for kind, config in configs.items():
        model = AutoModelForCausalLM.from_pretrained(root / "src", quantization_config=config,
                                                     device_map="cpu")
        model.save_pretrained(root / kind)
    return root


def bnb_library_weight(path: Path, module: str) -> torch.Tensor:
    from bitsandbytes import functional as F

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if f"{module}.SCB" in keys:
            return F.int8_vectorwise_dequant(f.get_tensor(f"{module}.weight"),
                                             f.get_tensor(f"{module}.SCB"))
        prefix = f"{module}.weight."
        state = F.QuantState.from_dict({k[len(prefix):]: f.get_tensor(k) for k in keys
                                        if k.startswith(prefix)}, torch.device("cpu"))
        return F.dequantize_4bit(f.get_tensor(f"{module}.weight"), state)


@pytest.mark.parametrize("kind, storage", [("nf4-nested", "bnb-nf4-b64+nested"),
                                           ("fp4", "bnb-fp4-b64"), ("int8", "bnb-int8")])
def test_bitsandbytes_matches_the_library(bnb_checkpoints, kind, storage):
    reader = open_reader(bnb_checkpoints / kind)
    quantized = [n for n in reader.names if reader.storage(n) == storage]
    assert len(quantized) == 14  # 7 linear layers x 2 blocks; embeddings and lm_head kept
    assert not [n for n in reader.names if "absmax" in n or "quant_" in n or "SCB" in n]
    oracle = {}
    for name in quantized:
        oracle[name] = bnb_library_weight(bnb_checkpoints / kind / "model.safetensors",
                                          name.removesuffix(".weight")).float()
        got = reader.get(name)
        if kind == "int8":
            assert torch.allclose(got, oracle[name], rtol=BNB8_RTOL, atol=0)
        else:
            assert torch.equal(got, oracle[name])
    assert_esd_matches(reader, oracle)


# --- compressed-tensors (its own compressor and decompressor) -----------------------------

def ct_checkpoint(folder: Path, weights: dict, fmt: str) -> dict[str, torch.Tensor]:
    """A tiny llama compressed by compressed-tensors; returns the library's decompression."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**weights)
    model = llama(seed=5, hidden_size=64, intermediate_size=128)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            lo, hi = observe(module.weight.data, args)
            scale, zero = calculate_qparams(lo, hi, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    compressor.update_config(str(folder))
    compressor.decompress_model(model)
    return dict(model.state_dict())


def observe(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each scale's cells (the calibration llm-compressor's observers do)."""
    if args.strategy == "group":
        g = w.reshape(w.shape[0], -1, args.group_size)
        return g.amin(-1), g.amax(-1)
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    br, bc = args.block_structure
    pad = torch.nn.functional.pad(w, (0, -w.shape[1] % bc, 0, -w.shape[0] % br), value=math.nan)
    cells = pad.reshape(pad.shape[0] // br, br, pad.shape[1] // bc, bc).transpose(1, 2)
    cells = cells.flatten(2)
    return cells.nan_to_num(math.inf).amin(-1), cells.nan_to_num(-math.inf).amax(-1)


@pytest.mark.parametrize("weights, fmt, storage", [
    (dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
     "pack-quantized", "int4+g32"),
    (dict(num_bits=3, type="int", symmetric=True, strategy="channel"), "pack-quantized",
     "int3+channel"),
    (dict(num_bits=8, type="int", symmetric=True, strategy="channel"), "int-quantized",
     "int8+channel"),
    (dict(num_bits=8, type="float", symmetric=True, strategy="block", block_structure=[32, 48]),
     "float-quantized", "float8_e4m3fn+block32x48"),
    (dict(num_bits=8, type="float", symmetric=True, strategy="tensor"), "float-quantized",
     "float8_e4m3fn+tensor"),
])
def test_compressed_tensors_matches_the_library(tmp_path, weights, fmt, storage):
    pytest.importorskip("compressed_tensors")
    oracle = ct_checkpoint(tmp_path / "ct", weights, fmt)
    reader = open_reader(tmp_path / "ct")
    quantized = [n for n in reader.names if reader.storage(n) == storage]
    assert len(quantized) == 14
    for name in quantized:
        assert torch.equal(reader.get(name), oracle[name]), name
    assert_esd_matches(reader, {n: oracle[n] for n in quantized})


# --- the reader interface ---------------------------------------------------------------------

def test_parts_in_two_shards_and_the_interface(tmp_path):
    rng = np.random.default_rng(9)
    parts, exact = gptq_layer(rng, 4, 64, 64, 32, False, False)
    m = "model.layers.3.mlp.up_proj"
    tensors = {f"{m}.{k}": v for k, v in parts.items()} | {"model.norm.weight": torch.ones(64)}
    folder = save_checkpoint(tmp_path / "sharded", tensors,
                             {"quant_method": "gptq", "bits": 4, "group_size": 32},
                             shards=[[f"{m}.qweight", "model.norm.weight"],
                                     [f"{m}.qzeros", f"{m}.scales", f"{m}.g_idx"]])
    reader = open_reader(folder)
    assert reader.names == (f"{m}.weight", "model.norm.weight")
    assert reader.files_of(f"{m}.weight") == ("model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors")
    assert reader.files_of("model.norm.weight") == ("model-00001-of-00002.safetensors",)
    # the loader's order: a weight once all its parts' shards are there, each shard read once
    assert read_order(reader) == ["model.norm.weight", f"{m}.weight"]
    assert reader.storage("model.norm.weight") == "float32" == reader.base.storage(
        "model.norm.weight")
    assert reader.nbytes == sum((folder / f).stat().st_size for f in reader.files)
    items = list(reader.iter_tensors())
    assert [(n, s) for n, _, s in items] == [(f"{m}.weight", "gptq-4bit-g32"),
                                             ("model.norm.weight", "float32")]
    assert_one_rounding(items[0][1], exact)


def test_supported_formats_name_every_reader():
    text = "\n".join(supported_formats())
    for name in ("safetensors", "GGUF", "Q4_K", "IQ4_XS", "BF16", "gptq", "awq", "fp8",
                 "fbgemm_fp8", "bitsandbytes", "compressed-tensors"):
        assert name in text


def test_declared_quantization_without_quantized_tensors(tmp_path):
    folder = save_checkpoint(tmp_path / "plain", {"model.layers.0.mlp.up_proj.weight":
                                                  torch.ones(4, 4)}, GPTQ4)
    with pytest.raises(CorruptCheckpointError, match="declares gptq quantization, but no "
                       "tensor"):
        open_reader(folder)


def test_quantization_format_from_config_alone():
    assert quantization_format({"model_type": "llama"}, "m") is None
    assert quantization_format({"quantization_config": {}}, "m") is None
    assert quantization_format({"quantization_config": {"load_in_4bit": True}}, "m") == \
        "bitsandbytes"
    for method in ("gptq", "awq", "fp8", "fbgemm_fp8", "compressed-tensors"):
        assert quantization_format({"quantization_config": {"quant_method": method,
                                                            "bits": 4}}, "m") == method


@pytest.mark.parametrize("quant, named", [
    ({"quant_method": "hqq"}, "org/m: quantized checkpoint \\(hqq\\) is not read"),
    ({"quant_method": "gptq", "bits": 5}, "GPTQ with bits=5"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "awq", "bits": 8}, "AWQ with bits=8"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size=\\[128\\]"),
    ({"quant_method": "bitsandbytes"}, "neither load_in_4bit nor load_in_8bit"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}}},
     "'nvfp4-pack-quantized'"),
    ({"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-24-bitmask"}},
     "sparsity format 'sparse-24-bitmask'"),
    ({"quant_method": "compressed-tensors", "transform_config": {"config_groups": {"r": {}}}},
     "transform_config"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "int", "strategy": "tensor_group"}}}},
     "tensor_group strategy"),
])
def test_formats_not_read_are_refused_naming_them(quant, named):
    with pytest.raises(UnsupportedFormatError, match=named):
        quantization_format({"quantization_config": quant}, "org/m")


# --- bad input: the model fails naming the tensor and the cause ----------------------------

def gptq_tensors(rng) -> dict[str, torch.Tensor]:
    parts, _ = gptq_layer(rng, 4, 64, 64, 32, False, False)
    return {f"model.layers.0.mlp.up_proj.{k}": v for k, v in parts.items()}


GPTQ4 = {"quant_method": "gptq", "bits": 4, "group_size": 32}


def test_gptq_without_scales_names_the_tensor(tmp_path):
    tensors = gptq_tensors(np.random.default_rng(0))
    del tensors["model.layers.0.mlp.up_proj.scales"]
    with pytest.raises(CorruptCheckpointError, match="org/quant: GPTQ layer "
                       "model.layers.0.mlp.up_proj has no model.layers.0.mlp.up_proj.scales"):
        open_reader(save_checkpoint(tmp_path / "q", tensors, GPTQ4))


def test_gptq_act_order_without_g_idx_names_the_tensor(tmp_path):
    """desc_act permutes the inputs' groups: without g_idx no weight can be placed."""
    tensors = gptq_tensors(np.random.default_rng(0))
    del tensors["model.layers.0.mlp.up_proj.g_idx"]
    with pytest.raises(CorruptCheckpointError, match="org/quant: GPTQ layer "
                       "model.layers.0.mlp.up_proj has no model.layers.0.mlp.up_proj.g_idx"):
        open_reader(save_checkpoint(tmp_path / "q", tensors, GPTQ4 | {"desc_act": True}))


def test_gptq_scales_of_the_wrong_shape_and_bad_g_idx(tmp_path):
    rng = np.random.default_rng(0)
    tensors = gptq_tensors(rng)
    tensors["model.layers.0.mlp.up_proj.scales"] = torch.ones(3, 64, dtype=torch.float16)
    with pytest.raises(CorruptCheckpointError,
                       match=r"up_proj.scales has shape \(3, 64\), expected \(2, 64\)"):
        open_reader(save_checkpoint(tmp_path / "a", tensors, GPTQ4))
    tensors = gptq_tensors(rng)
    tensors["model.layers.0.mlp.up_proj.g_idx"] = torch.full((64,), 7, dtype=torch.int32)
    reader = open_reader(save_checkpoint(tmp_path / "b", tensors, GPTQ4))
    with pytest.raises(CorruptCheckpointError, match="cannot dequantize "
                       "model.layers.0.mlp.up_proj.weight .*g_idx holds group indices"):
        reader.get("model.layers.0.mlp.up_proj.weight")


def test_fp8_weight_without_scale_names_the_tensor(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"model.layers.0.mlp.up_proj.weight": fp8(rng, 64, 64),
               "model.layers.1.mlp.up_proj.weight": fp8(rng, 64, 64),
               "model.layers.1.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)}
    quant = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(CorruptCheckpointError, match="FP8 weight model.layers.0.mlp.up_proj"
                       ".weight \\(float8_e4m3fn\\) has no .*_scale_inv or .*weight_scale"):
        open_reader(save_checkpoint(tmp_path / "a", tensors, quant))
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(2, 2)
    with pytest.raises(CorruptCheckpointError, match="up_proj.weight_scale_inv has shape "
                       "\\(2, 2\\), which is no .*\\(128, 128\\)"):
        open_reader(save_checkpoint(tmp_path / "b", tensors, quant))


def test_bitsandbytes_bad_parts(bnb_checkpoints, tmp_path):
    m = "model.layers.0.mlp.up_proj"
    with safe_open(str(bnb_checkpoints / "nf4-nested" / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != f"{m}.weight.absmax"}
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(CorruptCheckpointError, match=f"bitsandbytes 4-bit layer {m} has no "
                       f"{m}.weight.absmax"):
        open_reader(save_checkpoint(tmp_path / "a", tensors, quant))
    with safe_open(str(bnb_checkpoints / "int8" / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[f"{m}.weight_format"] = torch.tensor(2, dtype=torch.uint8)
    with pytest.raises(UnsupportedFormatError, match=f"weight_format col_turing of {m}"):
        open_reader(save_checkpoint(tmp_path / "b", tensors, {"quant_method": "bitsandbytes",
                                                               "load_in_8bit": True}))
