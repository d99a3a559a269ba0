"""WeightWatcher's randomized ESD (``analyze(randomize=True)``), as the ``--randomize`` metric.

Each of the layer's matrices is shuffled element-wise (a uniform random permutation of its
entries, which keeps their distribution and destroys their correlations) and the shuffled
layer's eigenvalues are computed by the estimator's own eigensolver; the columns compare the
two spectra and fit the Marchenko-Pastur law to the shuffled one (estimator/mp_fit.py). Names and
definitions are WeightWatcher 0.7's (``apply_random_esd``, ``random_eigenvalues``,
``apply_mp_fit(random=True)``), docs/metrics.md section 4. The shuffle is seeded by ``--seed``
and the layer's name, so a result is reproducible and independent of the order layers are
computed in. Imports neither torch nor pandas.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from esd_experiment.estimator.mp_fit import mp_fit

RANDOMIZE_NAME = "randomize"  # recorded as randomize(seed=<seed>) in esd_options
RANDOM_COLUMNS = ("max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist",
                  "rand_num_spikes", "num_traps", "rand_sigma_mp", "rand_mp_softrank",
                  "rand_W_scale", "rand_bulk_max", "rand_bulk_min")
# WeightWatcher pools this many shuffles of a layer whose matrices have fewer than
# FEW_EVALS eigenvalues each, for a steadier random ESD.
FEW_EVALS = 100
FEW_EVALS_REPLICAS = 5
# Integer types as wide as each float storage type: the shuffle moves bits, not values.
_SAME_WIDTH = {2: np.int16, 4: np.int32, 8: np.int64}


def recorded_name(seed: int) -> str:
    """The name the metric is recorded by: the seed is part of the result's options."""
    return f"{RANDOMIZE_NAME}(seed={seed})"


def layer_rng(seed: int, name: str, replica: int) -> np.random.Generator:
    """The generator of one shuffle of one layer: from the run's seed, the layer's name and
    the shuffle's number, so that no layer's shuffle depends on another's."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), replica])


def shuffled_bits(raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``raw`` (any shape, any 2-, 4- or 8-byte dtype) with its entries in a
    uniformly random order, as an integer array of the same width and shape: reinterpreted
    as the original dtype it is the element-wise shuffled matrix."""
    flat = np.ascontiguousarray(raw).view(_SAME_WIDTH[raw.dtype.itemsize]).reshape(-1).copy()
    rng.shuffle(flat)
    return flat.reshape(raw.shape)


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """sqrt of the Jensen-Shannon divergence (natural log) between ``p`` and ``q`` read as
    weights over the same positions, each normalised to sum 1 (WeightWatcher compares the
    two sorted eigenvalue vectors so)."""
    from scipy.special import rel_entr

    m = (p + q) / 2
    m = m / m.sum()
    kl_p = rel_entr(p / p.sum(), m).sum()
    kl_q = rel_entr(q / q.sum(), m).sum()
    return float(np.sqrt((kl_p + kl_q) / 2))


def randomized_columns(evals: np.ndarray, N: int, M: int,
                       shuffled_evals: Callable[[int, int], np.ndarray | None], *,
                       seed: int) -> dict[str, float]:
    """The randomized-ESD columns of one layer.

    ``evals``: the layer's eigenvalues (ascending, float64); ``N`` >= ``M`` its matrices'
    dimensions; ``shuffled_evals(seed, replica)``: the eigenvalues (ascending, float64, scaled
    as ``evals``) of the layer with every matrix shuffled by ``layer_rng(seed, name,
    replica)``, None when they are not finite.
    """
    replicas = FEW_EVALS_REPLICAS if M < FEW_EVALS else 1
    parts = [shuffled_evals(seed, r) for r in range(replicas)]
    if any(p is None for p in parts):
        return dict.fromkeys(RANDOM_COLUMNS, np.nan)
    first = parts[0]
    pooled = np.sort(np.concatenate(parts)) if replicas > 1 else first
    out = {"max_rand_eval": float(pooled[-1])}
    lambda_max = float(evals[-1])
    out["rand_distance"] = (jensen_shannon_distance(evals, first) if evals.sum() > 0
                            else np.nan)
    out["ww_softrank"] = float(first[-1]) / lambda_max if lambda_max > 0 else np.nan
    out["ww_maxdist"] = lambda_max - float(first[-1])
    fit = mp_fit(pooled, N, M)
    out["rand_num_spikes"] = out["num_traps"] = fit["num_spikes"]
    out["rand_sigma_mp"] = fit["sigma_mp"]
    out["rand_mp_softrank"] = fit["mp_softrank"]
    total = pooled.sum()
    out["rand_W_scale"] = float(np.sqrt(pooled.size / total)) if total > 0 else np.nan
    out["rand_bulk_max"] = fit["bulk_max"]
    out["rand_bulk_min"] = fit["bulk_min"]
    return {c: out[c] for c in RANDOM_COLUMNS}
