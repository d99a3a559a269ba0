"""What a user meets at the edges: bad input gets one line, local paths as written, a results
directory that a user's own scripts and a shared reader can use safely, reports that never
compare results computed with other options."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esd_experiment.core import paths
from esd_experiment.core.paths import ModelPaths
from esd_experiment.core.results import load_results, read_results, summarize
from esd_experiment.estimator.options import ESDConfig
from esd_experiment.report import cli as esd_report
from esd_experiment.run import cli as run_esd_experiment
from esd_experiment.run import worker as esd_worker
from esd_experiment.run.model_list import ListEntry, group_jobs
from esd_experiment.run.state import read_failure_cause
from tests.result_fixtures import (
    fine_tuned,
    good_results,
    llama_like,
    write_model,
)

ROOT = Path(__file__).resolve().parents[1]
# The seed's batch analysis script, as a user keeps it beside their results (unchanged).
BATCH_SCRIPT = '''
import pandas as pd
from pathlib import Path

results_dir = Path("results/")
all_results = []

for csv_file in results_dir.glob("*.csv"):
    df = pd.read_csv(csv_file)
    model_stats = {
        "model_id": df["model_id"].iloc[0],
        "mean_alpha": df["alpha"].mean(),
        "median_alpha": df["alpha"].median(),
        "num_layers": len(df),
    }
    all_results.append(model_stats)

summary = pd.DataFrame(all_results)
summary.to_csv(results_dir / "summary.csv", index=False)
print(summary)
'''
CLI_TIMEOUT_S = 180


def runner(*argv) -> int:
    return run_esd_experiment.main([*map(str, argv), "--device", "cpu", "--no-progress"])


def report(*argv) -> int:
    return esd_report.main(["report", *map(str, argv), "--jobs", "1"])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_config(model_id):
    return None


# ---------------------------------------------------------------------------------------------
# 1. Bad input: one line, exit 2.

def test_list_cell_over_the_csv_field_limit_is_one_line(tmp_path, capsys):
    path = tmp_path / "list.csv"
    path.write_text("model_id\n" + "x" * (200 * 1024) + "\n")
    assert runner("--model_list", path, "--output_dir", tmp_path / "out", "--dry_run") == 2
    assert "longer than" in one_error_line(capsys)


def test_log_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("model_id\n./nowhere\n")
    (tmp_path / "afile").write_text("x")
    assert runner("--model_list", tmp_path / "list.csv", "--output_dir", tmp_path / "out",
                  "--log_dir", tmp_path / "afile") == 2
    assert "--log_dir" in one_error_line(capsys)


@pytest.mark.parametrize("dry_run", [(), ("--dry_run",)])
def test_output_dir_that_cannot_be_created_is_one_line(tmp_path, capsys, dry_run):
    (tmp_path / "list.csv").write_text("model_id\n./nowhere\n")
    assert runner("--model_list", tmp_path / "list.csv", "--output_dir", "/proc/esd-x",
                  *dry_run) == 2
    assert "/proc/esd-x" in one_error_line(capsys)


def test_dry_run_checks_the_flags_as_a_run_does(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("model_id\n./nowhere\n")
    assert runner("--model_list", tmp_path / "list.csv", "--output_dir", tmp_path / "out",
                  "--dry_run", "--limit", "-1") == 2
    assert "--limit" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return out, good_results(out)


@pytest.mark.parametrize("out", ["/proc/self", "/proc/self/esd-report"])
def test_report_out_that_cannot_be_written_is_one_line(good, capsys, out):
    assert report(good[0], "--out", out) == 2
    assert out in one_error_line(capsys)


def test_ok_rows_with_nan_alpha_show_as_missing(good, tmp_path):
    out = tmp_path / "r"
    write_model(out, "org/base", llama_like(0))
    paths = write_model(out, "org/nan", llama_like(1))
    frame = pd.read_csv(paths.csv, keep_default_na=False, dtype=str)
    frame["alpha"] = "nan"
    frame.to_csv(paths.csv, index=False)
    assert report(out) == 0
    summary = pd.read_csv(out / "report" / "summary.csv").set_index("model_id")
    assert math.isnan(summary.loc["org/nan", "alpha_mean"])
    assert summary.loc["org/nan", "fitted"] == 0


def test_names_with_dollar_signs_are_drawn_as_text(tmp_path):
    out = tmp_path / "r"
    tensors = {f"model.$^$.{k}": v for k, v in llama_like(0, blocks=1).items()}
    write_model(out, "./models/x$}$y", tensors)
    assert report(out) == 0
    assert "x$}$y" in (out / "report" / "index.html").read_text()


def _raise_stop_iteration():
    next(iter(()))


def test_unexpected_exception_is_an_internal_error_with_file_line_and_stage(tmp_path, capsys):
    paths = ModelPaths.for_model(tmp_path, "org/m")
    try:
        _raise_stop_iteration()
    except StopIteration as exc:
        error = exc
    run = esd_worker.ModelRun("org/m", paths, error=error, stage="analyse")
    assert esd_worker.report([run], "write") == esd_worker.EXIT_FAILED
    cause = read_failure_cause(paths.failure)
    assert cause.startswith("internal error"), cause
    assert "test_outputs.py:" in cause and "StopIteration" in cause
    assert json.loads(paths.failure.read_text())["stage"] == "analyse"
    assert "in stage analyse" in cause
    assert "Traceback" in capsys.readouterr().err  # the worker's stderr is the model's log


# ---------------------------------------------------------------------------------------------
# 2. Local paths.

def test_model_key_ignores_trailing_slashes_and_dot_segments():
    key = paths.model_key
    assert key("models/base/") == key("./models/base") == key("models/base")
    assert key("org/name") == "org/name"
    assert key("org/name@v1") == "org/name@v1"


def test_adapter_whose_source_has_a_trailing_slash_joins_its_listed_base(tmp_path):
    base, adapter = ListEntry("./models/base"), ListEntry("./ad", "lora", "models/base/")
    [job] = group_jobs([base, adapter], 8, no_config)
    assert job.entries == (base, adapter) and job.base == "./models/base"


def test_delta_alpha_mean_matches_a_source_written_with_a_trailing_slash(tmp_path):
    base = llama_like(0)
    write_model(tmp_path, "./models/base", base)
    write_model(tmp_path, "./models/tuned", fine_tuned(base, 1), source_model="./models/base/")
    summary = summarize(load_results(tmp_path)).set_index("model_id")
    assert not math.isnan(summary.loc["./models/tuned", "delta_alpha_mean"])


def test_missing_directory_under_an_existing_folder_says_so(tmp_path, monkeypatch):
    from esd_experiment.core.errors import ModelNotFoundError
    from esd_experiment.loader.opener import ModelRequest, open_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelNotFoundError, match="no such local directory"):
        open_model(ModelRequest("models/x"))


# ---------------------------------------------------------------------------------------------
# 3. Outputs a user's scripts read.

def test_seed_batch_script_runs_on_a_directory_after_dry_run_run_and_report(tmp_path):
    results = tmp_path / "results"
    write_model(results, "org/base", llama_like(0))
    (tmp_path / "list.csv").write_text("model_id\n./nowhere\n")
    assert runner("--model_list", tmp_path / "list.csv", "--output_dir", results,
                  "--dry_run") == 1
    assert report(results) == 0
    (tmp_path / "batch.py").write_text(BATCH_SCRIPT)
    proc = subprocess.run([sys.executable, "batch.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "org/base" in proc.stdout
    assert (results / "preflight" / "preflight.csv").is_file()


def test_old_top_level_preflight_is_still_left_out(good, tmp_path):
    out = tmp_path / "r"
    write_model(out, "org/base", llama_like(0))
    (out / "preflight.csv").write_text("model_id,revision,status\norg/a,,ok\n")
    assert read_results(out).skipped == {}


def test_requirements_name_matplotlib():
    names = [line.split(">=")[0].split("==")[0].strip()
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert "matplotlib" in names


# ---------------------------------------------------------------------------------------------
# 4. A shared results directory.

def test_links_out_of_the_directory_are_not_read_nor_echoed(tmp_path, capsys):
    secret = tmp_path / "token.csv"
    secret.write_text("hf_SECRETTOKEN0123456789\n")
    out = tmp_path / "r"
    write_model(out, "org/base", llama_like(0))
    (out / "stolen.csv").symlink_to(secret)
    (out / "inside.csv").write_text("hf_SECRETTOKEN0123456789\n")
    loaded = read_results(out)
    assert "outside" in loaded.skipped[out / "stolen.csv"]
    assert report(out) == 0
    page = (out / "report" / "index.html").read_text()
    assert "SECRETTOKEN" not in page and "stolen.csv" in page


def test_failed_models_link_out_of_the_directory_is_not_echoed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_SECRETTOKEN0123456789\tx\n")
    out = tmp_path / "r"
    write_model(out, "org/base", llama_like(0))
    (out / "failed_models.txt").symlink_to(secret)
    assert report(out) == 0
    assert "SECRETTOKEN" not in (out / "report" / "index.html").read_text()


def test_formula_like_names_are_written_inert_and_read_back_as_written(tmp_path):
    tensors = {f"=cmd|'/c calc'!A{i}.weight" if i == 0 else f"@x{i}.weight": t
               for i, t in enumerate(llama_like(0, blocks=1).values())}
    paths = write_model(tmp_path, "-org/base", tensors)
    cells = [line.split(",")[4] for line in paths.csv.read_text().splitlines()[1:]]
    assert all(cell.startswith("'") for cell in cells if cell[1:2] in "=+-@"), cells
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)
    layers = load_results(tmp_path)
    names = set(layers["longname"])
    assert "=cmd|'/c calc'!A0" in names and names <= {n.removesuffix(".weight") for n in tensors}
    assert set(layers["model_id"]) == {"-org/base"}
    raw = pd.read_csv(paths.csv)
    assert (raw["alpha"].dropna() > 0).all() and raw["alpha"].dtype == float


# ---------------------------------------------------------------------------------------------
# 5. Options never mix silently.

def test_delta_and_pairs_only_between_equal_options(tmp_path):
    base = llama_like(0)
    write_model(tmp_path, "org/base", base, config=ESDConfig(fix_fingers="DKS"))
    write_model(tmp_path, "org/tuned", fine_tuned(base, 1), source_model="org/base")
    with pytest.warns(UserWarning, match="mixes results computed with 2 different"):
        summary = summarize(load_results(tmp_path)).set_index("model_id")
    assert math.isnan(summary.loc["org/tuned", "delta_alpha_mean"])
    assert summary.loc["org/base", "esd_options"].startswith("fix_fingers=DKS")
    assert report(tmp_path) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "mixes results computed with different estimator options" in page
    assert "fix_fingers=DKS" in page and "fix_fingers=xmin_mid" in page
    assert "pair-0" not in page  # no fine-tune drawn against a base fitted differently
