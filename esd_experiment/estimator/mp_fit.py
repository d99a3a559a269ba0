"""WeightWatcher's Marchenko-Pastur fit (``analyze(mp_fit=True)``), as the ``--mp_fit`` metric.

Its columns and definitions are WeightWatcher 0.7's (``WeightWatcher.mp_fit`` and
``RMT_Util.fit_density_with_range`` / ``resid_mp``), docs/metrics.md section 4: the ESD is
rescaled to mean 1, ``sigma_mp`` is the MP scale whose density best matches a linear-kernel
density estimate of it (bandwidth 0.1; a grid search over 0.05 .. 2 times the scale that puts
the MP edge at lambda_max, polished by Nelder-Mead), and ``bulk_max`` / ``bulk_min`` are that
MP law's edges in the layer's own units; ``W_scale`` is the rescaling of the matrix, the square
root of the ESD's. Imports neither torch nor pandas.
"""

from __future__ import annotations

import warnings

import numpy as np

MP_FIT_NAME = "mp_fit"   # the name results record the metric by (esd_options)
MP_COLUMNS = ("bulk_max", "bulk_min", "mp_softrank", "num_spikes", "sigma_mp", "W_scale")
BANDWIDTH = 0.1          # WeightWatcher's KDE bandwidth, in units of the rescaled ESD
KDE_GRID = 1000          # points of the density estimate, over [0, lambda_max + 0.5]
DENSITY_FLOOR = 0.01     # density estimate below this is left out of the residual
PENALTY = 1000.0         # residual of an MP law whose edges leave the estimate's support


def mp_fit(evals: np.ndarray, N: int, M: int) -> dict[str, float]:
    """The MP-fit columns of one layer: ``evals`` ascending (float64, every eigenvalue of the
    layer), ``N`` >= ``M`` its matrix's dimensions (the aspect ratio is Q = N / M)."""
    from scipy import optimize

    evals = np.asarray(evals, dtype=np.float64)
    if not np.sum(evals) > 0:  # a zero matrix has no scale (WeightWatcher writes -1: we NaN)
        return dict.fromkeys(MP_COLUMNS, np.nan)
    q = N / M
    scale2 = evals.size / np.sum(evals)   # WeightWatcher's Wscale**2: the mean eigenvalue -> 1
    x = scale2 * evals
    lambda_max = np.max(x)
    edge_sigma = np.sqrt(lambda_max / np.square(1 + 1 / np.sqrt(q)))
    grid = (slice(0.05 * edge_sigma, 2.0 * edge_sigma, 0.01 * edge_sigma),)
    to_fit = np.sqrt(x) if q == 1 else x
    xde = np.linspace(0, np.max(to_fit) + 0.5, KDE_GRID)
    yde = linear_kde(to_fit, xde, BANDWIDTH)
    good = yde > DENSITY_FLOOR  # WeightWatcher's residual leaves near-empty regions out
    xde, yde = xde[good], yde[good]
    args = (xde, yde, q, xde[np.where(yde == np.max(yde))][0], np.max(xde))
    # scipy.optimize.brute(_residual, grid, args, finish=fmin), its grid in one array pass:
    # the first grid minimum, polished by Nelder-Mead.
    sigmas = np.mgrid[grid[0]]
    start = sigmas[np.argmin(_residuals(sigmas, *args))]
    sigma = float(optimize.fmin(_residual, start, args=args, full_output=1, disp=False)[0][0])
    bulk_max = (sigma * (1 + 1 / np.sqrt(q))) ** 2
    bulk_min = (sigma * (1 - 1 / np.sqrt(q))) ** 2
    tracy_widom = 1 / np.sqrt(q) * np.power(bulk_max, 2 / 3) * np.power(M, -2 / 3)
    spikes = int(np.count_nonzero(x > bulk_max + np.sqrt(tracy_widom)))
    return {"bulk_max": bulk_max / scale2, "bulk_min": bulk_min / scale2,
            "mp_softrank": bulk_max / lambda_max, "num_spikes": spikes, "sigma_mp": sigma,
            "W_scale": float(np.sqrt(scale2))}


def linear_kde(samples: np.ndarray, at: np.ndarray, bandwidth: float) -> np.ndarray:
    """The density estimate with the linear (triangular) kernel of half-width ``bandwidth``:
    ``mean_i max(0, 1 - |x - s_i| / h) / h``."""
    out = np.empty(at.size)
    for start in range(0, at.size, 64):  # blocks keep the pairwise array small
        d = np.abs(at[start:start + 64, None] - samples[None, :]) / bandwidth
        out[start:start + 64] = np.maximum(0.0, 1.0 - d).sum(axis=1)
    return out / (samples.size * bandwidth)


def _residual(p, xde: np.ndarray, yde: np.ndarray, q: float, peak: float,
              top: float) -> float:
    """WeightWatcher's ``resid_mp(..., allresid=False)``: the squared distance between the MP
    (or, for Q = 1, quarter-circle) density of scale ``p`` and the density estimate ``yde``
    at ``xde``; ``peak``: the estimate's mode, ``top``: the last grid point."""
    return float(_residuals(np.asarray(p, dtype=np.float64).reshape(-1), xde, yde, q, peak,
                            top)[0])


def _residuals(sigmas: np.ndarray, xde: np.ndarray, yde: np.ndarray, q: float, peak: float,
               top: float) -> np.ndarray:
    """``_residual`` at every scale of ``sigmas`` (1-D) at once."""
    sigma = sigmas[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if q == 1:
            resid = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - xde ** 2)) - yde
        else:
            y = 1 / q
            b = np.power(sigma * (1 + np.sqrt(1 / q)), 2)
            a = np.power(sigma * (1 - np.sqrt(1 / q)), 2)
            ymp = np.nan_to_num((1 / (2 * np.pi * sigma * sigma * xde * y))
                                * np.sqrt((b - xde) * (xde - a)))
            resid = ymp - yde
            outside = ((b < peak) | (b > top) | (a > peak))[:, 0]
            resid[outside] = PENALTY
    return np.sum(resid ** 2, axis=1)
