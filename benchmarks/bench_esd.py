"""Benchmark the ESD estimator against WeightWatcher and a bare eigvalsh loop.

Writes a synthetic Llama-shaped fp32 safetensors checkpoint (hidden 1024, 4 layers,
intermediate 2816, vocab 32000, untied embed_tokens and lm_head: 30 matrices, ~0.5 GB) into
--workdir (default: a temporary directory, removed afterwards), then times, alternating and
each as a whole separate process (python start-up, imports and checkpoint reads included):

  worker     the whole tool for one model: esd_worker.py on the checkpoint's directory
             (model_loader stream -> estimator -> CSV), float64, xmin_mid (default)
  ours       iter_layer_results over safe_open, tensor by tensor, float64, xmin_mid (default)
  ours_dks   the same with fix_fingers=DKS (WeightWatcher's default fit)
  ours_f32   the same with precision=float32
  bare       torch.linalg.eigvalsh of the smaller float64 Gram, matrix by matrix: the limit
  ww         weightwatcher analyze() with its defaults on an nn.Module loaded from the checkpoint

and, untimed, the float32 path's largest relative eigenvalue error against float64 on the
eigenvalues >= 1e-6 and >= 1e-3 lambda_max. Prints a table of median wall seconds and ratios.

Usage: python benchmarks/bench_esd.py [--repeats 3] [--workdir DIR] [--skip ww]
Exit code: 0 when every run succeeded, 1 when a run failed (its output is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, LAYERS, INTERMEDIATE, VOCAB = 1024, 4, 2816, 32000
MODES = ("worker", "ours", "ours_dks", "ours_f32", "bare", "ww")
ERROR_FLOORS = (1e-6, 1e-3)  # float32 error on eigenvalues >= floor * lambda_max


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a Llama checkpoint, in the order a model defines them."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}.mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}.mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[f"{p}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_checkpoint(path: Path) -> None:
    """Gaussian weights with log-uniform column scales over two decades, so each spectrum spans
    about five decades, like a trained layer's, rather than a narrow Marchenko-Pastur bulk."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in checkpoint_shapes().items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape)
        else:
            scale = 0.02 * 10 ** (2 * torch.rand(shape[1], generator=g) - 1)
            tensors[name] = torch.randn(shape, generator=g) * scale
    save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# The measured runs (each in its own process).

