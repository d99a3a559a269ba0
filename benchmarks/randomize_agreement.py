"""How closely ``--randomize`` agrees with WeightWatcher's ``analyze(randomize=True)``.

The shuffles differ (ours: NumPy's Generator seeded by --seed and the layer name;
WeightWatcher's: the global ``np.random.shuffle``), so the agreement is one of distribution.
For a few Linear layers (noise with heavy, Student-t(3) entries plus rank-one spikes and a few
loud columns), over --seeds seeds on each side:

  ks        the two-sample Kolmogorov-Smirnov statistic between our pooled shuffled spectra
            and WeightWatcher's (``random_eigenvalues``), and, for scale, between the
            unshuffled spectrum and WeightWatcher's shuffled one
  columns   the relative difference of the seed-means of each randomized column, ours
            (``net_esd_estimator(randomize=True, seed=s)``) against WeightWatcher's
            (``analyze(randomize=True)`` after ``np.random.seed(s)``), and the seed-to-seed
            spread of WeightWatcher's own column (std / |mean|) to compare it with; spike
            counts in absolute terms

Usage: python benchmarks/randomize_agreement.py [--seeds 10]
Writes nothing; prints Markdown tables. Exit code 0 (an exception exits 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(300, 120), (512, 512), (64, 160)]  # (out, in); 64 x 160 has fewer than 100 evals


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    args = p.parse_args()

    import numpy as np
    import torch
    import weightwatcher as ww
    from scipy import stats

    from esd_experiment.estimator.net_esd import (
        layer_eigenvalues,
        net_esd_estimator,
        shuffled_eigenvalues,
        split_layers,
    )
    from esd_experiment.estimator.options import ESDConfig
    from esd_experiment.estimator.randomize import RANDOM_COLUMNS

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    rng = np.random.default_rng(1)
    net = torch.nn.Sequential(*[torch.nn.Linear(m, n) for n, m in SHAPES])
    with torch.no_grad():
        for layer, (n, m) in zip(net, SHAPES, strict=True):
            w = rng.standard_t(3, size=(n, m)) / np.sqrt(m) + rng.standard_normal(
                (n, 4)) @ rng.standard_normal((4, m)) * 0.2
            w[:, :10] *= 4.0
            layer.weight.copy_(torch.from_numpy(w))
    seeds = range(args.seeds)
    config = ESDConfig()
    watcher = ww.WeightWatcher()
    print("| layer (N x M) | KS ours vs WW | KS unshuffled vs WW |\n|---|---|---|")
    for name, module in net.named_children():
        w = module.weight.detach().double()
        (layer,) = split_layers(f"{name}.weight", w, "linear", 0.5)
        ours = np.concatenate([shuffled_eigenvalues(layer, config, s, 0) for s in seeds])
        theirs = []
        for s in seeds:
            np.random.seed(s)
            theirs.append(watcher.random_eigenvalues([w.numpy().copy()], layer.M, 1))
        theirs = np.concatenate(theirs)
        plain = np.tile(layer_eigenvalues(layer, config).numpy(), len(seeds))
        print(f"| {name} ({layer.N} x {layer.M}) | {stats.ks_2samp(ours, theirs).statistic:.3f} "
              f"| {stats.ks_2samp(plain, theirs).statistic:.3f} |")
    ours_runs, ww_runs = [], []
    for s in seeds:
        ours_runs.append(net_esd_estimator(net, randomize=True, seed=s)[list(RANDOM_COLUMNS)])
        np.random.seed(s)
        ww_runs.append(ww.WeightWatcher(model=net).analyze(randomize=True)[list(RANDOM_COLUMNS)])
    ours_mean = sum(r.to_numpy(float) for r in ours_runs) / len(ours_runs)
    ww_stack = np.stack([r.to_numpy(float) for r in ww_runs])
    ww_mean, ww_std = ww_stack.mean(axis=0), ww_stack.std(axis=0)
    print("\n| column | max rel. diff of seed-means | WW's own seed spread (max std/|mean|) |")
    print("|---|---|---|")
    with np.errstate(divide="ignore", invalid="ignore"):
        for j, col in enumerate(RANDOM_COLUMNS):
            # counts (spikes) are compared in absolute terms: their means are near 0
            counts = col in ("rand_num_spikes", "num_traps")
            scale = np.ones_like(ww_mean[:, j]) if counts else np.abs(ww_mean[:, j])
            diff = np.where(scale > 0, np.abs(ours_mean[:, j] - ww_mean[:, j]) / scale,
                            np.abs(ours_mean[:, j] - ww_mean[:, j]))
            spread = np.where(scale > 0, ww_std[:, j] / scale, ww_std[:, j])
            unit = " (absolute)" if counts else ""
            print(f"| `{col}`{unit} | {np.nanmax(diff):.3f} | {np.nanmax(spread):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
