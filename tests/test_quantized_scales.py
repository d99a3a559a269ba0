"""Scales stored in other number formats than the weights' own: E8M0 exponent bytes.

MXFP8 checkpoints (``quant_method: fp8`` with ``weight_block_size: [1, 32]``) store each block's
scale as one E8M0 byte, the exponent of a power of two: byte b is ``2**(b - 127)``. They come
as ``uint8`` tensors or as ``float8_e8m0fnu`` (safetensors ``F8_E8M0``). The oracle is
transformers' own dequantization of such checkpoints (``Fp8Dequantize``, which decodes uint8
scales itself), and, independently, the same product computed in float64 from the bytes.
compressed-tensors' ``mxfp8-quantized`` format stores the same scales as ``weight_scale``; its
own compressor writes the checkpoint and its decompressor gives the oracle's weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_quantized import (
    assert_esd_matches,
    assert_one_rounding,
    ct_checkpoint,
    fp8,
    open_reader,
    save_checkpoint,
)

MX_BLOCK = (1, 32)  # one scale per 32 consecutive inputs of a row (OCP MX block)


def transformers_dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=torch.float32)


@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float8_e8m0fnu])
def test_fp8_with_e8m0_byte_scales_matches_transformers(tmp_path, scale_dtype):
    rng = np.random.default_rng(11)
    w, experts = fp8(rng, 64, 96), fp8(rng, 3, 32, 64)
    # Exponents around 127 (scales 2**-8 .. 2**7), as a quantizer writes them.
    s = torch.from_numpy(rng.integers(119, 135, size=(64, 3)).astype(np.uint8))
    se = torch.from_numpy(rng.integers(119, 135, size=(3, 32, 2)).astype(np.uint8))
    down, gate_up = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"
    tensors = {down: w, down + "_scale_inv": s.view(scale_dtype),
               gate_up: experts, gate_up + "_scale_inv": se.view(scale_dtype)}
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic",
             "weight_block_size": list(MX_BLOCK)}
    reader = open_reader(save_checkpoint(tmp_path / "mxfp8", tensors, quant))
    assert reader.storage(down) == "float8_e4m3fn+block1x32"
    oracle = {}
    for name, weight, scale in ((down, w, s), (gate_up, experts, se)):
        powers = np.exp2(scale.numpy().astype(np.float64) - 127)
        assert_one_rounding(reader.get(name), weight.double().numpy() * np.repeat(powers, 32, -1))
        oracle[name] = transformers_dequantize(weight, scale.view(scale_dtype))
        assert torch.equal(reader.get(name), oracle[name])
    assert_esd_matches(reader, oracle)


def test_e8m0_nan_byte_gives_a_nonfinite_weight(tmp_path):
    """Byte 255 is E8M0's NaN (OCP MX spec): the weight is not finite, never 2**128."""
    rng = np.random.default_rng(12)
    s = torch.full((32, 2), 127, dtype=torch.uint8)
    s[5, 1] = 255
    m = "model.layers.0.mlp.up_proj.weight"
    reader = open_reader(save_checkpoint(tmp_path / "nan", {m: fp8(rng, 32, 64),
                                                            m + "_scale_inv": s},
                                         {"quant_method": "fp8", "weight_block_size": [1, 32]}))
    got = reader.get(m)
    assert torch.isnan(got[5, 32:]).all() and torch.isfinite(got[:5]).all()


def test_compressed_tensors_mxfp8_matches_the_library(tmp_path):
    pytest.importorskip("compressed_tensors")
    weights = dict(num_bits=8, type="float", symmetric=True, strategy="group", group_size=32,
                   scale_dtype=torch.uint8)
    oracle = ct_checkpoint(tmp_path / "ct", weights, "mxfp8-quantized")
    reader = open_reader(tmp_path / "ct")
    quantized = [n for n in reader.names if reader.storage(n) == "float8_e4m3fn+g32"]
    assert len(quantized) == 14  # 7 linear layers x 2 blocks
    assert reader.base.dtype(quantized[0] + "_scale") == "uint8"
    for name in quantized:
        assert torch.equal(reader.get(name), oracle[name].float()), name
    assert_esd_matches(reader, {n: oracle[n].float() for n in quantized})
