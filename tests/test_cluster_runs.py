"""The runner on a real single-node Slurm and a real local Ray: same list, same contract,
same rows as a local run; only where the workers run changes."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from tests.test_backend_slurm import slurm  # noqa: F401  (the cluster fixture)

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "run_esd_experiment.py"
CLI_TIMEOUT_S = 600  # five Slurm tasks of a few seconds each on two busy cores
HUNG_TIMEOUT_S = 10  # --model_timeout for a stalled download: past the worker's start on Slurm
AUTO_TIMEOUT_S = 300  # --device auto on a Ray without GPUs: five CPU jobs, or a hang before
# The delta's top eigenvalue against numpy's SVD of the float64 difference: both exact to a few
# ulps of lambda_max times the dimension.
DELTA_RTOL = 1e-9
SLURM_FLAGS = ("--backend", "slurm", "--slurm_cpus_per_task", "1", "--slurm_time", "10",
               "--slurm_poll_interval", "0.5")


def cli(*argv, timeout=CLI_TIMEOUT_S):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, argv), "--device", "cpu",
                           "--retry_backoff", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def five_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    rows = []
    for i in range(5):
        folder = root / f"m{i}"
        folder.mkdir()
        g = torch.Generator().manual_seed(i)
        save_file({f"model.layers.{k}.mlp.weight": torch.randn(64, 48, generator=g)
                   for k in range(3)}, folder / "model.safetensors")
        rows.append([str(folder)])
    with open(root / "models.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["model_id"], *rows])
    return root / "models.csv"


@pytest.fixture(scope="module")
def local_rows(five_models, tmp_path_factory) -> dict[str, pd.DataFrame]:
    out = tmp_path_factory.mktemp("local")
    proc = cli("--model_list", five_models, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {p.name: pd.read_csv(p) for p in out.glob("*.csv")}


def assert_same_rows(out: Path, expected: dict[str, pd.DataFrame]) -> None:
    got = {p.name: pd.read_csv(p) for p in out.glob("*.csv")}
    assert sorted(got) == sorted(expected)
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(got[name], frame)


def test_slurm_array_rows_equal_a_local_run_and_a_rerun_submits_nothing(
        slurm, five_models, local_rows, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = cli("--model_list", five_models, "--output_dir", out, *SLURM_FLAGS,
               "--slurm_models_per_task", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_rows(out, local_rows)
    scripts = sorted((out / "slurm" / "submitit").glob("*_submission.sh"))
    assert len(scripts) == 1, "one array"
    assert len(list((out / "logs").glob("*.log"))) >= 5, "each model keeps its log"
    # The two models of a task ran in one long-lived worker: three tasks, three workers.
    workers = [re.findall(r" in worker pid (\d+): ", log.read_text())
               for log in (out / "logs").glob("*.log") if log.name != "esd_experiment.log"]
    assert all(len(pids) == 1 for pids in workers) and len({p for p, in workers}) <= 3
    proc = cli("--model_list", five_models, "--output_dir", out, *SLURM_FLAGS)
    assert proc.returncode == 0 and "0 to run, 5 already done" in proc.stderr
    assert sorted((out / "slurm" / "submitit").glob("*_submission.sh")) == scripts


def test_slurm_detach_then_rerun_collects_without_resubmitting(
        slurm, five_models, local_rows, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = cli("--model_list", five_models, "--output_dir", out, *SLURM_FLAGS, "--detach")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted: Slurm job(s)" in proc.stderr and "scancel" in proc.stderr
    proc = cli("--model_list", five_models, "--output_dir", out, *SLURM_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_rows(out, local_rows)
    assert len(list((out / "slurm" / "submitit").glob("*_submission.sh"))) == 1, \
        "the rerun waited for the detached jobs instead of submitting them again"


def test_ray_rows_equal_a_local_run(five_models, local_rows, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional install: requirements-ray.txt")
    out = tmp_path / "out"
    proc = cli("--model_list", five_models, "--output_dir", out, "--backend", "ray")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_rows(out, local_rows)



@pytest.fixture(scope="module")
def fine_tune_of_a_base(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """A base and a fine-tune listed with it as its source_model (one job under --delta),
    and a custom metric's file: (models.csv, the metric, base tensors, fine-tune tensors)."""
    root = tmp_path_factory.mktemp("pair")
    g = torch.Generator().manual_seed(7)
    base = {f"model.layers.{k}.mlp.weight": torch.randn(96, 40, generator=g) for k in range(2)}
    ft = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for name, tensors in (("base", base), ("ft", ft)):
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors")
    (root / "top.py").write_text("def top(evals):\n    return {'top': float(evals[-1])}\n")
    (root / "models.csv").write_text("model_id,base_model_relation,source_model\n"
                                     f"{root / 'base'},,\n{root / 'ft'},,{root / 'base'}\n")
    return root / "models.csv", root / "top.py", base, ft


