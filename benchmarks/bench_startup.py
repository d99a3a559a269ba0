"""Start-up of the runner and the worker: wall time, peak RSS and the heavy modules imported.

Usage: python benchmarks/bench_startup.py [--repeats 5] [--workdir DIR]

Writes a tiny safetensors model (three 64 x 32 matrices) and a one-model list into --workdir
(default: a temporary directory, removed afterwards), runs the worker on it once so that the
list is finished, then times, alternating and each a whole separate process:

  runner_help      run_esd_experiment.py --help
  runner_empty     run_esd_experiment.py on a list naming no model (refused: exit code 2)
  runner_finished  run_esd_experiment.py on the finished list: resume check, nothing to run
  worker_imports   python -c "import esd_worker": the worker before it reads a model
  worker_tiny      esd_worker.py on the tiny model: start-up, imports, load, ESD, CSV

Peak RSS is the child's own maximum resident set (getrusage via wait4). Each child also runs
once under ``python -X importtime``: the table lists which heavy packages it imported and
their cumulative import time. The runner must import neither torch nor transformers, and the
worker of a plain safetensors model must not import transformers or peft.
Exit code: 0 when every run behaved as expected, 1 otherwise (the offending run is named).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "scipy", "numpy", "pandas", "safetensors",
         "huggingface_hub", "tqdm", "pynvml")
FORBIDDEN = {"runner": {"torch", "transformers", "peft"}, "worker": {"transformers", "peft"}}


def commands(work: Path) -> dict[str, tuple[list[str], int]]:
    """Each run's argv and its expected exit code."""
    py = sys.executable
    runner, worker = str(ROOT / "run_esd_experiment.py"), str(ROOT / "esd_worker.py")
    out = str(work / "out")
    return {
        "runner_help": ([py, runner, "--help"], 0),
        "runner_empty": ([py, runner, "--model_list", str(work / "empty.csv"), "--output_dir",
                          str(work / "out_empty"), "--device", "cpu", "--no-progress"], 2),
        "runner_finished": ([py, runner, "--model_list", str(work / "models.csv"),
                             "--output_dir", out, "--device", "cpu", "--no-progress"], 0),
        "worker_imports": ([py, "-c", "import esd_worker"], 0),
        "worker_tiny": ([py, worker, "--model_id", str(work / "tiny"), "--output_dir",
                         str(work / "out_worker"), "--device", "cpu"], 0),
    }


def write_inputs(work: Path) -> None:
    """The tiny model is written by a child: this process stays small (see ``measure``)."""
    (work / "tiny").mkdir(parents=True, exist_ok=True)
    code = ("import sys, numpy as np; from safetensors.numpy import save_file; "
            "g = np.random.default_rng(0); "
            "save_file({f'layers.{i}.proj.weight': g.standard_normal((64, 32), dtype=np.float32) "
            "for i in range(3)}, sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(work / "tiny" / "model.safetensors")],
                   check=True)
    (work / "models.csv").write_text(f"model_id\n{work / 'tiny'}\n")
    (work / "empty.csv").write_text("model_id\n")


def measure(argv: list[str], expected: int) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one whole process.

    Linux carries a process's peak RSS across exec, and a child forked by vfork starts from
    its parent's: so this process imports nothing heavy, and its own peak (about 10 MiB, below
    any Python child's) is the floor of the figure.
    """
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: wait4 must not block on it
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != expected:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)} exited {code}, expected {expected}:\n"
                               f"{err.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def imports(argv: list[str]) -> dict[str, float]:
    """Heavy top-level packages the process imported, with cumulative import seconds."""
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=ROOT,
                          capture_output=True, text=True)
    found: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        top = name.split(".")[0]
        if top in HEAVY and cumulative.isdigit():  # the outermost entry has the largest total
            found[top] = max(found.get(top, 0.0), int(cumulative) / 1e6)
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        write_inputs(work)
        runs = commands(work)
        measure(*runs["runner_finished"])  # the first run analyses the tiny model; later ones find it done
        times: dict[str, list[float]] = {name: [] for name in runs}
        rss: dict[str, list[float]] = {name: [] for name in runs}
        try:
            for r in range(args.repeats):
                for name in runs if r % 2 == 0 else reversed(list(runs)):
                    wall, peak = measure(*runs[name])
                    times[name].append(wall)
                    rss[name].append(peak)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print("| run | median s | min s | peak RSS MiB | heavy imports (cumulative s) |\n"
              "|---|---|---|---|---|")
        bad = []
        for name, (argv, _) in runs.items():
            found = imports(argv)
            shown = ", ".join(f"{m} {s:.2f}" for m, s in
                              sorted(found.items(), key=lambda kv: -kv[1]))
            print(f"| {name} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | "
                  f"{max(rss[name]):.0f} | {shown or 'none'} |")
            forbidden = set(found) & FORBIDDEN[name.split("_")[0]]
            if forbidden:
                bad.append(f"{name} imported {sorted(forbidden)}")
        for line in bad:
            print(f"FAIL: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
