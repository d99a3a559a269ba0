"""The Slurm backend on a real single-node Slurm (tests/slurm/start_slurm.sh), with real jobs.

Skipped, with the reason, where that cluster cannot start (no slurm-wlm, not root).
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from esd_experiment.backends.slurm import SlurmBackend, SlurmOptions
from esd_experiment.backends.slurm_cli import SlurmCLI, gpu_count, run_command
from esd_experiment.core.errors import InputError
from tests.slurm_fixtures import ROOT, probe_job, runs, wait_for, worker_argv

START = ROOT / "tests" / "slurm" / "start_slurm.sh"
POLL_S = 0.3            # squeue every 0.3 s: the tests wait on seconds-long jobs
QUEUE_TIMEOUT_S = 60    # a free single-node cluster starts a task within a few seconds
TIME_LIMIT_WAIT_S = 150  # Slurm's limits are whole minutes, checked about once a minute
JOB_TIMEOUT_S = 3       # --model_timeout: seconds, enforced by the task on the node


@pytest.fixture(scope="session")
def slurm():
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the single-node test cluster starts only as root")
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"the single-node Slurm did not start: {proc.stderr.strip()}")


def options(**kwargs) -> SlurmOptions:
    return SlurmOptions(**{"poll_interval": POLL_S, "time_min": 5, "cpus_per_task": 1,
                           **kwargs})


def squeue(*job_ids: str) -> str:
    proc = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"],
                          capture_output=True, text=True)
    return proc.stdout.strip()


def submission_scripts(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "submitit").glob("*_submission.sh"))


def retry_signalled(backend):
    """on_finish as the runner's: a job killed by a signal is retried at once, once."""
    def on_finish(result):
        if result.returncode < 0 and not result.stopped and result.job.attempt == 1:
            return [replace(result.job, attempt=2)]
        return None
    return on_finish


def test_array_of_five_jobs_on_fake_gpus(slurm, tmp_path):
    jobs = [probe_job(tmp_path, f"m{i}", code=i % 2, env={"PROBE_EXTRA": f"x{i}"})
            for i in range(5)]
    backend = SlurmBackend(options(gpus_per_task=1), tmp_path / "state")
    results = backend.run(jobs)
    assert sorted((r.name, r.returncode) for r in results) == [
        (f"m{i}", i % 2) for i in range(5)]
    tasks = {runs(tmp_path, f"m{i}")[0]["task"] for i in range(5)}
    assert len({task.split("_")[0] for task in tasks}) == 1, "one array"
    assert len(tasks) == 5, "one task per job"
    for result in results:
        (run,) = runs(tmp_path, result.name)
        assert run["cvd"] in ("0", "1"), "Slurm gave each task one of the node's 2 GPUs"
        assert result.gpus == (int(run["cvd"]),) and result.pid == run["pid"]
        assert run["extra"] == f"x{result.name[1:]}", "the job's own env reaches it"
        log = result.log_path.read_text()
        assert "probe ran" in log and f"# task {run['task']} on " in log
    assert len(submission_scripts(tmp_path / "state")) == 1
    assert not backend.left_running and backend.running_jobs == 0
    assert '"submissions": []' in (tmp_path / "state" / "submissions.json").read_text()


def test_models_per_task_share_tasks_and_cpu_mode(slurm, tmp_path):
    jobs = [probe_job(tmp_path, f"m{i}") for i in range(5)]
    results = SlurmBackend(options(models_per_task=2, cpus_per_task=1),
                           tmp_path / "state").run(jobs)
    assert all(r.ok for r in results) and len(results) == 5
    tasks = [runs(tmp_path, f"m{i}")[0]["task"] for i in range(5)]
    assert tasks[0] == tasks[1] and tasks[2] == tasks[3] and len(set(tasks)) == 3
    first, second = runs(tmp_path, "m0")[0], runs(tmp_path, "m1")[0]
    assert first["start"] < second["start"], "one after another within a task"
    assert {run[0]["cvd"] for run in map(lambda i: runs(tmp_path, f"m{i}"), range(5))} == {""}
    assert {runs(tmp_path, f"m{i}")[0]["omp"] for i in range(5)} == {"1"}


