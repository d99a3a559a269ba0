"""Benchmark the ESD tool against WeightWatcher and bare eigensolver loops, CPU or CUDA.

Writes a synthetic Llama-shaped safetensors checkpoint into --workdir (default: a temporary
directory, removed afterwards):
  --shape small (default)  hidden 1024, 4 layers, MLP 2816, vocab 32000, fp32: 30 matrices,
                           0.47 GB
  --shape 7b               hidden 4096, MLP 11008, vocab 32000, --layers (default 2), bf16:
                           Llama-2-7B's matrices, 1.3 GB for 2 layers
(untied embed_tokens and lm_head; column scales log-uniform over two decades, so each spectrum
spans about five decades, like a trained layer's). Then times, alternating, each run a whole
separate process (python start-up, imports and checkpoint reads included):

  runner    run_esd_experiment.py on a one-model list (the checkpoint's directory): the tool
            as a user runs it, dispatcher and worker process included
  worker    esd_worker.py on the checkpoint's directory (loader -> estimator -> CSV)
  ours      net_esd.iter_layer_results over safe_open, float64, xmin_mid (default)
  ours_ahead  the same through the worker's run.devices.on_devices: the next tensors read on
            this thread while a device thread solves (its layer_ids restart per tensor)
  ours_dks  the same with fix_fingers=DKS (WeightWatcher's default fit)
  ours_f32  the same with precision=float32
  bare      torch float64 Gram (W.T @ W, a gemm) + torch.linalg.eigvalsh per matrix: the
            old limit, on --device
  limit     BLAS dsyrk + LAPACK dsyevr (eigenvalues only) per matrix through SciPy's
            wrappers: the CPU's limit (CPU only)
  batched   like bare, but the Grams of same-shaped matrices stacked and solved by one
            batched eigvalsh (CUDA only)
  ww        weightwatcher analyze() with its defaults (fp32 checkpoints on the CPU only)

Prints per run the median wall seconds (whole process) and the median in-process seconds
(from the first tensor read to the last eigenvalue), the ratios against the targets, and,
untimed, the float32 path's largest relative eigenvalue error against float64 (CPU).

Usage: python benchmarks/bench_esd.py [--repeats 3] [--device cpu|cuda] [--shape small|7b]
       [--layers N] [--threads N] [--workdir DIR] [--skip ww ...] [--only runner bare ...]
--threads N runs every child with N BLAS and OpenMP threads (OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS, MKL_NUM_THREADS; the worker with --threads N, the runner with as many
CPU workers as that leaves each N cores): on a machine shared with other work, two threads
that wait for each other at every BLAS block can cost several times one thread's time.
Exit code: 0 when every run succeeded, 1 when a run failed (its output is printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = dict(os.environ)  # --threads N sets the thread counts of every BLAS and OpenMP
SHAPES = {  # hidden, default layers, MLP, vocab, stored dtype
    "small": (1024, 4, 2816, 32000, "float32"),
    "7b": (4096, 2, 11008, 32000, "bfloat16"),
}
MODES = ("runner", "worker", "ours", "ours_ahead", "ours_dks", "ours_f32", "bare", "limit",
         "batched", "ww")
CPU_ONLY, CUDA_ONLY = {"limit", "ww"}, {"batched"}
PROCESS_MODES = {"runner", "worker"}  # timed from outside only: their wall time is the figure
ERROR_FLOORS = (1e-6, 1e-3)  # float32 error on eigenvalues >= floor * lambda_max
BATCH = 8  # same-shaped Grams per batched eigvalsh call (8 x 4096^2 float64 = 1 GiB)
# (numerator, denominator, target, kind): the targets; "<=" ratios of medians.
TARGETS = (("runner", "bare", 0.8, "wall"), ("ww", "runner", 3.0, "wall>="),
           ("ours", "limit", 1.1, "inner"), ("worker", "bare", None, "wall"),
           ("ours", "bare", None, "wall"), ("ours_f32", "bare", None, "wall"),
           ("ww", "ours", None, "wall>="), ("ours_ahead", "ours", None, "inner"),
           ("batched", "bare", None, "inner"))


def checkpoint_shapes(shape: str, layers: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a Llama checkpoint, in the order a model defines them."""
    hidden, _, inter, vocab, _ = SHAPES[shape]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_checkpoint(path: Path, shape: str = "small", layers: int | None = None) -> None:
    """Gaussian weights with log-uniform column scales over two decades, so each spectrum spans
    about five decades, like a trained layer's, rather than a narrow Marchenko-Pastur bulk."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, SHAPES[shape][4])
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dims in checkpoint_shapes(shape, layers or SHAPES[shape][1]).items():
        if len(dims) == 1:
            tensors[name] = torch.ones(dims, dtype=dtype)
        else:
            scale = 0.02 * 10 ** (2 * torch.rand(dims[1], generator=g) - 1)
            tensors[name] = (torch.randn(dims, generator=g) * scale).to(dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# The measured runs (each in its own process).

def tensor_stream(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def matrices(path: Path):
    return (w for _, w in tensor_stream(path) if w.ndim == 2)


def run_ours(path: Path, mode: str, device: str) -> dict:
    from esd_experiment.estimator.net_esd import ESDConfig, iter_layer_results

    config = ESDConfig(fix_fingers="DKS" if mode == "ours_dks" else "xmin_mid",
                       precision="float32" if mode == "ours_f32" else "float64", device=device)
    if mode == "ours_ahead":
        from esd_experiment.run.devices import on_devices

        rows = []
        for _, value in on_devices(lambda item, dev: list(iter_layer_results([item], config)),
                                   tensor_stream(path), [device]):
            if isinstance(value, BaseException):
                raise value
            rows += [r.row for r in value]
    else:
        rows = [r.row for r in iter_layer_results(tensor_stream(path), config)]
    return {"layers": len(rows), "ok": sum(r["status"] == "ok" for r in rows)}


def torch_gram(w, device: str):
    wd = w.to(device).double()
    return wd.T @ wd if w.shape[0] >= w.shape[1] else wd @ wd.T


def run_bare(path: Path, device: str) -> dict:
    import torch

    count = 0
    for w in matrices(path):
        torch.linalg.eigvalsh(torch_gram(w, device))
        count += 1
    return {"layers": count}


def run_batched(path: Path, device: str) -> dict:
    import torch

    pending: dict[int, list] = {}
    count = 0
    for w in matrices(path):
        gram = torch_gram(w, device)
        group = pending.setdefault(gram.shape[0], [])
        group.append(gram)
        count += 1
        if len(group) == BATCH:
            torch.linalg.eigvalsh(torch.stack(pending.pop(gram.shape[0])))
    for group in pending.values():
        torch.linalg.eigvalsh(torch.stack(group))
    return {"layers": count}


def run_limit(path: Path) -> dict:
    from scipy.linalg.blas import dsyrk
    from scipy.linalg.lapack import dsyevr

    count = 0
    for w in matrices(path):
        x = w.double().numpy()  # C order: x.T is a Fortran matrix, used without a copy
        gram = dsyrk(1.0, x.T, trans=int(x.shape[0] < x.shape[1]), lower=1)  # smaller Gram
        info = dsyevr(gram, compute_v=0, lower=1, overwrite_a=1)[-1]
        if info != 0:
            raise RuntimeError(f"dsyevr info={info}")
        count += 1
    return {"layers": count}


def run_ww(path: Path) -> dict:
    import logging

    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    df = ww.WeightWatcher(model=build_module(path)).analyze()
    return {"layers": len(df)}


def build_module(path: Path):
    """A plain nn.Module with the checkpoint's Embedding/Linear layers, weights loaded."""
    import torch
    from safetensors.torch import load_file

    root = torch.nn.Module()
    for name, w in load_file(str(path)).items():
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


