"""The cost of WeightWatcher's other views: a plain estimator run against ``--mp_fit`` and
``--randomize`` over the same matrices, alternated in one process.

Builds Llama-shaped random matrices in memory (hidden --hidden, MLP --mlp, --layers blocks,
vocab --vocab, untied embedding and head, float32; column scales log-uniform over two decades,
so each spectrum spans about five decades) and times, --repeats times in alternating order:

  plain      net_esd.iter_layer_results with the defaults (float64, xmin_mid)
  mp_fit     the same with --mp_fit
  randomize  the same with --randomize
  eigensolve layer_eigenvalues alone per layer: the plain run's eigensolve time
  mp_fit_work     the MP fit alone (esd_mp.mp_fit on every layer's eigenvalues): what
                  --mp_fit adds, measured directly
  randomize_work  the randomized columns alone (shuffles, their eigensolves, the MP fit of
                  the shuffled spectra): what --randomize adds, measured directly
  shuffles        the element-wise shuffles alone (esd_randomize.shuffled_bits)
  generator_shuffles  the same shuffles by NumPy's Generator.shuffle, for comparison
  keys            the shuffles' random bits alone (one 64-bit word per entry, into the reused
                  buffer): the floor of any shuffle by random keys
  read_plain      the worker (esd_worker.main, in process) on the same matrices saved as a
                  safetensors checkpoint (read from the page cache): a job as the runner runs it
  read_randomize  the same with --randomize

Each run is one scope of ``esd_randomize.WORDS``, as a job is: no shuffle buffer is kept
from an earlier run, so --randomize pays for its first large buffer's page faults in every
run.

Besides wall-clock seconds it reports the process's CPU seconds (all threads): --randomize
shuffles a layer on a background thread while the layer's own eigenvalues are computed, which
hides wall-clock time only where a core is free, so the CPU ratio is printed too.

Prints medians and minima (wall and CPU) and the ratios of the targets: --mp_fit adds <= 5 % of the plain
run, --randomize adds <= 1.1 x the plain run's eigensolve time; each both as the difference
of two whole runs and as the directly measured work (steadier on a loaded machine).

Usage: python benchmarks/bench_views.py [--repeats 3] [--hidden 1024] [--mlp 2816]
       [--layers 2] [--vocab 32000] [--threads N] [--device cpu|cuda] [--runs a,b,...]
Writes nothing; prints Markdown tables. Exit code 0 (an exception exits 1).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
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
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--runs", default=",".join(RUNS),
                   help="comma-separated runs to time (default: all; large shapes: "
                        "plain,randomize,eigensolve,shuffles)")
    args = p.parse_args()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import numpy as np
    import torch

    from esd_experiment.estimator.metrics import MP_FIT, randomize_metric
    from esd_experiment.estimator.mp_fit import mp_fit
    from esd_experiment.estimator.net_esd import (
        iter_layer_results,
        layer_eigenvalues,
        shuffled_eigenvalues,
        split_layers,
    )
    from esd_experiment.estimator.options import ESDConfig
    from esd_experiment.estimator.randomize import (
        _RAW_CHUNK,
        WORDS,
        layer_rng,
        randomized_columns,
        shuffled_bits,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = llama_tensors(args.hidden, args.mlp, args.layers, args.vocab)
    scratch = Path(tempfile.mkdtemp(prefix="bench-views-"))
    if any(r.startswith("read_") for r in args.runs.split(",")):
        from safetensors.torch import save_file

        (scratch / "model").mkdir()
        save_file(dict(tensors), str(scratch / "model" / "model.safetensors"))
    dev = args.device
    configs = {"plain": ESDConfig(device=dev), "mp_fit": ESDConfig(device=dev, metrics=(MP_FIT,)),
               "randomize": ESDConfig(device=dev, metrics=(randomize_metric(0),))}
    layers = [layer for name, t in tensors for layer in split_layers(name, t, None, 0.5)]

    evals = {layer.longname: layer_eigenvalues(layer, configs["plain"]).cpu().numpy()
             for layer in layers}

    def run(name: str) -> tuple[float, float]:
        with WORDS.reused():  # one scope a run, as a job is: no buffer kept from before
            return timed(name)

    def timed(name: str) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        if name == "eigensolve":
            for layer in layers:
                layer_eigenvalues(layer, configs["plain"])
        elif name == "mp_fit_work":
            for layer in layers:
                mp_fit(evals[layer.longname], layer.N, layer.M)
        elif name == "randomize_work":
            for layer in layers:
                randomized_columns(evals[layer.longname], layer.N, layer.M,
                                   lambda seed, r, la=layer: shuffled_eigenvalues(
                                       la, configs["randomize"], seed, r), seed=0)
        elif name == "shuffles":
            for layer in layers:
                rng = layer_rng(0, layer.longname, 0)
                for m in layer.mats:
                    room = WORDS.take(m.numel())  # the buffer a run reuses, as it does
                    shuffled_bits(m.numpy(), rng, words=room)
                    WORDS.give(room)
        elif name == "keys":
            for layer in layers:
                rng = layer_rng(0, layer.longname, 0)
                for m in layer.mats:
                    room = WORDS.take(m.numel())
                    for start in range(0, m.numel(), _RAW_CHUNK):  # as sort_shuffle does
                        stop = min(start + _RAW_CHUNK, m.numel())
                        room[start:stop] = rng.bit_generator.random_raw(stop - start)
                    WORDS.give(room)
        elif name == "generator_shuffles":
            for layer in layers:
                rng = layer_rng(0, layer.longname, 0)
                for m in layer.mats:
                    rng.shuffle(m.numpy().reshape(-1).copy())
        elif name.startswith("read_"):
            from esd_experiment.run import worker

            flags = ["--randomize"] if name == "read_randomize" else []
            out = scratch / f"{name}-{len(times[name])}"  # a new result each run
            assert worker.main(["--model_id", str(scratch / "model"), "--device", dev,
                                "--output_dir", str(out), *flags]) == 0
        else:
            for _ in iter_layer_results(tensors, configs[name]):
                pass
        return time.perf_counter() - t0, time.process_time() - c0

    order = [name for name in RUNS if name in args.runs.split(",")]
    times: dict[str, list[float]] = {k: [] for k in order}
    cpu: dict[str, list[float]] = {k: [] for k in order}
    layer_eigenvalues(layers[-1], configs["plain"])  # warm-up: BLAS start-up
    mp_fit(np.linspace(0.1, 1.0, 20), 40, 20)  # and SciPy's optimize, imported once per process
    for r in range(args.repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
            wall, used = run(name)
            times[name].append(wall)
            cpu[name].append(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    cpu_low = {k: min(v) for k, v in cpu.items()}
    elements = sum(m.numel() for layer in layers for m in layer.mats)
    gpu = torch.cuda.get_device_name() if dev.startswith("cuda") else "no GPU used"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{gpu}, threads {args.threads or 'default'}; "
          f"torch {torch.__version__}, numpy {np.__version__}")
    print(f"matrices: {len(layers)} ({elements / 1e6:.1f} M entries), hidden {args.hidden}, "
          f"mlp {args.mlp}, layers {args.layers}, vocab {args.vocab}, float32; "
          f"repeats {args.repeats}")
    print("| run | median s | min s | min CPU s | all s |\n|---|---|---|---|---|")
    for name, v in times.items():
        print(f"| `{name}` | {med[name]:.2f} | {low[name]:.2f} | {cpu_low[name]:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in v)} |")
    for what, t in (("medians", med), ("minima", low), ("CPU minima", cpu_low)):
        ratios = [(label, fn(t)) for label, needs, fn in RATIOS if set(needs) <= t.keys()]
        print(f"{what}: " + "; ".join(f"{label} = {value}" for label, value in ratios)
              + f"; {1e9 * t.get('shuffles', float('nan')) / elements:.0f} ns per entry shuffled")
    shutil.rmtree(scratch)
    return 0


RUNS = ("plain", "mp_fit", "randomize", "eigensolve", "mp_fit_work", "randomize_work",
        "shuffles", "generator_shuffles", "keys", "read_plain", "read_randomize")
# The printed ratios: (label, the runs it needs, its value from the times).
RATIOS = (
    ("(mp_fit - plain) / plain (target <= 5 %)", ("mp_fit", "plain"),
     lambda t: f"{100 * (t['mp_fit'] - t['plain']) / t['plain']:.1f} %"),
    ("mp_fit_work / plain (target <= 5 %)", ("mp_fit_work", "plain"),
     lambda t: f"{100 * t['mp_fit_work'] / t['plain']:.1f} %"),
    ("(randomize - plain) / eigensolve (target <= 1.1)", ("randomize", "plain", "eigensolve"),
     lambda t: f"{(t['randomize'] - t['plain']) / t['eigensolve']:.2f}"),
    ("randomize_work / eigensolve", ("randomize_work", "eigensolve"),
     lambda t: f"{t['randomize_work'] / t['eigensolve']:.2f}"),
    ("shuffles / eigensolve", ("shuffles", "eigensolve"),
     lambda t: f"{t['shuffles'] / t['eigensolve']:.2f}"),
    ("generator_shuffles / shuffles", ("generator_shuffles", "shuffles"),
     lambda t: f"{t['generator_shuffles'] / t['shuffles']:.2f}"),
    ("(read_randomize - read_plain) / eigensolve (target <= 1.1)",
     ("read_randomize", "read_plain", "eigensolve"),
     lambda t: f"{(t['read_randomize'] - t['read_plain']) / t['eigensolve']:.2f}"),
    ("keys / eigensolve", ("keys", "eigensolve"),
     lambda t: f"{t['keys'] / t['eigensolve']:.2f}"),
)


if __name__ == "__main__":
    sys.exit(main())
