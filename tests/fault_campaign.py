"""A fault campaign: a list of models, a base with its adapters and a sharded model, run
against the hub stand-in (tests/hub_server.py) under random faults drawn from a seed — 5xx
answers, dropped connections, stalls, a gated repository, a missing file, the hub down for a
while, a full disk, kill -9 of the runner or of a worker at a random moment — then rerun
with the faults gone.

After every run the directory is held to the contract: each listed model done (a current
result), failed (a ``failed_models.txt`` line) or not reached, never two of these; exit 0
only when all are done; models not reached only when the run said why it stopped; no
traceback; a failure only where a fault could cause it. The clean rerun must complete the
list with rows equal to those of a fault-free run.

Used by tests/test_fault_campaign.py (a few seeds) and benchmarks/fault_campaign.py (many).
"""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from tests.hub_server import CLIENT_TIMEOUT_S, HubServer
from tests.loader_fixtures import llama, save_adapter, save_model, write_safetensors, write_sharded

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "run_esd_experiment.py"
RUN_FLAGS = ("--device", "cpu", "--retry_backoff", "0", "--max_retries", "1",
             "--cpu_workers", "2", "--no-progress")
RUN_TIMEOUT_S = 300  # a whole run of the zoo, with its retries, on a loaded 2-core machine
GONE_WAIT_S = 30     # workers of a killed runner end by their parent watch (1 s polls)
PAGE = 4096          # tmpfs counts a file's space in pages
DISK_PAGES = 512     # the small disk of a disk-full fault: 2 MiB, the whole zoo's results fit
# The same bytes through the same estimator: only the BLAS threads of a job may differ
# between two runs, which can move the last bits of a sum.
ROW_RTOL = 1e-9
SUMMARY = re.compile(r"(finished|stopped|interrupted): done (\d+), skipped (\d+), failed (\d+), "
                     r"not reached (\d+)")
STOPPED = ("cannot be reached", "is full", "GPUs")
KINDS = ("5xx", "reset", "stall", "gated", "missing", "down", "disk_full", "kill_runner",
         "kill_worker")
GLOBAL = {"down", "disk_full", "kill_runner", "kill_worker"}  # not tied to one repository


@dataclass
class Zoo:
    """The repositories (their folders and weight files) and the list that names them."""

    root: Path
    folders: dict[str, Path] = field(default_factory=dict)
    weights: dict[str, list[str]] = field(default_factory=dict)
    adapters: dict[str, list[str]] = field(default_factory=dict)  # base -> its adapters
    model_list: Path | None = None

    def publish(self, hub: HubServer, gated: set[str] = frozenset()) -> None:
        for repo, folder in self.folders.items():
            hub.add_repo(repo, folder, gated=repo in gated)

    def dependents(self, repo: str) -> set[str]:
        """The listed models a fault on ``repo`` may fail: itself and its adapters."""
        return {repo, *self.adapters.get(repo, ())}


def build_zoo(root: Path) -> Zoo:
    """A base (two shards) with two LoRA adapters (one names its base in the list, one only
    in its config), a one-file model and a model of two shards."""
    zoo = Zoo(root)
    base = llama()
    zoo.folders["org/base"] = save_model(base, root / "base", max_shard_size="60KB")
    for i in range(2):
        zoo.folders[f"org/lora{i}"] = save_adapter(base, root / f"lora{i}", "org/base",
                                                   seed=i + 1, r=4,
                                                   target_modules=["q_proj", "v_proj"])
    zoo.adapters["org/base"] = ["org/lora0", "org/lora1"]
    g = torch.Generator().manual_seed(0)
    zoo.folders["org/plain"] = write_safetensors(root / "plain", {
        "a.weight": torch.randn(48, 32, generator=g), "b.weight": torch.randn(32, 32,
                                                                             generator=g)})
    zoo.folders["org/sharded"] = write_sharded(root / "sharded", {
        "model-00001-of-00002.safetensors": {"x.weight": torch.randn(40, 24, generator=g)},
        "model-00002-of-00002.safetensors": {"y.weight": torch.randn(24, 24, generator=g)}})
    for repo, folder in zoo.folders.items():
        zoo.weights[repo] = sorted(p.name for p in folder.iterdir()
                                   if p.suffix == ".safetensors")
    zoo.model_list = root / "models.csv"
    with open(zoo.model_list, "w", newline="") as fh:
        rows = [("org/base", "", ""), ("org/lora0", "lora", "org/base"), ("org/plain", "", ""),
                ("org/lora1", "lora", ""), ("org/sharded", "", "")]
        csv.writer(fh).writerows([("model_id", "base_model_relation", "source_model"), *rows])
    return zoo


