"""The node side of the cluster backends (backend_task) and Slurm's answers (slurm_cli),
with real subprocesses and no cluster."""

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from esd_experiment.backends.slurm import SlurmOptions, add_slurm_arguments, slurm_options_from_args
from esd_experiment.backends.slurm_cli import SlurmCLI, cause_from_log, submission_error
from esd_experiment.backends.task import Outcome, TaskCommand, read_outcome, run_commands
from esd_experiment.backends.task_workers import worker_for_tasks
from esd_experiment.core.errors import InputError, TransientError
from gputracker.jobs import Job, JobResult
from gputracker.pool import PER_MODEL_ENV
from tests.slurm_fixtures import PROBE, ROOT, runs, wait_for

START_TIMEOUT_S = 30


def command(tmp: Path, name: str, code: int = 0, hold: Path | None = None) -> TaskCommand:
    return TaskCommand(name, [sys.executable, "-c", PROBE, str(tmp / f"{name}.marker"),
                              str(code), str(hold or "")], {"PROBE_EXTRA": name},
                       tmp / "logs" / f"{name}.log", tmp / "outcomes" / f"{name}.json")


def test_commands_run_in_order_with_their_env_and_outcomes(tmp_path):
    outcomes = run_commands([command(tmp_path, "a", 3), command(tmp_path, "b")], gpus=(),
                            threads=2, task="7_1")
    assert [o.returncode for o in outcomes] == [3, 0]
    assert read_outcome(tmp_path / "outcomes" / "a.json") == outcomes[0]
    (a,), (b,) = runs(tmp_path, "a"), runs(tmp_path, "b")
    assert a["start"] < b["start"] and (a["cvd"], a["omp"], a["extra"]) == ("", "2", "a")
    assert outcomes[0].pid == a["pid"] and outcomes[0].task == "7_1"
    log = (tmp_path / "logs" / "a.log").read_text()
    assert log.startswith("# task 7_1 on ") and "probe ran" in log


