"""The runner's decisions on finished jobs, and a worker that outlives its runner."""

import argparse
import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from esd_experiment.core.paths import ModelPaths
from esd_experiment.core.results import RESULT_COLUMNS
from esd_experiment.estimator.net_esd import ESDConfig
from esd_experiment.run import cli as runner_mod
from esd_experiment.run.accounts import EXIT_INTERNAL, Accounts
from esd_experiment.run.model_list import JobSpec, ListEntry
from esd_experiment.run.plan import EXIT_TRANSIENT, result_signature, worker_argv, written_by
from esd_experiment.run.state import FailureLog
from gputracker import Dispatcher, JobResult

ROOT = Path(__file__).resolve().parents[1]
WORKER_EXIT_WAIT_S = 20  # the watchdog polls every second; a loaded CI machine needs slack


def fake_result(path: Path, options: str | None = None) -> None:
    """A result CSV of one row computed with ``options`` (default: the default options)."""
    row = dict.fromkeys(RESULT_COLUMNS, "")
    row["esd_options"] = options or ESDConfig().options_key
    path.write_text(",".join(RESULT_COLUMNS) + "\n" + ",".join(row.values()) + "\n")


def make_config(tmp_path, **overrides) -> runner_mod.RunConfig:
    args = runner_mod.build_parser().parse_args(["--output_dir", str(tmp_path), "--device", "cpu"])
    fields = dict(model_list=tmp_path / "list.csv", output_dir=tmp_path,
                  log_dir=tmp_path / "logs", args=args, max_retries=2, retry_backoff=5.0)
    fields.update(overrides)
    return runner_mod.RunConfig(**fields)


class FakeClockDispatcher(Dispatcher):
    def __init__(self):
        super().__init__(None, cpu_slots=1, cpu_count=2, clock=lambda: 1000.0)


def finished(runner, entry, paths, returncode, attempt=1, stopped=False, timed_out=False):
    job = runner.job(JobSpec((entry,)), attempt)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    paths.log.write_text("loading\nTraceback (most recent call last):\nValueError: bad header\n")
    result = JobResult(job=job, returncode=returncode, gpus=(), threads=2, pid=1, start=0.0,
                       end=1.0, started_at=0.0, log_path=paths.log, stopped=stopped,
                       timed_out=timed_out)
    return runner.on_finish(result)


@pytest.fixture
def setup(tmp_path):
    config = make_config(tmp_path)
    failures = FailureLog(tmp_path)
    runner = runner_mod.Runner(config, FakeClockDispatcher(), failures,
                               runner_mod.Progress(3, enabled=False))
    entry = ListEntry("org/model")
    paths = ModelPaths.for_model(tmp_path, "org/model", log_dir=tmp_path / "logs")
    return runner, failures, entry, paths


def test_transient_failure_is_retried_with_backoff_then_recorded(setup):
    runner, failures, entry, paths = setup
    (retry,) = finished(runner, entry, paths, EXIT_TRANSIENT)
    assert retry.attempt == 2 and retry.not_before == 1000.0 + 5.0
    (retry,) = finished(runner, entry, paths, EXIT_TRANSIENT, attempt=2)
    assert retry.attempt == 3 and retry.not_before == 1000.0 + 10.0, "backoff doubles"
    assert finished(runner, entry, paths, EXIT_TRANSIENT, attempt=3) == []
    assert "org/model" in failures and runner.progress.failed == 1


def test_deterministic_failure_is_not_retried_and_quotes_the_log(setup):
    runner, failures, entry, paths = setup
    assert finished(runner, entry, paths, 1) == []
    cause = failures.cause("org/model")
    assert "exit code 1" in cause and "ValueError: bad header" in cause and str(paths.log) in cause


def test_worker_failure_record_wins_over_log_tail(setup):
    runner, failures, entry, paths = setup
    paths.failure.parent.mkdir(parents=True, exist_ok=True)
    paths.failure.write_text('{"error": "NoWeightsError", "message": "org/model: no weights"}')
    finished(runner, entry, paths, 1)
    assert failures.cause("org/model") == "NoWeightsError: org/model: no weights"


def test_success_needs_a_complete_csv_and_clears_old_failure(setup):
    runner, failures, entry, paths = setup
    failures.record("org/model", "old failure")
    assert finished(runner, entry, paths, 0) == []
    assert "missing or incomplete" in failures.cause("org/model"), "exit 0 without a CSV fails"
    paths.csv.write_text(",".join(RESULT_COLUMNS) + "\n")
    finished(runner, entry, paths, 0)
    assert "org/model" in failures, "a header without rows is no result"
    fake_result(paths.csv)
    finished(runner, entry, paths, 0)
    assert "org/model" not in failures and runner.progress.done == 1


