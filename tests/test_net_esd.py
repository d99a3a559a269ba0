"""The ESD estimator on synthetic ground truth and every edge case of docs/metrics.md."""

import math
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from esd_experiment.core.errors import InputError
from esd_experiment.core.naming import is_weight_name, layer_type_of
from esd_experiment.estimator import net_esd
from esd_experiment.estimator.fit import METRIC_COLUMNS
from esd_experiment.estimator.net_esd import (
    LAYER_COLUMNS,
    ESDConfig,
    fit_from_evals,
    gram_eigenvalues,
    iter_layer_results,
    net_esd_estimator,
)

ROOT = Path(__file__).resolve().parents[1]
EVALS_RTOL = 1e-9       # metrics.md section 2: float64 path vs float64 SVD
EVALS_FLOOR = 1e-6      # ... for every eigenvalue >= EVALS_FLOOR * lambda_max
DEVICE_RTOL = 1e-9      # CPU vs CUDA float64: different BLAS/solver order, same 1e-9 contract
ALPHA_SIGMAS = 4.0      # power-law recovery: within 4 standard errors ((alpha-1)/sqrt(n_tail))
MP_EDGE_RTOL = 0.05     # Marchenko-Pastur edges at N=4000, M=1000: finite-size shift ~ N^(-2/3)
CHUNK_RTOL = 1e-12      # chunked vs one-piece Gram: only the summation order differs
FLOAT32_RTOL = 1e-3     # float32 path, eigenvalues >= 1e-3 lambda_max of a moderate spectrum
FITS = ("xmin_mid", "xmin_peak", "DKS")


def rows(named, **kw):
    return [r.row for r in iter_layer_results(named, ESDConfig(**kw))]


def one(w, name="layer.weight", **kw):
    (row,) = rows([(name, w)], **kw)
    return row


def evals_of(w, **kw):
    (res,) = iter_layer_results([("w.weight", w)], ESDConfig(keep_evals=True, **kw))
    return res.evals


def svd_evals(w):
    return np.sort(np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2)


def with_spectrum(n, m, lam, seed=0):
    """An n x m float64 tensor U diag(sqrt(lam)) V^T with random orthonormal U, V."""
    rng = np.random.default_rng(seed)
    k = len(lam)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((m, k)))
    return torch.tensor((u * np.sqrt(lam)) @ v.T)


def pareto(n, alpha, seed):
    """n draws of density ~ x^-alpha on [1, inf)."""
    return (1.0 - np.random.default_rng(seed).random(n)) ** (-1.0 / (alpha - 1.0))


def assert_rows_close(a, b, rtol):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and isinstance(b[k], float):
            assert a[k] == pytest.approx(b[k], rel=rtol, nan_ok=True), k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------
# Synthetic ground truth.

@pytest.mark.parametrize("fix_fingers", ["xmin_mid", "DKS"])
@pytest.mark.parametrize("alpha", [2.5, 3.5, 4.5])
def test_pareto_eigenvalues_recover_alpha(alpha, fix_fingers):
    out = fit_from_evals(pareto(4000, alpha, seed=int(alpha * 10)),
                         ESDConfig(fix_fingers=fix_fingers))
    assert out["status"] == "ok"
    assert abs(out["alpha"] - alpha) <= ALPHA_SIGMAS * out["sigma"]
    assert out["sigma"] == pytest.approx((out["alpha"] - 1) / math.sqrt(out["num_pl_spikes"]))


@pytest.mark.parametrize("fix_fingers", ["xmin_mid", "DKS"])
@pytest.mark.parametrize("alpha", [2.5, 3.5])
def test_matrix_with_power_law_spectrum_recovers_alpha(alpha, fix_fingers):
    lam = pareto(600, alpha, seed=7)
    row = one(with_spectrum(1200, 600, lam, seed=3), fix_fingers=fix_fingers)
    assert row["status"] == "ok"
    assert abs(row["alpha"] - alpha) <= ALPHA_SIGMAS * row["sigma"]
    assert row["xmax"] == pytest.approx(lam.max(), rel=1e-12)


