"""Long-lived workers (gputracker.pool): a crash, a hang, an out-of-memory and a kill -9 each
fail only their own job, the next job gets a fresh worker, logs stay per job, and a rerun
completes the list; the runner's models run in one worker and keep their own logs."""

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from gputracker import Dispatcher, Job, launch_in_session
from gputracker.pool import PER_MODEL_ENV, WorkerPool, launcher_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("pool_job.py")
TIMEOUT_S = 6.0  # a hung job's limit: far above an ok job's run (a few ms) even under load
WAIT_S = 60.0  # how long the kill -9 test waits for its job to start
ORPHAN_EXIT_S = 10.0  # a worker polls for its dispatcher every second; a loaded machine lags


def job(mode: str, name: str, folder: Path) -> Job:
    return Job(name=name, argv=[sys.executable, str(SCRIPT), mode, name, str(folder)],
               log_path=folder / "logs" / f"{name}.log", timeout=TIMEOUT_S)


def run_list(folder: Path, modes: list[tuple[str, str]], pool: WorkerPool | None = None):
    pool = pool or WorkerPool(SCRIPT)
    dispatcher = Dispatcher(None, cpu_slots=1, cpu_count=1, grace_period=1.0, launcher=pool)
    results = dispatcher.run([job(mode, name, folder) for name, mode in modes])
    return {r.name: r for r in results}


def worker_pid(folder: Path, name: str) -> int:
    return int((folder / f"{name}.done").read_text())


def log_lines(folder: Path, name: str) -> list[str]:
    return (folder / "logs" / f"{name}.log").read_text().splitlines()


def test_each_failure_fails_its_own_job_and_the_rerun_completes(tmp_path):
    modes = [("a1", "ok"), ("a2", "ok"), ("crash", "crash"), ("b", "ok"), ("exit", "exit"),
             ("hang", "hang"), ("c", "ok"), ("oom", "oom"), ("d", "ok")]
    for name in ("crash", "exit", "hang", "oom"):
        (tmp_path / f"poison-{name}").touch()
    results = run_list(tmp_path, modes)

    assert [n for n, r in results.items() if r.ok] == ["a1", "a2", "b", "c", "d"]
    assert results["crash"].returncode == -signal.SIGSEGV
    assert results["exit"].returncode == 3
    assert results["hang"].timed_out and results["hang"].returncode == -signal.SIGTERM
    assert results["oom"].returncode == 1
    assert any("MemoryError" in line for line in log_lines(tmp_path, "oom"))
    # One worker ran a1 and a2; each failure retired its worker, so the next job got a new one.
    assert worker_pid(tmp_path, "a1") == worker_pid(tmp_path, "a2")
    pids = [worker_pid(tmp_path, n) for n in ("a2", "b", "c", "d")]
    assert len(set(pids)) == len(pids)
    assert results["crash"].pid == results["a2"].pid  # the crash took a1/a2's worker down
    for name, _ in modes:  # each log holds its own job's output and no other job's
        jobs = [line for line in log_lines(tmp_path, name) if line.startswith("job ")]
        assert [line.split()[1] for line in jobs] == [name]

    for name in ("crash", "exit", "hang", "oom"):
        (tmp_path / f"poison-{name}").unlink()
    again = run_list(tmp_path, [(n, m) for n, m in modes if not results[n].ok])
    assert all(r.ok for r in again.values())
    assert all((tmp_path / f"{name}.done").is_file() for name, _ in modes)


def test_a_kill_9_of_a_worker_fails_only_its_job(tmp_path):
    (tmp_path / "poison-victim").touch()
    pid_file = tmp_path / "victim.pid"

    def kill_when_started():
        deadline = time.monotonic() + WAIT_S
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    results = run_list(tmp_path, [("before", "ok"), ("victim", "wait"), ("after", "ok")])
    killer.join()
    assert results["victim"].returncode == -signal.SIGKILL
    assert not results["victim"].timed_out
    assert results["before"].ok and results["after"].ok
    assert results["victim"].pid == worker_pid(tmp_path, "before")
    assert worker_pid(tmp_path, "after") != worker_pid(tmp_path, "before")

    (tmp_path / "poison-victim").unlink()
    assert run_list(tmp_path, [("victim", "wait")])["victim"].ok


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_whose_dispatcher_is_killed_stops_its_job(tmp_path):
    """The process holding the pool killed (a cluster task by the OOM killer, kill -9): its
    worker stops within seconds instead of finishing a job nobody reads, beside a retry."""
    (tmp_path / "poison-victim").touch()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from pathlib import Path\n"
        "from test_worker_pool import run_list\n"
        "run_list(Path(sys.argv[3]), [('victim', 'wait')])\n"),
        str(ROOT), str(Path(__file__).parent), str(tmp_path)])
    pid_file = tmp_path / "victim.pid"
    deadline = time.monotonic() + WAIT_S
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    holder.kill()
    holder.wait()
    deadline = time.monotonic() + ORPHAN_EXIT_S
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker), "the worker went on with its job"
    assert "is gone; stopping" in (tmp_path / "logs" / "victim.log").read_text()