def test_argv_builder_gets_the_nodes_allocation(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    seen = []
    cmd = TaskCommand("x", lambda alloc: seen.append(alloc) or [sys.executable, "-c", ""],
                      {}, tmp_path / "x.log")
    (outcome,) = run_commands([cmd])
    assert outcome.returncode == 0 and outcome.gpus == (2, 3) and seen[0].gpus == (2, 3)


def test_a_command_that_cannot_start_is_an_error_outcome(tmp_path):
    cmd = TaskCommand("x", [str(tmp_path / "no-such-program")], {}, tmp_path / "x.log",
                      tmp_path / "x.json")
    (outcome,) = run_commands([cmd])
    assert outcome.returncode is None and "could not start x" in outcome.error
    assert read_outcome(tmp_path / "x.json").error == outcome.error


# The task as Slurm runs it: a process of its own, which the test signals as scancel does.
TASK = textwrap.dedent("""
    import pickle, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from esd_experiment.backends.task import run_commands
    run_commands(pickle.load(open(sys.argv[1], "rb")), grace_period=2.0,
                 worker_script=Path(sys.argv[2]) if sys.argv[2:] else None)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_command_and_skips_the_rest(tmp_path, signum):
    import pickle

    hold = tmp_path / "hold"
    hold.touch()
    commands = [command(tmp_path, "first", hold=hold), command(tmp_path, "second")]
    (tmp_path / "task.pkl").write_bytes(pickle.dumps(commands))
    proc = subprocess.Popen([sys.executable, "-c", TASK.format(root=str(ROOT)),
                             str(tmp_path / "task.pkl")])
    wait_for(lambda: runs(tmp_path, "first"), START_TIMEOUT_S, "the first command")
    os.kill(proc.pid, signal.SIGUSR2)  # Slurm's early warning: ignored
    os.kill(proc.pid, signum)
    assert proc.wait(START_TIMEOUT_S) == 0
    first = read_outcome(tmp_path / "outcomes" / "first.json")
    second = read_outcome(tmp_path / "outcomes" / "second.json")
    assert first.returncode == -signal.SIGTERM and first.signal == signum.name
    assert second.returncode is None and second.signal == signum.name
    assert not runs(tmp_path, "second")


# A command that stays past its timeout: it holds until the test ends it (the probe), or
# ignores SIGTERM as a worker stuck in uninterruptible I/O might.
TIMEOUT_S = 1.0
GRACE_S = 1.5
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('holding', flush=True); time.sleep(60)")


def test_a_command_past_its_timeout_is_stopped_and_the_next_one_runs(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    slow = command(tmp_path, "slow", hold=hold)
    slow = TaskCommand(slow.name, slow.argv, slow.env, slow.log_path, slow.outcome_path,
                       timeout=TIMEOUT_S)
    stubborn = TaskCommand("stubborn", [sys.executable, "-c", STUBBORN], {},
                           tmp_path / "logs" / "stubborn.log", timeout=TIMEOUT_S)
    outcomes = run_commands([slow, stubborn, command(tmp_path, "next")], gpus=(),
                            grace_period=GRACE_S)
    stopped, killed, after = outcomes
    assert stopped.returncode == -signal.SIGTERM and stopped.timed_out and not stopped.signal
    assert TIMEOUT_S <= stopped.end - stopped.start < TIMEOUT_S + GRACE_S
    assert read_outcome(tmp_path / "outcomes" / "slow.json") == stopped
    assert killed.returncode == -signal.SIGKILL and killed.timed_out
    assert killed.end - killed.start >= TIMEOUT_S + GRACE_S
    assert "holding" in (tmp_path / "logs" / "stubborn.log").read_text()
    assert after.returncode == 0 and not after.timed_out and runs(tmp_path, "next")


# Long-lived workers in a task: tests/pool_job.py serves jobs as esd_worker.py does.
POOL_SCRIPT = ROOT / "tests" / "pool_job.py"
POOL_TIMEOUT_S = 6.0  # a hung model's limit: far above an ok job (a few ms) even under load
POOL_GRACE_S = 1.0
KILL_WAIT_S = 60.0  # how long the kill -9 waits for its model to start


def pooled(tmp: Path, mode: str, name: str) -> TaskCommand:
    return TaskCommand(name, [sys.executable, str(POOL_SCRIPT), mode, name, str(tmp)], {},
                       tmp / "logs" / f"{name}.log", tmp / "outcomes" / f"{name}.json",
                       POOL_TIMEOUT_S)


def served_by(tmp: Path, name: str) -> int:
    """The pid of the process that ran model ``name`` to its end."""
    return int((tmp / f"{name}.done").read_text())


def job_lines(tmp: Path, name: str) -> list[str]:
    return [line for line in (tmp / "logs" / f"{name}.log").read_text().splitlines()
            if line.startswith(("job ", "env "))]


def test_a_tasks_models_share_one_worker_with_their_own_env_logs_and_outcomes(tmp_path):
    commands = [pooled(tmp_path, "ok", "a"), command(tmp_path, "probe"),
                pooled(tmp_path, "ok", "b"), pooled(tmp_path, "ok", "c")]
    outcomes = run_commands(commands, gpus=(3,), task="7_1", worker_script=POOL_SCRIPT)
    assert [o.returncode for o in outcomes] == [0, 0, 0, 0]
    a, probe, b, c = outcomes
    worker = served_by(tmp_path, "a")
    assert served_by(tmp_path, "b") == served_by(tmp_path, "c") == worker
    assert a.pid == b.pid == c.pid == worker and a.gpus == (3,)
    # A command that is not the worker script's still runs in a process of its own.
    (probe_run,) = runs(tmp_path, "probe")
    assert probe.pid == probe_run["pid"] != worker and probe_run["cvd"] == "3"
    for name, outcome in zip("abc", (a, b, c), strict=True):
        assert read_outcome(tmp_path / "outcomes" / f"{name}.json") == outcome
        assert job_lines(tmp_path, name) == [f"job {name} in pid {worker}", "env cvd=3 omp=None"]
        log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert log.startswith("# task 7_1 on ") and f" in worker pid {worker}: " in log


def test_a_crash_hang_oom_or_kill_9_fails_only_its_model_and_the_task_goes_on(tmp_path):
    modes = [("a1", "ok"), ("a2", "ok"), ("crash", "crash"), ("b", "ok"), ("hang", "hang"),
             ("c", "ok"), ("oom", "oom"), ("d", "ok"), ("victim", "wait"), ("e", "ok")]
    failing = ("crash", "hang", "oom", "victim")
    for name in failing:
        (tmp_path / f"poison-{name}").touch()
    pid_file = tmp_path / "victim.pid"

    def kill_when_started():
        deadline = time.monotonic() + KILL_WAIT_S
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    outcomes = run_commands([pooled(tmp_path, mode, name) for name, mode in modes], gpus=(),
                            threads=1, grace_period=POOL_GRACE_S, worker_script=POOL_SCRIPT)
    killer.join()
    got = {name: outcome for (name, _), outcome in zip(modes, outcomes, strict=True)}

    assert [n for n, o in got.items() if o.returncode == 0] == ["a1", "a2", "b", "c", "d", "e"]
    assert got["crash"].returncode == -signal.SIGSEGV and not got["crash"].timed_out
    assert got["hang"].returncode == -signal.SIGTERM and got["hang"].timed_out
    assert got["oom"].returncode == 1
    assert "MemoryError" in (tmp_path / "logs" / "oom.log").read_text()
    assert got["victim"].returncode == -signal.SIGKILL and not got["victim"].timed_out
    assert not any(o.signal or o.error for o in outcomes)
    # a1, a2 and the crash shared a worker; each failure retired its worker, so the model
    # after it got a fresh one.
    assert got["a1"].pid == got["a2"].pid == got["crash"].pid == served_by(tmp_path, "a1")
    pids = [served_by(tmp_path, n) for n in ("a2", "b", "c", "d", "e")]
    assert len(set(pids)) == len(pids)
    for name, _ in modes:  # each model its own log and outcome file
        assert [line.split()[1] for line in job_lines(tmp_path, name)
                if line.startswith("job ")] == [name]
        assert read_outcome(tmp_path / "outcomes" / f"{name}.json") == got[name]

    for name in failing:
        (tmp_path / f"poison-{name}").unlink()
    again = run_commands([pooled(tmp_path, mode, name) for name, mode in modes
                          if name in failing], gpus=(), worker_script=POOL_SCRIPT)
    assert [o.returncode for o in again] == [0, 0, 0, 0]
    assert all((tmp_path / f"{name}.done").is_file() for name, _ in modes)


def test_a_stop_signal_ends_the_worker_and_skips_the_rest(tmp_path):
    import pickle

    (tmp_path / "poison-first").touch()
    commands = [pooled(tmp_path, "ok", "before"), pooled(tmp_path, "wait", "first"),
                pooled(tmp_path, "ok", "second")]
    (tmp_path / "task.pkl").write_bytes(pickle.dumps(commands))
    proc = subprocess.Popen([sys.executable, "-c", TASK.format(root=str(ROOT)),
                             str(tmp_path / "task.pkl"), str(POOL_SCRIPT)])
    pid_file = tmp_path / "first.pid"
    wait_for(pid_file.is_file, START_TIMEOUT_S, "the first model")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(START_TIMEOUT_S) == 0
    before, first, second = (read_outcome(tmp_path / "outcomes" / f"{name}.json")
                             for name in ("before", "first", "second"))
    worker = int(pid_file.read_text())
    assert before.returncode == 0 and before.pid == first.pid == worker
    assert first.returncode == -signal.SIGTERM and first.signal == "SIGTERM"
    assert second.returncode is None and second.signal == "SIGTERM"
    assert not (tmp_path / "second.done").exists()
    with pytest.raises(ProcessLookupError):  # the worker went with its model
        os.kill(worker, 0)


def test_one_process_per_model_stays_available_on_clusters(monkeypatch):
    monkeypatch.setenv(PER_MODEL_ENV, "1")
    assert worker_for_tasks(POOL_SCRIPT) is None
    monkeypatch.delenv(PER_MODEL_ENV)
    assert worker_for_tasks(POOL_SCRIPT) == POOL_SCRIPT


def test_unreadable_outcome_is_reported(tmp_path):
    (tmp_path / "o.json").write_text("{not json")
    assert "unreadable outcome" in read_outcome(tmp_path / "o.json").error
    assert read_outcome(tmp_path / "missing.json") is None
    outcome = Outcome(0, 1.0, 2.0, "node", gpus=(1,))
    (tmp_path / "ok.json").write_text(outcome.to_json())
    assert read_outcome(tmp_path / "ok.json") == outcome and json.loads(outcome.to_json())


def test_describe_adds_the_backends_detail(tmp_path):
    job = Job("m", ["true"], tmp_path / "m.log")
    result = JobResult(job, -15, (), None, 0, 0.0, 1.0, 0.0, job.log_path,
                       detail="Slurm ended the task at its time limit")
    assert result.describe() == "killed by SIGTERM: Slurm ended the task at its time limit"
    assert JobResult(job, 1, (), None, 0, 0.0, 1.0, 0.0, job.log_path).describe() == "exit code 1"


@pytest.mark.parametrize("line, state", [
    ("slurmstepd: error: *** JOB 5 ON vm CANCELLED AT 2026-11-26T00:22:21 DUE TO TIME LIMIT ***",
     "TIMEOUT"),
    ("slurmstepd: error: *** STEP 6.0 ON vm CANCELLED AT 2026-11-26T00:21:16 ***", "CANCELLED"),
    ("slurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026-11-26T00:21:16 DUE TO PREEMPTION ***",
     "PREEMPTED"),
    ("slurmstepd: error: Detected 1 oom_kill event in StepId=8.0.", "OUT_OF_MEMORY"),
])
def test_cause_read_from_the_slurm_log(tmp_path, line, state):
    (tmp_path / "t.err").write_text(f"srun: got SIGCONT\n{line}\nsrun: error: task 0\n")
    assert cause_from_log(tmp_path / "t.err").state == state
    assert cause_from_log(tmp_path / "missing.err") is None


def test_sbatch_refusals_and_outages_are_told_apart():
    refused = submission_error("sbatch: error: Batch job submission failed: Invalid account")
    assert isinstance(refused, InputError) and "Invalid account" in str(refused)
    down = submission_error("sbatch: error: Batch job submission failed: Unable to contact "
                            "slurm controller (connect failure)")
    assert isinstance(down, TransientError) and "nothing was submitted" in str(down)


def fake_run(stdout="", stderr="", returncode=0, calls=None):
    def run(argv):
        if calls is not None:
            calls.append(list(argv))
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)
    return run


def test_squeue_answers():
    calls = []
    cli = SlurmCLI(fake_run("12_0|RUNNING\n12_1|PENDING\n13|COMPLETED\n", calls=calls))
    assert cli.queued(["12_0", "12_1", "12_2", "13"]) == {"12_0": "RUNNING", "12_1": "PENDING"}
    assert calls == [["squeue", "-h", "-r", "-j", "12,13", "-o", "%i|%T"]]
    assert SlurmCLI(fake_run(stderr="Invalid job id specified", returncode=1)).queued(["9"]) == {}
    with pytest.raises(TransientError, match="squeue failed"):
        SlurmCLI(fake_run(stderr="Socket timed out", returncode=1)).queued(["9"])


def test_slurm_flags():
    parser = argparse.ArgumentParser()
    add_slurm_arguments(parser)
    args = parser.parse_args(["--slurm_partition", "gpu", "--slurm_time", "90",
                              "--slurm_setup", "module load cuda", "--slurm_setup", ". env",
                              "--slurm_additional", "mail-type=FAIL", "--detach",
                              "--slurm_models_per_task", "3"])
    options = slurm_options_from_args(args, default_gpus=2, job_name="esd")
    assert options == SlurmOptions(partition="gpu", time_min=90, gpus_per_task=2,
                                   setup=("module load cuda", ". env"),
                                   additional=(("mail-type", "FAIL"),), models_per_task=3,
                                   detach=True, job_name="esd")
    assert slurm_options_from_args(parser.parse_args(["--slurm_gpus_per_task", "0"]),
                                   default_gpus=2).gpus_per_task == 0
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        slurm_options_from_args(parser.parse_args(["--slurm_additional", "exclusive"]), 1)
    with pytest.raises(InputError, match="--slurm_time must be at least 1"):
        slurm_options_from_args(parser.parse_args(["--slurm_time", "0"]), 1)


def test_backends_import_neither_torch_nor_transformers():
    code = ("import sys; from esd_experiment.backends import ray_backend, slurm, slurm_cli, task; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[]"