def test_gaussian_matrix_has_marchenko_pastur_edges():
    """ESD of X^T X with X = W / sqrt(N), W_ij ~ N(0, s^2): support s^2 (1 -/+ 1/sqrt(Q))^2."""
    n, m, s = 4000, 1000, 0.7
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s
    ev = evals_of(w) / n
    q = n / m
    assert ev[0] == pytest.approx(s**2 * (1 - 1 / math.sqrt(q)) ** 2, rel=MP_EDGE_RTOL)
    assert ev[-1] == pytest.approx(s**2 * (1 + 1 / math.sqrt(q)) ** 2, rel=MP_EDGE_RTOL)


# ---------------------------------------------------------------------------------------------
# Eigenvalue accuracy.

@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (257, 257), (2000, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eigenvalues_match_float64_svd(shape, dtype):
    lam = np.logspace(-7, 1, min(shape))  # eight decades: some below the accuracy floor
    w = with_spectrum(*shape, lam, seed=sum(shape)).to(dtype)
    ref = svd_evals(w)
    ev = evals_of(w)
    assert len(ev) == min(shape) and np.all(np.diff(ev) >= 0) and ev.dtype == np.float64
    big = ref >= EVALS_FLOOR * ref[-1]
    np.testing.assert_allclose(ev[big], ref[big], rtol=EVALS_RTOL, atol=0)


def test_tall_chunked_path_equals_one_piece():
    w = torch.randn(5000, 48, generator=torch.Generator().manual_seed(1))
    small = rows([("embed.weight", w), ("down.weight", w.T)], chunk_elems=7 * 48)
    whole = rows([("embed.weight", w), ("down.weight", w.T)], chunk_elems=10**9)
    for a, b in zip(small, whole, strict=True):
        assert_rows_close(a, b, CHUNK_RTOL)


def test_gram_converts_one_chunk_at_a_time(monkeypatch):
    """No float64 copy of the whole matrix, on either path.

    LAPACK path (CPU): its NumPy allocations, which tracemalloc sees, peak at the Gram and one
    chunk's buffer (and the Gram's finiteness mask), far below the matrix's float64 size.
    torch path (CUDA, or where SciPy cannot be bound): every converted piece has at most
    chunk_elems entries.
    """
    w = torch.randn(20000, 50, generator=torch.Generator().manual_seed(3))
    tracemalloc.start()
    try:
        ev = gram_eigenvalues(w, torch.device("cpu"), torch.float64, chunk_elems=5000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ev) == 50
    assert peak <= 2 * (50 * 50 + 5000) * 8 + 16384 < w.numel() * 8 // 10

    converted = []

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            out = super().__torch_function__(func, types, args, kwargs or {})
            if func is torch.Tensor.to and isinstance(out, torch.Tensor):
                converted.append((out.dtype, out.numel()))
            return out

    monkeypatch.setattr(net_esd.esd_lapack, "available", lambda: False)
    ev = gram_eigenvalues(torch.randn(3000, 20).as_subclass(Spy), torch.device("cpu"),
                          torch.float64, chunk_elems=400)
    assert len(ev) == 20
    f64 = [numel for dtype, numel in converted if dtype == torch.float64]
    assert len(f64) == 3000 // 20 and max(f64) == 400


def test_float32_path_is_close_to_float64():
    lam = np.logspace(-3, 1, 200)
    w = with_spectrum(800, 200, lam, seed=5).float()
    ev64, ev32 = evals_of(w), evals_of(w, precision="float32")
    big = ev64 >= 1e-3 * ev64[-1]
    np.testing.assert_allclose(ev32[big], ev64[big], rtol=FLOAT32_RTOL)
    assert ev32.dtype == np.float64


def test_matrix_rank_uses_the_computation_dtype_eps():
    """rank = #{lambda > lambda_max * N * eps}: float64 resolves all 8 decades, float32 not."""
    lam = np.repeat(10.0 ** np.arange(-8, 1), 12)  # 1e-8 .. 1, each decade 12 times
    w = with_spectrum(300, 108, lam, seed=6)
    assert one(w)["matrix_rank"] == 108
    eps32 = float(np.finfo(np.float32).eps)  # 300 * eps32 = 3.6e-5: five decades are above
    assert one(w, precision="float32")["matrix_rank"] == int(np.sum(lam > 300 * eps32)) == 60


# ---------------------------------------------------------------------------------------------
# Edge cases (metrics.md section 1).

def test_rows_have_exactly_the_schema_columns():
    for row in rows([("a.weight", torch.randn(30, 20)), ("b.weight", torch.ones(3, 3)),
                     ("c.weight", torch.zeros(12, 12, dtype=torch.int8))]):
        assert tuple(row) == LAYER_COLUMNS


def test_rank_deficient_matrix():
    """Integer factors make W exactly rank 7 in float32; the Gram must not count round-off."""
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-3, 4, (200, 7), generator=g).float()
    b = torch.randint(-3, 4, (7, 90), generator=g).float()
    w = a @ b
    row = one(w)
    assert np.linalg.matrix_rank(w.double().numpy()) == 7
    assert row["matrix_rank"] == 7 and row["num_evals"] == 90 and row["status"] == "ok"
    assert row["norm"] == pytest.approx(float((w.double() ** 2).sum()), rel=1e-12)