def tensor_stream(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def run_ours(path: Path, mode: str) -> dict:
    from net_esd import ESDConfig, iter_layer_results

    config = ESDConfig(fix_fingers="DKS" if mode == "ours_dks" else "xmin_mid",
                       precision="float32" if mode == "ours_f32" else "float64")
    rows = [r.row for r in iter_layer_results(tensor_stream(path), config)]
    return {"layers": len(rows), "ok": sum(r["status"] == "ok" for r in rows)}


def run_bare(path: Path) -> dict:
    import torch

    count = 0
    for _, w in tensor_stream(path):
        if w.ndim != 2:
            continue
        wd = w.double()
        gram = wd.T @ wd if w.shape[0] >= w.shape[1] else wd @ wd.T
        torch.linalg.eigvalsh(gram)
        count += 1
    return {"layers": count}


def build_module(path: Path):
    """A plain nn.Module with the checkpoint's Embedding/Linear layers, weights loaded."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    root = torch.nn.Module()
    for name, w in state.items():
        *parents, leaf, _ = name.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        if w.ndim == 1:
            mod = torch.nn.Module()
            mod.weight = torch.nn.Parameter(w, requires_grad=False)
        elif "embed" in leaf:
            mod = torch.nn.Embedding(*w.shape, _weight=w, _freeze=True)
        else:
            mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            mod.weight = torch.nn.Parameter(w, requires_grad=False)
        node.add_module(leaf, mod)
    return root


def run_ww(path: Path) -> dict:
    import logging

    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    df = ww.WeightWatcher(model=build_module(path)).analyze()
    return {"layers": len(df)}


def child(mode: str, path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    if mode.startswith("ours"):
        out = run_ours(path, mode)
    elif mode == "bare":
        out = run_bare(path)
    else:
        out = run_ww(path)
    out["inner_s"] = time.perf_counter() - t0
    out["imported"] = sorted(m for m in ("transformers", "peft") if m in sys.modules)
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The parent: timing, the float32 error, the table.

def worker_run(path: Path) -> tuple[float, dict]:
    """esd_worker.py as a user runs it; its CSV gives the layer count."""
    import csv

    out = path.parent / "worker_out"
    cmd = [sys.executable, str(ROOT / "esd_worker.py"), "--model_id", str(path.parent),
           "--output_dir", str(out), "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"worker run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    (result,) = out.glob("*.csv")
    with open(result, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return wall, {"layers": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
                  "inner_s": wall, "imported": []}


def timed_run(mode: str, path: Path) -> tuple[float, dict]:
    if mode == "worker":
        return worker_run(path)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--checkpoint", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} run failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, json.loads(lines[-1][len("RESULT "):])


def float32_errors(path: Path) -> dict[float, float]:
    """Largest relative error of float32 eigenvalues >= floor * lambda_max, over all matrices."""
    sys.path.insert(0, str(ROOT))
    import torch

    from net_esd import gram_eigenvalues

    cpu, worst = torch.device("cpu"), dict.fromkeys(ERROR_FLOORS, 0.0)
    for _, w in tensor_stream(path):
        if w.ndim != 2:
            continue
        e64 = gram_eigenvalues(w, cpu, torch.float64, 1 << 19)
        e32 = gram_eigenvalues(w, cpu, torch.float32, 1 << 19).double()
        for floor in ERROR_FLOORS:
            keep = e64 >= floor * e64[-1]
            err = float(((e32[keep] - e64[keep]).abs() / e64[keep]).max())
            worst[floor] = max(worst[floor], err)
    return worst


def machine() -> str:
    import platform

    import torch

    cpu, cpuinfo = platform.processor(), Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def report(times: dict[str, list[float]], info: dict[str, list[dict]],
           f32_err: dict[float, float]) -> None:
    """Median wall seconds per run (whole process) and median in-process analysis seconds."""
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\n{'run':<10}{'median s':>10}{'min s':>9}{'inner s':>9}  layers  imports")
    for m, v in times.items():
        inner = statistics.median(i["inner_s"] for i in info[m])
        last = info[m][-1]
        print(f"{m:<10}{med[m]:>10.2f}{min(v):>9.2f}{inner:>9.2f}  {last['layers']:>6}  "
              f"{','.join(last['imported']) or 'none'}")
    print()
    if "bare" in med:
        for m in ("worker", "ours", "ours_dks", "ours_f32"):
            if m in med:
                print(f"{m}/bare = {med[m] / med['bare']:.2f}")
    if "ww" in med:
        print("   ".join(f"ww/{m} = {med['ww'] / med[m]:.2f}"
                         for m in ("worker", "ours", "ours_dks") if m in med))
    for floor, err in f32_err.items():
        print(f"float32 max relative eigenvalue error, eigenvalues >= {floor:g} lambda_max: "
              f"{err:.2e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here")
    p.add_argument("--skip", nargs="*", default=[], choices=MODES, help="runs to leave out")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.checkpoint)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "model.safetensors"
        if not path.exists():
            write_checkpoint(path)
        print(f"checkpoint {path} ({path.stat().st_size / 1e9:.2f} GB); {machine()}")
        modes = [m for m in MODES if m not in args.skip]
        times: dict[str, list[float]] = {m: [] for m in modes}
        info: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.repeats):
            for m in modes if r % 2 == 0 else reversed(modes):
                wall, out = timed_run(m, path)
                times[m].append(wall)
                info[m].append(out)
                print(f"repeat {r} {m:<9} {wall:6.2f} s  {out}", flush=True)
        report(times, info, float32_errors(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