def test_detach_then_rerun_adopts_running_jobs(slurm, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    jobs = [probe_job(tmp_path, f"m{i}", code=0, hold=hold) for i in range(3)]
    first = SlurmBackend(options(detach=True), tmp_path / "state")
    assert first.run(jobs) == []
    assert sorted(first.left_running) == ["m0", "m1", "m2"]
    assert first.scancel_command() == f"scancel {first.job_ids[0]}"
    wait_for(lambda: all(runs(tmp_path, f"m{i}") for i in range(3)), QUEUE_TIMEOUT_S, "starts")

    second = SlurmBackend(options(), tmp_path / "state")
    threading.Timer(1.0, hold.unlink).start()  # the jobs end while the rerun waits for them
    results = second.run(jobs)
    assert sorted(r.name for r in results) == ["m0", "m1", "m2"] and all(r.ok for r in results)
    assert all(len(runs(tmp_path, f"m{i}")) == 1 for i in range(3)), "nothing resubmitted"
    assert len(submission_scripts(tmp_path / "state")) == 1


def test_a_rerun_with_another_command_cancels_the_earlier_runs_job(slurm, tmp_path):
    """A job an earlier run left running with another command (other options, --overwrite)
    is cancelled and submitted again with this run's; adopted, it wrote a result of the old
    options, which the runner then removed and recorded as failed."""
    old, first, hold = held_running(tmp_path, "m0")
    new = replace(old, argv=[*old.argv[:-1], ""])  # the same job, another command: no hold
    (result,) = SlurmBackend(options(), tmp_path / "state").run([new])
    assert result.ok and result.job.argv == new.argv
    wait_for(lambda: not squeue(*first.job_ids), QUEUE_TIMEOUT_S, "the old task's cancel")
    assert len(runs(tmp_path, "m0")) == 2, "the old command started, the new one ran"
    assert len(submission_scripts(tmp_path / "state")) == 2
    hold.unlink()


def test_a_local_run_beside_a_detached_runs_jobs_is_refused(slurm, tmp_path, capsys):
    """--detach leaves the directory's lock; a run on another backend would compute the same
    models beside the Slurm tasks: refused (exit 2) with the way on."""
    from esd_experiment.run import cli

    out = tmp_path / "out"
    _, first, hold = held_running(tmp_path, "m0", out / "slurm")
    models = tmp_path / "models.csv"
    models.write_text(f"model_id\n{tmp_path / 'm0'}\n")
    try:
        code = cli.main(["--model_list", str(models), "--output_dir", str(out), "--device",
                         "cpu", "--no-progress"])
    finally:
        subprocess.run(["scancel", *first.job_ids], check=False)
        hold.unlink()
    err = capsys.readouterr().err
    assert code == 2 and "queued or running" in err and "--backend slurm" in err, err
    assert f"scancel {first.job_ids[0]}" in err


def test_detached_results_collected_and_finished_list_submits_nothing(slurm, tmp_path):
    jobs = [probe_job(tmp_path, "good"), probe_job(tmp_path, "bad", code=1, attempt=1)]
    first = SlurmBackend(options(detach=True), tmp_path / "state")
    first.run(jobs)
    wait_for(lambda: not squeue(*first.job_ids), QUEUE_TIMEOUT_S, "the array to finish")

    seen = []
    second = SlurmBackend(options(), tmp_path / "state")
    results = second.run(jobs, lambda r: seen.append(r.name))
    assert sorted((r.name, r.returncode) for r in results) == [("bad", 1), ("good", 0)]
    assert sorted(seen) == ["bad", "good"], "on_finish sees collected results"
    assert len(runs(tmp_path, "bad")) == 1 and len(submission_scripts(tmp_path / "state")) == 1

    third = SlurmBackend(options(), tmp_path / "state")
    assert third.run([]) == [] and third.running_jobs == 0
    assert len(submission_scripts(tmp_path / "state")) == 1, "a finished list submits nothing"


def held_running(tmp_path, name: str, state_dir=None):
    """A probe job submitted by a detached run and held running once it has started:
    ``(job, that run's backend, the hold file to remove)``."""
    hold = tmp_path / "hold"
    hold.touch()
    job = probe_job(tmp_path, name, hold=hold)
    first = SlurmBackend(options(detach=True), state_dir or tmp_path / "state")
    first.run([job])
    wait_for(lambda: runs(tmp_path, name), QUEUE_TIMEOUT_S, "the job to start")
    return job, first, hold


def signalled_while_held(tmp_path, name: str, *scancel_args: str, until_gone: bool = False):
    """A probe job submitted and left running (held), given ``scancel *scancel_args`` once
    it has started (and, with ``until_gone``, once Slurm no longer lists it), then let go."""
    job, first, hold = held_running(tmp_path, name)
    subprocess.run(["scancel", *scancel_args, *first.job_ids], check=True)
    if until_gone:
        wait_for(lambda: not squeue(*first.job_ids), QUEUE_TIMEOUT_S, "the cancel")
    hold.unlink()
    return job


def test_cancelled_task_is_transient_and_a_rerun_completes_it(slurm, tmp_path):
    job = signalled_while_held(tmp_path, "slow", until_gone=True)
    second = SlurmBackend(options(), tmp_path / "state")
    results = second.run([job], retry_signalled(second))
    cancelled, retried = results
    assert cancelled.returncode == -signal.SIGTERM and "cancelled (scancel)" in cancelled.detail
    assert "killed by SIGTERM: the task was cancelled" in cancelled.describe()
    assert retried.ok and retried.job.attempt == 2 and len(runs(tmp_path, "slow")) == 2


def test_a_task_killed_on_its_node_is_transient_and_retried(slurm, tmp_path):
    """The task's own process killed (the kernel's OOM killer, kill -9): Slurm says FAILED
    with exit 137; the job is retried as killed by SIGKILL (it was a final failure 'before
    running the job')."""
    job, first, hold = held_running(tmp_path, "victim")
    task = subprocess.run(["pgrep", "-f", f"submitit.core._submit.*{tmp_path}"],
                          capture_output=True, text=True).stdout.split()
    assert task, "the task's process"
    for pid in task:
        os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: not squeue(*first.job_ids), QUEUE_TIMEOUT_S, "the task to end")
    hold.unlink()
    second = SlurmBackend(options(), tmp_path / "state")
    killed, retried = second.run([job], retry_signalled(second))
    assert killed.returncode == -signal.SIGKILL, killed.detail
    assert "killed by SIGKILL" in killed.detail
    assert retried.ok and retried.job.attempt == 2


