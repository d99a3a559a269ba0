"""The delta view (--delta, esd_delta.delta_frame): the ESD of W - W_source, against
WeightWatcher's ``base_model=`` (which subtracts the base layer by layer; read in its
WWDeltaLayerIterator) and, for adapters, against peft's merge_and_unload() minus the base.

WeightWatcher's default fit is DKS over eigenvalues > 1e-5, our ``filter_zeros=True``; its
entropy carries a 1e-10 regulariser (see test_net_esd_oracle.py).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from esd_experiment.estimator.options import ESDConfig
from esd_experiment.run.delta import LayerDelta, delta_frame, delta_layer_results, difference
from tests.loader_fixtures import llama

ww = pytest.importorskip("weightwatcher")

PARITY_RTOL = 1e-6   # the bar; both sides are float64 (agree to ~1e-12)
EIGEN_RTOL = 1e-9    # the contract's eigenvalue accuracy (metrics.md section 2)
SHARED = ("alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes", "spectral_norm",
          "log_spectral_norm", "norm", "log_norm", "stable_rank", "alpha_weighted",
          "log_alpha_norm", "matrix_rank", "entropy", "N", "M", "Q", "num_evals")
WW_CONFIG = dict(fix_fingers="DKS", filter_zeros=True)


@pytest.fixture(autouse=True)
def quiet_weightwatcher():
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)


def heavy_tailed(n, m, rng, alpha=3.0):
    """n x m matrix with a power-law spectrum, like a trained layer's update."""
    k = min(n, m)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((m, k)))
    lam = 0.01 * (1.0 - rng.random(k)) ** (-1.0 / (alpha - 1.0))
    return (u * np.sqrt(lam)) @ v.T


def on_grid(x) -> torch.Tensor:
    """Float32 values on a 2^-12 grid: WeightWatcher subtracts the base in float32, which is
    exact for them, so both sides analyse the same ΔW (off the grid its rounding moves D by
    ~1e-6 relative)."""
    return torch.round(torch.as_tensor(x, dtype=torch.float32) * GRID) / GRID


GRID = 4096.0


def compare(ours, theirs, names, columns=SHARED):
    ours, theirs = ours.set_index("longname"), theirs.set_index("longname")
    for col in columns:
        np.testing.assert_allclose(ours.loc[names, col].to_numpy(float),
                                   theirs.loc[names, col].to_numpy(float),
                                   rtol=PARITY_RTOL, atol=0, err_msg=col)


def gram_evals(delta: np.ndarray) -> np.ndarray:
    """numpy's eigenvalues of the smaller Gram matrix of an explicitly formed matrix."""
    d = delta if delta.shape[0] >= delta.shape[1] else delta.T
    return np.linalg.eigvalsh(d.T @ d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_of_two_modules_matches_weightwatcher_base_model(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 48),
                               torch.nn.Linear(48, 40))
    with torch.no_grad():
        for layer in base:
            layer.weight.copy_(on_grid(layer.weight))
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for layer in ft:
            n, m = layer.weight.shape
            layer.weight.add_(on_grid(heavy_tailed(n, m, rng)))
    theirs = ww.WeightWatcher(model=ft, base_model=base).analyze()
    ours = delta_frame(ft, base, **WW_CONFIG)
    assert list(ours["longname"]) == ["0", "1", "2"] and (ours["status"] == "ok").all()
    compare(ours, theirs, ["0", "1", "2"])
    # and it is the delta, not the fine-tune: the plain analysis differs
    plain = ww.WeightWatcher(model=ft).analyze().set_index("longname")
    assert not np.allclose(plain.loc[["0"], "norm"], ours.set_index("longname").loc[["0"], "norm"])


