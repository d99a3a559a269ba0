"""The cost of --delta, side by side in one run: a full fine-tune's worker job without and
with --delta, and a base + LoRA adapter job without and with it.

Writes into --workdir (default: a temporary directory, removed afterwards) a Llama-shaped
safetensors base (hidden --hidden, --layers blocks, MLP 2.75 x hidden, vocab --vocab, fp32),
a full fine-tune of it (every matrix plus a small dense update) and a LoRA adapter (rank
--rank on every projection). Then times, alternating, each run a whole esd_worker.py process
(python start-up, imports and reads included):

  ft        the fine-tune, its source named (--source_model), no --delta
  ft_delta  the same with --delta: delta/<name>.csv too, the base read beside it
  lora      the base and its adapter as one job (the runner's grouping), no --delta
  lora_delta  the same with --delta

and, in this process, the plain run's eigensolve time (net_esd.layer_eigenvalues over the
fine-tune's matrices) and the adapter's low-rank delta eigenvalues (esd_delta). Prints the medians,
wall and CPU (the child's own, robust to other work on the machine), and the ratio the target
is stated in: (ft_delta - ft) / eigensolve (<= 1.1), in CPU seconds.

Usage: python benchmarks/bench_delta.py [--repeats 3] [--hidden 1024] [--layers 2]
       [--vocab 8000] [--rank 16] [--threads N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(hidden: int, layers: int, vocab: int) -> dict[str, tuple[int, int]]:
    mlp = int(hidden * 2.75)
    out = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    for b in range(layers):
        p = f"model.layers.{b}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{proj}.weight"] = (hidden, hidden)
        out[f"{p}.mlp.gate_proj.weight"] = (mlp, hidden)
        out[f"{p}.mlp.up_proj.weight"] = (mlp, hidden)
        out[f"{p}.mlp.down_proj.weight"] = (hidden, mlp)
    return out


def build(workdir: Path, hidden: int, layers: int, vocab: int, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": hidden, "intermediate_size": int(hidden * 2.75),
              "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
              "vocab_size": vocab, "tie_word_embeddings": False}
    base, ft, lora = {}, {}, {}
    for name, (n, m) in shapes(hidden, layers, vocab).items():
        scale = torch.logspace(-1, 1, m)[torch.randperm(m, generator=gen)]
        base[name] = torch.randn(n, m, generator=gen) * scale / m ** 0.5
        ft[name] = base[name] + 0.01 * torch.randn(n, m, generator=gen) / m ** 0.5
        if name.split(".")[-2] in PROJECTIONS:
            key = f"base_model.model.{name.removesuffix('.weight')}"
            lora[f"{key}.lora_A.weight"] = torch.randn(rank, m, generator=gen) / m ** 0.5
            lora[f"{key}.lora_B.weight"] = torch.randn(n, rank, generator=gen) * 0.01
    for folder, tensors in (("base", base), ("ft", ft)):
        (workdir / folder).mkdir(parents=True)
        save_file(tensors, str(workdir / folder / "model.safetensors"))
        (workdir / folder / "config.json").write_text(json.dumps(config))
    (workdir / "lora").mkdir()
    save_file(lora, str(workdir / "lora" / "adapter_model.safetensors"))
    (workdir / "lora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "task_type": "CAUSAL_LM",
         "target_modules": list(PROJECTIONS), "base_model_name_or_path": str(workdir / "base")}))


def worker(workdir: Path, name: str, delta: bool, threads: int | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one worker process: the CPU time is what the job
    itself spent, whatever else shares the machine."""
    out = workdir / f"out-{name}{'-delta' if delta else ''}"
    shutil.rmtree(out, ignore_errors=True)
    base = str(workdir / "base")
    if name == "ft":
        ids = ["--model_id", str(workdir / "ft"), "--source_model", base]
    else:
        ids = ["--model_id", base, str(workdir / "lora"), "--source_model", base,
               "--base_model_relation", "adapter"]
    argv = [sys.executable, str(ROOT / "esd_worker.py"), *ids, "--output_dir", str(out),
            "--device", "cpu", *(["--delta"] if delta else []),
            *(["--threads", str(threads)] if threads else [])]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if delta and not any((out / "delta").glob("*.csv")):
        raise SystemExit(f"{name} with --delta wrote no delta")
    return took, cpu_s


def eigensolve_seconds(workdir: Path) -> tuple[float, float, float]:
    """CPU seconds, in this process, float64: the plain eigensolve of the fine-tune's
    matrices, ΔW's (esd_delta.difference_eigenvalues, as the worker computes it), and the
    adapter's low-rank delta eigenvalues."""
    from safetensors.torch import load_file

    from esd_experiment.estimator.net_esd import layer_eigenvalues, split_layers
    from esd_experiment.estimator.options import ESDConfig
    from esd_experiment.run.delta import difference_eigenvalues, lowrank_eigenvalues

    config = ESDConfig()
    tensors = load_file(str(workdir / "ft" / "model.safetensors"))
    started = time.process_time()
    for name, w in tensors.items():
        for layer in split_layers(name, w, None, config.conv_norm):
            layer_eigenvalues(layer, config)
    plain = time.process_time() - started
    base = load_file(str(workdir / "base" / "model.safetensors"))
    started = time.process_time()
    for name, w in tensors.items():  # as the worker does: ΔW's Gram from row chunks
        for mine, theirs in zip(split_layers(name, w, None, config.conv_norm),
                                split_layers(name, base[name], None, config.conv_norm),
                                strict=True):
            difference_eigenvalues(mine, theirs, config)
    delta = time.process_time() - started
    lora = load_file(str(workdir / "lora" / "adapter_model.safetensors"))
    started = time.process_time()
    for key in [k for k in lora if k.endswith("lora_A.weight")]:
        a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
        lowrank_eigenvalues(a, b, 2.0, min(b.shape[0], a.shape[1]))
    return plain, delta, time.process_time() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-delta-"))
    try:
        build(workdir, args.hidden, args.layers, args.vocab, args.rank)
        times: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeats):
            for name in ("ft", "lora"):
                for delta in (False, True):
                    key = f"{name}{'_delta' if delta else ''}"
                    times.setdefault(key, []).append(worker(workdir, name, delta, args.threads))
        plain, delta, lowrank = eigensolve_seconds(workdir)
        wall = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        for key in times:
            print(f"{key:11s} wall {wall[key]:6.2f} s, CPU {cpu[key]:6.2f} s  (runs, wall/CPU: "
                  f"{', '.join(f'{t:.2f}/{c:.2f}' for t, c in times[key])})")
        print(f"plain eigensolve of the fine-tune (CPU): {plain:.2f} s; ΔW's {delta:.2f} s = "
              f"{delta / plain:.2f}x")
        for label, a, b in (("the fine-tune", "ft", "ft_delta"), ("base + adapter", "lora",
                                                                   "lora_delta")):
            print(f"--delta on {label} adds CPU {cpu[b] - cpu[a]:.2f} s = "
                  f"{(cpu[b] - cpu[a]) / plain:.2f}x the plain eigensolve, wall "
                  f"{wall[b] - wall[a]:.2f} s (target <= 1.1x)")
        print(f"the adapter's low-rank delta eigenvalues: {lowrank * 1e3:.1f} ms CPU for "
              f"{len(PROJECTIONS) * args.layers} matrices")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