def test_slurm_gives_the_researchers_views_a_local_run_gives(
        slurm, fine_tune_of_a_base, tmp_path):  # noqa: F811
    """--delta, --mp_fit, --randomize and a custom metric travel to the Slurm task's worker:
    every result and delta file equals a local run's, and the delta is that of W - W_base."""
    models, metric, base, ft = fine_tune_of_a_base
    views = ("--delta", "--mp_fit", "--randomize", "--seed", "3", "--metric", f"{metric}:top")
    local, out = tmp_path / "local", tmp_path / "slurm"
    proc = cli("--model_list", models, "--output_dir", local, *views)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli("--model_list", models, "--output_dir", out, *views, *SLURM_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for where in (Path("."), Path("delta")):
        expected = {p.name: pd.read_csv(p) for p in (local / where).glob("*.csv")}
        assert len(expected) == (2 if where == Path(".") else 1)
        assert_same_rows(out / where, expected)
    (delta,) = (out / "delta").glob("*.csv")
    rows = pd.read_csv(delta).set_index("longname")
    for name, w in ft.items():
        sv = torch.linalg.svdvals(w.double() - base[name].double())
        row = rows.loc[name.removesuffix(".weight")]
        assert row["top"] == pytest.approx(float(sv[0] ** 2), rel=DELTA_RTOL)
        assert row["max_rand_eval"] > 0 and row["num_spikes"] >= 0


@pytest.fixture(scope="module")
def two_gguf_files(tmp_path_factory) -> Path:
    """A list of two GGUF files of one (local) repository: two entries of one model id."""
    from tests.test_quantized_runs import gguf_repo

    root = tmp_path_factory.mktemp("gguf")
    repo = gguf_repo(root / "repo")
    with open(root / "models.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["model_id", "gguf_file"], [repo, "Q8_0"], [repo, "Q4_0"]])
    return root / "models.csv"


def assert_two_gguf_results(out: Path) -> None:
    got = {pd.read_csv(p).model_id.iat[0]: set(pd.read_csv(p).storage) for p in out.glob("*.csv")}
    repo = str(Path(next(iter(got)).rpartition("#")[0]))
    assert got == {f"{repo}#Q8_0": {"Q8_0"}, f"{repo}#Q4_0": {"Q4_0"}}


def test_slurm_two_gguf_files_of_one_repo_are_two_jobs_across_a_rerun(
        slurm, two_gguf_files, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = cli("--model_list", two_gguf_files, "--output_dir", out, *SLURM_FLAGS, "--detach")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli("--model_list", two_gguf_files, "--output_dir", out, *SLURM_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done 2" in proc.stderr and not (out / "failed_models.txt").exists()
    assert_two_gguf_results(out)


def test_ray_two_gguf_files_of_one_repo_are_two_results(two_gguf_files, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional install: requirements-ray.txt")
    out = tmp_path / "out"
    proc = cli("--model_list", two_gguf_files, "--output_dir", out, "--backend", "ray")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_two_gguf_results(out)


def runner(*argv, timeout=CLI_TIMEOUT_S):
    """The runner with the device left to it (``cli`` always adds --device cpu)."""
    return subprocess.run([sys.executable, str(RUNNER), *map(str, argv), "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_ray_device_auto_without_gpus_runs_on_cpus(five_models, local_rows, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional install: requirements-ray.txt")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the local Ray would too")
    out = tmp_path / "out"
    proc = runner("--model_list", five_models, "--output_dir", out, "--backend", "ray",
                  timeout=AUTO_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_rows(out, local_rows)
    for flags in (["--device", "cuda"], ["--num_gpus_per_job", "2"]):
        proc = runner("--model_list", five_models, "--output_dir", tmp_path / "cuda",
                      "--backend", "ray", *flags, timeout=AUTO_TIMEOUT_S)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "no GPU" in error_line(proc) and "--device cpu" in error_line(proc)
    assert not list((tmp_path / "cuda").glob("*.csv"))


def test_slurm_more_gpus_per_job_than_a_node_has_is_refused_at_once(
        slurm, five_models, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = runner("--model_list", five_models, "--output_dir", out, "--backend", "slurm",
                  "--num_gpus_per_job", "3", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert "no node of the default partition has more than 2" in line, line
    assert "--num_gpus_per_job" in line and not (out / "slurm" / "submitit").exists()

def test_slurm_unknown_partition_is_bad_input(slurm, five_models, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = cli("--model_list", five_models, "--output_dir", out, *SLURM_FLAGS,
               "--slurm_partition", "no-such-partition")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "partition" in proc.stderr.lower() and not list(out.glob("*.csv"))


def test_slurm_model_timeout_names_the_workers_stage(slurm, hub, tmp_path):  # noqa: F811
    from tests.loader_fixtures import write_safetensors

    folder = write_safetensors(tmp_path / "big", {"w.weight": torch.randn(300, 300)})
    hub.add_repo("org/slow", folder)
    hub.stall(60, filename="model.safetensors", after_bytes=200_000)  # past the header reads
    models = tmp_path / "models.csv"
    models.write_text("model_id\norg/slow\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--model_list", models, "--output_dir", out, "--device",
         "cpu", "--no-progress", *SLURM_FLAGS, "--model_timeout", str(HUNG_TIMEOUT_S),
         "--max_retries", "0"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        env={**os.environ, **hub.env(hub.cache), "HF_HUB_DOWNLOAD_TIMEOUT": "300"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    cause = (out / "failed_models.txt").read_text()
    assert cause.startswith(f"org/slow\ttimeout after {HUNG_TIMEOUT_S} s in download"), cause