def test_all_zero_matrix_fails_the_fit_with_nan_not_sentinels():
    row = one(torch.zeros(40, 30))
    assert row["status"] == "fit_failed"
    assert row["norm"] == 0 and row["spectral_norm"] == 0 and row["matrix_rank"] == 0
    for col in ("alpha", "xmin", "D", "sigma", "num_pl_spikes", "alpha_weighted",
                "log_alpha_norm", "stable_rank", "entropy"):
        assert math.isnan(row[col]), col
    assert -1 not in [v for v in row.values() if isinstance(v, (int, float))]


@pytest.mark.parametrize("shape, status", [((1, 500), "too_small"), ((500, 1), "too_small"),
                                           ((9, 9), "too_small"), ((10, 10), "ok")])
def test_small_layers(shape, status):
    row = one(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), min_evals=10)
    assert row["status"] == status
    assert (row["N"], row["M"], row["num_evals"]) == (max(shape), min(shape), min(shape))
    assert row["Q"] == max(shape) / min(shape) and row["longname"] == "layer"
    assert math.isnan(row["alpha"]) == (status == "too_small")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_layer_is_marked_and_others_still_analysed(bad):
    w = torch.randn(30, 20)
    w[4, 5] = bad
    first, second = rows([("bad.weight", w), ("good.weight", torch.randn(30, 20))])
    assert first["status"] == "nonfinite" and first["N"] == 30 and first["M"] == 20
    assert all(math.isnan(first[c]) for c in METRIC_COLUMNS if c != "warning")
    assert second["status"] == "ok" and second["layer_id"] == 1


def test_all_eigenvalues_tied_fails_the_fit():
    """An orthogonal matrix: every tail has sum ln(x_j/x_i) = 0, so no finite alpha exists."""
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    for fit in FITS:
        out = fit_from_evals(np.ones(50), ESDConfig(fix_fingers=fit))
        assert out["status"] == "fit_failed" and math.isnan(out["alpha"])
    row = one(q * 3.0)
    assert row["spectral_norm"] == pytest.approx(9.0) and row["matrix_rank"] == 50
    assert row["entropy"] == pytest.approx(1.0)