def test_stopped_job_is_neither_result_nor_failure(setup):
    runner, failures, entry, paths = setup
    assert finished(runner, entry, paths, -15, stopped=True) == []
    assert "org/model" not in failures
    assert runner.progress.done == runner.progress.failed == 0


@pytest.mark.parametrize("flags, message", [
    (["--cpu_workers", "0"], "--cpu_workers must be at least 1"),
    (["--limit", "-1"], "--limit must be 0 or more"),
    (["--gpus", "0", "--num_gpus_per_job", "2", "--device", "cuda"], "exceeds the 1 GPU"),
    (["--device", "cuda:1"], "choose them with --gpus"),
])
def test_bad_flags_are_input_errors(tmp_path, flags, message):
    args = runner_mod.build_parser().parse_args(
        ["--model_list", "x.csv", "--output_dir", str(tmp_path), *flags])
    with pytest.raises(runner_mod.InputError, match=message):
        runner_mod.config_from_args(args)


def test_worker_argv_keeps_flags_and_no_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    args = runner_mod.build_parser().parse_args(
        ["--output_dir", str(tmp_path), "--fix_fingers", "DKS", "--filter_zeros", "--save_eigs",
         "--evals_thresh", "1e-7", "--device", "cpu", "--cleanup_cache"])
    argv = worker_argv(JobSpec((ListEntry("a/b", "lora", "c/d"),)), args, tmp_path,
                       tmp_path / "logs", None, None)
    worker_args = __import__("esd_experiment.run.worker", fromlist=["x"]).build_parser().parse_args(argv[2:])
    assert (worker_args.fix_fingers, worker_args.filter_zeros, worker_args.save_eigs) == \
        ("DKS", True, True)
    assert worker_args.evals_thresh == 1e-7 and worker_args.cleanup_cache
    assert (worker_args.base_model_relation, worker_args.source_model) == ("lora", "c/d")
    assert not any("hf_secret" in a for a in argv), "tokens travel in the environment only"


def test_worker_stops_when_its_runner_dies(tmp_path):
    model = tmp_path / "slow"
    model.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({f"layers.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(60)},
              model / "model.safetensors")
    pid_file = tmp_path / "worker.pid"
    # A stand-in runner: starts the worker in its own session, as the dispatcher does, then dies.
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, {str(ROOT / "esd_worker.py")!r},
            "--model_id", {str(model)!r}, "--output_dir", {str(tmp_path / "out")!r},
            "--device", "cpu", "--parent_pid", str(os.getpid())], start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(3)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", parent], check=True, timeout=60)
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + WORKER_EXIT_WAIT_S
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        state = Path(f"/proc/{worker}/stat").read_text().split()[2] if Path(
            f"/proc/{worker}/stat").exists() else "X"
        if state == "Z":
            break
        time.sleep(0.2)
    alive = Path(f"/proc/{worker}/stat").exists() and \
        Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z"
    assert not alive, "the orphaned worker stopped by itself"
    assert not list((tmp_path / "out").glob("*.csv"))


def test_summary_line_and_exit_code_for_empty_plan(tmp_path, caplog):
    (tmp_path / "list.csv").write_text("model_id\norg/done\n")
    fake_result(tmp_path / "org--done.csv")
    config = make_config(tmp_path)
    with caplog.at_level("INFO"):
        assert runner_mod.run(config, FakeClockDispatcher()) == 0
    assert "finished: done 0, skipped 1, failed 0" in caplog.text


def test_parser_defaults_match_the_seed():
    args = runner_mod.build_parser().parse_args(["--output_dir", "x"])
    assert isinstance(args, argparse.Namespace)
    assert (args.num_gpus_per_job, args.gpu_memory_threshold, args.max_check) == (1, 500, 10)
    assert (args.fix_fingers, args.evals_thresh, args.bins) == ("xmin_mid", 1e-5, 100)
    assert args.filter_zeros is False and args.parallel_esd is False, "both can be turned on and off"


def test_bad_estimator_flags_are_refused_before_any_worker(tmp_path):
    args = runner_mod.build_parser().parse_args(
        ["--model_list", "x.csv", "--output_dir", str(tmp_path), "--bins", "0"])
    with pytest.raises(runner_mod.InputError, match="bins must be at least 1"):
        runner_mod.config_from_args(args)


