"""Custom metrics as users hand them over: a package of the run's directory on every backend,
column names and numbers a result cannot hold, a file edited in a notebook session, a metric
that exits or changes W."""

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
from test_custom_metrics import (
    CLI_TIMEOUT_S,
    REL_TOL,
    ROOT,
    RUNNER,
    cli,
    oracle,
    worker,
    write_list,
)

from esd_experiment.core.errors import InputError
from esd_experiment.core.results import RESULT_COLUMNS, load_results
from esd_experiment.report import cli as esd_report
from esd_experiment.run import worker as esd_worker
from tests.test_backend_slurm import slurm  # noqa: F401  (the cluster fixture)


def package_in(folder: Path) -> str:
    """A package ``usermetrics`` in ``folder``, importable only from there; its spec."""
    (folder / "usermetrics").mkdir()
    (folder / "usermetrics" / "__init__.py").write_text("")
    (folder / "usermetrics" / "spectral.py").write_text(
        "def top(evals):\n    return {'top': float(evals[-1])}\n")
    return "usermetrics.spectral:top"


# Ray's tasks run the same task commands, with the same environment, as Slurm's (a local Ray
# start costs CI about 17 s more).
@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_a_package_metric_of_the_runs_directory_runs_on_its_workers(checkpoint, tmp_path,
                                                                    backend, request):
    """``--metric package.module:FUNCTION`` with the package in the directory the run starts
    in (as ``python -m`` finds it): the runner and every worker, wherever it runs, import it
    (on Slurm, a task that starts in another directory)."""
    flags = ["--backend", backend]
    if backend == "slurm":
        request.getfixturevalue("slurm")
        flags += ["--slurm_cpus_per_task", "1", "--slurm_time", "10",
                  "--slurm_poll_interval", "0.5", "--slurm_setup", "cd /"]
    root, tensors = checkpoint
    spec = package_in(tmp_path)
    models, out = write_list(tmp_path / "models.csv", root), tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(RUNNER), "--model_list", str(models),
                           "--output_dir", str(out), "--metric", spec, *flags,
                           "--device", "cpu", "--retry_backoff", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = load_results(out).set_index("longname")
    digest = hashlib.sha256((tmp_path / "usermetrics" / "spectral.py").read_bytes())
    assert frame["esd_options"].iat[0].endswith(
        f";metrics=usermetrics.spectral:top@{digest.hexdigest()[:12]}")
    name = "model.layers.0.mlp.down_proj"
    top, _ = oracle(tensors[f"{name}.weight"], "linear")
    assert frame.loc[name, "top"] == pytest.approx(top, rel=REL_TOL)


def test_a_column_name_a_spreadsheet_would_run_is_never_written_as_a_formula(checkpoint,
                                                                            tmp_path):
    """A user's column ``=1+1`` in a result: summary.csv names its mean inertly (as text
    cells are, with a leading quote), and a metric may not return such a column."""
    import csv as csvlib

    from esd_experiment.core.results import FORMULA_START
    from esd_experiment.estimator.metrics import load_metrics, metric_columns

    root, _ = checkpoint
    assert worker(root, tmp_path) == 0
    (result,) = tmp_path.glob("*.csv")
    frame = pd.read_csv(result, keep_default_na=False)
    frame["=1+1"] = 2.0
    frame["@SUM(1)"] = 3.0
    frame.to_csv(result, index=False)
    assert esd_report.main(["report", str(tmp_path), "--jobs", "1"]) == esd_report.EXIT_OK
    with open(tmp_path / "report" / "summary.csv", newline="") as fh:
        header = next(csvlib.reader(fh))
    assert not [c for c in header if c.startswith(FORMULA_START[:4])], header
    assert {"'=1+1_mean", "'@SUM(1)_mean"} <= set(header)
    for name in ("=1+1", "+A1", "@SUM(1)", "-2+3"):
        (metric,) = load_metrics([lambda evals, name=name: {name: 1.0}])
        with pytest.raises(InputError, match="begin"):
            metric_columns([metric], np.arange(12.0), lambda: None, RESULT_COLUMNS, 12, 12)


def test_a_metric_of_many_columns_loads_without_a_warning(checkpoint, tmp_path):
    """Hundreds of columns (a metric per eigenvalue quantile, say) are written, read back and
    summarised like a few, without pandas' warnings about the frame it builds."""
    root, _ = checkpoint
    metric = tmp_path / "quantiles.py"
    metric.write_text("import numpy as np\n\ndef quantiles(evals):\n"
                      "    return {f'q{i:03d}': float(np.quantile(evals, i / 299))"
                      " for i in range(300)}\n")
    out = tmp_path / "out"
    assert worker(root, out, "--metric", f"{metric}:quantiles") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers = load_results(out)
        summary = load_results(out, summary=True)
    assert list(layers.columns[len(RESULT_COLUMNS):]) == [f"q{i:03d}" for i in range(300)]
    fitted = layers[layers["status"] == "ok"]
    assert (fitted["q299"] == fitted["spectral_norm"]).all()
    assert summary["q299_mean"].iat[0] == pytest.approx(layers["q299"].mean())


