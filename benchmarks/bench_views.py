"""The cost of WeightWatcher's other views: a plain estimator run against ``--mp_fit`` and
``--randomize`` over the same matrices, alternated in one process.

Builds Llama-shaped random matrices in memory (hidden --hidden, MLP --mlp, --layers blocks,
vocab --vocab, untied embedding and head, float32; column scales log-uniform over two decades,
so each spectrum spans about five decades) and times, --repeats times in alternating order:

  plain      net_esd.iter_layer_results with the defaults (float64, xmin_mid)
  mp_fit     the same with --mp_fit
  randomize  the same with --randomize
  eigensolve layer_eigenvalues alone per layer: the plain run's eigensolve time

and, untimed against the others, the parts of --randomize: the element-wise shuffles alone
(esd_randomize.shuffled_bits over every matrix) and the shuffled layers' eigensolves.
Prints the medians and the two ratios of the targets: (mp_fit - plain) / plain <= 5 %, and
(randomize - plain) / eigensolve <= 1.1.

Usage: python benchmarks/bench_views.py [--repeats 3] [--hidden 1024] [--mlp 2816]
       [--layers 2] [--vocab 32000] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def llama_tensors(hidden: int, mlp: int, layers: int, vocab: int) -> list[tuple[str, object]]:
    import torch

    gen = torch.Generator().manual_seed(0)

    def mat(n: int, m: int):
        scales = 10 ** (2 * torch.rand(m, generator=gen) - 1)
        return torch.randn(n, m, generator=gen) * scales / m ** 0.5

    out = [("model.embed_tokens.weight", mat(vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{x}_proj.weight", mat(hidden, hidden)) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", mat(mlp, hidden)),
                (p + "mlp.up_proj.weight", mat(mlp, hidden)),
                (p + "mlp.down_proj.weight", mat(hidden, mlp))]
    out.append(("lm_head.weight", mat(vocab, hidden)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=2816)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=None, help="BLAS and torch threads")
    args = p.parse_args()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import numpy as np
    import torch

    from custom_metrics import MP_FIT, randomize_metric
    from esd_config import ESDConfig
    from esd_randomize import layer_rng, shuffled_bits
    from net_esd import iter_layer_results, layer_eigenvalues, shuffled_eigenvalues, split_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = llama_tensors(args.hidden, args.mlp, args.layers, args.vocab)
    configs = {"plain": ESDConfig(), "mp_fit": ESDConfig(metrics=(MP_FIT,)),
               "randomize": ESDConfig(metrics=(randomize_metric(0),))}
    layers = [layer for name, t in tensors for layer in split_layers(name, t, None, 0.5)]

    def run(name: str) -> float:
        t0 = time.perf_counter()
        if name == "eigensolve":
            for layer in layers:
                layer_eigenvalues(layer, configs["plain"])
        elif name == "shuffles":
            for layer in layers:
                rng = layer_rng(0, layer.longname, 0)
                for m in layer.mats:
                    shuffled_bits(m.numpy(), rng)
        elif name == "shuffled_eigensolve":
            for layer in layers:
                shuffled_eigenvalues(layer, configs["plain"], 0, 0)
        else:
            for _ in iter_layer_results(tensors, configs[name]):
                pass
        return time.perf_counter() - t0

    order = ["plain", "mp_fit", "randomize", "eigensolve"]
    times: dict[str, list[float]] = {k: [] for k in [*order, "shuffles", "shuffled_eigensolve"]}
    run("plain")  # warm-up: imports, BLAS start-up, page faults
    for r in range(args.repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
            times[name].append(run(name))
    for name in ("shuffles", "shuffled_eigensolve"):
        times[name].append(run(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    elements = sum(m.numel() for layer in layers for m in layer.mats)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}, numpy {np.__version__}")
    print(f"matrices: {len(layers)} ({elements / 1e6:.1f} M entries), hidden {args.hidden}, "
          f"mlp {args.mlp}, layers {args.layers}, vocab {args.vocab}, float32; "
          f"repeats {args.repeats}")
    print("| run | median s | all s |\n|---|---|---|")
    for name, v in times.items():
        print(f"| `{name}` | {med[name]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    mp = (med["mp_fit"] - med["plain"]) / med["plain"]
    rnd = (med["randomize"] - med["plain"]) / med["eigensolve"]
    print(f"(mp_fit - plain) / plain = {100 * mp:.1f} % (target <= 5 %)")
    print(f"(randomize - plain) / eigensolve = {rnd:.2f} (target <= 1.1)")
    print(f"shuffles / eigensolve = {med['shuffles'] / med['eigensolve']:.2f}; "
          f"shuffle {1e9 * med['shuffles'] / elements:.0f} ns per entry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
