"""Custom metrics (--metric FILE.py:FUNCTION): columns after the built-in ones, recorded in the
options, recomputed from saved eigenvalues without loading a model; a user's file is theirs."""

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from result_fixtures import llama_like

from esd_experiment.core.errors import InputError
from esd_experiment.core.results import RESULT_COLUMNS, load_results
from esd_experiment.estimator.net_esd import net_esd_estimator
from esd_experiment.report import cli as esd_report
from esd_experiment.run import worker as esd_worker
from tests.test_backend_slurm import slurm  # noqa: F401  (the cluster fixture)

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "run_esd_experiment.py"
CLI_TIMEOUT_S = 180
# Eigenvalues from two eigensolvers (LAPACK syevr on the Gram matrix here, torch's SVD or
# matrix norm in the oracle) agree to a few ulps of lambda_max times the dimension.
REL_TOL = 1e-9

METRICS = '''
import numpy as np

def spectrum(evals):
    assert evals.dtype == np.float64 and np.all(np.diff(evals) >= 0)
    return {"lambda_max": float(evals[-1]), "lambda_sum": float(evals.sum())}

def frob(evals, W):
    return {"frob_sq": float((np.asarray(W, dtype=np.float64) ** 2).sum())}

def broken(evals):
    raise ValueError("boom")

def text(evals):
    return {"word": "abc"}
'''


@pytest.fixture(scope="module")
def metric_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics") / "my_metrics.py"
    path.write_text(METRICS)
    return path


def worker(checkpoint_dir: Path, out: Path, *options) -> int:
    return esd_worker.main(["--model_id", str(checkpoint_dir), "--output_dir", str(out),
                            "--device", "cpu", *map(str, options)])


def cli(*argv):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, argv), "--device", "cpu",
                           "--retry_backoff", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def oracle(tensor: torch.Tensor, layer_type: str) -> tuple[float, float]:
    """(largest eigenvalue, sum of eigenvalues) of W^T W from torch's norms; a convolution's
    slices are scaled by conv_norm = 0.5, the default."""
    w = tensor.double()
    if w.ndim == 4:
        slices = w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)
        top = torch.linalg.matrix_norm(slices, 2).max() ** 2
        return 0.5 * float(top), 0.5 * float((w ** 2).sum())
    return float(torch.linalg.matrix_norm(w, 2) ** 2), float((w ** 2).sum())


def test_metric_columns_follow_the_builtin_ones_in_every_row(checkpoint, metric_file, tmp_path):
    root, tensors = checkpoint
    assert worker(root, tmp_path, "--metric", f"{metric_file}:spectrum",
                  "--metric", f"{metric_file}:frob") == esd_worker.EXIT_OK
    (csv,) = tmp_path.glob("*.csv")
    frame = pd.read_csv(csv, keep_default_na=False,
                        na_values=dict.fromkeys(("lambda_max", "lambda_sum", "frob_sq"), [""]))
    assert tuple(frame.columns) == RESULT_COLUMNS + ("lambda_max", "lambda_sum", "frob_sq")
    digest = hashlib.sha256(metric_file.read_bytes()).hexdigest()[:12]
    assert frame["esd_options"].iat[0].endswith(f";metrics=my_metrics.py:spectrum@{digest},"
                                                f"my_metrics.py:frob@{digest}")
    by_name = {k.removesuffix(".weight"): v for k, v in tensors.items()}
    for row in frame.itertuples():
        if row.status not in ("ok", "fit_failed"):
            assert np.isnan(row.lambda_max), row.longname  # no eigenvalues, no metric
            continue
        top, total = oracle(by_name[row.longname], row.layer_type)
        assert row.lambda_max == pytest.approx(top, rel=REL_TOL, abs=1e-12), row.longname
        assert row.lambda_sum == pytest.approx(total, rel=REL_TOL, abs=1e-12), row.longname
        # W as analysed: a convolution's slices scaled by sqrt(conv_norm), like its evals
        assert row.frob_sq == pytest.approx(total, rel=REL_TOL, abs=1e-12), row.longname
    assert (frame["status"] == "too_small").any()