def test_repeated_eigenvalues_still_fit():
    lam = np.repeat(pareto(40, 3.0, seed=1), 5)  # every value five times
    for fit in FITS:
        out = fit_from_evals(lam, ESDConfig(fix_fingers=fit))
        assert out["status"] == "ok" and out["alpha"] > 1 and math.isfinite(out["D"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_its_float32_upcast(dtype):
    w = (torch.randn(120, 60, generator=torch.Generator().manual_seed(4)) * 0.05).to(dtype)
    for fit in FITS:
        half, upcast = one(w, fix_fingers=fit), one(w.float(), fix_fingers=fit)
        assert half.pop("storage") == str(dtype).removeprefix("torch.")
        assert upcast.pop("storage") == "float32"
        assert half == upcast


def test_conv_pools_scaled_slices():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 6, 3, 2, generator=g)
    (res,) = iter_layer_results([("features.0.weight", w)], ESDConfig(keep_evals=True))
    ref = np.sort(np.concatenate([svd_evals(w[:, :, i, j]) * 0.5  # (sqrt(0.5) W)^T (sqrt(0.5) W)
                                  for i in range(3) for j in range(2)]))
    np.testing.assert_allclose(res.evals, ref, rtol=1e-12)
    row = res.row
    assert (row["layer_type"], row["N"], row["M"], row["num_evals"]) == ("conv2d", 16, 6, 36)
    other = fit_from_evals(ref / 0.5 * 0.25, ESDConfig(conv_norm=0.25), N=16)
    (res25,) = iter_layer_results([("c.weight", w)], ESDConfig(conv_norm=0.25))
    assert res25.row["spectral_norm"] == pytest.approx(other["spectral_norm"], rel=1e-12)


def test_fused_experts_give_one_row_each():
    g = torch.Generator().manual_seed(6)
    experts = torch.randn(3, 40, 24, generator=g)
    out = rows([("a.weight", torch.randn(30, 20, generator=g)),
                ("model.layers.0.mlp.experts.gate_up_proj", experts),
                ("b.weight", torch.randn(30, 20, generator=g))])
    assert [r["layer_id"] for r in out] == [0, 1, 2, 3, 4]
    assert [r["longname"] for r in out[1:4]] == [
        f"model.layers.0.mlp.experts.gate_up_proj[{e}]" for e in range(3)]
    for e, row in enumerate(out[1:4]):
        alone = one(experts[e], name="alone.weight")
        assert row["layer_type"] == "expert"
        assert (row["block"], row["stack"]) == (0, "model.layers")
        assert {**row, "layer_id": 0, "layer_type": "linear", "longname": "alone",
                "block": None, "stack": ""} == alone


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn])
def test_non_float_dtypes_are_unsupported(dtype):
    w = torch.zeros(64, 32).to(dtype)
    row = one(w, name="model.layers.0.q_proj.qweight")
    assert row["status"] == "unsupported_dtype"
    assert (row["N"], row["M"], row["num_evals"], row["Q"]) == (64, 32, 32, 2.0)
    assert math.isnan(row["alpha"]) and math.isnan(row["norm"])


def test_non_weights_and_vectors_give_no_rows():
    out = rows([("a.bias", torch.randn(20, 30)), ("norm.weight", torch.ones(30)),
                ("q.weight_scale", torch.ones(20, 30)), ("embeddings.position_ids",
                                                        torch.arange(40).reshape(1, 40)),
                ("h.0.attn.masked_bias", torch.ones(20, 20)), ("q.weight", torch.randn(20, 30))])
    assert [r["longname"] for r in out] == ["q"] and out[0]["layer_id"] == 0