@pytest.mark.parametrize("shape,r", [((64, 32), 4), ((32, 48), 8), ((40, 40), 40), ((48, 36), 40)])
def test_lowrank_shortcut_equals_explicit_merged_minus_base(shape, r):
    """s·B·A by the r x r core against numpy on the formed matrix: every eigenvalue, the
    rank-deficient ones as exact zeros, and every row column."""
    gen = torch.Generator().manual_seed(r)
    out, inp = shape
    a, b = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
    base = torch.randn(out, inp, generator=gen)
    scale = 0.5
    config = ESDConfig(keep_evals=True)
    merged = base + scale * (b @ a)
    explicit = delta_layer_results("l.weight", difference(merged, base), config)
    shortcut = delta_layer_results("l.weight", LayerDelta(shape, torch.float32,
                                                          factors=(a, b, scale, False)), config)
    ref = gram_evals(scale * (b.double() @ a.double()).numpy())
    rank = min(r, *shape)
    (e,), (s,) = explicit, shortcut
    assert (s.evals[:-rank] == 0).all() and (e.evals[:-rank] == 0).all()
    np.testing.assert_allclose(s.evals[-rank:], ref[-rank:], rtol=EIGEN_RTOL)
    # the explicit path forms merged - base in float32 sums: its eigenvalues carry that rounding
    np.testing.assert_allclose(e.evals[-rank:], s.evals[-rank:], rtol=1e-4)
    assert s.row["matrix_rank"] == e.row["matrix_rank"] == rank
    for col in ("N", "M", "num_evals", "num_pl_spikes", "status"):
        assert s.row[col] == e.row[col], col