@dataclass(frozen=True)
class Fault:
    kind: str
    repo: str = ""
    filename: str | None = None
    times: int = 1
    at: float = 0.0       # seconds after the start (down, kills)
    seconds: float = 0.0  # how long the hub stays down
    pages: int = 0        # room left on the small disk


def draw_faults(rng: random.Random, zoo: Zoo, small_disk: bool) -> list[Fault]:
    """One to three faults; repository faults on a random repository and file."""
    kinds = [k for k in KINDS if small_disk or k != "disk_full"]
    faults = []
    for kind in rng.sample(kinds, rng.randint(1, 3)):
        repo = rng.choice(sorted(zoo.folders))
        files = zoo.weights[repo] + [None]  # None: every request of the repository
        if kind in ("5xx", "reset"):
            faults.append(Fault(kind, repo, rng.choice(files), times=rng.randint(1, 8)))
        elif kind == "stall":
            faults.append(Fault(kind, repo, rng.choice(zoo.weights[repo]),
                                times=rng.randint(1, 3)))
        elif kind in ("gated", "missing"):
            faults.append(Fault(kind, repo, rng.choice(zoo.weights[repo])))
        elif kind == "down":
            faults.append(Fault(kind, at=rng.uniform(0, 10), seconds=rng.uniform(1, 12)))
        elif kind == "disk_full":
            faults.append(Fault(kind, pages=rng.randint(2, 40)))
        else:
            faults.append(Fault(kind, at=rng.uniform(1, 20)))
    return faults


def inject(hub: HubServer, fault: Fault) -> None:
    """Arm a repository fault on the stand-in (timed faults are armed by ``run``)."""
    where = {"repo_id": fault.repo, "filename": fault.filename}
    if fault.kind == "5xx":
        hub.fail(random.Random(fault.times).choice([500, 502, 503]), times=fault.times, **where)
    elif fault.kind == "reset":
        hub.drop(0 if fault.times % 2 else 64, times=fault.times, **where)
    elif fault.kind == "stall":
        hub.stall(CLIENT_TIMEOUT_S + 1, times=fault.times, **where)
    elif fault.kind == "missing":
        hub.remove_file(fault.repo, fault.filename)


@dataclass
class Run:
    returncode: int
    stderr: str
    killed: bool


def run(hub: HubServer, zoo: Zoo, out: Path, cache: Path, faults: list[Fault] = ()) -> Run:
    """The runner on the zoo's list, with the timed faults fired at their moments."""
    env = hub.env(cache)
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--model_list", str(zoo.model_list),
                             "--output_dir", str(out), *RUN_FLAGS], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()
    timers = []
    for fault in faults:
        if fault.kind == "down":
            timers.append(threading.Timer(fault.at, hub.down, kwargs={
                "for_seconds": fault.seconds}))
        elif fault.kind == "kill_runner":
            timers.append(threading.Timer(fault.at, _kill, (proc.pid, killed)))
        elif fault.kind == "kill_worker":
            timers.append(threading.Timer(fault.at, _kill_a_worker, (out, proc.pid)))
    for timer in timers:
        timer.daemon = True
        timer.start()
    try:
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        for timer in timers:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if killed.is_set():
        _wait_for_workers(out)
    return Run(proc.returncode, stderr, killed.is_set())


