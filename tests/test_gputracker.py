"""The dispatcher with fake GPU readings and real child processes.

Children are small Python scripts that write what they saw (environment, pids) to files and
block on marker files, so every check below is about order and state, not about timing.
The waits in this file have generous time limits that only guard against a hang.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gputracker import (
    THREAD_VARS,
    Allocation,
    Dispatcher,
    DispatchThread,
    GPUQueryError,
    GPUStatus,
    Job,
    JobResult,
    launch_in_session,
)
from gputracker.dispatcher import MAX_QUERY_FAILURES

ROOT = Path(__file__).resolve().parents[1]
# Upper bound for any wait on a child: a guard against a hang, never a measurement.
HANG_GUARD_S = 30.0
# Short enough that a test needing several polls stays well under a second.
FAST_POLL_S = 0.01

# Starts a grandchild, writes both pids to argv[1] once the grandchild is ready, then sleeps; argv[2] == "ignore" makes it
# (and, inherited, its grandchild) ignore SIGTERM, else the grandchild notes its SIGTERM in
# argv[1] + ".term".
GRANDCHILD = """
import signal, sys, time
def note(signum, frame):
    open(sys.argv[1] + ".term", "w").close()
    sys.exit(0)
if sys.argv[2] == "obey":
    signal.signal(signal.SIGTERM, note)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""
SLEEPER = """
import os, signal, subprocess, sys, time
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", GRANDCHILD_CODE, *sys.argv[1:3]])
if sys.argv[2] == "obey":  # die of SIGTERM, but only once the grandchild has noted its own
    def die(signum, frame):
        grandchild.wait()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    signal.signal(signal.SIGTERM, die)
while not os.path.exists(sys.argv[1] + ".ready"):
    time.sleep(0.005)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[3] == "sleep":
    time.sleep(60)
""".replace("GRANDCHILD_CODE", repr(GRANDCHILD))

# Writes its environment and argv to argv[1], then waits until the file argv[2] exists.
BLOCKER = """
import json, os, sys, time
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"env": dict(os.environ), "argv": sys.argv}, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
deadline = time.monotonic() + 30
while not os.path.exists(sys.argv[2]):
    if time.monotonic() > deadline:
        sys.exit(2)
    time.sleep(0.005)
"""

# A runner in miniature: two CPU slots of SLEEPER jobs, stopped by a signal.
RUNNER = """
import logging, signal, sys
sys.path.insert(0, {root!r})
from gputracker import Dispatcher, Job, install_signal_handlers
out, mode, sleeper, sigterm, grace = sys.argv[1:]
logging.basicConfig(filename=out + "/runner.log", level=logging.INFO)
dispatcher = Dispatcher(None, cpu_slots=2, grace_period=float(grace))
if mode == "handlers":
    install_signal_handlers(dispatcher)
else:  # Python's own Ctrl-C, whatever the shell that started the tests left (a background
    # job's SIGINT is ignored, and Python then keeps it ignored)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
    signal.signal(signal.SIGINT, signal.default_int_handler)
jobs = [Job(f"j{{i}}", [sys.executable, sleeper, f"{{out}}/pid{{i}}", sigterm, "sleep"],
            f"{{out}}/j{{i}}.log") for i in range(3)]
results = dispatcher.run(jobs)
print("stopped" if dispatcher.stopped else "finished", [r.returncode for r in results],
      len(dispatcher.pending_jobs), flush=True)
sys.exit(128 + dispatcher.stop_signum if dispatcher.stop_signum is not None else 0)
"""


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scripts")
    paths = {}
    for name, text in {"sleeper": SLEEPER, "blocker": BLOCKER}.items():
        paths[name] = folder / f"{name}.py"
        paths[name].write_text(text)
    paths["runner"] = folder / "runner.py"
    paths["runner"].write_text(RUNNER.format(root=str(ROOT)))
    return paths


def wait_until(predicate, what: str):
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def exist(folder: Path, names, suffix: str) -> bool:
    return all((folder / f"{name}{suffix}").exists() for name in names)


def read_pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()]


class FakeGPUs:
    """Memory readings per poll: ``script[i]`` maps GPU index -> used MB at poll i; the last
    entry repeats. Counts the polls."""

    def __init__(self, *script: dict[int, float], total_mb: float = 80_000.0):
        self.script = script
        self.total_mb = total_mb
        self.calls = 0

    def __call__(self) -> list[GPUStatus]:
        used = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return [GPUStatus(i, mb, self.total_mb) for i, mb in sorted(used.items())]