def test_lowrank_shortcut_equals_formed_delta_exactly_in_float64():
    """With ΔW formed exactly (float64 factors), the two paths give the same row."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 48, generator=gen).double(), torch.randn(64, 6, generator=gen).double()
    config = ESDConfig(keep_evals=True)
    dense = LayerDelta((48, 64), torch.float64, pair=((b @ a).T * 2.0, torch.zeros(48, 64)))
    (e,) = delta_layer_results("l.weight", dense, config)
    (s,) = delta_layer_results("l.weight", LayerDelta((48, 64), torch.float64,
                                                      factors=(a, b, 2.0, True)), config)
    np.testing.assert_allclose(e.evals, s.evals, rtol=EIGEN_RTOL, atol=0)
    for col in SHARED:
        np.testing.assert_allclose(float(e.row[col]), float(s.row[col]), rtol=PARITY_RTOL,
                                   err_msg=col)


@pytest.fixture(scope="module")
def peft_llama():
    base = llama().double()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                        init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    return base, model


def test_peft_delta_matches_merge_and_unload_minus_base(peft_llama):
    base, model = peft_llama
    ours = delta_frame(model, fix_fingers="DKS", filter_zeros=True).set_index("longname")
    merged = copy.deepcopy(model).merge_and_unload()
    targeted = [n for n in ours.index if n.endswith(("q_proj", "v_proj", "up_proj"))]
    assert len(targeted) == 6
    untouched = ours.drop(index=targeted)
    assert (untouched["norm"] == 0).all() and (untouched["matrix_rank"] == 0).all()
    for name in targeted:
        d = (merged.get_submodule(name).weight - base.get_submodule(name).weight)
        ref = gram_evals(d.detach().numpy())
        row = ours.loc[name]
        assert row["matrix_rank"] == 4 and row["num_evals"] == len(ref)
        assert row["norm"] == pytest.approx(ref.sum(), rel=EIGEN_RTOL)
        assert row["spectral_norm"] == pytest.approx(ref.max(), rel=EIGEN_RTOL)
    theirs = ww.WeightWatcher(model=merged, base_model=base).analyze()
    # Left out: sigma (4 fit eigenvalues: WWFit's -1/sqrt(n) slip), and matrix_rank and
    # entropy, where WeightWatcher counts the float32 round-off of its subtraction as rank (32
    # or 16 for a rank-4 update); the numpy oracle above holds matrix_rank to 4.
    compare(ours.reset_index(), theirs, targeted,
            [c for c in SHARED if c not in ("sigma", "matrix_rank", "entropy")])


# ---------------------------------------------------------------------------------------------
# The runner: --delta on local checkpoints, a full fine-tune and an adapter of one base.

def runner(*argv) -> int:
    from esd_experiment.run import cli as run_esd_experiment

    return run_esd_experiment.main([*map(str, argv), "--device", "cpu", "--no-progress"])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from tests.loader_fixtures import save_adapter, save_model

    root = tmp_path_factory.mktemp("delta_zoo")
    base = llama()
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(on_grid(param))
    ft = copy.deepcopy(base)
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for param in ft.parameters():
            if param.ndim == 2:
                param.add_(on_grid(heavy_tailed(*param.shape, rng)))
    save_model(base, root / "base")
    save_model(ft, root / "ft")
    save_model(ft, root / "ft-copy")  # listed against a source that does not exist
    save_adapter(base, root / "lora", str(root / "base"), r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj"])
    (root / "models.csv").write_text(
        "model_id,base_model_relation,source_model\n"
        f"{root / 'base'},,\n{root / 'ft'},,{root / 'base'}\n"
        f"{root / 'lora'},adapter,{root / 'base'}\n{root / 'ft-copy'},,{root / 'missing'}\n")
    return root, base, ft


def test_runner_writes_deltas_resumes_and_records_a_failed_delta(zoo, tmp_path):
    from esd_experiment.core.paths import ModelPaths
    from tests.loader_fixtures import peft_merged

    root, base, ft = zoo
    out = tmp_path / "out"
    args = ("--model_list", root / "models.csv", "--output_dir", out, "--delta",
            "--fix_fingers", "DKS", "--filter_zeros", "--save_eigs")
    assert runner(*args) == 1  # the fine-tune listed against a missing source fails
    stem = {name: ModelPaths.for_model(out, str(root / name)).stem for name in ("base", "ft", "lora")}
    assert sorted(p.name for p in (out / "delta").glob("*.csv")) == sorted(
        f"{stem[n]}.csv" for n in ("ft", "lora"))
    assert sorted(p.name for p in (out / "delta").glob("*.eigs.npz")) == sorted(
        f"{stem[n]}.eigs.npz" for n in ("ft", "lora"))
    import json

    assert json.loads((out / ".esd_options.json").read_text())["delta"] is True
    failed = (out / "failed_models.txt").read_text()
    assert f"{root / 'ft-copy'}\t" in failed and "--delta" in failed and "missing" in failed
    # the fine-tune's delta against WeightWatcher's base_model=
    import pandas as pd

    ours = pd.read_csv(out / "delta" / f"{stem['ft']}.csv")
    assert (ours["source_model"] == str(root / "base")).all()
    theirs = ww.WeightWatcher(model=ft, base_model=base).analyze()
    shared = sorted(set(ours["longname"]) & set(theirs["longname"]))
    assert len(shared) >= 14  # every projection of both blocks
    compare(ours, theirs, shared)
    # the adapter's delta: peft's merged model minus the base
    lora = pd.read_csv(out / "delta" / f"{stem['lora']}.csv").set_index("longname")
    merged = peft_merged(root / "base", root / "lora")
    base_sd = base.state_dict()
    for name in lora.index:
        d = (merged[f"{name}.weight"] - base_sd[f"{name}.weight"]).double().numpy()
        ref = gram_evals(d)
        targeted = name.endswith(("q_proj", "v_proj"))
        assert lora.loc[name, "matrix_rank"] == (4 if targeted else 0), name
        assert lora.loc[name, "norm"] == pytest.approx(ref.sum(), rel=1e-5, abs=1e-30)
    from esd_experiment.core.results import load_results

    loaded = load_results(out / "delta")  # the delta directory reads as results do
    assert set(loaded["model_id"]) == {str(root / "ft"), str(root / "lora")}
    # a rerun finds every delta done; one removed is computed again, the others left alone
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.csv")}
    (out / "delta" / f"{stem['lora']}.csv").unlink()
    assert runner(*args, "--skip_failed") == 1
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.csv")}
    assert (out / "delta" / f"{stem['lora']}.csv").is_file()
    assert after[out / "delta" / f"{stem['ft']}.csv"] == before[out / "delta" / f"{stem['ft']}.csv"]
    assert after[out / f"{stem['ft']}.csv"] == before[out / f"{stem['ft']}.csv"]


def test_a_delta_counts_as_the_result_does(tmp_path):
    """Done only with a current delta; --overwrite leaves the old delta when it makes the
    job (tests/test_runner.py: it goes when the model fails); the worker is told; .esd_options.json records --delta without refusing a run that
    turns it on or off."""
    import json

    from esd_experiment.core.delta_paths import delta_paths
    from esd_experiment.core.paths import ModelPaths
    from esd_experiment.run import cli as runner_mod
    from esd_experiment.run.model_list import JobSpec, ListEntry
    from esd_experiment.run.plan import estimator_options, result_done
    from esd_experiment.run.state import FailureLog, check_options
    from tests.test_runner import FakeClockDispatcher, fake_result, make_config

    config = make_config(tmp_path, overwrite=True)
    config.args.delta, config.args.overwrite = True, True
    entry = ListEntry("org/ft", "", "org/base")
    paths = ModelPaths.for_model(tmp_path, "org/ft", log_dir=tmp_path / "logs")
    delta = delta_paths(paths)
    assert delta.csv == tmp_path / "delta" / paths.csv.name and delta.failure == paths.failure
    fake_result(paths.csv)
    options = ESDConfig().options_key
    assert not result_done(paths, options, False, delta=True)  # the delta is missing
    delta.csv.parent.mkdir()
    fake_result(delta.csv)
    assert result_done(paths, options, False, delta=True)
    fake_result(delta.csv, ESDConfig(fix_fingers="DKS").options_key)
    assert not result_done(paths, options, False, delta=True)  # another options' delta
    runner = runner_mod.Runner(config, FakeClockDispatcher(), FailureLog(tmp_path),
                               runner_mod.Progress(1, enabled=False))
    job = runner.job(JobSpec((entry,)))
    assert "--delta" in job.argv and delta.csv.exists() and paths.csv.exists()
    recorded = estimator_options(config.args)
    assert recorded["delta"] is True
    config.args.delta = False
    fake_result(delta.csv)  # the directory's results all of this run's options again
    check_options(tmp_path, estimator_options(config.args), overwrite=False)
    check_options(tmp_path, recorded, overwrite=False)  # on again: not refused, recorded
    assert json.loads((tmp_path / ".esd_options.json").read_text())["delta"] is True


def counted_reads(monkeypatch) -> Counter:
    """``{(model id, tensor name): times read}`` of every checkpoint read from now on."""
    from esd_experiment.formats.checkpoint import CheckpointReader

    reads: Counter = Counter()
    real_get = CheckpointReader.get

    def counting_get(self, name):
        reads[(self.model_id, name)] += 1
        return real_get(self, name)

    monkeypatch.setattr(CheckpointReader, "get", counting_get)
    return reads


def test_a_job_reads_the_source_once_for_its_fine_tunes_and_adapters(zoo, tmp_path,
                                                                    monkeypatch):
    """The runner puts a base, its full fine-tune and its adapter in one job under --delta;
    the worker reads each base tensor once, and each fine-tune tensor once for both of its
    results; the fine-tune's result and delta equal those of its job alone."""
    import pandas as pd

    from esd_experiment.core.paths import ModelPaths
    from esd_experiment.run import worker as esd_worker
    from esd_experiment.run.model_list import ListEntry, group_jobs

    root, _, _ = zoo
    base, ft, lora = (str(root / n) for n in ("base", "ft", "lora"))
    entries = [ListEntry(base), ListEntry(ft, "", base), ListEntry(lora, "adapter", base)]
    (spec,) = group_jobs(entries, 8, lambda _: None, fine_tunes=True)
    assert [e.model_id for e in spec.entries] == [base, ft, lora] and spec.base == base
    assert len(group_jobs(entries, 8, lambda _: None)) == 2  # without --delta: as before
    reads = counted_reads(monkeypatch)
    common = ["--output_dir", tmp_path / "group", "--device", "cpu", "--delta"]
    assert esd_worker.main([*map(str, ["--model_id", base, ft, lora, "--source_model", base,
                                       "--base_model_relation", "", *common])]) == 0
    # base and fine-tune tensors once each (the adapter's small factors serve its merge and
    # its delta, each reading them)
    checkpoints = Counter({k: v for k, v in reads.items() if k[0] in (base, ft)})
    assert checkpoints and max(checkpoints.values()) == 1, checkpoints.most_common(3)
    assert {m for m, _ in checkpoints} == {base, ft}
    monkeypatch.undo()  # reads are counted no more
    alone = ["--output_dir", tmp_path / "alone", "--device", "cpu", "--delta"]
    assert esd_worker.main([*map(str, ["--model_id", ft, "--source_model", base, *alone])]) == 0
    stem = ModelPaths.for_model(tmp_path, ft).stem
    for kind in ("", "delta/"):
        grouped = pd.read_csv(tmp_path / "group" / f"{kind}{stem}.csv")
        single = pd.read_csv(tmp_path / "alone" / f"{kind}{stem}.csv")
        pd.testing.assert_frame_equal(grouped, single)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 40), (40, 64)])
