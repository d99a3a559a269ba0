"""A list of small models: the runner against a one-process WeightWatcher loop.

Usage: python benchmarks/bench_list.py [--models 20] [--repeats 2] [--per_model] [--workdir DIR]

Writes ``--models`` small models (alternately BERT-like and GPT-2-like: 4 layers, hidden 256,
about 10 MB of float32 safetensors each, random weights) and their list into --workdir
(default: a temporary directory, removed afterwards), then times, alternating and each a whole
separate process on the CPU:

  runner     run_esd_experiment.py on the list (long-lived workers), a fresh output directory
  ww_loop    one Python process: for each model AutoModel.from_pretrained + WeightWatcher's
             analyze()
  per_model  (with --per_model) the runner with ESD_WORKER_PER_MODEL=1: a process per model

and prints the median of each, the ratio runner / ww_loop (the goal is <= 0.5) and the
runner's overhead per model: its wall time less the time its jobs spent reading, analysing
and writing their models (the workers' "job ... done in" lines), divided by the model count.
Exit code: 0 when every run succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB_DONE = re.compile(r"job of \d+ model\(s\) done in ([0-9.]+) s")

WRITE_MODELS = """
import sys
from pathlib import Path
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model
root, count = Path(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    torch.manual_seed(i)
    if i % 2:
        model = GPT2Model(GPT2Config(n_embd=256, n_layer=4, n_head=4, n_inner=512,
                                     vocab_size=2000, n_positions=256))
    else:
        model = BertModel(BertConfig(hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=512,
                                     vocab_size=2000, max_position_embeddings=256))
    model.save_pretrained(root / f"model-{i:03d}", safe_serialization=True)
"""

WW_LOOP = """
import logging, sys, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import weightwatcher as ww
from transformers import AutoModel
for path in open(sys.argv[1]).read().split()[1:]:
    model = AutoModel.from_pretrained(path)
    ww.WeightWatcher(model=model).analyze()
"""


def write_inputs(work: Path, count: int) -> Path:
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", WRITE_MODELS, str(models), str(count)], check=True)
    listing = work / "models.csv"
    listing.write_text("model_id\n" + "".join(
        f"{models / f'model-{i:03d}'}\n" for i in range(count)))
    return listing


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_list: {argv[1]} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall


def in_job_seconds(out: Path) -> float:
    """The time the workers' jobs spent on their models, from the per-model logs."""
    return sum(float(m.group(1)) for log in (out / "logs").glob("*.log")
               for m in JOB_DONE.finditer(log.read_text(errors="replace")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--per_model", action="store_true",
                   help="also time the runner with one process per model")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_list_"))
    try:
        listing = write_inputs(work, args.models)
        base_env = {k: v for k, v in os.environ.items() if k != "ESD_WORKER_PER_MODEL"}
        contenders = {"runner": base_env, "ww_loop": base_env}
        if args.per_model:
            contenders["per_model"] = {**base_env, "ESD_WORKER_PER_MODEL": "1"}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        overhead: list[float] = []
        for repeat in range(args.repeats):
            for name, env in contenders.items():
                if name == "ww_loop":
                    argv = [sys.executable, "-c", WW_LOOP, str(listing)]
                else:
                    out = work / f"out-{name}-{repeat}"
                    shutil.rmtree(out, ignore_errors=True)
                    argv = [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
                            str(listing), "--output_dir", str(out), "--device", "cpu",
                            "--no-progress"]
                wall = timed(argv, env)
                times[name].append(wall)
                if name == "runner":
                    overhead.append((wall - in_job_seconds(out)) / args.models)
                print(f"repeat {repeat + 1} {name:9s} {wall:7.2f} s", flush=True)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n{args.models} models, medians of {args.repeats}:")
        for name, value in med.items():
            print(f"  {name:9s} {value:7.2f} s  ({value / args.models:.3f} s a model)")
        print(f"  runner / ww_loop = {med['runner'] / med['ww_loop']:.2f} (goal <= 0.5)")
        if args.per_model:
            print(f"  per_model / ww_loop = {med['per_model'] / med['ww_loop']:.2f}")
        print(f"  runner overhead beyond each model's own read, ESD and write: "
              f"{statistics.median(overhead):.3f} s a model")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
