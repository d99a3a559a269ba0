"""Which version of a metric a result records and a run computes with: the file that defines
the function, held to the version the run started with; and the files a run keeps."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esd_experiment.core.delta_paths import delta_paths
from esd_experiment.core.errors import InputError
from esd_experiment.core.paths import ModelPaths
from esd_experiment.estimator.metrics import load_metric
from esd_experiment.run.model_list import JobSpec, ListEntry
from esd_experiment.run.state import FailureLog
from gputracker import JobResult

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "run_esd_experiment.py"
CLI_TIMEOUT_S = 180


def cli(*argv, env=None):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, argv), "--device", "cpu",
                           "--retry_backoff", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          env={**os.environ, **(env or {})})


def digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.read_bytes())
    return sha.hexdigest()[:12]


def models(checkpoint, tmp_path: Path, count: int) -> Path:
    """A model list of ``count`` copies of the checkpoint, each in its own directory."""
    root, _ = checkpoint
    rows = []
    for i in range(count):
        model = tmp_path / f"m{i}"
        model.mkdir()
        (model / "model.safetensors").write_bytes((root / "model.safetensors").read_bytes())
        rows.append(f"{model},,\n")
    path = tmp_path / "models.csv"
    path.write_text("model_id,base_model_relation,source_model\n" + "".join(rows))
    return path


# ---------------------------------------------------------------------------------------------
# Saved eigenvalues of a delta stay unless the run saves its own.

@pytest.mark.parametrize("save_eigs", [False, True])
def test_overwrite_delta_keeps_the_deltas_eigenvalues_unless_it_saves_its_own(tmp_path,
                                                                              save_eigs):
    from esd_experiment.run import cli as runner_mod
    from tests.test_runner import FakeClockDispatcher, fake_result, make_config

    config = make_config(tmp_path, overwrite=True)
    config.args.delta, config.args.overwrite, config.args.save_eigs = True, True, save_eigs
    paths = ModelPaths.for_model(tmp_path, "org/ft", log_dir=tmp_path / "logs")
    delta = delta_paths(paths)
    delta.csv.parent.mkdir()
    fake_result(delta.csv)
    delta.eigs.write_bytes(b"saved eigenvalues")
    runner = runner_mod.Runner(config, FakeClockDispatcher(), FailureLog(tmp_path),
                               runner_mod.Progress(1, enabled=False))
    job = runner.job(JobSpec((ListEntry("org/ft", "", "org/base"),)))
    runner.on_finish(JobResult(job=job, returncode=0, gpus=(), threads=2, pid=1, start=0.0,
                               end=1.0, started_at=time.time(), log_path=paths.log))
    assert not delta.csv.exists()  # the model failed: its old delta is no result of this run
    assert delta.eigs.exists() != save_eigs  # gone only when this run saves its own


# ---------------------------------------------------------------------------------------------
# The digest a metric is recorded by: that of the file that defines the function.

def recorded_name(spec: str, cwd: Path) -> str:
    """The name ``spec`` is recorded by, loaded in a fresh process (a module is imported
    once per process)."""
    code = ("import sys; from esd_experiment.estimator.metrics import load_metric; "
            "print(load_metric(sys.argv[1]).name)")
    proc = subprocess.run([sys.executable, "-c", code, spec], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_reexported_metric_records_the_file_that_defines_it(tmp_path):
    package = tmp_path / "mymetrics"
    package.mkdir()
    init, core = package / "__init__.py", package / "core.py"
    init.write_text("from .core import top\n")
    core.write_text("def top(evals):\n    return {'top': float(evals[-1])}\n")
    first = recorded_name("mymetrics:top", tmp_path)
    assert first == f"mymetrics:top@{digest(init, core)}"
    # Named by the module that defines it, the digest is that file's alone (as before).
    assert recorded_name("mymetrics.core:top", tmp_path) == f"mymetrics.core:top@{digest(core)}"
    core.write_text("def top(evals):\n    return {'top': 1000 * float(evals[-1])}\n")
    assert recorded_name("mymetrics:top", tmp_path) != first


def test_a_metric_file_that_imports_its_function_records_the_defining_file(tmp_path):
    (tmp_path / "helpers.py").write_text("def top(evals):\n    return {'top': evals[-1]}\n")
    shim = tmp_path / "shim.py"
    shim.write_text("from helpers import top\n")
    own = tmp_path / "own.py"
    own.write_text("def top(evals):\n    return {'top': evals[-1]}\n")
    assert recorded_name(f"{own}:top", tmp_path) == f"own.py:top@{digest(own)}"  # as before
    first = recorded_name(f"{shim}:top", tmp_path)
    assert first == f"shim.py:top@{digest(shim, tmp_path / 'helpers.py')}"
    (tmp_path / "helpers.py").write_text("def top(evals):\n    return {'top': evals[-2]}\n")
    assert recorded_name(f"{shim}:top", tmp_path) != first
    # Not run from its directory, a FILE.py does not import the modules beside it (two files'
    # helpers of one name would be one module, its digest not theirs): the error says how.
    with pytest.raises(InputError, match=r"No module named 'helpers'.*package\.module:FUNCTION"):
        load_metric(f"{shim}:top")


# ---------------------------------------------------------------------------------------------
# A run holds to the metric versions it started with.

def test_a_pinned_metric_spec_refuses_another_version_of_its_file(tmp_path):
    from esd_experiment.estimator.metrics import MetricChanged, load_metric

    path = tmp_path / "pinned.py"
    path.write_text("def f(evals):\n    return {'x': evals[-1]}\n")
    now = digest(path)
    assert load_metric(f"{path}:f@{now}").name == f"pinned.py:f@{now}"
    with pytest.raises(MetricChanged, match=r"metric file pinned\.py changed during the run "
                                            rf"\(digest 0123456789ab at the start, {now} now\)"):
        load_metric(f"{path}:f@0123456789ab")


def test_the_runner_pins_the_metric_versions_it_started_with(tmp_path):
    from tests.test_runner import make_config

    path = tmp_path / "slowm.py"
    path.write_text("def slow(evals):\n    return {'s': evals[-1]}\n")
    start = digest(path)
    config = make_config(tmp_path)
    config.args.metric = [str(path) + ":slow"]
    config = make_config(tmp_path, args=config.args)
    key = config.options_key
    path.write_text("def slow(evals):\n    return {'s': evals[-2]}\n")
    assert config.options_key == key and key.endswith(f"slowm.py:slow@{start}")
    assert f"{path}:slow@{start}" in config.worker_args.metric


SELF_EDITING = '''
import pathlib

def top(evals):
    """Edits its own file as it first runs: the next worker finds another version."""
    path = pathlib.Path(__file__)
    marker = "# edited " + "while the run went on"
    if marker not in path.read_text():
        with open(path, "a") as fh:
            fh.write(marker + "\\n")
    return {"top": float(evals[-1])}
'''


@pytest.mark.parametrize("per_model", ["0", "1"])
def test_a_metric_file_edited_during_the_run_fails_later_models_with_the_true_cause(
        checkpoint, tmp_path, per_model):
    model_list = models(checkpoint, tmp_path, 2)
    metric, out = tmp_path / "selfedit.py", tmp_path / "out"
    metric.write_text(SELF_EDITING)
    start = digest(metric)
    proc = cli("--model_list", model_list, "--output_dir", out, "--metric", f"{metric}:top",
               env={"ESD_WORKER_PER_MODEL": per_model})
    assert proc.returncode == 1, proc.stderr  # a model failed: no internal error
    now = digest(metric)
    assert now != start
    (csv,) = out.glob("*.csv")  # the first model's, computed with the version started with
    frame = pd.read_csv(csv)
    assert (frame["model_id"] == str(tmp_path / "m0")).all()
    assert frame["esd_options"].str.endswith(f";metrics=selfedit.py:top@{start}").all()
    (line,) = (out / "failed_models.txt").read_text().splitlines()
    model, cause = line.split("\t")
    assert model == str(tmp_path / "m1"), line
    assert cause == (f"MetricChanged: metric file selfedit.py changed during the run (digest "
                     f"{start} at the start, {now} now): rerun with --overwrite to compute every "
                     "model with the new version"), cause
    assert json.loads((out / ".esd_options.json").read_text())["metrics"] == [
        f"selfedit.py:top@{start}"]


# ---------------------------------------------------------------------------------------------
# A directory without results takes a run's new options.

def test_a_fixed_metric_reruns_where_every_model_failed(checkpoint, tmp_path):
    model_list = models(checkpoint, tmp_path, 1)
    metric, out = tmp_path / "fixme.py", tmp_path / "out"
    metric.write_text("def m(evals):\n    raise ZeroDivisionError('typo')\n")
    assert cli("--model_list", model_list, "--output_dir", out, "--metric",
               f"{metric}:m").returncode == 1
    assert not list(out.glob("*.csv"))
    metric.write_text("def m(evals):\n    return {'r': evals[-1] / evals[-3]}\n")
    proc = cli("--model_list", model_list, "--output_dir", out, "--metric", f"{metric}:m")
    assert proc.returncode == 0, proc.stderr
    (csv,) = out.glob("*.csv")
    assert np.isfinite(pd.read_csv(csv)["r"]).any()
    recorded = json.loads((out / ".esd_options.json").read_text())
    assert recorded["metrics"] == [f"fixme.py:m@{digest(metric)}"]
    assert not (out / "failed_models.txt").exists() \
        or not (out / "failed_models.txt").read_text().strip()


def test_what_counts_as_a_result_for_the_options_check(tmp_path):
    from esd_experiment.run.state import holds_results

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "m.log").write_text("log")
    (tmp_path / "failed_models.txt").write_text("m\tboom\n")
    (tmp_path / ".esd_options.json").write_text("{}")
    (tmp_path / "preflight").mkdir()
    (tmp_path / "preflight" / "preflight.csv").write_text("model_id\n")
    (tmp_path / "preflight.csv").write_text("model_id\n")  # where older versions wrote it
    assert not holds_results(tmp_path)
    for found in ("org--m.csv", "org--m.eigs.npz", "delta/org--m.csv", "delta/org--m.eigs.npz",
                  "slurm/submissions.json"):  # a detached Slurm run's jobs may still write
        path = tmp_path / found
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
        assert holds_results(tmp_path), found
        path.unlink()


def test_other_options_are_still_refused_where_a_delta_result_stands(checkpoint, tmp_path):
    model_list = models(checkpoint, tmp_path, 1)
    out = tmp_path / "out"
    assert cli("--model_list", model_list, "--output_dir", out).returncode == 0
    (csv,) = out.glob("*.csv")
    (out / "delta").mkdir()
    csv.rename(out / "delta" / csv.name)  # the only result left is a delta's
    proc = cli("--model_list", model_list, "--output_dir", out, "--fix_fingers", "DKS")
    assert proc.returncode == 2 and "other estimator options" in proc.stderr, proc.stderr