def test_chunked_difference_matches_numpy_on_the_formed_matrix(dtype, shape):
    """ΔW's Gram summed from row chunks (3 rows a chunk here), whatever the stored dtype and
    orientation, against numpy on the difference formed whole in float64."""
    from esd_experiment.estimator.net_esd import split_layers
    from esd_experiment.run.delta import difference_eigenvalues

    gen = torch.Generator().manual_seed(7)
    ft, base = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(2))
    config = ESDConfig(chunk_elems=3 * max(shape))
    (mine,), (theirs,) = (list(split_layers("l.weight", t, None, 0.5)) for t in (ft, base))
    ours = difference_eigenvalues(mine, theirs, config).numpy()
    ref = gram_evals((ft.double() - base.double()).numpy())
    np.testing.assert_allclose(ours, ref, rtol=EIGEN_RTOL, atol=0)


def test_an_adapter_peft_merges_fails_its_delta_alone_in_one_line(zoo, tmp_path):
    """An IA3 adapter (merged by peft, not s·B·A): its result is written, its delta is not,
    and its failure record says why and what to do."""
    import json

    from peft import IA3Config

    from esd_experiment.core.paths import ModelPaths
    from esd_experiment.run import worker as esd_worker
    from tests.loader_fixtures import set_adapter_base

    root, base, _ = zoo
    config = IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "ia3")
    set_adapter_base(tmp_path / "ia3", str(root / "base"))
    out = tmp_path / "out"
    code = esd_worker.main([*map(str, ["--model_id", tmp_path / "ia3", "--source_model",
                                       root / "base", "--base_model_relation", "adapter",
                                       "--output_dir", out, "--device", "cpu", "--delta"])])
    assert code == esd_worker.EXIT_FAILED
    paths = ModelPaths.for_model(out, str(tmp_path / "ia3"))
    assert paths.csv.is_file() and not (out / "delta" / paths.csv.name).exists()
    record = json.loads(paths.failure.read_text())
    assert record["transient"] is False and "\n" not in record["message"]
    assert "--delta" in record["message"] and "merged by peft" in record["message"]