def child(mode: str, path: Path, device: str) -> None:
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    if mode.startswith("ours"):
        out = run_ours(path, mode, device)
    elif mode in ("bare", "batched"):
        out = (run_bare if mode == "bare" else run_batched)(path, device)
    elif mode == "limit":
        out = run_limit(path)
    else:
        out = run_ww(path)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    out["inner_s"] = time.perf_counter() - t0
    out["imported"] = sorted(m for m in ("transformers", "peft") if m in sys.modules)
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The parent: timing, the float32 error, the table.

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def run_process(cmd: list[str], what: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return wall, proc


def tool_run(mode: str, path: Path, device: str) -> tuple[float, dict]:
    """The runner or the worker as a user runs them, into a fresh output directory."""
    out = path.parent / f"{mode}_out"
    shutil.rmtree(out, ignore_errors=True)
    common = ["--output_dir", str(out), "--device", device]
    threads = CHILD_ENV.get("OMP_NUM_THREADS")
    if mode == "worker":
        cmd = [sys.executable, str(ROOT / "esd_worker.py"), "--model_id", str(path.parent)]
        cmd += ["--threads", threads] if threads else []
    else:
        model_list = path.parent / "models.csv"
        model_list.write_text(f"model_id\n{path.parent}\n")
        cmd = [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
               str(model_list), "--no-progress"]
        if device.startswith("cuda"):  # one real NVML reading, then dispatch at once
            common += ["--gpus", "0", "--max_check", "1", "--poll_interval", "0.5",
                       "--gpu_memory_threshold", "2048"]
        elif threads:  # the runner gives each worker cores // cpu_workers threads
            cmd += ["--cpu_workers", str(max(1, len(os.sched_getaffinity(0)) // int(threads)))]
    wall, _ = run_process(cmd + common, f"{mode} run")
    (result,) = out.glob("*.csv")
    with open(result, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return wall, {"layers": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
                  "inner_s": wall, "imported": []}


def timed_run(mode: str, path: Path, device: str) -> tuple[float, dict]:
    if mode in PROCESS_MODES:
        return tool_run(mode, path, device)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--checkpoint",
           str(path), "--device", device]
    wall, proc = run_process(cmd, f"{mode} run")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{mode} printed no result:\n{proc.stdout[-3000:]}")
    return wall, json.loads(lines[-1][len("RESULT "):])


def float32_errors(path: Path) -> dict[float, float]:
    """Largest relative error of float32 eigenvalues >= floor * lambda_max, over all matrices."""
    sys.path.insert(0, str(ROOT))
    import torch

    from esd_experiment.estimator.net_esd import gram_eigenvalues

    cpu, worst = torch.device("cpu"), dict.fromkeys(ERROR_FLOORS, 0.0)
    for w in matrices(path):
        e64 = gram_eigenvalues(w, cpu, torch.float64, 1 << 19)
        e32 = gram_eigenvalues(w, cpu, torch.float32, 1 << 19).double()
        for floor in ERROR_FLOORS:
            keep = e64 >= floor * e64[-1]
            worst[floor] = max(worst[floor], float(((e32[keep] - e64[keep]).abs()
                                                    / e64[keep]).max()))
    return worst


def machine(device: str) -> str:
    import platform

    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS, so threadpoolctl lists it)
    import torch

    cpu, cpuinfo = platform.processor(), Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{p['internal_api']} {p['version']} ({p['num_threads']} threads)"
                         for p in threadpool_info() if p["user_api"] == "blas")
    except ImportError:
        blas = "unknown (threadpoolctl not installed)"
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs{gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); numpy/scipy BLAS: {blas}; "
            f"python {platform.python_version()}")


def report(times: dict[str, list[float]], info: dict[str, list[dict]]) -> None:
    """Median wall seconds per run (whole process) and median in-process seconds; ratios."""
    wall = {m: statistics.median(v) for m, v in times.items()}
    inner = {m: statistics.median(i["inner_s"] for i in info[m]) for m in times}
    print("\n| run | median s | min s | in-process s | layers | imports |\n|---|---|---|---|---|---|")
    for m, v in times.items():
        last = info[m][-1]
        shown = "" if m in PROCESS_MODES else f"{inner[m]:.2f}"
        print(f"| {m} | {wall[m]:.2f} | {min(v):.2f} | {shown} | {last['layers']} | "
              f"{','.join(last['imported']) or 'none'} |")
    print("\n| ratio | measured | target |\n|---|---|---|")
    for num, den, target, kind in TARGETS:
        if num not in wall or den not in wall:
            continue
        which = inner if kind == "inner" else wall
        goal = "" if target is None else f"{'>=' if kind == 'wall>=' else '<='} {target}"
        what = "in process" if kind == "inner" else "whole process"
        print(f"| {num} / {den} ({what}) | {which[num] / which[den]:.2f} | {goal} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: by shape)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here")
    p.add_argument("--skip", nargs="*", default=[], choices=MODES, help="runs to leave out")
    p.add_argument("--only", nargs="*", default=None, choices=MODES, help="runs to do")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS/OpenMP threads of every run (default: the libraries' own)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.checkpoint, args.device)
        return 0
    if args.threads is not None:
        CHILD_ENV.update(dict.fromkeys(THREAD_VARS, str(args.threads)))
    cuda = args.device.startswith("cuda")
    modes = [m for m in (args.only or MODES) if m not in args.skip
             and m not in (CPU_ONLY if cuda else CUDA_ONLY)
             and not (m == "ww" and SHAPES[args.shape][4] != "float32")]  # numpy has no bf16
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        name = f"{args.shape}-{args.layers or SHAPES[args.shape][1]}"
        path = workdir / name / "model.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_checkpoint(path, args.shape, args.layers)
        print(f"checkpoint {path} ({path.stat().st_size / 1e9:.2f} GB, {args.shape}); "
              f"device {args.device}; {machine(args.device)}", flush=True)
        times: dict[str, list[float]] = {m: [] for m in modes}
        info: dict[str, list[dict]] = {m: [] for m in modes}
        try:
            for r in range(args.repeats):
                for m in modes if r % 2 == 0 else reversed(modes):
                    wall, out = timed_run(m, path, args.device)
                    times[m].append(wall)
                    info[m].append(out)
                    print(f"repeat {r} {m:<9} {wall:6.2f} s  {out}", flush=True)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        report(times, info)
        if not cuda and "ours_f32" in modes:
            for floor, err in float32_errors(path).items():
                print(f"float32 max relative eigenvalue error, eigenvalues >= {floor:g} "
                      f"lambda_max: {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