def _kill(pid: int, killed: threading.Event) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        killed.set()
    except ProcessLookupError:  # it had finished
        pass


def _workers(out: Path, parent: int | None = None) -> list[int]:
    """Worker processes writing to ``out`` (children of ``parent`` when given)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (any(a.endswith(b"esd_worker.py") for a in argv) and str(out).encode() in argv
                and (parent is None or ppid == parent)):
            found.append(int(proc.name))
    return found


def _kill_a_worker(out: Path, runner: int) -> None:
    for pid in _workers(out, runner)[:1]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_workers(out: Path) -> None:
    deadline = time.monotonic() + GONE_WAIT_S
    while _workers(out) and time.monotonic() < deadline:
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# The contract, checked from outside the runner.

def states(zoo: Zoo, out: Path) -> dict[str, set[str]]:
    """Each listed model's states as the directory holds them: "done", "failed", both or
    neither."""
    from esd_experiment.core.paths import model_paths
    from esd_experiment.estimator.options import esd_config_from_args
    from esd_experiment.run.cli import build_parser
    from esd_experiment.run.model_list import read_model_list
    from esd_experiment.run.plan import result_done
    from esd_experiment.run.state import FailureLog

    args = build_parser().parse_args(["--output_dir", str(out), *RUN_FLAGS])
    options = esd_config_from_args(args, "cpu").options_key
    failures = FailureLog(out)
    found = {}
    for entry in read_model_list(zoo.model_list):
        paths = model_paths(out, entry.model_id, out / "logs", entry.gguf_file)
        found[entry.key] = ({"done"} if result_done(paths, options, False) else set()) | (
            {"failed"} if entry.key in failures else set())
    return found


def check_accounting(zoo: Zoo, out: Path, result: Run, faults: list[Fault]) -> list[str]:
    """The rules of the contract this run broke (none, normally)."""
    broken = []
    found = states(zoo, out)
    broken += [f"{key} is both done and failed" for key, s in found.items() if len(s) > 1]
    if result.killed:
        return broken  # killed -9: it said nothing; the directory alone must hold
    if "Traceback" in result.stderr:
        broken.append("the runner printed a traceback")
    if result.returncode not in (0, 1):
        broken.append(f"exit status {result.returncode}")
    done = [k for k, s in found.items() if s == {"done"}]
    failed = [k for k, s in found.items() if "failed" in s]
    neither = [k for k, s in found.items() if not s]
    if result.returncode == 0 and len(done) != len(found):
        broken.append(f"exit 0 with {len(found) - len(done)} model(s) not done")
    summary = SUMMARY.findall(result.stderr)
    if not summary:
        broken.append("no summary line")
    elif int(summary[-1][4]) != len(neither):
        broken.append(f"the summary says {summary[-1][4]} not reached, the directory "
                      f"{len(neither)}")
    if neither and not (result.returncode == 1 and any(w in result.stderr for w in STOPPED)):
        broken.append(f"{neither} neither done nor failed, and the run did not say it stopped")
    hit = set().union(*(zoo.dependents(f.repo) for f in faults if f.kind not in GLOBAL))
    network = any(f.kind in ("down", "reset", "stall", "kill_worker") for f in faults)
    causes = _causes(out)
    for key in failed:
        if key not in hit and not (network and re.search(
                r"network|unreachable|timed? ?out|connection|SIGKILL|signal", causes[key], re.I)):
            broken.append(f"{key} failed without a fault to cause it: {causes[key]}")
    return broken


def _causes(out: Path) -> dict[str, str]:
    path = out / "failed_models.txt"
    if not path.exists():
        return {}
    return dict(line.split("\t", 1) for line in path.read_text().splitlines() if line)


def rows_differ(reference: Path, out: Path) -> list[str]:
    """Where the results in ``out`` differ from the fault-free run's in ``reference``."""
    ref = {p.name for p in reference.glob("*.csv")}
    got = {p.name for p in out.glob("*.csv")}
    if ref != got:
        return [f"result files differ: {sorted(ref ^ got)}"]
    differ = []
    for name in sorted(ref):
        a, b = pd.read_csv(reference / name), pd.read_csv(out / name)
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=ROW_RTOL)
        except AssertionError as exc:
            differ.append(f"{name}: {str(exc).splitlines()[0]}")
    return differ