def test_an_adapter_on_the_embedding_gives_its_update_in_the_delta(tmp_path):
    """peft saves the whole embedding beside its LoRA factors (save_embedding_layers): the
    delta is that saved embedding minus the base plus s·B·A, never the saved copy alone."""
    from peft import PeftModel

    from esd_experiment import analyze
    from tests.loader_fixtures import save_adapter, save_model

    base = llama()
    save_model(base, tmp_path / "base")
    save_adapter(base, tmp_path / "lora", str(tmp_path / "base"), r=4, lora_alpha=8,
                 target_modules=["q_proj", "embed_tokens"])
    ours = analyze(str(tmp_path / "lora"), delta=True, device="cpu").set_index("longname")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).double()
    for name in ("model.embed_tokens", "model.layers.0.self_attn.q_proj"):
        update = peft_model.base_model.model.get_submodule(name).get_delta_weight("default")
        ref = gram_evals(update.detach().numpy())
        assert ours.loc[name, "matrix_rank"] == 4, name
        assert ours.loc[name, "norm"] == pytest.approx(ref.sum(), rel=EIGEN_RTOL), name
        assert ours.loc[name, "spectral_norm"] == pytest.approx(ref.max(), rel=EIGEN_RTOL), name


def test_refit_refits_the_delta_view_too(zoo, tmp_path):
    """esd_report.py refit of a --delta --save_eigs directory writes delta/ from the saved
    delta eigenvalues, as a run with the new options would."""
    import json

    import pandas as pd

    from esd_experiment.core.paths import ModelPaths
    from esd_experiment.report import cli as esd_report

    root, base, ft = zoo
    out, new = tmp_path / "out", tmp_path / "new"
    assert runner("--model_list", root / "models.csv", "--output_dir", out, "--delta",
                  "--save_eigs") == 1  # the fine-tune listed against a missing source fails
    assert esd_report.main(["refit", str(out), "--output_dir", str(new),
                            "--fix_fingers", "DKS", "--filter_zeros"]) == esd_report.EXIT_OK
    stem = ModelPaths.for_model(out, str(root / "ft")).stem
    assert sorted(p.name for p in (new / "delta").glob("*.csv")) == sorted(
        p.name for p in (out / "delta").glob("*.csv"))
    ours = pd.read_csv(new / "delta" / f"{stem}.csv")
    theirs = ww.WeightWatcher(model=ft, base_model=base).analyze()
    compare(ours, theirs, sorted(set(ours["longname"]) & set(theirs["longname"])))
    assert json.loads((new / ".esd_options.json").read_text())["delta"] is True