def test_runner_imports_neither_torch_nor_transformers():
    """Login nodes are slow and often lack GPU libraries: the runner process stays lean."""
    code = ("import sys; from esd_experiment.run import cli as r; r.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors.torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_timed_out_job_keeps_the_models_it_finished(setup, tmp_path):
    runner, failures, _, _ = setup
    spec = JobSpec((ListEntry("org/base"), ListEntry("org/lora", "lora", "org/base")),
                   "org/base")
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "logs" / "org--base.log").write_text("old run\n")
    job = runner.job(spec)
    done, pending = job.payload[1]
    fake_result(done.csv)
    job.log_path.with_suffix(".stage").write_text("analyse\n")
    with open(job.log_path, "a") as fh:
        fh.write("this run\n")
    result = JobResult(job=replace(job, timeout=5.0), returncode=-15, gpus=(), threads=2,
                       pid=1, start=0.0, end=6.0, started_at=0.0, log_path=job.log_path,
                       timed_out=True)
    (retry,) = runner.on_finish(result)
    assert [e.model_id for e in retry.payload[0].entries] == ["org/lora"]
    assert retry.payload[0].base == "org/base" and runner.progress.done == 1
    shared = pending.log.read_text()
    assert "this run" in shared and "old run" not in shared, "a member's log gets this run only"


def network_failure(paths, model_id):
    paths.failure.parent.mkdir(parents=True, exist_ok=True)
    paths.failure.write_text(json.dumps({
        "error": "NetworkError", "message": f"{model_id}: network failure talking to the hub",
        "transient": True, "network": True}))


def test_a_network_failure_that_outlasts_its_retries_is_recorded(setup):
    runner, failures, entry, paths = setup
    network_failure(paths, "org/model")
    for attempt in (1, 2):
        (retry,) = finished(runner, entry, paths, EXIT_TRANSIENT, attempt)
        assert retry.attempt == attempt + 1
    assert finished(runner, entry, paths, EXIT_TRANSIENT, attempt=3) == []
    runner.finish()
    assert "network failure" in failures.cause("org/model"), "the model never vanishes"
    assert runner.progress.failed == 1 and not runner.outage


def test_one_job_of_a_base_and_its_adapters_is_one_network_failure(setup, tmp_path):
    """Three adapters of an unreachable base are one job failing, not an outage: the job is
    retried, then its models are recorded, and the run goes on."""
    runner, failures, _, _ = setup
    entries = (ListEntry("org/base"),) + tuple(
        ListEntry(f"org/lora{i}", "lora", "org/base") for i in range(3))
    spec = JobSpec(entries, "org/base")
    for attempt in (1, 2, 3):
        job = runner.job(spec, attempt)
        for member in job.payload[1]:
            network_failure(member, member.csv.stem)
        result = JobResult(job=job, returncode=EXIT_TRANSIENT, gpus=(), threads=2, pid=1,
                           start=0.0, end=1.0, started_at=0.0, log_path=job.log_path)
        retries = runner.on_finish(result)
        assert not runner.outage, f"attempt {attempt} stopped the run as an outage"
        assert len(retries) == (attempt < 3)
    runner.finish()
    assert sorted(failures._causes) == sorted(e.key for e in entries)


class LosingDispatcher(FakeClockDispatcher):
    """A backend that loses the outcome of every job: none reaches the runner."""

    def run(self, jobs=(), on_finish=None):
        return []


def test_a_run_whose_accounting_does_not_add_up_never_exits_0(tmp_path, caplog):
    (tmp_path / "list.csv").write_text("model_id\norg/done\norg/lost\n")
    fake_result(tmp_path / "org--done.csv")
    with caplog.at_level("INFO"):
        code = runner_mod.run(make_config(tmp_path), LosingDispatcher())
    assert code == EXIT_INTERNAL
    assert "internal error" in caplog.text and "org/lost is neither done nor failed" in caplog.text


def test_accounts_hold_each_entry_once_and_against_the_directory():
    accounts = Accounts(["a", "b", "c"])
    accounts.done("a")
    accounts.failed("b")
    disk = {"a": (True, False), "b": (False, True), "c": (False, False)}
    assert accounts.check(stopped=True, on_disk=disk.get) == [], "c: not reached, run stopped"
    assert accounts.check(stopped=False, on_disk=disk.get) == [
        "c is neither done nor failed, yet the run was not stopped"]
    assert accounts.exit_code(None) == 1, "exit 0 only when every entry is done"
    assert accounts.exit_code(130) == 130, "a stopped run says how it stopped"
    everything = Accounts(["a"])
    everything.done("a")
    assert everything.exit_code(None) == 0
    accounts.done("c")
    accounts.failed("a")
    assert accounts.violations == ["a is counted twice: done, then failed"]
    stale = {**disk, "a": (True, True), "b": (True, True), "c": (False, False)}
    assert accounts.check(stopped=True, on_disk=stale.get) == [
        "a is counted twice: done, then failed", "a counted done but is in failed_models.txt",
        "b counted failed but has a current result", "c counted done but has no current result"]


