"""The Ray backend on a real local Ray that the test starts, with 2 logical GPUs: placement is
checked on the GPUs Ray hands out while the jobs themselves run on the CPU."""

import argparse
import re
import signal
import sys
import threading
import time
from dataclasses import replace

import pandas as pd
import pytest

from esd_experiment.backends.ray_backend import (
    RayBackend,
    RayOptions,
    add_ray_arguments,
    ray_options_from_args,
)
from esd_experiment.core.errors import InputError
from gputracker import Job
from tests.slurm_fixtures import ROOT, probe_job, runs, wait_for, worker_argv

LOGICAL_GPUS = 2
START_TIMEOUT_S = 60  # the first task waits for Ray to start a worker process
SETTLE_S = 1.0        # a job given a GPU starts well within this once Ray has its workers
JOB_TIMEOUT_S = 2     # --model_timeout: seconds, enforced by the task in its Ray worker
POOL_SCRIPT = ROOT / "tests" / "pool_job.py"  # serves jobs in a long-lived worker


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")
    ray.init(num_cpus=4, num_gpus=LOGICAL_GPUS, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def options(**kwargs) -> RayOptions:
    return RayOptions(**{"poll_interval": 0.1, "grace_period": 5.0, **kwargs})


def test_each_job_gets_its_own_logical_gpu(ray_cluster, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    jobs = [probe_job(tmp_path, f"m{i}", code=i % 2, hold=hold, env={"PROBE_EXTRA": str(i)})
            for i in range(3)]
    backend = RayBackend(options(gpus_per_job=1))
    thread = threading.Thread(target=lambda: results.extend(backend.run(jobs)))
    results = []
    thread.start()
    def started():
        return [job.name for job in jobs if runs(tmp_path, job.name)]

    wait_for(lambda: len(started()) >= LOGICAL_GPUS, START_TIMEOUT_S, "two jobs to start")
    time.sleep(SETTLE_S)
    assert len(started()) == LOGICAL_GPUS, "a third job waits for a free GPU"
    assert {runs(tmp_path, name)[0]["cvd"] for name in started()} == {"0", "1"}
    hold.unlink()
    thread.join(START_TIMEOUT_S)
    assert sorted((r.name, r.returncode) for r in results) == [("m0", 0), ("m1", 1), ("m2", 0)]
    for result in results:
        (run,) = runs(tmp_path, result.name)
        assert result.gpus == (int(run["cvd"]),) and run["extra"] == result.name[1:]
        assert "probe ran" in result.log_path.read_text()


def test_cpu_mode_asks_for_cpus_and_sets_threads(ray_cluster, tmp_path):
    results = RayBackend(options(gpus_per_job=0, cpus_per_job=2)).run(
        [probe_job(tmp_path, "c0"), probe_job(tmp_path, "c1")])
    assert all(r.ok and r.gpus == () and r.threads == 2 for r in results)
    assert {(run["cvd"], run["omp"]) for n in ("c0", "c1") for run in runs(tmp_path, n)} == {
        ("", "2")}


def test_retries_wait_for_not_before(ray_cluster, tmp_path):
    backend = RayBackend(options(gpus_per_job=0))

    def on_finish(result):
        if result.returncode and result.job.attempt == 1:
            return [replace(result.job, attempt=2, not_before=backend.now() + 1.0)]
        return None

    results = backend.run([probe_job(tmp_path, "flaky", code=75)], on_finish)
    assert [r.job.attempt for r in results] == [1, 2] and len(runs(tmp_path, "flaky")) == 2
    first, second = runs(tmp_path, "flaky")
    assert second["start"] - first["start"] >= 1.0


def test_model_timeout_stops_the_command_in_its_task(ray_cluster, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    (result,) = RayBackend(options(gpus_per_job=0)).run(
        [probe_job(tmp_path, "hung", hold=hold, timeout=JOB_TIMEOUT_S)])
    assert result.returncode == -signal.SIGTERM and result.timed_out and not result.stopped
    assert result.describe() == f"killed by SIGTERM (timed out after {JOB_TIMEOUT_S:g} s)"
    assert result.duration >= JOB_TIMEOUT_S
    pid = runs(tmp_path, "hung")[0]["pid"]
    wait_for(lambda: not _alive(pid), 10, "the command to be gone")


def test_stop_cancels_the_tasks_and_their_commands(ray_cluster, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    backend = RayBackend(options(gpus_per_job=1))
    threading.Thread(target=lambda: (wait_for(lambda: runs(tmp_path, "s"), START_TIMEOUT_S,
                                              "the job to start"),
                                     backend.stop("received SIGINT", signal.SIGINT))).start()
    (result,) = backend.run([probe_job(tmp_path, "s", hold=hold)])
    assert result.stopped and backend.stopped and backend.stop_signum == signal.SIGINT
    pid = runs(tmp_path, "s")[0]["pid"]
    wait_for(lambda: not _alive(pid), 10, "the command to be gone")


def pooled_job(tmp, mode: str, name: str, **kwargs) -> Job:
    (tmp / f"poison-{name}").touch()  # pool_job.py: "hang" and "wait" then sleep
    return Job(name, [sys.executable, str(POOL_SCRIPT), mode, name, str(tmp)],
               tmp / "logs" / f"{name}.log", **kwargs)


def served_by_worker(job: Job) -> int:
    """The pid of the long-lived worker that ran ``job`` (its log's header names it)."""
    (pid,) = re.findall(r" in worker pid (\d+): ", job.log_path.read_text())
    return int(pid)


def test_a_timeout_ends_a_jobs_long_lived_worker(ray_cluster, tmp_path):
    job = pooled_job(tmp_path, "hang", "hung", timeout=JOB_TIMEOUT_S)
    (result,) = RayBackend(options(gpus_per_job=0), worker_script=POOL_SCRIPT).run([job])
    assert result.returncode == -signal.SIGTERM and result.timed_out and not result.stopped
    assert result.pid == served_by_worker(job)
    wait_for(lambda: not _alive(result.pid), 10, "the worker to be gone")


def test_stop_cancels_a_job_in_its_long_lived_worker(ray_cluster, tmp_path):
    job = pooled_job(tmp_path, "wait", "s")
    backend = RayBackend(options(gpus_per_job=1), worker_script=POOL_SCRIPT)
    pid_file = tmp_path / "s.pid"
    threading.Thread(target=lambda: (wait_for(pid_file.is_file, START_TIMEOUT_S,
                                              "the job to start"),
                                     backend.stop("received SIGINT", signal.SIGINT))).start()
    (result,) = backend.run([job])
    assert result.stopped and backend.stopped
    worker = served_by_worker(job)
    assert worker == int(pid_file.read_text())
    wait_for(lambda: not _alive(worker), 10, "the worker to be gone")


def test_a_tasks_jobs_run_in_one_long_lived_worker_and_a_crash_fails_only_its_own(
        ray_cluster, tmp_path):
    jobs = [pooled_job(tmp_path, "ok", "a"), pooled_job(tmp_path, "crash", "x"),
            pooled_job(tmp_path, "ok", "b"), pooled_job(tmp_path, "ok", "c"),
            pooled_job(tmp_path, "ok", "d")]
    backend = RayBackend(options(gpus_per_job=0, models_per_task=4), worker_script=POOL_SCRIPT)
    results = {r.name: r for r in backend.run(jobs)}
    assert sorted(results) == ["a", "b", "c", "d", "x"]
    assert results["x"].returncode == -signal.SIGSEGV
    assert all(results[n].ok for n in "abcd")
    first, second = served_by_worker(jobs[0]), served_by_worker(jobs[2])
    assert second == served_by_worker(jobs[3]) != first  # the crash took its worker down
    assert results["b"].pid == results["c"].pid == second
    assert served_by_worker(jobs[4]) not in (first, second)  # the fifth job: a task of its own
    for job in jobs:
        assert f"job {job.name} in pid" in job.log_path.read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_real_worker_on_ray_writes_the_local_csv(ray_cluster, tmp_path):
    import subprocess

    from esd_experiment.run.demo import build_gpt2

    model = build_gpt2(tmp_path / "tiny-gpt2")
    local = subprocess.run(worker_argv(model, tmp_path / "local"), capture_output=True,
                           text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    job = replace(probe_job(tmp_path, "unused"), name="tiny-gpt2",
                  argv=worker_argv(model, tmp_path / "ray"), log_path=tmp_path / "ray.log")
    (result,) = RayBackend(options(gpus_per_job=0)).run([job])
    assert result.ok, result.log_path.read_text()
    (local_csv,) = (tmp_path / "local").glob("*.csv")
    (ray_csv,) = (tmp_path / "ray").glob("*.csv")
    pd.testing.assert_frame_equal(pd.read_csv(local_csv), pd.read_csv(ray_csv))



def test_requests_no_node_can_place_are_refused_at_once(ray_cluster, tmp_path):
    with pytest.raises(InputError, match=r"3 GPUs per job, but no Ray node has more than 2: "
                                         r".*--num_gpus_per_job"):
        RayBackend(options(gpus_per_job=3)).run([probe_job(tmp_path, "g")])
    with pytest.raises(InputError, match=r"--ray_cpus_per_job 5, but no Ray node has more "
                                         r"than 4 CPUs"):
        RayBackend(options(gpus_per_job=0, cpus_per_job=5)).run([probe_job(tmp_path, "c")])
    assert not runs(tmp_path, "g") and not runs(tmp_path, "c")

def test_without_ray_the_backend_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what "import ray" meets when it is absent
    with pytest.raises(InputError, match=r"pip install -r requirements-ray\.txt"):
        RayBackend(RayOptions())


def test_ray_flags():
    parser = argparse.ArgumentParser()
    add_ray_arguments(parser)
    args = parser.parse_args(["--ray_address", "10.0.0.1:6379", "--ray_cpus_per_job", "4",
                              "--ray_models_per_task", "8"])
    assert ray_options_from_args(args, gpus_per_job=2) == RayOptions(
        address="10.0.0.1:6379", gpus_per_job=2, cpus_per_job=4, models_per_task=8)
    with pytest.raises(InputError, match="--ray_models_per_task must be at least 1"):
        ray_options_from_args(parser.parse_args(["--ray_models_per_task", "0"]), 1)
    with pytest.raises(InputError, match="--ray_cpus_per_job must be at least 1"):
        ray_options_from_args(parser.parse_args(["--ray_cpus_per_job", "0"]), 1)


# A run with no Ray yet: the backend starts a local one and shuts it down when done. In a
# fresh interpreter, since the other tests share the module's Ray.
LOCAL_RAY = """
import sys
sys.path[:0] = [{root!r}]
import ray
from esd_experiment.backends.ray_backend import RayBackend, RayOptions
from tests.slurm_fixtures import probe_job
from pathlib import Path
(result,) = RayBackend(RayOptions(gpus_per_job=0)).run([probe_job(Path({tmp!r}), "solo")])
print(result.returncode, ray.is_initialized())
"""


def test_without_an_address_a_local_ray_is_started_and_stopped(tmp_path):
    import subprocess

    pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")
    from tests.slurm_fixtures import ROOT

    proc = subprocess.run([sys.executable, "-c", LOCAL_RAY.format(root=str(ROOT),
                                                                  tmp=str(tmp_path))],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["0", "False"] and runs(tmp_path, "solo")