def test_a_metric_that_raises_or_returns_text_fails_the_model_naming_it(checkpoint,
                                                                      metric_file, tmp_path):
    root, _ = checkpoint
    for name, cause in (("broken", "ValueError: boom"), ("text", "'word'")):
        out = tmp_path / name
        assert worker(root, out, "--metric", f"{metric_file}:{name}") == esd_worker.EXIT_FAILED
        assert not list(out.glob("*.csv"))
        (failure,) = (out / "logs").glob("*.failure.json")
        message = json.loads(failure.read_text())["message"]
        assert f"metric my_metrics.py:{name}" in message and cause in message, message


def test_a_metric_answering_yes_or_no_gets_one_and_zero():
    """``{"heavy": alpha < 2}`` is a NumPy bool: a column of 1 and 0 (it failed the model)."""
    from esd_experiment import analyze

    def heavy(evals):
        return {"heavy": evals[-1] > 1e9, "fitted": True}

    frame = analyze(torch.nn.Sequential(torch.nn.Linear(40, 30)), metrics=[heavy])
    assert frame["heavy"].tolist() == [0.0] and frame["fitted"].tolist() == [1.0]


@pytest.mark.parametrize("spec, cause", [
    ("missing_file.py:f", "no such file"),
    ("{metric_file}:nothing", "has no function 'nothing'"),
    ("no_such_package_xyz.mod:f", "cannot be imported"),
    ("just_a_name", "FILE.py:FUNCTION or package.module:FUNCTION"),
])
def test_a_bad_metric_spec_is_refused_at_startup(metric_file, tmp_path, spec, cause):
    proc = cli("--model_list", tmp_path / "none.csv", "--output_dir", tmp_path / "out",
               "--metric", spec.format(metric_file=metric_file))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--metric" in lines[0] and cause in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_metric_file_named_as_a_module_of_the_runs_directory_is_found(metric_file,
                                                                       monkeypatch):
    """``my_metrics:spectrum`` (the ``.py`` left off) imports my_metrics.py from the directory
    the run starts in, as ``python -m`` would."""
    from esd_experiment.estimator.metrics import load_metric

    monkeypatch.chdir(metric_file.parent)
    as_module = load_metric("my_metrics:spectrum")
    as_file = load_metric(f"{metric_file}:spectrum")
    assert as_module.name.startswith("my_metrics:spectrum@")
    evals = np.linspace(1.0, 4.0, 12)
    assert as_module.fn(evals) == as_file.fn(evals)