class RecordingLauncher:
    """The real launcher, noting each launch's GPUs and how many polls preceded it."""

    def __init__(self, gpus: FakeGPUs | None = None):
        self.gpus = gpus
        self.launches: list[dict] = []

    def __call__(self, argv, env, log_path):
        polls = self.gpus.calls if self.gpus is not None else None
        self.launches.append({"visible": env["CUDA_VISIBLE_DEVICES"], "polls": polls})
        return launch_in_session(argv, env, log_path)


def py_job(name: str, code: str, tmp_path: Path, **kwargs) -> Job:
    return Job(name, [sys.executable, "-c", code], tmp_path / "logs" / f"{name}.log", **kwargs)


def blocker_job(name: str, scripts, tmp_path: Path) -> Job:
    argv = [sys.executable, scripts["blocker"], tmp_path / f"{name}.seen", tmp_path / f"{name}.go"]
    return Job(name, argv, tmp_path / "logs" / f"{name}.log")


def seen(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.seen").read_text())


def gpu_dispatcher(gpus, fake: FakeGPUs, **kwargs) -> Dispatcher:
    kwargs.setdefault("poll_interval", FAST_POLL_S)
    kwargs.setdefault("max_check", 1)
    return Dispatcher(gpus, query=fake, **kwargs)


# ----- which GPUs are granted, and when ---------------------------------------------------


def test_gpu_at_or_above_threshold_is_never_granted(tmp_path):
    fake = FakeGPUs({0: 8000.0, 1: 100.0, 2: 500.0})  # 2 sits exactly on the threshold
    dispatcher = gpu_dispatcher([0, 1, 2], fake, memory_threshold_mb=500.0)
    results = dispatcher.run([py_job(f"j{i}", "pass", tmp_path) for i in range(3)])
    assert [r.gpus for r in results] == [(1,), (1,), (1,)]
    assert all(r.ok for r in results)


class FlakyGPUs(FakeGPUs):
    """Like FakeGPUs, but the polls numbered in ``failing`` raise GPUQueryError."""

    def __init__(self, failing: set[int], *script: dict[int, float]):
        super().__init__(*script)
        self.failing = failing

    def __call__(self) -> list[GPUStatus]:
        if self.calls in self.failing:
            self.calls += 1
            raise GPUQueryError("NVML could not read the GPUs: GPU is lost")
        return super().__call__()


@pytest.mark.parametrize("make_fake", [
    # Free, free, busy, then free for good: with max_check=3 the third free reading in a row
    # is poll 5 (the sixth call), so the job cannot start before it.
    lambda: FakeGPUs({0: 10.0}, {0: 10.0}, {0: 9000.0}, {0: 10.0}),
    # Free, free, a failed reading, then free: a failure restarts the count like a busy reading.
    lambda: FlakyGPUs({2}, {0: 10.0}),
], ids=["busy reading", "failed reading"])
def test_gpu_is_granted_after_max_check_consecutive_free_readings(tmp_path, make_fake):
    fake = make_fake()
    launcher = RecordingLauncher(fake)
    dispatcher = gpu_dispatcher([0], fake, max_check=3, launcher=launcher)
    results = dispatcher.run([py_job("j", "pass", tmp_path)])
    assert launcher.launches == [{"visible": "0", "polls": 6}]
    assert results[0].ok


def test_gpu_readings_failing_in_a_row_end_the_run(tmp_path):
    fake = FlakyGPUs(set(range(1, 100)), {0: 10.0})
    dispatcher = gpu_dispatcher([0], fake, max_check=2)
    with pytest.raises(GPUQueryError, match="GPU is lost"):
        dispatcher.run([py_job("j", "pass", tmp_path)])
    assert fake.calls == 1 + MAX_QUERY_FAILURES


class FastForward:
    """A clock that jumps ahead whenever the dispatcher waits with no job running, so polls
    an hour apart cost nothing; while jobs run it is the real clock."""

    def __init__(self):
        self.offset = 0.0
        self.dispatcher: Dispatcher | None = None

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        if self.dispatcher.running_jobs == 0:
            self.offset += timeout
        else:
            cond.wait(timeout)


def test_free_count_is_kept_and_a_freed_gpu_is_reused_without_a_new_poll(tmp_path):
    # Polls an hour apart: the first job waits for three of them (fast-forwarded); every
    # later job starts on the GPU the previous one freed, with no further poll.
    fake = FakeGPUs({0: 0.0})
    launcher = RecordingLauncher(fake)
    clock = FastForward()
    dispatcher = gpu_dispatcher(
        [0], fake, max_check=3, poll_interval=3600.0, launcher=launcher,
        clock=clock.now, wait=clock.wait,
    )  # fmt: skip
    clock.dispatcher = dispatcher
    jobs = [py_job(f"j{i}", "pass", tmp_path) for i in range(4)]
    with DispatchThread(dispatcher, jobs) as thread:
        results = thread.result(timeout=HANG_GUARD_S)
    assert [launch["polls"] for launch in launcher.launches] == [3, 3, 3, 3]
    assert [r.gpus for r in results] == [(0,)] * 4
    assert all(r.ok for r in results)


def test_gpu_held_by_our_job_is_not_granted_even_when_it_reads_free(tmp_path, scripts):
    fake = FakeGPUs({0: 0.0, 1: 0.0})  # our jobs use no memory: every reading says free
    dispatcher = gpu_dispatcher([0, 1], fake)
    jobs = [blocker_job(name, scripts, tmp_path) for name in ("a", "b", "c")]
    with DispatchThread(dispatcher, jobs) as thread:
        wait_until(lambda: exist(tmp_path, "ab", ".seen"), "two jobs to start")
        polls = fake.calls
        wait_until(lambda: fake.calls >= polls + 5, "five more polls")
        assert not (tmp_path / "c.seen").exists()
        (tmp_path / "a.go").touch()
        wait_until(lambda: (tmp_path / "c.seen").exists(), "the third job to start")
        (tmp_path / "b.go").touch()
        (tmp_path / "c.go").touch()
        results = thread.result(timeout=HANG_GUARD_S)
    visible = {name: seen(tmp_path, name)["env"]["CUDA_VISIBLE_DEVICES"] for name in "abc"}
    assert {visible["a"], visible["b"]} == {"0", "1"}
    assert visible["c"] == visible["a"]
    assert sorted(r.name for r in results) == ["a", "b", "c"] and all(r.ok for r in results)


def test_multi_gpu_jobs_get_distinct_free_gpus(tmp_path, scripts):
    fake = FakeGPUs({i: 0.0 for i in range(8)} | {4: 7000.0})
    dispatcher = gpu_dispatcher([3, 4, 5, 6, 7], fake, gpus_per_job=2)
    jobs = [blocker_job(name, scripts, tmp_path) for name in ("a", "b")]
    with DispatchThread(dispatcher, jobs) as thread:
        wait_until(lambda: exist(tmp_path, "ab", ".seen"), "both jobs to start")
        (tmp_path / "a.go").touch()
        (tmp_path / "b.go").touch()
        results = thread.result(timeout=HANG_GUARD_S)
    visible = sorted(seen(tmp_path, name)["env"]["CUDA_VISIBLE_DEVICES"] for name in "ab")
    assert visible == ["3,5", "6,7"]
    assert sorted(r.gpus for r in results) == [(3, 5), (6, 7)]


# ----- the child's environment, logs and exit codes ---------------------------------------


def test_child_env_has_cuda_vars_and_parent_env_is_untouched(tmp_path, scripts):
    before = dict(os.environ)
    fake = FakeGPUs({i: 0.0 for i in range(6)})
    dispatcher = gpu_dispatcher([3, 5], fake, gpus_per_job=2)
    (tmp_path / "j.go").touch()

    def argv(allocation: Allocation) -> list:
        gpu_list = ",".join(map(str, allocation.gpus))
        return [sys.executable, scripts["blocker"], tmp_path / "j.seen", tmp_path / "j.go", gpu_list]  # fmt: skip

    job = Job("j", argv, tmp_path / "logs" / "j.log", env={"ESD_EXTRA": "x"})
    [result] = dispatcher.run([job])
    child = seen(tmp_path, "j")
    assert child["env"]["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert child["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert child["env"]["ESD_EXTRA"] == "x"
    assert child["argv"][-1] == "3,5"
    assert dict(os.environ) == before
    assert result.ok and result.gpus == (3, 5) and result.threads is None
    assert "CUDA_VISIBLE_DEVICES='3,5'" in result.log_path.read_text()  # the log's header


def test_nonzero_exit_is_recorded_with_its_log_tail(tmp_path):
    code = "import sys; print('line1\\nline5', flush=True); sys.exit('boom')"  # exit code 1
    job = py_job("bad", code, tmp_path / "deep" / "dir")
    [result] = Dispatcher(None).run([job])
    assert result.returncode == 1
    assert not result.ok and not result.stopped
    assert result.describe() == "exit code 1"
    assert result.tail(2) == ["line5", "boom"]
    assert result.tail(100)[0].startswith("# ")  # the header; nothing before it
    assert result.log_path == tmp_path / "deep" / "dir" / "logs" / "bad.log"


def test_log_is_appended_across_attempts(tmp_path):
    first = py_job("j", "print('first')", tmp_path)
    second = dataclasses.replace(first, argv=[sys.executable, "-c", "print('second')"], attempt=2)
    dispatcher = Dispatcher(None)
    dispatcher.run([first])
    [result] = dispatcher.run([second])
    lines = result.log_path.read_text().splitlines()
    assert [line for line in lines if not line.startswith("# ")] == ["first", "second"]
    assert result.tail(1) == ["second"]


def test_tail_reads_past_its_chunk_and_splits_carriage_returns(tmp_path):
    log = tmp_path / "big.log"
    body = "".join(f"{i:07d}{'x' * 93}\n" for i in range(3000))  # 300 kB, over the 64 kB chunk
    log.write_text(body + "progress 10%\rprogress 100%\n")
    job = Job("j", ["true"], log)
    result = JobResult(job, 0, (), 1, 1, 0.0, 1.0, 0.0, log)
    lines = result.tail(1500)
    assert len(lines) == 1500
    assert lines[0].startswith("0001502") and lines[-2:] == ["progress 10%", "progress 100%"]


def test_background_process_left_by_a_finished_job_is_killed(tmp_path, scripts):
    pid_file = tmp_path / "pids"
    job = Job("j", [sys.executable, scripts["sleeper"], pid_file, "obey", "exit"], tmp_path / "j.log")  # fmt: skip
    [result] = Dispatcher(None).run([job])
    assert result.ok
    _, grandchild = read_pids(pid_file)
    wait_until(lambda: not alive(grandchild), "the job's background process to die")


# ----- stopping --------------------------------------------------------------------------


def sleeper_job(name: str, scripts, tmp_path: Path, sigterm: str = "obey") -> Job:
    argv = [sys.executable, scripts["sleeper"], tmp_path / f"{name}.pid", sigterm, "sleep"]
    return Job(name, argv, tmp_path / "logs" / f"{name}.log")


def test_stop_terminates_every_job_and_its_children(tmp_path, scripts):
    # A grace period longer than the hang guard: result() only returns in time if the
    # jobs died of SIGTERM rather than waiting out the grace period.
    dispatcher = Dispatcher(None, cpu_slots=2, grace_period=10 * HANG_GUARD_S)
    jobs = [sleeper_job(name, scripts, tmp_path) for name in ("a", "b", "c")]
    seen_results = []

    def on_finish(result):
        seen_results.append(result)
        return [dataclasses.replace(result.job, name=result.name + "-retry")]

    with DispatchThread(dispatcher, jobs, on_finish) as thread:
        wait_until(lambda: exist(tmp_path, "ab", ".pid"), "two jobs")
        pids = read_pids(tmp_path / "a.pid") + read_pids(tmp_path / "b.pid")
        thread.stop(timeout=HANG_GUARD_S)
        results = thread.result(timeout=HANG_GUARD_S)
    assert dispatcher.stopped and dispatcher.stop_signum is None
    assert sorted(r.name for r in results) == ["a", "b"]
    assert all(r.stopped and r.returncode == -signal.SIGTERM for r in results)
    assert "killed by SIGTERM" in results[0].describe()
    assert (tmp_path / "a.pid.term").exists()  # SIGTERM went to the job's whole group
    assert seen_results == results
    assert sorted(j.name for j in dispatcher.pending_jobs) == ["a-retry", "b-retry", "c"]
    for pid in pids:
        wait_until(lambda pid=pid: not alive(pid), f"pid {pid} to die")
    assert dispatcher.run() == []  # a stopped dispatcher starts nothing again


def test_job_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path, scripts):
    dispatcher = Dispatcher(None, grace_period=0.2)
    with DispatchThread(dispatcher, [sleeper_job("a", scripts, tmp_path, "ignore")]) as thread:
        wait_until(lambda: (tmp_path / "a.pid").exists(), "the job to start")
        pids = read_pids(tmp_path / "a.pid")
        thread.stop(timeout=HANG_GUARD_S)
        [result] = thread.result(timeout=HANG_GUARD_S)
    assert result.returncode == -signal.SIGKILL and result.stopped
    for pid in pids:
        wait_until(lambda pid=pid: not alive(pid), f"pid {pid} to die")


def test_exception_in_on_finish_terminates_running_jobs(tmp_path, scripts):
    dispatcher = Dispatcher(None, cpu_slots=2, grace_period=HANG_GUARD_S)
    code = f"import os, time\nwhile not os.path.exists({str(tmp_path / 'b.pid')!r}): time.sleep(0.005)"  # fmt: skip
    waits_for_b = py_job("a", code, tmp_path)

    def on_finish(result):
        raise RuntimeError(f"runner bug after {result.name}")

    with pytest.raises(RuntimeError, match="runner bug after a"):
        dispatcher.run([waits_for_b, sleeper_job("b", scripts, tmp_path)], on_finish)
    for pid in read_pids(tmp_path / "b.pid"):
        wait_until(lambda pid=pid: not alive(pid), f"pid {pid} to die")


@pytest.mark.parametrize(
    ("signum", "mode", "sigterm", "signals", "expected_rc", "expected_codes"),
    [
        (signal.SIGINT, "handlers", "obey", 1, 128 + signal.SIGINT, "[-15, -15]"),
        (signal.SIGTERM, "handlers", "obey", 1, 128 + signal.SIGTERM, "[-15, -15]"),
        # A second Ctrl-C skips the grace period, which here outlasts the hang guard.
        (signal.SIGINT, "handlers", "ignore", 2, 128 + signal.SIGINT, "[-9, -9]"),
        # Without the handlers KeyboardInterrupt escapes run(), after the jobs are gone.
        (signal.SIGINT, "default", "obey", 1, -signal.SIGINT, None),
    ],
)
def test_signal_to_a_runner_leaves_no_job_running(
    tmp_path, scripts, signum, mode, sigterm, signals, expected_rc, expected_codes
):
    grace = str(10 * HANG_GUARD_S)
    runner = subprocess.Popen(
        [sys.executable, scripts["runner"], tmp_path, mode, scripts["sleeper"], sigterm, grace],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: all((tmp_path / f"pid{i}").exists() for i in (0, 1)), "two jobs")
        pids = read_pids(tmp_path / "pid0") + read_pids(tmp_path / "pid1")
        runner.send_signal(signum)
        if signals == 2:
            log = tmp_path / "runner.log"
            wait_until(lambda: "terminating 2 running job(s)" in log.read_text(), "the first stop")
            runner.send_signal(signum)
        out, err = runner.communicate(timeout=HANG_GUARD_S)
    finally:
        runner.kill()
    assert runner.returncode == expected_rc, err
    if expected_codes is not None:
        assert out.split()[0] == "stopped" and expected_codes in out, out
    for pid in pids:
        wait_until(lambda pid=pid: not alive(pid), f"pid {pid} to die")
    assert not (tmp_path / "pid2").exists()


# ----- CPU mode, retries, submit ----------------------------------------------------------


def test_cpu_mode_runs_cpu_slots_jobs_at_once_with_thread_counts(tmp_path, scripts):
    dispatcher = Dispatcher(None, cpu_slots=2, cpu_count=5)
    assert dispatcher.cpu_mode and dispatcher.threads_per_job == 2

    def job(name):
        def argv(allocation: Allocation) -> list:
            return [sys.executable, scripts["blocker"], tmp_path / f"{name}.seen",
                    tmp_path / f"{name}.go", f"--threads={allocation.threads}"]  # fmt: skip

        return Job(name, argv, tmp_path / "logs" / f"{name}.log")

    with DispatchThread(dispatcher, [job(n) for n in "abcd"]) as thread:
        wait_until(lambda: sum((tmp_path / f"{n}.seen").exists() for n in "abcd") == 2, "2 jobs")
        first = sorted(n for n in "abcd" if (tmp_path / f"{n}.seen").exists())
        assert dispatcher.running_jobs == 2
        for name in first:
            (tmp_path / f"{name}.go").touch()
        wait_until(lambda: exist(tmp_path, "abcd", ".seen"), "all jobs")
        assert dispatcher.running_jobs <= 2
        for name in "abcd":
            (tmp_path / f"{name}.go").touch()
        results = thread.result(timeout=HANG_GUARD_S)
    assert first == ["a", "b"]
    for name in "abcd":
        child = seen(tmp_path, name)
        assert child["env"]["CUDA_VISIBLE_DEVICES"] == ""
        assert all(child["env"][var] == "2" for var in THREAD_VARS)
        assert child["argv"][-1] == "--threads=2"
    assert all(r.ok and r.gpus == () and r.threads == 2 for r in results)


def test_cpu_threads_default_to_the_cores_this_process_may_use():
    cores = len(os.sched_getaffinity(0))
    assert Dispatcher(None).threads_per_job == cores
    assert Dispatcher([], cpu_slots=cores + 1).threads_per_job == 1


def test_delayed_retry_from_on_finish(tmp_path):
    backoff_s = 0.2
    code = "import os, sys; sys.exit(0 if os.environ['ATTEMPT'] == '2' else 75)"
    dispatcher = Dispatcher(None)
    first = py_job("j", code, tmp_path, env={"ATTEMPT": "1"})

    def on_finish(result):
        if result.returncode == 75:
            retry = dataclasses.replace(
                result.job, env={"ATTEMPT": "2"}, attempt=2, not_before=dispatcher.now() + backoff_s
            )
            return [retry]
        return None

    results = dispatcher.run([first], on_finish)
    assert [(r.returncode, r.job.attempt) for r in results] == [(75, 1), (0, 2)]
    assert results[1].start >= results[0].end + backoff_s


def test_submit_from_another_thread_while_running(tmp_path, scripts):
    dispatcher = Dispatcher(None)
    with DispatchThread(dispatcher, [blocker_job("a", scripts, tmp_path)]) as thread:
        wait_until(lambda: (tmp_path / "a.seen").exists(), "the first job")
        thread.submit(py_job("b", "pass", tmp_path))
        (tmp_path / "a.go").touch()
        results = thread.result(timeout=HANG_GUARD_S)
    assert [r.name for r in results] == ["a", "b"]


def test_stop_before_run_starts_nothing(tmp_path):
    launcher = RecordingLauncher()
    dispatcher = Dispatcher(None, launcher=launcher)
    dispatcher.stop("shutting down")
    assert dispatcher.run([py_job("j", "pass", tmp_path)]) == []
    assert launcher.launches == [] and dispatcher.stop_reason == "shutting down"
    assert [j.name for j in dispatcher.pending_jobs] == ["j"]


# A job timeout well above a job's start-up on a loaded machine, well below the hang guard.
JOB_TIMEOUT_S = 3.0


@pytest.mark.parametrize("sigterm, signum", [("obey", signal.SIGTERM),
                                             ("ignore", signal.SIGKILL)])
def test_a_job_past_its_timeout_is_stopped_and_says_so(tmp_path, scripts, sigterm, signum):
    """SIGTERM at the timeout, SIGKILL once the grace period is over too; the result says
    ``timed_out``, and the next job starts at once."""
    dispatcher = Dispatcher(None, cpu_slots=1, grace_period=0.5)
    slow = dataclasses.replace(sleeper_job("a", scripts, tmp_path, sigterm),
                               timeout=JOB_TIMEOUT_S)
    quick = Job("b", [sys.executable, "-c", "pass"], tmp_path / "logs" / "b.log")
    started = time.monotonic()
    results = dispatcher.run([slow, quick])
    assert time.monotonic() - started < HANG_GUARD_S
    first, second = results
    assert first.name == "a" and first.timed_out and first.returncode == -signum
    assert f"timed out after {JOB_TIMEOUT_S:g} s" in first.describe()
    assert first.duration >= JOB_TIMEOUT_S
    assert second.name == "b" and second.ok and not second.timed_out
    for pid in read_pids(tmp_path / "a.pid"):
        wait_until(lambda pid=pid: not alive(pid), f"pid {pid} to die")