@pytest.mark.parametrize("name, ndim, expected", [
    ("model.embed_tokens.weight", 2, "embedding"), ("transformer.wte.weight", 2, "embedding"),
    ("transformer.wpe.weight", 2, "embedding"), ("shared.weight", 2, "embedding"),
    ("bert.embeddings.word_embeddings.weight", 2, "embedding"),
    ("bert.embeddings.token_type_embeddings.weight", 2, "embedding"),
    ("lm_head.weight", 2, "lm_head"), ("gpt_neox.embed_out.weight", 2, "lm_head"),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 2, "embedding"),
    ("model.layers.0.mlp.shared_experts.gate_proj.weight", 2, "linear"),
    ("model.layers.0.self_attn.q_proj.weight", 2, "linear"),
    ("model.layers.0.mlp.experts.down_proj", 3, "expert"),
    ("encoder.conv1.weight", 3, "conv1d"), ("resnet.conv.weight", 4, "conv2d"),
    ("upsampler.0.weight", 3, "conv1d"), ("text_encoder.project.weight", 3, "conv1d"),
    ("model.layers.0.block_sparse_moe.input_linear.weight", 3, "expert"),
    # JetMoE's MLP experts (ParallelExperts); a Conv1d of that name elsewhere is a Conv1d
    ("model.layers.0.mlp.output_linear.weight", 3, "expert"),
    ("decoder.input_linear.weight", 3, "conv1d"), ("vq.output_linear.weight", 3, "conv1d"),
    ("transformer.blocks.0.ffn.experts.mlp.w1", 3, "expert"),
    # one expert's own matrix is an expert row, as a slice of a fused stack is; a router is not
    ("model.layers.0.block_sparse_moe.experts.3.w1.weight", 2, "expert"),
    ("model.layers.0.mlp.experts.0.down_proj.weight", 2, "expert"),
    ("model.layers.0.block_sparse_moe.gate.weight", 2, "linear"),
    ("model.layers.0.mlp.shared_expert.up_proj.weight", 2, "linear"),
    # nn.Linear projections named after embeddings (ALBERT, ELECTRA) are linear maps
    ("albert.encoder.embedding_hidden_mapping_in.weight", 2, "linear"),
    ("electra.embeddings_project.weight", 2, "linear"),
    ("gpt_neox.embed_in.weight", 2, "embedding"),
    # GGUF names (llama.cpp) and heads named output (InternLM2)
    ("token_embd.weight", 2, "embedding"), ("output.weight", 2, "lm_head"),
    ("model.tok_embeddings.weight", 2, "embedding"),
    ("model.layers.0.attention.output.dense.weight", 2, "linear"),
    ("blk.0.ffn_gate_exps.weight[2]", 2, "expert"), ("blk.0.attn_k_b.weight[1]", 2, "linear"),
    ("blk.0.ffn_down_shexp.weight", 2, "linear"), ("blk.0.ffn_gate_inp.weight", 2, "linear"),
    # one expert of Mixtral GGUFs made before llama.cpp stacked them, and of Switch/NLLB-MoE
    ("blk.0.ffn_gate.3.weight", 2, "expert"), ("model.layers.0.ffn_down.7.weight", 2, "expert"),
    ("encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight", 2, "expert"),
    ("model.decoder.layers.3.ffn.experts.expert_12.fc1.weight", 2, "expert"),
    ("model.layers.0.mlp.gate.weight", 2, "linear"),
])
def test_layer_type_from_name(name, ndim, expected):
    assert layer_type_of(name, ndim) == expected


@pytest.mark.parametrize("name, expected", [
    ("transformer.blocks.0.ffn.experts.mlp.w1", True), ("ffn.experts.mlp.v1", True),
    ("model.layers.0.mlp.experts.gate_up_proj", True), ("mlp.experts.gate_up_proj_bias", False),
    ("model.layers.0.mlp.w1", False), ("x.weight_scale", False), ("model.norm.bias", False),
    ("blk.0.ffn_up_exps.weight[3]", True), ("blk.0.ffn_up_exps.bias[3]", False),
])
def test_weight_names(name, expected):
    assert is_weight_name(name) is expected


def test_stream_is_read_lazily_and_tensors_released():
    """Only the current tensor is alive when the loader produces the next one.

    Each tensor views a NumPy buffer; the buffer lives as long as any view of its storage.
    """
    refs, read = [], []

    def stream():
        for i in range(4):
            if refs:
                assert refs[-1]() is None, "previous tensor's storage still held"
            buf = np.random.default_rng(i).standard_normal((30 + i, 20))
            refs.append(weakref.ref(buf))
            t = torch.from_numpy(buf)
            del buf
            read.append(i)
            yield f"l{i}.weight", t
            del t

    it = iter_layer_results(stream(), ESDConfig())
    first = next(it)
    assert first.row["longname"] == "l0" and read == [0]
    assert [r.row["layer_id"] for r in it] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Saved eigenvalues, the options, the nn.Module door.

@pytest.mark.parametrize("fit", FITS)
def test_fit_from_saved_evals_equals_tensor_path(fit):
    w = with_spectrum(300, 150, pareto(150, 3.0, seed=2), seed=8).float()
    (res,) = iter_layer_results([("w.weight", w)], ESDConfig(fix_fingers=fit, keep_evals=True))
    again = fit_from_evals(res.evals[::-1].copy(), ESDConfig(fix_fingers=fit), N=300)
    assert again == {k: res.row[k] for k in again}


def test_ks_scan_blocks_do_not_change_the_fit():
    x = pareto(3000, 2.8, seed=9)
    a = fit_from_evals(x, ESDConfig(fix_fingers="DKS", chunk_elems=5000))
    b = fit_from_evals(x, ESDConfig(fix_fingers="DKS", chunk_elems=10**8))
    assert a == b


