"""The documentation's promises, checked against the tool, so the two cannot drift apart."""

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from result_fixtures import llama_like
from safetensors.torch import save_file

from esd_experiment import analyze
from esd_experiment.report import cli as report_cli
from esd_experiment.run import cli as run_cli
from esd_experiment.run import worker

ROOT = Path(__file__).resolve().parents[1]
FLAG_DOCS = ("docs/flags.md", "docs/clusters.md")  # where every command-line flag is listed
README_METRIC_LINES = 5   # the README promises a custom metric in five lines
CLI_TIMEOUT_S = 180       # generous: a 2-core machine under load starts a worker in seconds
# The metric divides two eigenvalues; ours (LAPACK on the Gram matrix) and numpy's SVD agree
# to a few ulps of lambda_max times the dimension.
REL_TOL = 1e-9


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option a parser (and its subcommands) accepts, but --help."""
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
        flags |= {s for s in action.option_strings if s.startswith("--") and s != "--help"}
    return flags


@pytest.mark.parametrize("parser", [run_cli.build_parser, worker.build_parser,
                                    report_cli.build_parser],
                         ids=["run_esd_experiment", "esd_worker", "esd_report"])
def test_every_flag_a_command_accepts_is_documented(parser):
    text = "".join((ROOT / doc).read_text(encoding="utf-8") for doc in FLAG_DOCS)
    documented = set(re.findall(r"--[a-z][a-z_-]*", text))
    hidden = {a.option_strings[0] for a in parser()._actions if a.help == argparse.SUPPRESS}
    missing = sorted(parser_flags(parser()) - documented - hidden)
    assert not missing, f"flags missing from {' or '.join(FLAG_DOCS)}: {missing}"


def test_the_runners_help_states_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    lines = [line for line in run_cli.build_parser().format_help().splitlines()
             if line.lstrip().startswith("--")]
    doubled = [line.strip() for line in lines if line.count("default:") > 1]
    assert not doubled, doubled


def readme_metric_example() -> tuple[str, str, str]:
    """The README's custom metric as printed: (file name, its code, the --metric of its
    "run with:" comment)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("**Your own metric**"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", 10)]
    first = code.splitlines()[0]
    file_name = re.match(r"# (\S+\.py)", first).group(1)
    spec = re.search(r"--metric (\S+)", first).group(1)
    return file_name, code, spec


def test_the_readme_metric_example_runs_as_printed(tmp_path):
    file_name, code, spec = readme_metric_example()
    assert len(code.splitlines()) <= README_METRIC_LINES
    (tmp_path / file_name).write_text(code, encoding="utf-8")
    model = tmp_path / "model"
    model.mkdir()
    tensors = llama_like(7, blocks=1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(model / "model.safetensors"))
    (tmp_path / "models.csv").write_text(f"model_id\n{model}\n", encoding="utf-8")
    run = subprocess.run(
        [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list", "models.csv",
         "--output_dir", "results/", "--device", "cpu", "--no-progress",
         *shlex.split(code.splitlines()[0].split("run with:")[1].split("(")[0])],
        cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-2000:]
    (csv,) = (tmp_path / "results").glob("*.csv")
    frame = pd.read_csv(csv)
    column = frame.columns[-1]
    assert spec.endswith(f":{column}") and frame.columns[-2] == "esd_options"
    fitted = frame[frame["status"] == "ok"]
    assert len(fitted) >= 4
    for row in fitted.itertuples():
        sv = np.linalg.svd(tensors[f"{row.longname}.weight"].double().numpy(), compute_uv=False)
        assert getattr(row, column) == pytest.approx(sv[0] ** 2 / sv[1] ** 2, rel=REL_TOL)
    # "From Python: analyze(model, metrics=[top_ratio])": the same column, the same numbers
    spec_file, function = spec.split(":")
    found = importlib.util.spec_from_file_location("readme_metric", tmp_path / spec_file)
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    ours = analyze(str(model), metrics=[getattr(module, function)], device="cpu")
    np.testing.assert_allclose(ours[column].to_numpy(float), frame[column].to_numpy(float),
                               rtol=REL_TOL)


def test_refit_help_explains_every_argument():
    (sub,) = [a for a in report_cli.build_parser()._actions
              if isinstance(a, argparse._SubParsersAction)]
    refit = sub.choices["refit"]
    bare = [a.dest for a in refit._actions if not a.help]
    assert not bare, f"refit arguments without help: {bare}"
    results_dir = next(a for a in refit._actions if a.dest == "results_dir")
    assert "--save_eigs" in results_dir.help