# ---------------------------------------------------------------------------------------------
# One seed.

@dataclass
class SeedReport:
    seed: int
    faults: list[list[Fault]]  # of each faulty round
    runs: list[Run]            # each faulty round's, then the clean rerun's
    broken: list[str]

    def line(self) -> str:
        rounds = " | ".join(",".join(f.kind for f in faults) or "none" for faults in self.faults)
        ends = ", ".join(f"{r.returncode}{' (killed)' if r.killed else ''}" for r in self.runs)
        return (f"seed {self.seed}: faults {rounds}; exits {ends}; "
                + ("ok" if not self.broken else "BROKEN: " + "; ".join(self.broken)))


def reference_run(zoo: Zoo, work: Path) -> Path:
    """The fault-free run the campaign's reruns are compared with."""
    out = work / "reference"
    with HubServer() as hub:
        zoo.publish(hub)
        result = run(hub, zoo, out, work / "reference-cache")
    if result.returncode != 0:
        raise RuntimeError(f"the fault-free run failed:\n{result.stderr[-3000:]}")
    return out


def campaign_seed(seed: int, zoo: Zoo, reference: Path, work: Path,
                  rounds: int = 1) -> SeedReport:
    """Run the zoo ``rounds`` times under the seed's faults (drawn afresh for each round, in
    the same directory), checking each run, then rerun it clean and check that."""
    rng = random.Random(seed)
    can_mount = os.geteuid() == 0 and shutil.which("mount") is not None
    faults = [draw_faults(rng, zoo, can_mount) for _ in range(rounds)]
    out, cache = work / f"seed{seed}" / "out", work / f"seed{seed}" / "cache"
    out.mkdir(parents=True)
    mounted = any(f.kind == "disk_full" for r in faults for f in r) and _mount_small_disk(out)
    if not mounted:
        faults = [[f for f in r if f.kind != "disk_full"] for r in faults]
    runs, broken = [], []
    try:
        for i, round_faults in enumerate(faults):
            disk = next((f for f in round_faults if f.kind == "disk_full"), None)
            _fill(out, disk.pages if disk is not None else None)
            with HubServer() as hub:
                zoo.publish(hub, gated={f.repo for f in round_faults if f.kind == "gated"})
                for fault in round_faults:
                    inject(hub, fault)
                runs.append(run(hub, zoo, out, cache, round_faults))
            broken += [f"round {i + 1}: {b}"
                       for b in check_accounting(zoo, out, runs[-1], round_faults)]
        _fill(out, None)
        with HubServer() as hub:
            zoo.publish(hub)
            runs.append(run(hub, zoo, out, cache))
        broken += [f"rerun: {b}" for b in check_accounting(zoo, out, runs[-1], [])]
        if runs[-1].returncode != 0:
            broken.append(f"the clean rerun exited {runs[-1].returncode}: "
                          f"{runs[-1].stderr[-1500:]}")
        broken += rows_differ(reference, out)
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)
    return SeedReport(seed, faults, runs, broken)


def _mount_small_disk(path: Path) -> bool:
    """A tmpfs of ``DISK_PAGES`` at ``path``; False when it cannot be mounted."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_PAGES * PAGE}",
                              "tmpfs", str(path)], capture_output=True)
    return mounted.returncode == 0


def _fill(disk: Path, pages_left: int | None) -> None:
    """Fill the small disk at ``disk`` up to ``pages_left`` free pages (None: empty it)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    if pages_left is not None:
        st = os.statvfs(disk)
        with open(filler, "wb") as fh:  # as much as fits, less the room to leave
            fh.write(b"\0" * max(0, (st.f_bavail - pages_left) * st.f_frsize))