def test_refit_never_writes_one_view_over_the_other(zoo, tmp_path, capsys):
    """A refit of the results into their own delta/, or of delta/ into the results, would
    replace each model's result with its delta (or the reverse) under the same options:
    refused, nothing written."""
    from esd_experiment.report import cli as esd_report

    root, _, _ = zoo
    out = tmp_path / "out"
    assert runner("--model_list", root / "models.csv", "--output_dir", out, "--delta",
                  "--save_eigs") == 1  # the fine-tune listed against a missing source fails
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
    for results, new in ((out, out / "delta"), (out / "delta", out)):
        assert esd_report.main(["refit", str(results), "--output_dir", str(new),
                                "--fix_fingers", "DKS"]) == esd_report.EXIT_BAD_INPUT
        assert "delta" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in out.rglob("*")
                      if p.is_file() and "logs" not in p.parts}


# ---------------------------------------------------------------------------------------------
# Checkpoints in other layouts than the source's.

@pytest.mark.parametrize("gguf_side", ["fine_tune", "source"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_gguf_fine_tune_against_a_safetensors_source_and_the_reverse(tmp_path, arch,
                                                                        gguf_side):
    """llama.cpp's converter permutes the rows of a llama's attn_q and attn_k, and transposes
    GPT-2's Conv1D weights; a GGUF on one side and the Hugging Face layout on the other still
    give ΔW of the Hugging Face matrices, every matrix of them (numpy on the difference of the
    two safetensors checkpoints)."""
    from safetensors.torch import load_file

    from esd_experiment import analyze
    from tests.loader_fixtures import gpt2, save_model
    from tests.test_gguf import gpt2_as_gguf, llama_as_gguf

    make, convert, count = {"llama": (llama, llama_as_gguf, 16),
                            "gpt2": (gpt2, gpt2_as_gguf, 10)}[arch]
    hf_dir, gguf = convert(tmp_path)  # the same weights, as safetensors and as GGUF
    save_model(make(seed=4), tmp_path / "other")
    if gguf_side == "fine_tune":
        rows = analyze(str(gguf), base=str(tmp_path / "other"), device="cpu")
    else:
        rows = analyze(str(tmp_path / "other"), base=str(gguf), device="cpu")
    mine, theirs = (load_file(str(d / "model.safetensors")) for d in (hf_dir, tmp_path / "other"))
    rows = rows.set_index("longname")
    assert len(rows) == count and any(n.endswith(("q_proj", "c_attn")) for n in rows.index)
    for name, row in rows.iterrows():
        ref = gram_evals((mine[f"{name}.weight"].double()
                          - theirs[f"{name}.weight"].double()).numpy())
        assert row["norm"] == pytest.approx(ref.sum(), rel=EIGEN_RTOL), name
        assert row["spectral_norm"] == pytest.approx(ref.max(), rel=EIGEN_RTOL), name


def fused_mixtral(values: dict) -> dict:
    """The tensors of a published (per-expert) Mixtral in the fused 3-D layout of
    transformers' modules: mlp.experts.gate_up_proj[e] = [w1; w3], down_proj[e] = w2,
    mlp.gate the router."""
    from tests.zoo_published import LAYERS, E

    out = {n: v for n, v in values.items() if ".block_sparse_moe." not in n}
    for i in range(LAYERS):
        p, moe = f"model.layers.{i}", f"model.layers.{i}.block_sparse_moe"
        out[f"{p}.mlp.gate.weight"] = values[f"{moe}.gate.weight"]
        out[f"{p}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([
            values[f"{moe}.experts.{e}.w1.weight"], values[f"{moe}.experts.{e}.w3.weight"]])
            for e in range(E)])
        out[f"{p}.mlp.experts.down_proj"] = torch.stack([
            values[f"{moe}.experts.{e}.w2.weight"] for e in range(E)])
    return out