def test_gpus_asked_for_where_nvml_finds_none_are_refused(tmp_path):
    from gputracker import detect_gpus

    if detect_gpus():
        pytest.skip("this machine has a GPU")
    for flags in (["--device", "cuda"], ["--num_gpus_per_job", "2"]):
        args = runner_mod.build_parser().parse_args(
            ["--model_list", "x.csv", "--output_dir", str(tmp_path), *flags])
        with pytest.raises(runner_mod.InputError, match="NVML reports no GPU.*--device cpu"):
            runner_mod.config_from_args(args)
    args = runner_mod.build_parser().parse_args(
        ["--model_list", "x.csv", "--output_dir", str(tmp_path)])
    assert runner_mod.config_from_args(args).gpus is None, "--device auto: CPUs"


def test_only_a_result_the_job_wrote_counts_under_overwrite(tmp_path):
    csv = tmp_path / "m.csv"
    fake_result(csv)
    before = result_signature(csv)
    started = time.time() + 1  # the job started after the result stood there
    assert not written_by(csv, before, started), "the old result is not the job's"
    fake_result(csv.with_suffix(".tmp"))
    csv.with_suffix(".tmp").replace(csv)  # written as write_atomic writes: a new file
    assert written_by(csv, before, started)
    adopted = result_signature(csv)  # a job an earlier run submitted wrote it before this run
    assert written_by(csv, adopted, started - 2), "written since that job started"
    csv.unlink()
    assert not written_by(csv, before, started)


def test_after_an_outage_the_held_models_stay_unrecorded(setup, tmp_path):
    """A job that ends by itself after the outage stopped the run is recorded as it ended;
    the models the outage held back are not (the outage message says nothing was)."""
    runner, failures, _, _ = setup
    for name in ("org/a", "org/b", "org/c"):
        entry = ListEntry(name)
        paths = ModelPaths.for_model(tmp_path, name, log_dir=tmp_path / "logs")
        network_failure(paths, name)
        finished(runner, entry, paths, EXIT_TRANSIENT, attempt=3)
    assert runner.outage == ["org/a", "org/b", "org/c"]
    late = ModelPaths.for_model(tmp_path, "org/late", log_dir=tmp_path / "logs")
    finished(runner, ListEntry("org/late"), late, 1)
    runner.finish()
    assert list(failures._causes) == ["org/late"]


class StoppedAfterWriteDispatcher(FakeClockDispatcher):
    """A run stopped (Ctrl-C) while its one job was finishing: the job had written its result,
    but its outcome reached the runner as stopped."""

    def run(self, jobs=(), on_finish=None):
        for job in jobs:
            fake_result(job.payload[1][0].csv)
        self.stop("interrupted", signum=2)
        return []


def test_a_result_written_as_the_run_stopped_counts_as_done(tmp_path, caplog):
    (tmp_path / "list.csv").write_text("model_id\norg/written\n")
    with caplog.at_level("INFO"):
        code = runner_mod.run(make_config(tmp_path), StoppedAfterWriteDispatcher())
    assert code == 130, "an interrupted run says so"
    assert "done 1" in caplog.text and "not reached 0" in caplog.text, caplog.text


def test_overwrite_delta_leaves_an_old_delta_until_its_model_fails(tmp_path):
    """Under --overwrite --delta a job that is made, or stopped before it ends, removes
    nothing (a stopped run leaves the models it did not reach as they were); one that ends
    without writing the model's result or delta fails the model and drops both."""
    from esd_experiment.core.delta_paths import delta_paths

    args = runner_mod.build_parser().parse_args(["--output_dir", str(tmp_path), "--device",
                                                 "cpu", "--overwrite", "--delta"])
    failures = FailureLog(tmp_path)
    runner = runner_mod.Runner(make_config(tmp_path, args=args, overwrite=True),
                               FakeClockDispatcher(), failures,
                               runner_mod.Progress(1, enabled=False))
    entry = ListEntry("org/ft", source_model="org/base")
    paths = ModelPaths.for_model(tmp_path, "org/ft", log_dir=tmp_path / "logs")
    delta = delta_paths(paths).csv
    delta.parent.mkdir(parents=True)
    fake_result(paths.csv)
    fake_result(delta)
    assert finished(runner, entry, paths, -2, stopped=True) == []
    assert paths.csv.is_file() and delta.is_file(), "a stopped job removed an old result"
    job = runner.job(JobSpec((entry,)))
    assert runner.on_finish(JobResult(job=job, returncode=0, gpus=(), threads=2, pid=1,
                                      start=0.0, end=1.0, started_at=time.time(),
                                      log_path=paths.log)) == []
    assert "missing or incomplete" in failures.cause("org/ft")
    assert not paths.csv.exists() and not delta.exists(), "old numbers passed for new"