def random_net(seed: int) -> torch.nn.Sequential:
    """Two Linear layers (30 -> 20 -> 40) of standard normal weights."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 40))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net


def test_net_esd_estimator_takes_metrics():
    net = random_net(0)

    def top(evals):
        return {"top": evals[-1]}

    df = net_esd_estimator(net, metrics=[top])
    assert list(df.columns[-1:]) == ["top"]
    for row, layer in zip(df.itertuples(), (net[0], net[2]), strict=True):
        assert row.top == pytest.approx(float(torch.linalg.matrix_norm(
            layer.weight.detach().double(), 2) ** 2), rel=REL_TOL)


def test_refit_adds_a_metric_from_saved_eigenvalues(checkpoint, metric_file, tmp_path):
    root, _ = checkpoint
    plain, direct, refit = tmp_path / "plain", tmp_path / "direct", tmp_path / "refit"
    assert worker(root, plain, "--save_eigs") == 0
    assert worker(root, direct, "--save_eigs", "--metric", f"{metric_file}:spectrum") == 0
    assert esd_report.main(["refit", str(plain), "--output_dir", str(refit),
                            "--metric", f"{metric_file}:spectrum"]) == 0
    (name,) = [p.name for p in direct.glob("*.csv")]
    assert (refit / name).read_bytes() == (direct / name).read_bytes()
    # a metric that needs the weights cannot come from eigenvalues alone
    assert esd_report.main(["refit", str(plain), "--output_dir", str(tmp_path / "w"),
                            "--metric", f"{metric_file}:frob"]) == esd_report.EXIT_BAD_INPUT
    # The same refit again keeps a refit result a user annotated (--overwrite replaces it).
    frame = pd.read_csv(refit / name, keep_default_na=False).assign(my_note="checked")
    frame.to_csv(refit / name, index=False)
    annotated = (refit / name).read_bytes()
    argv = ["refit", str(plain), "--output_dir", str(refit), "--metric", f"{metric_file}:spectrum"]
    assert esd_report.main(argv) == 0
    assert (refit / name).read_bytes() == annotated
    # ... and so it does when the user annotated the results it came from too
    source = pd.read_csv(plain / name, keep_default_na=False).assign(seen="yes")
    source.to_csv(plain / name, index=False)
    later = (refit / name).stat().st_mtime_ns + 10**9
    os.utime(plain / name, ns=(later, later))
    assert esd_report.main(argv) == 0
    assert (refit / name).read_bytes() == annotated
    assert esd_report.main([*argv, "--overwrite"]) == 0
    assert (refit / name).read_bytes() == (direct / name).read_bytes()
    # A model of the results computed again since (its eigenvalues newer): refit again.
    (refit / name).write_bytes(annotated)
    later = (refit / name).stat().st_mtime_ns + 10**9
    os.utime(plain / name.replace(".csv", ".eigs.npz"), ns=(later, later))
    assert esd_report.main(argv) == 0
    assert (refit / name).read_bytes() == (direct / name).read_bytes()
    # --overwrite with a metric that fails: the model is skipped, and its old refit (other
    # options) does not stay to pass for this refit's.
    assert esd_report.main(["refit", str(plain), "--output_dir", str(refit), "--overwrite",
                            "--metric", f"{metric_file}:broken"]) == esd_report.EXIT_SOME_SKIPPED
    assert not (refit / name).exists()
    assert not (refit / name.replace(".csv", ".eigs.npz")).exists()


def test_load_results_and_summary_carry_custom_columns(checkpoint, metric_file, tmp_path):
    root, _ = checkpoint
    assert worker(root, tmp_path, "--metric", f"{metric_file}:spectrum") == 0
    layers = load_results(tmp_path)
    assert list(layers.columns[-2:]) == ["lambda_max", "lambda_sum"]
    assert layers["lambda_max"].dtype == np.float64
    summary = load_results(tmp_path, summary=True)
    assert summary["lambda_max_mean"].iat[0] == pytest.approx(layers["lambda_max"].mean())


def write_list(path: Path, *models: Path) -> Path:
    path.write_text("model_id,base_model_relation,source_model\n"
                    + "".join(f"{m},,\n" for m in models))
    return path


def test_runner_adds_a_metric_from_saved_eigenvalues_without_loading(checkpoint, metric_file,
                                                                     tmp_path):
    root, _ = checkpoint
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes((root / "model.safetensors").read_bytes())
    models, out = write_list(tmp_path / "models.csv", model), tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out, "--save_eigs").returncode == 0
    (model / "model.safetensors").unlink()  # loading the model again would fail
    spec = f"{metric_file}:spectrum"
    proc = cli("--model_list", models, "--output_dir", out, "--metric", spec)
    assert proc.returncode == 2 and "metrics" in proc.stderr and "--overwrite" in proc.stderr
    proc = cli("--model_list", models, "--output_dir", out, "--metric", spec, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    (csv,) = out.glob("*.csv")
    frame = pd.read_csv(csv)
    assert "lambda_max" in frame.columns and frame["lambda_max"].notna().any()
    assert "from its saved eigenvalues" in proc.stderr
    # The run's own accounts count the model as done by it, not as found done before.
    assert "1 computed from saved eigenvalues, 0 already done" in proc.stderr, proc.stderr
    assert "finished: done 1, skipped 0, failed 0" in proc.stderr, proc.stderr


def annotated(checkpoint, tmp_path: Path) -> tuple[Path, Path, Path, pd.DataFrame]:
    """A run of the checkpoint, and its result read with pandas plus a user's column
    ``my_note``, not yet saved: (the list, the output directory, the CSV, the frame)."""
    root, _ = checkpoint
    models, out = write_list(tmp_path / "models.csv", root), tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out).returncode == 0
    (csv,) = out.glob("*.csv")
    frame = pd.read_csv(csv, keep_default_na=False)
    frame["my_note"] = "checked"
    return models, out, csv, frame


def test_a_users_columns_keep_the_result_done(checkpoint, tmp_path):
    models, out, csv, frame = annotated(checkpoint, tmp_path)
    frame.to_csv(csv, index=False)
    before = csv.read_bytes()
    proc = cli("--model_list", models, "--output_dir", out)
    assert proc.returncode == 0 and "0 to run, 1 already done" in proc.stderr, proc.stderr
    assert csv.read_bytes() == before
    assert (load_results(out)["my_note"] == "checked").all()


def test_a_run_without_save_eigs_keeps_saved_eigenvalues(checkpoint, tmp_path):
    root, _ = checkpoint
    assert worker(root, tmp_path, "--save_eigs") == 0
    (eigs,) = tmp_path.glob("*.eigs.npz")
    saved = eigs.read_bytes()
    assert worker(root, tmp_path) == 0
    assert eigs.read_bytes() == saved


def test_the_report_carries_custom_columns(checkpoint, metric_file, tmp_path):
    root, _ = checkpoint
    assert worker(root, tmp_path, "--metric", f"{metric_file}:spectrum") == 0
    assert esd_report.main(["report", str(tmp_path), "--jobs", "1"]) == esd_report.EXIT_OK
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    expected = load_results(tmp_path)["lambda_sum"].mean()
    assert summary["lambda_sum_mean"].iat[0] == pytest.approx(expected)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "lambda_<wbr>sum_<wbr>mean" in page


def test_a_metric_that_raises_on_saved_eigenvalues_fails_each_model_not_the_run(
        checkpoint, metric_file, tmp_path):
    root, _ = checkpoint
    models, out = write_list(tmp_path / "models.csv", root), tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out, "--save_eigs").returncode == 0
    (eigs,) = out.glob("*.eigs.npz")
    saved = eigs.read_bytes()
    proc = cli("--model_list", models, "--output_dir", out, "--metric",
               f"{metric_file}:broken", "--overwrite")
    assert proc.returncode == 1, proc.stderr  # a model failed; the run went on
    (line,) = (out / "failed_models.txt").read_text().splitlines()
    assert line.startswith(f"{root}\t") and "metric my_metrics.py:broken" in line \
        and "ValueError: boom" in line, line
    assert eigs.read_bytes() == saved  # eigenvalues do not depend on metrics: kept


def test_an_edited_metric_file_makes_its_results_not_done(checkpoint, tmp_path):
    """The recorded options tell results of the edited file from the old ones: a resume is
    refused, and --overwrite recomputes them from the saved eigenvalues."""
    root, tensors = checkpoint
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes((root / "model.safetensors").read_bytes())
    models, out = write_list(tmp_path / "models.csv", model), tmp_path / "out"
    metric = tmp_path / "edited.py"
    metric.write_text("def top(evals):\n    return {'top': float(evals[-1])}\n")
    assert cli("--model_list", models, "--output_dir", out, "--save_eigs",
               "--metric", f"{metric}:top").returncode == 0
    (model / "model.safetensors").unlink()  # loading the model again would fail
    metric.write_text("def top(evals):\n    return {'top': float(evals[-2])}\n")
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs",
               "--metric", f"{metric}:top")
    assert proc.returncode == 2 and "edited.py:top@" in proc.stderr \
        and "--overwrite" in proc.stderr, proc.stderr
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs",
               "--metric", f"{metric}:top", "--overwrite")
    assert proc.returncode == 0 and "from its saved eigenvalues" in proc.stderr, proc.stderr
    (csv,) = out.glob("*.csv")
    frame = pd.read_csv(csv).set_index("longname")
    name = "model.layers.0.mlp.down_proj"
    w = tensors[f"{name}.weight"].double()
    second = float(torch.linalg.svdvals(w)[1] ** 2)  # the edited metric's number
    assert frame.loc[name, "top"] == pytest.approx(second, rel=REL_TOL)


def test_two_lambdas_or_closures_of_one_name_are_two_metrics():
    from esd_experiment import analyze

    net = random_net(1)

    def kth(k):
        def largest(evals):
            return {f"top{k}": evals[-k]}
        return largest

    df = analyze(net, metrics=[lambda e: {"a": e[-1]}, lambda e: {"b": e[0]}, kth(1), kth(2)],
                 device="cpu")
    assert list(df.columns[-4:]) == ["a", "b", "top1", "top2"]
    for row, layer in zip(df.itertuples(), (net[0], net[2]), strict=True):
        ref = torch.linalg.svdvals(layer.weight.detach().double()) ** 2  # descending
        assert row.a == pytest.approx(float(ref[0]), rel=REL_TOL)
        assert row.b == pytest.approx(float(ref[-1]), rel=REL_TOL)
        assert row.top2 == pytest.approx(float(ref[1]), rel=REL_TOL)
    recorded = df["esd_options"].iat[0].partition(";metrics=")[2].split(",")
    assert len(set(recorded)) == 4, recorded
    same = kth(3)
    with pytest.raises(InputError, match="given twice"):  # one function twice: refused
        analyze(net, metrics=[same, same], device="cpu")


def test_a_resume_that_adds_save_eigs_keeps_an_annotated_result(checkpoint, tmp_path):
    """The result is current, only its eigenvalues are missing: they are computed and written
    beside it, and the user's file is left as it is."""
    models, out, csv, frame = annotated(checkpoint, tmp_path)
    frame.iloc[::-1].to_csv(csv, index=False, float_format="%.6g")  # the user's own way
    before = csv.read_bytes()
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs")
    assert proc.returncode == 0, proc.stderr
    assert csv.read_bytes() == before
    (eigs,) = out.glob("*.eigs.npz")
    ok = frame[frame["status"] == "ok"]
    with np.load(eigs) as saved:
        for row in ok.itertuples():
            assert saved[row.longname][-1] == pytest.approx(float(row.spectral_norm),
                                                            rel=REL_TOL)
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs")
    assert proc.returncode == 0 and "0 to run, 1 already done" in proc.stderr, proc.stderr