@pytest.mark.parametrize("fused_side", ["fine_tune", "source"])
def test_a_mixtral_fine_tune_in_the_other_expert_layout_than_its_source(tmp_path, caplog,
                                                                        fused_side):
    """Mixtral's published per-expert names (block_sparse_moe.experts.E.w1) against the fused
    3-D layout of transformers' modules (mlp.experts.gate_up_proj), either way round: every
    expert matrix and the router give ΔW rows, named as the per-expert checkpoint names them
    (numpy on the difference of the matrices as the published layout holds them); a weight
    the source lacks is left out with one line that names the model, the source and why."""
    from esd_experiment import analyze
    from tests.loader_fixtures import write_safetensors
    from tests.zoo_published import LAYERS, E, build

    published, per_expert = build("mixtral", tmp_path)
    gen = torch.Generator().manual_seed(9)
    tuned = {n: v + 0.01 * torch.randn(v.shape, generator=gen)
             for n, v in published.values.items()}
    if fused_side == "fine_tune":
        ft_dir = write_safetensors(tmp_path / "ft", {**fused_mixtral(tuned),
                                                     "score.weight": torch.ones(3, 32)},
                                   published.config)
        source = per_expert
    else:
        ft_dir = write_safetensors(tmp_path / "ft", {**tuned, "score.weight": torch.ones(3, 32)},
                                   published.config)
        source = write_safetensors(tmp_path / "fused", fused_mixtral(published.values),
                                   published.config)
    with caplog.at_level(logging.WARNING, logger="esd_experiment"):
        rows = analyze(str(ft_dir), base=str(source), device="cpu")
    rows = rows.set_index("longname")
    assert len(rows) == 2 + LAYERS * (4 + 1 + 3 * E)  # embed, head; attention, router, experts
    assert set(rows.loc[[n for n in rows.index if n.endswith(".gate")], "status"]) == {
        "too_small"}  # the router: E = 4 eigenvalues, under min_evals
    for name, row in rows[rows["status"] != "too_small"].iterrows():
        published_name = name + ".weight"
        ref = gram_evals((tuned[published_name].double()
                          - published.values[published_name].double()).numpy())
        assert row["norm"] == pytest.approx(ref.sum(), rel=EIGEN_RTOL), name
        assert row["spectral_norm"] == pytest.approx(ref.max(), rel=EIGEN_RTOL), name
    assert (rows.loc[[n for n in rows.index if ".experts." in n], "layer_type"]
            == "expert").all()
    (line,) = [r.getMessage() for r in caplog.records if "no delta row" in r.getMessage()]
    assert "\n" not in line and line.startswith(str(ft_dir))
    assert str(source) in line and "1 of its" in line and "score.weight" in line
    # the fine-tune's own result, read in the same pass (each stack once), is its result alone
    import pandas as pd

    from esd_experiment.core.paths import ModelPaths
    from esd_experiment.run import worker as esd_worker

    out = tmp_path / "out"
    assert esd_worker.main([*map(str, ["--model_id", ft_dir, "--source_model", source,
                                       "--output_dir", out, "--device", "cpu",
                                       "--delta"])]) == 0
    own = pd.read_csv(ModelPaths.for_model(out, str(ft_dir)).csv)
    alone = analyze(str(ft_dir), device="cpu")
    assert list(own["longname"]) == list(alone["longname"])
    np.testing.assert_allclose(own["norm"], alone["norm"], rtol=EIGEN_RTOL)


def test_a_layer_of_another_shape_is_named_in_one_line_from_modules(caplog):
    from esd_experiment import analyze

    torch.manual_seed(0)
    mine = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 16))
    theirs = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(16, 16))
    with caplog.at_level(logging.WARNING, logger="esd_experiment"):
        assert list(analyze(mine, base=theirs, model_id="org/mine")["longname"]) == ["0"]
    (line,) = [r.getMessage() for r in caplog.records if "no delta row" in r.getMessage()]
    assert line.startswith("org/mine: --delta: 1 of its 2 weight tensors")
    assert "1 have another shape there (1.weight)" in line