@pytest.mark.parametrize("kw", [{"fix_fingers": "peak"}, {"precision": "float16"},
                                {"xmin_pos": 0}, {"bins": 0}, {"device": "gpu0"},
                                {"conv_norm": 0.0}, {"chunk_elems": 0},
                                {"evals_thresh": -1e-3}, {"evals_thresh": math.nan},
                                {"evals_thresh": math.inf}, {"conv_norm": math.inf},
                                {"conv_norm": math.nan}])
def test_bad_options_are_refused(kw):
    with pytest.raises(InputError):
        ESDConfig(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_a_device_is_refused():
    with pytest.raises(InputError, match="no CUDA device"):
        list(iter_layer_results([("a.weight", torch.randn(20, 20))], ESDConfig(device="cuda")))


@pytest.mark.parametrize("evals", [np.array([]), np.array([1.0, np.nan]), np.ones((3, 3))])
def test_fit_from_evals_refuses_bad_input(evals):
    with pytest.raises(InputError, match="finite eigenvalues"):
        fit_from_evals(evals, ESDConfig())


class Conv1D(torch.nn.Module):
    """Stands in for transformers' GPT-2 Conv1D: weight stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf))


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 24)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.attn = Conv1D(72, 24)
        self.fc = torch.nn.Linear(24, 40)
        self.norm = torch.nn.LayerNorm(24)
        self.lm_head = torch.nn.Linear(24, 100, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: analysed once


def test_net_esd_estimator_covers_module_types():
    torch.manual_seed(0)
    net = TinyNet()
    df = net_esd_estimator(net, eigs=True)
    assert list(df.columns) == list(LAYER_COLUMNS) + ["alphahat", "eigs"]
    assert df["longname"].tolist() == ["embed", "conv", "attn", "fc"]
    assert df["layer_type"].tolist() == ["embedding", "conv2d", "linear", "linear"]
    assert df["layer_id"].tolist() == [0, 1, 2, 3]
    assert (df["alphahat"] == df["alpha_weighted"]).all()
    assert df.loc[1, "num_evals"] == 3 * 9 and len(df.loc[1, "eigs"]) == 27
    assert df.loc[2, "N"] == 72 and df.loc[2, "M"] == 24
    np.testing.assert_allclose(df.loc[3, "eigs"], svd_evals(net.fc.weight.detach()), rtol=EVALS_RTOL)
    stream = rows([("embed.weight", net.embed.weight.detach())])
    assert {k: df.loc[0, k] for k in ("alpha", "D", "norm")} == {
        k: stream[0][k] for k in ("alpha", "D", "norm")}
    assert "eigs" not in net_esd_estimator(net).columns


def test_module_door_labels_as_the_checkpoint_door():
    """The same nn.Linear gets the same layer_type from a module and from its checkpoint name:
    an embedding-named projection is linear, one expert's own Linear is an expert row."""
    net = torch.nn.Module()
    net.embedding_hidden_mapping_in = torch.nn.Linear(16, 32)
    net.experts = torch.nn.ModuleList([torch.nn.Linear(16, 24) for _ in range(2)])
    net.gate = torch.nn.Linear(16, 2)
    df = net_esd_estimator(net)
    by_name = dict(zip(df["longname"], df["layer_type"], strict=True))
    assert by_name == {"embedding_hidden_mapping_in": "linear", "experts.0": "expert",
                       "experts.1": "expert", "gate": "linear"}
    assert by_name == {n: layer_type_of(f"{n}.weight", 2) for n in by_name}


def test_untied_lm_head_is_labelled():
    net = torch.nn.ModuleDict({"body": torch.nn.Linear(20, 30), "lm_head": torch.nn.Linear(20, 50)})
    df = net_esd_estimator(net, fix_fingers="DKS", filter_zeros=True)
    assert df["layer_type"].tolist() == ["linear", "lm_head"]
    assert (df["fix_fingers"] == "DKS").all() and (df["status"] == "ok").all()


def test_analysis_path_imports_neither_transformers_nor_peft():
    code = ("import sys, torch; from esd_experiment.estimator import net_esd; "
            "list(net_esd.iter_layer_results([('a.weight', torch.randn(20, 20))], "
            "net_esd.ESDConfig())); "
            "net_esd.net_esd_estimator(torch.nn.Linear(20, 20)); "
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fit", FITS)
def test_cuda_matches_cpu(fit):
    g = torch.Generator().manual_seed(11)
    named = [("embed.weight", torch.randn(3000, 64, generator=g).bfloat16()),
             ("heavy.weight", with_spectrum(400, 200, pareto(200, 3.0, seed=4)).float()),
             ("conv.weight", torch.randn(8, 4, 3, 3, generator=g)),
             ("bad.weight", torch.full((20, 20), float("nan")))]
    cpu = rows(named, fix_fingers=fit)
    gpu = rows(named, fix_fingers=fit, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        assert_rows_close(a, b, DEVICE_RTOL)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3000, 256), (256, 1200)])