def test_a_model_failing_under_overwrite_keeps_its_saved_eigenvalues(checkpoint, tmp_path):
    """--overwrite without --save_eigs did not ask for eigenvalues: a model it fails loses its
    old result, never the eigenvalues saved earlier."""
    root, _ = checkpoint
    models, out = write_list(tmp_path / "models.csv", root), tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out, "--save_eigs").returncode == 0
    (eigs,) = out.glob("*.eigs.npz")
    saved = eigs.read_bytes()
    metric = tmp_path / "needs_w.py"
    metric.write_text("def frob(evals, W):\n    raise ValueError('not yet')\n")
    proc = cli("--model_list", models, "--output_dir", out, "--overwrite",
               "--metric", f"{metric}:frob")
    assert proc.returncode == 1 and "not yet" in proc.stderr, proc.stderr
    assert not list(out.glob("*.csv"))  # the old result is not this run's: removed
    assert eigs.read_bytes() == saved


@pytest.mark.parametrize("resave", ["index", "excel", "inserted", "quoted", "reordered"])
def test_a_result_resaved_with_pandas_stays_done_and_reads_back(checkpoint, tmp_path, resave):
    """A user's result saved again by pandas: ``df.to_csv(path)`` writes the index as a
    first, unnamed column; ``encoding="utf-8-sig"`` (for Excel) a byte-order mark; and a
    column may be inserted among the result's own, the result's own moved (the columns a
    user looks at first, with the index). The annotated result is still the
    model's result, done, read by load_results, never rewritten."""
    models, out, csv, frame = annotated(checkpoint, tmp_path)
    original = load_results(out)  # before the user's column is saved
    if resave == "index":
        frame.to_csv(csv)  # pandas' default: the index too
    elif resave == "excel":
        frame.to_csv(csv, index=False, encoding="utf-8-sig")
    elif resave == "inserted":
        frame.insert(5, "my_label", "keep me")
        frame.drop(columns="my_note").assign(my_note="checked").to_csv(csv, index=False)
    elif resave == "quoted":  # a name with a comma, which pandas quotes, and the index
        frame.assign(**{"my, label": "keep me"}).to_csv(csv)
    else:
        first = ["longname", "alpha", "my_note"]
        frame[first + [c for c in frame.columns if c not in first]].to_csv(csv)
    before = csv.read_bytes()
    proc = cli("--model_list", models, "--output_dir", out)
    assert proc.returncode == 0 and "0 to run, 1 already done" in proc.stderr, proc.stderr
    assert csv.read_bytes() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file skipped
        layers = load_results(out)
    assert (layers["my_note"] == "checked").all()
    added = {"inserted": ["my_label", "my_note"],
             "quoted": ["my_note", "my, label"]}.get(resave, ["my_note"])
    assert list(layers.columns[-len(added):]) == added  # after the result's own, as written
    pd.testing.assert_frame_equal(layers.drop(columns=added), original)


