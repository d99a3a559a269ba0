"""GGUF files in llama.cpp's naming, as published: a dense model, a mixture of experts, a
DeepSeek-V2/V3 (``deepseek2``, which transformers cannot map) and an architecture transformers
does not know, each in F32 and two quantized types.

For every file: every weight tensor of two or more dimensions is accounted for (a row, or one
row per matrix of a 3-D stack), each expert is one ``expert`` row, rows are in depth order
(embeddings, blocks in order with attention before the MLP, the head last) with the block of
their ``blk.N``, and each row's lambda_max is that of the matrix gguf's own GGUFReader and
``gguf.quants.dequantize`` give, by numpy's SVD.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from esd_experiment.core.layer_order import in_depth_order
from esd_experiment.core.naming import longname_of
from esd_experiment.estimator.net_esd import iter_layer_results
from esd_experiment.estimator.options import ESDConfig
from esd_experiment.formats.gguf_file import GGUFCheckpoint
from tests.test_gguf import LLAMA_META, T, stored, write_gguf

# Our reader and gguf's dequantization give the same float32 numbers; the eigenvalues come from
# a float64 Gram matrix against numpy's float64 SVD: the contract's 1e-9 relative.
LAMBDA_RTOL = 1e-9
TYPES = (T.F32, T.Q8_0, T.Q4_0)
H, F, V, E, HEADS = 32, 64, 96, 4, 4
GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _block(p: str, moe: bool, shared: bool = False) -> dict[str, tuple[int, ...]]:
    out = {f"{p}.attn_norm.weight": (H,), f"{p}.attn_q.weight": (H, H),
           f"{p}.attn_k.weight": (16, H), f"{p}.attn_v.weight": (16, H),
           f"{p}.attn_output.weight": (H, H), f"{p}.ffn_norm.weight": (H,)}
    if moe:
        out.update({f"{p}.ffn_gate_inp.weight": (E, H), f"{p}.ffn_gate_exps.weight": (E, F, H),
                    f"{p}.ffn_up_exps.weight": (E, F, H), f"{p}.ffn_down_exps.weight": (E, H, F)})
    if not moe or shared:
        s = "_shexp" if moe else ""
        out.update({f"{p}.ffn_gate{s}.weight": (F, H), f"{p}.ffn_up{s}.weight": (F, H),
                    f"{p}.ffn_down{s}.weight": (H, F)})
    return out


def _deepseek2_block(p: str, moe: bool) -> dict[str, tuple[int, ...]]:
    mla = {f"{p}.attn_norm.weight": (H,), f"{p}.attn_q_a.weight": (32, H),
           f"{p}.attn_q_a_norm.weight": (32,), f"{p}.attn_q_b.weight": (HEADS * 64, 32),
           f"{p}.attn_kv_a_mqa.weight": (32 + 32, H), f"{p}.attn_kv_a_norm.weight": (32,),
           f"{p}.attn_k_b.weight": (HEADS, 32, 32), f"{p}.attn_v_b.weight": (HEADS, 32, 32),
           f"{p}.attn_output.weight": (H, HEADS * 32), f"{p}.ffn_norm.weight": (H,)}
    body = _block(p, moe, shared=True)
    return {**mla, **{k: v for k, v in body.items() if ".attn_" not in k}}


def _model(block, moe_blocks=(0, 1)) -> dict[str, tuple[int, ...]]:
    shapes = {"token_embd.weight": (V, H)}
    for b in range(2):
        shapes.update(block(f"blk.{b}", b in moe_blocks))
    return {**shapes, "output_norm.weight": (H,), "output.weight": (V, H)}


MOE_META = {**LLAMA_META, "expert_count": E, "expert_used_count": 2,
            "expert_feed_forward_length": F, "expert_shared_feed_forward_length": F}
DEEPSEEK2_META = {**MOE_META, "leading_dense_block_count": 1, "expert_shared_count": 1}
# name -> (GGUF architecture, tensor shapes in torch order, metadata)
MODELS = {
    "dense": ("llama", _model(_block, moe_blocks=()), LLAMA_META),
    "moe": ("qwen2moe", _model(lambda p, m: _block(p, m, shared=True)), MOE_META),
    "llama_moe": ("llama", _model(_block), MOE_META),  # Mixtral as llama.cpp converts it
    "gpt_oss": ("gpt-oss", _model(_block), MOE_META),
    "deepseek2": ("deepseek2", _model(_deepseek2_block, moe_blocks=(1,)), DEEPSEEK2_META),
    "unknown_arch": ("internlm2", _model(_block, moe_blocks=()), LLAMA_META),
}


def _write(tmp_path: Path, name: str, qtype: T) -> Path:
    arch, shapes, meta = MODELS[name]
    rng = np.random.default_rng(7)
    tensors = {}
    for gguf_name, shape in shapes.items():
        values = (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
        kind = qtype if len(shape) >= 2 else T.F32  # norms stay F32, as llama.cpp keeps them
        tensors[gguf_name] = (stored(kind, values, rng), kind)
    return write_gguf(tmp_path / f"{name}.{qtype.name}.gguf", tensors, arch=arch, metadata=meta)


def expected_type(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base == "token_embd":
        return "embedding"
    if base == "output":
        return "lm_head"
    return "expert" if base.endswith("_exps") else "linear"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(MODELS))
def test_published_gguf_rows(tmp_path, name, qtype):
    path = _write(tmp_path, name, qtype)
    library = {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float64)
               for t in GGUFReader(path).tensors}
    reader = GGUFCheckpoint([path], name)
    gguf_of = {longname_of(n): reader.gguf_name(n) for n in reader.names}
    rows = [r.row for r in iter_layer_results(reader.iter_tensors(), ESDConfig())]
    rows = in_depth_order(rows, None)  # the worker's order; a GGUF has no config.json

    want = {}  # (GGUF name, index or None) of every matrix
    for gguf_name, array in library.items():
        if array.ndim == 2:
            want[gguf_name, None] = array
        elif array.ndim == 3:
            want.update({(gguf_name, e): array[e] for e in range(array.shape[0])})
    got = {}
    for row in rows:
        m = re.fullmatch(r"(.+)\[(\d+)\]", gguf_of[row["longname"]])
        key = (m[1], int(m[2])) if m else (gguf_of[row["longname"]], None)
        assert key not in got, f"{key} has two rows"
        got[key] = row
    assert set(got) == set(want), (sorted(set(want) - set(got)), sorted(set(got) - set(want)))
    for key, row in got.items():
        gguf_name = key[0]
        assert row["layer_type"] == expected_type(gguf_name), (key, row["layer_type"])
        assert row["storage"] == qtype.name
        blk = GGUF_BLOCK.match(gguf_name)
        assert row["block"] == (int(blk[1]) if blk else None), (key, row["block"])
        top = float(np.linalg.svd(want[key], compute_uv=False)[0] ** 2)
        assert row["status"] == "ok" or row["num_evals"] < ESDConfig().min_evals, key
        if row["status"] == "ok":
            assert math.isclose(row["spectral_norm"], top, rel_tol=LAMBDA_RTOL), (key, top)

    order = [gguf_of[r["longname"]] for r in rows]
    assert order[0] == "token_embd.weight" and order[-1] == "output.weight", order
    blocks = [r["block"] for r in rows[1:-1]]
    assert blocks == sorted(blocks), order
    for b in (0, 1):
        inside = [n.split(".", 2)[2] for n in order if n.startswith(f"blk.{b}.")]
        attn = [i for i, n in enumerate(inside) if n.startswith("attn_")]
        ffn = [i for i, n in enumerate(inside) if n.startswith("ffn_")]
        assert max(attn) < min(ffn), inside
        assert inside.index("attn_output.weight") == max(attn), inside
        for kind in ("", "_exps", "_shexp"):  # gate and up before down
            ranks = {p: i for i, n in enumerate(inside) for p in ("gate", "up", "down")
                     if re.fullmatch(rf"ffn_{p}{kind}\.weight(\[\d+\])?", n)}
            assert len(ranks) in (0, 3) and ranks.get("down", 3) == max(ranks.values(),
                                                                        default=3), inside