def test_a_job_that_exits_leaving_a_child_fails_at_once(tmp_path):
    (tmp_path / "poison-orphan").touch()
    results = run_list(tmp_path, [("orphan", "orphan"), ("next", "ok")])
    assert results["orphan"].returncode == 3 and not results["orphan"].timed_out
    assert results["next"].ok


def test_what_a_job_changes_in_its_worker_does_not_reach_the_next(tmp_path):
    results = run_list(tmp_path, [("first", "ok"), ("dirty", "dirty"), ("next", "ok")])
    assert all(r.ok for r in results.values())
    assert worker_pid(tmp_path, "first") == worker_pid(tmp_path, "next")
    state = {n: [x for x in log_lines(tmp_path, n) if x.startswith("state ")]
             for n in ("first", "next")}
    assert state["next"] == state["first"]
    assert "leak=None" in state["next"][0]


def test_worn_workers_are_replaced_and_other_commands_run_alone(tmp_path):
    pool = WorkerPool(SCRIPT, max_jobs=2)
    results = run_list(tmp_path, [("a", "ok"), ("b", "ok"), ("c", "ok")], pool)
    assert all(r.ok for r in results.values())
    assert worker_pid(tmp_path, "a") == worker_pid(tmp_path, "b") != worker_pid(tmp_path, "c")
    assert pool.started == 2
    # A command that is not the pool's script gets a process of its own.
    other = Job(name="echo", argv=["sh", "-c", "echo alone"], log_path=tmp_path / "echo.log")
    (result,) = Dispatcher(None, launcher=pool).run([other])
    assert result.ok and "alone" in (tmp_path / "echo.log").read_text()
    assert pool.started == 2


def test_one_process_per_model_stays_available(monkeypatch):
    monkeypatch.setenv(PER_MODEL_ENV, "1")
    assert launcher_for(SCRIPT) is launch_in_session
    monkeypatch.delenv(PER_MODEL_ENV)
    assert isinstance(launcher_for(SCRIPT), WorkerPool)


def write_model(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    save_file({f"layers.{i}.proj.weight": rng.standard_normal((64, 32), dtype=np.float32)
               for i in range(3)}, str(path / "model.safetensors"))
    return path


def test_the_runner_analyses_a_list_in_one_worker_with_a_log_per_model(tmp_path):
    models = [write_model(tmp_path / f"m{i}", i) for i in range(3)]
    (tmp_path / "list.csv").write_text("model_id\n" + "".join(f"{m}\n" for m in models))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != PER_MODEL_ENV}
    proc = subprocess.run([sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
                           str(tmp_path / "list.csv"), "--output_dir", str(out), "--device",
                           "cpu", "--no-progress"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.csv"))) == 3
    logs = {model: next((out / "logs").glob(f"*{model.name}~*.log")) for model in models}
    workers = set()
    for model, log in logs.items():
        text = log.read_text()
        (header,) = [line for line in text.splitlines() if " in worker pid " in line]
        workers.add(header.split(" in worker pid ")[1].split(":")[0])
        assert f"{model}: 3 rows" in text
        assert all(f"{other}:" not in text for other in models if other != model)
    assert len(workers) == 1


def test_an_idle_workers_cuda_context_does_not_make_its_gpu_look_taken(tmp_path):
    """GPU mode: once a worker has run on GPU 0, NVML reads its idle context there (2 GB
    here, above the threshold); the GPU stays ours and the next job runs in that worker."""
    from gputracker import GPUStatus

    pool = WorkerPool(SCRIPT)

    def query():
        used = 2000.0 if pool.started else 10.0
        return [GPUStatus(0, used, 80_000.0)]

    dispatcher = Dispatcher([0], max_check=1, poll_interval=0.05, query=query, launcher=pool)
    later = replace(job("ok", "second", tmp_path), not_before=dispatcher.now() + 1.0)
    jobs = [job("ok", "first", tmp_path), later]  # the second after a few polls
    guard = threading.Timer(WAIT_S, dispatcher.stop)
    guard.start()
    try:
        results = {r.name: r for r in dispatcher.run(jobs)}
    finally:
        guard.cancel()
    assert not dispatcher.stopped, "the second job never got GPU 0"
    assert results["second"].ok and results["second"].gpus == (0,)
    assert worker_pid(tmp_path, "first") == worker_pid(tmp_path, "second")