def test_a_column_named_as_a_summary_mean_source_breaks_no_summary(tmp_path):
    """A user's column ``delta_alpha`` would give ``delta_alpha_mean``, the summary's own
    column: the summary keeps its own and says it left the user's out; a metric may not
    return that column."""
    from result_fixtures import write_model

    from esd_experiment.estimator.metrics import load_metrics, metric_columns

    paths = write_model(tmp_path, "org/base", llama_like(0, blocks=1))
    frame = pd.read_csv(paths.csv, keep_default_na=False)
    frame["delta_alpha"] = 1.0
    frame.to_csv(paths.csv, index=False)
    with pytest.warns(UserWarning, match="delta_alpha"):
        summary = load_results(tmp_path, summary=True)
    assert summary["delta_alpha_mean"].isna().all()  # the model has no source: NaN, not 1.0
    (metric,) = load_metrics([lambda evals: {"delta_alpha": 1.0}])
    with pytest.raises(InputError, match="delta_alpha"):
        metric_columns([metric], np.arange(12.0), lambda: None, RESULT_COLUMNS, 12, 12)



@pytest.mark.parametrize("edit", ["sorted", "cut", "cut_last"])
def test_rows_from_saved_eigenvalues_are_the_models_whatever_a_user_did_to_its_csv(
        checkpoint, metric_file, tmp_path, edit):
    """A result a user sorted is rebuilt from its saved eigenvalues in depth order; one whose
    rows a user cut cannot be (the cut rows' eigenvalues are saved, their shapes are not; the
    last rows' layers may have no eigenvalues at all, a classifier head too small to have a
    spectrum): the model is run again. Either way the result is the one a fresh run writes."""
    from result_fixtures import HIDDEN, llama_like
    from safetensors.torch import save_file

    root, _ = checkpoint
    if edit == "cut_last":  # a sequence classifier: its last row, the 2-label head, too_small
        root = tmp_path / "classifier"
        root.mkdir()
        tensors = {**llama_like(5, blocks=1), "score.weight": torch.ones(2, HIDDEN)}
        save_file({k: v.contiguous() for k, v in tensors.items() if k != "lm_head.weight"},
                  str(root / "model.safetensors"))
    models, out = write_list(tmp_path / "models.csv", root), tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out, "--save_eigs").returncode == 0
    (csv,) = out.glob("*.csv")
    frame = pd.read_csv(csv, keep_default_na=False)
    fresh = load_results(out)
    if edit == "cut_last":
        assert list(frame["status"].iloc[-2:]) == ["too_small", "too_small"]
    frame = {"sorted": frame.sort_values("alpha"), "cut": frame.iloc[2:],
             "cut_last": frame.iloc[:-2]}[edit]
    frame.to_csv(csv, index=False)
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs", "--overwrite",
               "--metric", f"{metric_file}:spectrum")
    assert proc.returncode == 0, proc.stderr
    assert ("from its saved eigenvalues" in proc.stderr) == (edit == "sorted"), proc.stderr
    rebuilt = load_results(out)
    assert rebuilt["lambda_max"].notna().any()
    columns = [c for c in RESULT_COLUMNS if c != "esd_options"]
    pd.testing.assert_frame_equal(rebuilt[columns], fresh[columns])


def test_a_metric_failing_on_saved_eigenvalues_under_overwrite_drops_the_old_result(
        checkpoint, metric_file, tmp_path):
    """--overwrite with a metric that raises on the saved eigenvalues: the model fails, and its
    old result (other metrics) does not pass for this run's; its eigenvalues stay."""
    root, _ = checkpoint
    models, out = write_list(tmp_path / "models.csv", root), tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out, "--save_eigs").returncode == 0
    (eigs,) = out.glob("*.eigs.npz")
    saved = eigs.read_bytes()
    (csv,) = out.glob("*.csv")
    kept = out / "delta" / csv.name  # a --delta run's, which a run without --delta leaves
    kept.parent.mkdir()
    kept.write_bytes(csv.read_bytes())
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs", "--overwrite",
               "--metric", f"{metric_file}:broken")
    assert proc.returncode == 1 and "FAILED on its saved eigenvalues" in proc.stderr, proc.stderr
    assert not list(out.glob("*.csv"))
    assert eigs.read_bytes() == saved and kept.is_file()