def test_analyze_reads_an_edited_metric_file_again(tmp_path):
    """The research loop in one Python session (a notebook): edit the metric's file, call
    analyze() again, get the edited metric's numbers, recorded under the new digest."""
    from esd_experiment import analyze

    gen = torch.Generator().manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(30, 20))
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(20, 30, generator=gen))
    metric = tmp_path / "loop.py"
    ref = torch.linalg.svdvals(net[0].weight.detach().double()) ** 2  # descending
    for k in (1, 2):
        metric.write_text(f"def kth(evals):\n    return {{'kth': float(evals[-{k}])}}\n")
        df = analyze(net, metrics=[f"{metric}:kth"], device="cpu")
        assert df["kth"].iat[0] == pytest.approx(float(ref[k - 1]), rel=REL_TOL), k
        digest = hashlib.sha256(metric.read_bytes()).hexdigest()[:12]
        assert df["esd_options"].iat[0].endswith(f"loop.py:kth@{digest}")


def test_a_metric_may_not_name_the_readers_own_column(checkpoint, tmp_path):
    """``_file`` is the column load_results tells files apart by: a result holding it could
    not be read, so a metric returning it fails its model instead of writing one."""
    root, _ = checkpoint
    metric = tmp_path / "clash.py"
    metric.write_text("def f(evals):\n    return {'_file': 1.0}\n")
    out = tmp_path / "out"
    assert worker(root, out, "--metric", f"{metric}:f") == esd_worker.EXIT_FAILED
    assert not list(out.glob("*.csv"))
    (failure,) = (out / "logs").glob("*.failure.json")
    assert "'_file'" in json.loads(failure.read_text())["message"]


def test_a_number_too_large_for_a_float_fails_naming_the_metric():
    """A Python int beyond float64 (a count gone wrong): the model's one line names the
    metric and the column, as for any other value that is not a number of the CSV."""
    from esd_experiment.estimator.metrics import MetricError, load_metrics, metric_columns

    for power in (400, 5000):  # 5000 digits: more than Python writes an int in
        (metric,) = load_metrics([lambda evals, power=power: {"count": 10 ** power}])
        with pytest.raises(MetricError, match=r"metric .*lambda.*'count'"):
            metric_columns([metric], np.arange(12.0), lambda: None, RESULT_COLUMNS, 12, 12)


# A worker that ends on its own does so within seconds here; one that hangs is stopped.
HANG_TIMEOUT_S = 120


def test_a_metric_calling_sys_exit_fails_its_model_and_the_worker_ends(checkpoint, tmp_path):
    """``sys.exit()`` (or ``exit()``) in a metric is the metric's failure: the model fails with
    the line naming it, and the worker ends; it hung, waiting for the layer forever."""
    root, _ = checkpoint
    metric = tmp_path / "quits.py"
    metric.write_text("import sys\n\ndef f(evals):\n    sys.exit(3)\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "esd_worker.py"), "--model_id", str(root),
                           "--output_dir", str(out), "--device", "cpu",
                           "--metric", f"{metric}:f"],
                          capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == esd_worker.EXIT_FAILED, proc.stderr[-2000:]
    (failure,) = (out / "logs").glob("*.failure.json")
    message = json.loads(failure.read_text())["message"]
    assert "metric quits.py:f" in message and "SystemExit" in message, message


def test_a_metric_file_that_exits_when_loaded_is_refused_at_startup(tmp_path):
    """A script's unguarded ``sys.exit(main())`` runs when the file is loaded: the run is
    refused with one line (exit 2); it ended at once with that exit code, saying nothing."""
    metric = tmp_path / "script.py"
    metric.write_text("import sys\n\ndef f(evals):\n    return {}\n\nsys.exit(0)\n")
    proc = cli("--model_list", tmp_path / "none.csv", "--output_dir", tmp_path / "out",
               "--metric", f"{metric}:f")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--metric" in lines[0] and "SystemExit" in lines[0], proc.stderr


def test_w_is_read_only_so_a_metric_cannot_change_the_model_or_the_next_metric():
    """A float64 model's weights reach a metric without a copy: a metric centring ``W`` in
    place changed the caller's model and the ``W`` the next metric saw. It now fails, naming
    itself; one that copies ``W`` first is free to change its copy."""
    from esd_experiment import analyze
    from esd_experiment.estimator.metrics import MetricError

    gen = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(30, 20)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(20, 30, generator=gen, dtype=torch.float64) + 1.0)
    before = net[0].weight.detach().clone()

    def centre_in_place(evals, W):
        W -= W.mean()
        return {"centred_mean": float(W.mean())}

    def centre_a_copy(evals, W):
        W = W.copy()
        W -= W.mean()
        return {"centred_frob": float((W ** 2).sum())}

    def frob(evals, W):
        return {"frob": float((W ** 2).sum())}

    with pytest.raises(MetricError, match="centre_in_place.*read-only"):
        analyze(net, metrics=[centre_in_place, frob], device="cpu")
    assert torch.equal(net[0].weight.detach(), before)
    df = analyze(net, metrics=[centre_a_copy, frob], device="cpu")
    w = before.numpy()
    assert df["frob"].iat[0] == pytest.approx(float((w ** 2).sum()), rel=REL_TOL)
    assert df["centred_frob"].iat[0] == pytest.approx(float(((w - w.mean()) ** 2).sum()),
                                                      rel=REL_TOL)
    assert torch.equal(net[0].weight.detach(), before)
