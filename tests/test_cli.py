"""End-to-end runs of run_esd_experiment.py on tiny local models, as a user runs it."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from esd_experiment.core.results import RESULT_COLUMNS, eigs_options
from esd_experiment.estimator.options import ESDConfig
from esd_experiment.run.demo import build_demo_zoo
from esd_experiment.run.state import RunLock

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "run_esd_experiment.py"
CLI_TIMEOUT_S = 180  # generous: a 2-core CI machine under load starts each worker in ~2 s
INTERRUPT_WAIT_S = 60


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-zoo")
    build_demo_zoo(root)
    return root


def write_list(path: Path, rows, header=("model_id", "base_model_relation", "source_model")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def cli(*argv, timeout=CLI_TIMEOUT_S):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(RUNNER), *map(str, argv), "--device", "cpu",
                           "--retry_backoff", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def result_csvs(out: Path) -> list[Path]:
    return sorted(out.glob("*.csv"))


def test_demo_runs_end_to_end(tmp_path):
    proc = cli("--demo", "--output_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    csvs = result_csvs(tmp_path)
    assert len(csvs) == 5
    frames = [pd.read_csv(p, keep_default_na=False) for p in csvs]
    assert all(tuple(f.columns) == RESULT_COLUMNS for f in frames)
    layer_types = set().union(*(set(f.layer_type) for f in frames))
    assert {"linear", "embedding", "lm_head", "conv2d"} <= layer_types
    adapters = [f for f in frames if f.source_model.iloc[0]]
    assert len(adapters) == 2, "both demo adapters name their base"
    assert "finished: done 5, skipped 0, failed 0" in proc.stderr
    summary = proc.stdout.splitlines()
    assert summary[0].split()[:3] == ["model", "layers", "fitted"]
    assert len(summary) == 6 and "tiny-resnet" in proc.stdout


def test_resume_overwrite_and_limit(zoo, tmp_path):
    models = write_list(tmp_path / "models.csv", [(zoo / "tiny-llama", "", ""),
                                                  (zoo / "tiny-gpt2", "", ""),
                                                  (zoo / "tiny-resnet", "", "")])
    out = tmp_path / "out"
    proc = cli("--model_list", models, "--output_dir", out, "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(result_csvs(out)) == 2
    stamps = {p: p.stat().st_mtime_ns for p in result_csvs(out)}

    proc = cli("--model_list", models, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "1 to run, 2 already done" in proc.stderr
    assert len(result_csvs(out)) == 3
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "finished models are skipped"

    proc = cli("--model_list", models, "--output_dir", out, "--overwrite", "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert len(changed) == 1


def test_bad_lists_are_refused_before_anything_starts(tmp_path):
    out = tmp_path / "out"
    cases = {
        "missing": (tmp_path / "nope.csv", "does not exist"),
        "empty": (tmp_path / "empty.csv", "is empty"),
        "no column": (tmp_path / "cols.csv", "has no model_id column"),
    }
    (tmp_path / "empty.csv").write_text("\n\n")
    (tmp_path / "cols.csv").write_text("name,source\norg/a,\n")
    for path, message in cases.values():
        proc = cli("--model_list", path, "--output_dir", out)
        assert proc.returncode == 2
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not result_csvs(out)


@pytest.mark.parametrize("value", ["-0.001", "nan", "inf"])
def test_bad_evals_thresh_is_refused_in_one_line(zoo, tmp_path, value):
    models = write_list(tmp_path / "models.csv", [(zoo / "tiny-gpt2", "", "")])
    out = tmp_path / "out"
    proc = cli("--model_list", models, "--output_dir", out, "--evals_thresh", value)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "evals_thresh" in line and value.lstrip("-") in line
    assert not result_csvs(out)


def test_list_tolerates_bom_spaces_extra_columns_and_duplicates(zoo, tmp_path):
    text = ("\ufeffmodel_id , notes,base_model_relation\n\n"
            f"  {zoo / 'tiny-gpt2'} , first,\n{zoo / 'tiny-gpt2'},again,\n\n")
    models = tmp_path / "models.csv"
    models.write_text(text, encoding="utf-8")
    proc = cli("--model_list", models, "--output_dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "1 models: 1 to run" in proc.stderr
    assert len(result_csvs(tmp_path / "out")) == 1


def make_bad_models(zoo: Path, root: Path) -> dict[str, Path]:
    corrupt = root / "corrupt"
    shutil.copytree(zoo / "tiny-gpt2", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    orphan = root / "orphan-adapter"
    shutil.copytree(zoo / "tiny-llama-lora-mlp", orphan)
    config = (orphan / "adapter_config.json").read_text()
    (orphan / "adapter_config.json").write_text(
        config.replace(str(zoo / "tiny-llama"), str(root / "deleted-base")))
    return {"missing": root / "missing-model", "corrupt": corrupt, "orphan": orphan}


def test_bad_models_fail_alone_and_skip_failed(zoo, tmp_path):
    bad = make_bad_models(zoo, tmp_path)
    models = write_list(tmp_path / "models.csv", [
        (zoo / "tiny-llama", "", ""), (bad["missing"], "", ""), (bad["corrupt"], "", ""),
        (bad["orphan"], "lora", ""), (zoo / "tiny-resnet", "", "")])
    out = tmp_path / "out"
    proc = cli("--model_list", models, "--output_dir", out)
    assert proc.returncode == 1
    assert len(result_csvs(out)) == 2, "the good models finish"
    lines = (out / "failed_models.txt").read_text().splitlines()
    causes = dict(line.split("\t", 1) for line in lines)
    assert set(causes) == {str(p) for p in bad.values()}
    assert "not" in causes[str(bad["missing"])].lower()
    assert "deleted-base" in causes[str(bad["orphan"])]
    assert "Corrupt" in causes[str(bad["corrupt"])] or "corrupt" in causes[str(bad["corrupt"])]
    assert "done 2, skipped 0, failed 3" in proc.stderr
    run_log = (out / "logs" / "esd_experiment.log").read_text()
    assert "done 2, skipped 0, failed 3" in run_log and f"FAILED {bad['missing']}" in run_log

    proc = cli("--model_list", models, "--output_dir", out, "--skip_failed")
    assert proc.returncode == 1, "exit 0 means every listed model is done"
    assert "0 to run, 2 already done, 3 failed before and skipped" in proc.stderr

    shutil.copytree(zoo / "tiny-gpt2", bad["missing"])  # the missing model appears
    proc = cli("--model_list", models, "--output_dir", out)
    assert proc.returncode == 1
    assert "3 to run" in proc.stderr, "failed models are retried on a rerun"
    causes = dict(line.split("\t", 1) for line in
                  (out / "failed_models.txt").read_text().splitlines())
    assert set(causes) == {str(bad["corrupt"]), str(bad["orphan"])}


def test_second_runner_is_refused(zoo, tmp_path):
    models = write_list(tmp_path / "models.csv", [(zoo / "tiny-gpt2", "", "")])
    out = tmp_path / "out"
    with RunLock(out):
        proc = cli("--model_list", models, "--output_dir", out)
    assert proc.returncode == 2
    assert f"pid {os.getpid()}" in proc.stderr
    assert not result_csvs(out)


def big_model(path: Path, layers: int = 24, width: int = 1024) -> Path:
    """A checkpoint slow enough (~0.3 s a layer) to interrupt while it is analysed."""
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.weight": torch.randn(width, width, generator=g)
               for i in range(layers)}
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def worker_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "esd_worker.py" in cmdline and marker in cmdline:
                pids.append(int(entry.name))
    return pids


def test_interrupt_leaves_no_child_and_no_partial_file_then_resumes(zoo, tmp_path):
    slow = big_model(tmp_path / "slow-model")
    models = write_list(tmp_path / "models.csv", [(zoo / "tiny-gpt2", "", ""), (slow, "", "")])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--model_list", str(models),
                             "--output_dir", str(out), "--device", "cpu", "--no-progress"],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + INTERRUPT_WAIT_S
    slow_log = None
    while time.monotonic() < deadline and slow_log is None:
        time.sleep(0.2)
        slow_log = next((p for p in (out / "logs").glob("*slow-model*.log")
                         if "analysing" in p.read_text()), None) if (out / "logs").exists() else None
    assert slow_log is not None, "the slow model never started"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=INTERRUPT_WAIT_S)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert worker_pids(str(out)) == [], "no worker outlives the runner"
    assert [p.name for p in out.glob("*.csv")] == [next(out.glob("*gpt2*.csv")).name]
    assert not list(out.rglob("*.tmp")), "no partial file is left"
    assert not (out / "failed_models.txt").exists(), "an interrupted model is not a failure"

    proc = cli("--model_list", models, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "1 to run, 1 already done" in proc.stderr
    assert len(result_csvs(out)) == 2


def test_hub_ids_from_offline_cache_record_commit(zoo, tmp_path):
    """``org/name`` and ``org/name@rev`` resolve through a laid-out cache, offline."""
    from tests.loader_fixtures import write_hub_cache

    commit = "c0ffee" + "0" * 34
    hf_home = tmp_path / "hf_home"
    write_hub_cache(hf_home / "hub", "tiny-org/tiny-gpt2", commit, zoo / "tiny-gpt2")
    models = write_list(tmp_path / "models.csv", [("tiny-org/tiny-gpt2", "", ""),
                                                  (f"tiny-org/tiny-gpt2@{commit}", "", ""),
                                                  ("tiny-org/absent", "", "")])
    out = tmp_path / "out"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(RUNNER), "--model_list", str(models),
                           "--output_dir", str(out), "--device", "cpu", "--no-progress",
                           "--cleanup_cache"],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env)
    assert proc.returncode == 1, proc.stderr
    names = sorted(p.name for p in result_csvs(out))
    assert names == ["tiny-org--tiny-gpt2.csv", f"tiny-org--tiny-gpt2@{commit}.csv"]
    for name in names:
        df = pd.read_csv(out / name)
        assert (df.revision == commit).all()
    cause = (out / "failed_models.txt").read_text()
    assert cause.startswith("tiny-org/absent\t") and "offline" in cause.lower()
    assert (hf_home / "hub" / "models--tiny-org--tiny-gpt2" / "snapshots" / commit).is_dir(), \
        "--cleanup_cache keeps what was in the cache before the run"


def test_rerun_with_other_options_is_refused_unless_overwrite(zoo, tmp_path):
    models = write_list(tmp_path / "models.csv", [(zoo / "tiny-gpt2", "", "")])
    out = tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out).returncode == 0
    proc = cli("--model_list", models, "--output_dir", out, "--fix_fingers", "DKS")
    assert proc.returncode == 2
    assert "fix_fingers: 'xmin_mid' -> 'DKS'" in proc.stderr and "--overwrite" in proc.stderr
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs")
    assert proc.returncode == 0, proc.stderr
    assert "1 to run, 0 already done" in proc.stderr, "a result without its eigenvalues reruns"
    assert len(list(out.glob("*.eigs.npz"))) == 1
    proc = cli("--model_list", models, "--output_dir", out, "--fix_fingers", "DKS", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert set(pd.read_csv(result_csvs(out)[0]).fix_fingers) == {"DKS"}


def test_results_never_mix_estimator_options(zoo, tmp_path):
    """An --overwrite limited to part of the list, or interrupted, leaves results computed with
    the old options; the next run with the new options recomputes exactly those."""
    models = write_list(tmp_path / "models.csv", [(zoo / "tiny-gpt2", "", ""),
                                                  (zoo / "tiny-resnet", "", "")])
    out = tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out).returncode == 0
    proc = cli("--model_list", models, "--output_dir", out, "--overwrite", "--limit", "1",
               "--fix_fingers", "DKS")
    assert proc.returncode == 0, proc.stderr
    proc = cli("--model_list", models, "--output_dir", out, "--fix_fingers", "DKS")
    assert proc.returncode == 0, proc.stderr
    assert "1 to run, 1 already done" in proc.stderr
    frames = [pd.read_csv(p, keep_default_na=False) for p in result_csvs(out)]
    assert len(frames) == 2
    assert {opts for f in frames for opts in f.esd_options} == {
        ESDConfig(fix_fingers="DKS").options_key}
    assert {fit for f in frames for fit in f.fix_fingers} == {"DKS"}


def test_eigenvalues_always_match_the_csv_beside_them(zoo, tmp_path):
    models = write_list(tmp_path / "models.csv", [(zoo / "tiny-gpt2", "", "")])
    out = tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out, "--save_eigs").returncode == 0
    (eigs,) = out.glob("*.eigs.npz")
    saved = eigs.read_bytes()
    proc = cli("--model_list", models, "--output_dir", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert eigs.read_bytes() == saved, "a run without --save_eigs leaves saved eigenvalues"
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs")
    assert "0 to run, 1 already done" in proc.stderr  # they record the CSV's options
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs", "--overwrite",
               "--fix_fingers", "DKS")
    assert proc.returncode == 0, proc.stderr
    assert eigs_options(eigs) == ESDConfig(fix_fingers="DKS").options_key


def test_model_without_eigenvalues_counts_as_done_under_save_eigs(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    save_file({"tiny.weight": torch.randn(3, 3)}, small / "model.safetensors")
    models = write_list(tmp_path / "models.csv", [(small, "", "")])
    out = tmp_path / "out"
    assert cli("--model_list", models, "--output_dir", out, "--save_eigs").returncode == 0
    frame = pd.read_csv(next(iter(result_csvs(out))))
    assert list(frame.status) == ["too_small"]
    proc = cli("--model_list", models, "--output_dir", out, "--save_eigs")
    assert proc.returncode == 0 and "0 to run, 1 already done" in proc.stderr


def test_a_grouped_base_keeps_the_source_model_of_its_own_row(zoo, tmp_path):
    """A listed fine-tune run as the base of its adapters' job writes the result it writes
    alone: its own row's source_model, not the adapters' view of it."""
    base, lora = zoo / "tiny-llama", zoo / "tiny-llama-lora"
    grouped, alone = tmp_path / "grouped", tmp_path / "alone"
    proc = cli("--model_list", write_list(tmp_path / "grouped.csv", [
        (base, "finetune", "org/llama-origin"), (lora, "lora", base)]), "--output_dir", grouped)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 job(s)" in proc.stderr, "the base and its adapter share a job"
    proc = cli("--model_list", write_list(tmp_path / "alone.csv", [
        (base, "finetune", "org/llama-origin")]), "--output_dir", alone)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (csv_alone,) = result_csvs(alone)
    together = pd.read_csv(grouped / csv_alone.name, keep_default_na=False)
    assert (together.source_model == "org/llama-origin").all()
    pd.testing.assert_frame_equal(together, pd.read_csv(csv_alone, keep_default_na=False))