def test_cuda_torch_path_matches_cpu_lapack_path(shape, dtype):
    """CUDA keeps torch (addmm_ + eigvalsh); the CPU takes syrk + syevr: same contract."""
    w = with_spectrum(*shape, np.logspace(-7, 1, min(shape)), seed=12).to(dtype)
    cpu = gram_eigenvalues(w, torch.device("cpu"), torch.float64, 1 << 19).numpy()
    gpu = gram_eigenvalues(w.cuda(), torch.device("cuda"), torch.float64, 1 << 19).cpu().numpy()
    big = cpu >= EVALS_FLOOR * cpu[-1]
    np.testing.assert_allclose(gpu[big], cpu[big], rtol=DEVICE_RTOL)
    ref = svd_evals(w)
    np.testing.assert_allclose(gpu[big], ref[big], rtol=EVALS_RTOL)


# The MP fits' optimizer and the Jensen-Shannon distance may magnify the CPU/CUDA eigenvalue
# differences (DEVICE_RTOL); the views' columns are held to the 1e-6 they meet against
# WeightWatcher. The shuffled matrices are solved in float32 on both (SHUFFLED_PRECISION),
# whose sums the two devices order differently: 10x float32's 5e-6 measured against float64.
VIEWS_DEVICE_RTOL = 1e-6
SHUFFLED_DEVICE_RTOL = 5e-5


@pytest.mark.cuda
@needs_cuda
def test_cuda_randomize_and_mp_fit_match_cpu():
    """On a GPU the shuffle's words are sorted by torch on the device, in NumPy's order: the
    same shuffle, so the same --randomize and --mp_fit columns as on the CPU."""
    from esd_experiment.estimator.metrics import MP_FIT, randomize_metric
    from esd_experiment.estimator.randomize import RANDOM_COLUMNS

    g = torch.Generator().manual_seed(5)
    named = [(f"l{i}.weight", torch.randn(n, m, generator=g) / m ** 0.5
              + 0.3 * torch.randn(n, 3, generator=g) @ torch.randn(3, m, generator=g))
             for i, (n, m) in enumerate([(300, 120), (64, 160), (2000, 128)])]
    named.append(("embed.weight", torch.randn(3000, 64, generator=g).bfloat16()))
    views = (MP_FIT, randomize_metric(5))
    cpu = rows(named, metrics=views)
    gpu = rows(named, metrics=views, device="cuda")
    assert all(not math.isnan(r["max_rand_eval"]) and "mp_softrank" in r for r in cpu)
    for a, b in zip(cpu, gpu, strict=True):
        shuffled = [c for c in RANDOM_COLUMNS if c in a]
        # ww_maxdist, a difference of eigenvalues, errs as the larger one does
        assert abs(a.pop("ww_maxdist") - b.pop("ww_maxdist")) \
            <= SHUFFLED_DEVICE_RTOL * max(a["max_rand_eval"], a["spectral_norm"])
        assert_rows_close({c: a.pop(c) for c in shuffled if c in a},
                          {c: b.pop(c) for c in shuffled if c in b}, SHUFFLED_DEVICE_RTOL)
        assert_rows_close(a, b, VIEWS_DEVICE_RTOL)