def test_time_limit_kill_is_transient_with_its_cause(slurm, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    jobs = [probe_job(tmp_path, "long", hold=hold), probe_job(tmp_path, "next")]
    backend = SlurmBackend(options(time_min=1, models_per_task=2, poll_interval=1.0),
                           tmp_path / "state")
    timer = threading.Timer(TIME_LIMIT_WAIT_S, backend.stop, ("test timeout",))
    timer.start()
    try:
        results = {r.name: r for r in backend.run(jobs)}
    finally:
        timer.cancel()
    assert not backend.stopped, "Slurm enforced the limit"
    (script,) = submission_scripts(tmp_path / "state")
    text = script.read_text()
    assert "#SBATCH --signal=B:USR2@30" in text and "\ntrap '' USR2\n" in text
    assert results["long"].returncode == -signal.SIGTERM
    assert "time limit (--slurm_time 1 min)" in results["long"].detail
    assert results["next"].returncode == -signal.SIGTERM
    assert "before this job started" in results["next"].detail and not runs(tmp_path, "next")


def test_time_limit_warning_sent_at_once_kills_nothing(slurm, tmp_path):
    # Slurm may send the warning signal up to a minute before the time asked: under a short
    # limit, right as the task starts. It goes to the batch shell, which must survive it.
    job = signalled_while_held(tmp_path, "warned", "--batch", "--signal=USR2")
    (result,) = SlurmBackend(options(), tmp_path / "state").run([job])
    assert result.ok, result.describe()
    assert len(runs(tmp_path, "warned")) == 1


def test_model_timeout_stops_the_job_on_its_node_and_the_task_goes_on(slurm, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    jobs = [probe_job(tmp_path, "hung", hold=hold, timeout=JOB_TIMEOUT_S),
            probe_job(tmp_path, "after", timeout=JOB_TIMEOUT_S)]
    backend = SlurmBackend(options(models_per_task=2, poll_interval=0.5), tmp_path / "state")
    results = {r.name: r for r in backend.run(jobs)}
    hung = results["hung"]
    assert hung.returncode == -signal.SIGTERM and hung.timed_out and hung.detail == ""
    assert hung.describe() == f"killed by SIGTERM (timed out after {JOB_TIMEOUT_S:g} s)"
    assert hung.duration >= JOB_TIMEOUT_S and len(runs(tmp_path, "hung")) == 1
    assert results["after"].ok and not results["after"].timed_out


def test_stop_leaves_jobs_running_or_cancels_them(slurm, tmp_path, caplog):
    hold = tmp_path / "hold"
    hold.touch()
    jobs = [probe_job(tmp_path, f"m{i}", hold=hold) for i in range(2)]
    backend = SlurmBackend(options(), tmp_path / "kept")
    threading.Timer(2.0, backend.stop, ("received SIGINT", signal.SIGINT)).start()
    assert backend.run(jobs) == []
    assert backend.stopped and backend.stop_signum == signal.SIGINT
    assert sorted(backend.left_running) == ["m0", "m1"] and squeue(*backend.job_ids)
    assert backend.scancel_command() in caplog.text
    subprocess.run(["scancel", *backend.job_ids], check=True)

    cancelling = SlurmBackend(options(cancel_on_exit=True), tmp_path / "cancelled")
    threading.Timer(2.0, cancelling.stop, ("received SIGINT", signal.SIGINT)).start()
    results = cancelling.run([probe_job(tmp_path, "c", hold=hold)])
    assert [r.stopped for r in results] == [True] and not cancelling.left_running
    ids = {runs(tmp_path, "c")[0]["task"].split("_")[0]} if runs(tmp_path, "c") else set()
    wait_for(lambda: not ids or not squeue(*ids), QUEUE_TIMEOUT_S, "the cancel")


def test_unknown_partition_is_refused_with_sbatchs_message(slurm, tmp_path):
    backend = SlurmBackend(options(partition="no-such-partition"), tmp_path / "state")
    with pytest.raises(InputError, match="nothing was submitted: .*[Ii]nvalid partition"):
        backend.run([probe_job(tmp_path, "m0")])
    assert not submission_scripts(tmp_path / "state") and not runs(tmp_path, "m0")


def test_state_dir_the_nodes_cannot_write_stops_the_run(slurm, tmp_path):
    # The task runs as nobody, who cannot write into root's private pytest directory: what a
    # compute node sees when --output_dir is on a path it cannot write.
    tmp_path.chmod(0o700)
    backend = SlurmBackend(options(additional=(("uid", "nobody"),)), tmp_path / "state")
    with pytest.raises(InputError, match="compute nodes must be able to write"):
        backend.run([probe_job(tmp_path, f"m{i}") for i in range(2)])
    assert not backend.left_running



def test_two_jobs_of_one_name_are_refused_before_anything_is_submitted(slurm, tmp_path):
    backend = SlurmBackend(options(), tmp_path / "state")
    with pytest.raises(ValueError, match="unique; given twice: m0"):
        backend.run([probe_job(tmp_path, "m0"), probe_job(tmp_path, "m0"),
                     probe_job(tmp_path, "m1")])
    assert not submission_scripts(tmp_path / "state") and not runs(tmp_path, "m0")


def without_gpu_gres(argv):
    """Slurm's own commands, but sinfo answers as for a partition whose nodes declare no GPU
    (the test cluster declares 2, and it is shared: it is not reconfigured for a test)."""
    if argv[0] == "sinfo":
        return subprocess.CompletedProcess(argv, 0, "debug*|(null)\n", "")
    return run_command(argv)



@pytest.mark.parametrize("gres, gpus", [
    ("(null)", 0), ("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("shard:8,gpu:h100:8(S:0,1)", 8),
    ("gpu:tesla:2,gpu:a100:2", 4), ("gpu", 1), ("mps:100", 0)])
def test_gpus_of_a_node_read_from_sinfos_gres(gres, gpus):
    assert gpu_count(gres) == gpus

def test_gpus_if_any_on_a_partition_without_gpus_runs_cpu_tasks(slurm, tmp_path):
    backend = SlurmBackend(options(gpus_per_task=1, require_gpus=False), tmp_path / "state",
                           cli=SlurmCLI(without_gpu_gres))
    (result,) = backend.run([probe_job(tmp_path, "m0")])
    assert result.ok and result.gpus == () and result.threads == 1, result.describe()
    (run,) = runs(tmp_path, "m0")
    assert run["cvd"] == "" and run["omp"] == "1", "a CPU task: no GPU, one thread per CPU"
    (script,) = submission_scripts(tmp_path / "state")
    asked = [line.split("=")[0] for line in script.read_text().splitlines()
             if line.startswith("#SBATCH")]
    assert not [flag for flag in asked if "gpu" in flag or "gres" in flag], asked


def test_gpus_the_partition_cannot_give_are_refused_at_once(slurm, tmp_path):
    with pytest.raises(InputError, match=r"the default partition has no GPUs .*--device cpu"):
        SlurmBackend(options(gpus_per_task=1), tmp_path / "a", cli=SlurmCLI(without_gpu_gres))
    with pytest.raises(InputError, match=r"3 GPUs per task, but no node of partition debug "
                                         r"has more than 2: .*--num_gpus_per_job"):
        SlurmBackend(options(gpus_per_task=3, partition="debug"), tmp_path / "b")
    SlurmBackend(options(gpus_per_task=2), tmp_path / "c")  # what the node has: accepted
    assert not list(tmp_path.glob("*/submitit"))

def test_sbatch_missing_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="needs Slurm's sbatch"):
        SlurmBackend(options(), tmp_path / "state")


def test_real_worker_on_slurm_writes_the_local_csv(slurm, tmp_path):
    from esd_experiment.run.demo import build_llama

    model = build_llama(tmp_path / "tiny-llama")
    local = subprocess.run(worker_argv(model, tmp_path / "local"), capture_output=True,
                           text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    job = probe_job(tmp_path, "unused")
    job = replace(job, name="tiny-llama", argv=worker_argv(model, tmp_path / "slurm"),
                  log_path=tmp_path / "slurm" / "logs" / "tiny-llama.log")
    (result,) = SlurmBackend(options(), tmp_path / "state").run([job])
    assert result.ok, result.log_path.read_text()
    (local_csv,) = (tmp_path / "local").glob("*.csv")
    (slurm_csv,) = (tmp_path / "slurm").glob("*.csv")
    assert local_csv.name == slurm_csv.name
    pd.testing.assert_frame_equal(pd.read_csv(local_csv), pd.read_csv(slurm_csv))
    assert "# task " in result.log_path.read_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
