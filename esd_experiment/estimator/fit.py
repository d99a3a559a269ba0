"""Power-law fits and spectral metrics of one layer's eigenvalues (docs/metrics.md, 3 and 4).

Pure torch on the eigenvalues' own device, always in float64. The candidate scan is
vectorised: every ``alpha_i`` comes from suffix sums of ``ln x``, and the KS distances are
computed in blocks of candidates (at most ``chunk_elems`` matrix entries per block), so a
16k-eigenvalue layer needs no (n x n) array and the GPU is never synchronised per candidate.
``net_esd`` calls :func:`spectral_metrics` for live tensors and for saved eigenvalues alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

# The columns this module fills, and the `warning` column's thresholds.
from esd_experiment.core.results import METRIC_COLUMNS, OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA


class FitOptions(Protocol):
    """The fit's share of ``net_esd.ESDConfig`` (which satisfies this protocol)."""

    fix_fingers: str      # xmin_mid | xmin_peak | DKS
    xmin_pos: int         # xmin_mid: i = n // xmin_pos
    bins: int             # xmin_peak: histogram bins over log10(x)
    evals_thresh: float   # fit-set floor when filter_zeros is on
    filter_zeros: bool
    chunk_elems: int      # entries per block of the KS scan


@dataclass(frozen=True)
class PowerLawFit:
    """The chosen candidate; ``ok`` is False when no candidate was valid (values are NaN)."""

    ok: bool
    alpha: float
    xmin: float
    D: float
    num_pl_spikes: int


FAILED_FIT = PowerLawFit(False, math.nan, math.nan, math.nan, 0)

# DKS below SMALL_N fit eigenvalues: WeightWatcher's small-sample fit (WWFit with
# fit_powerlaw_smallN, metrics.md section 3), with its constants: only tails of at least
# SMALL_N_MIN_TAIL eigenvalues (all of them when fewer) whose log-sum exceeds SMALL_N_MIN_LOGSUM
# are candidates, each with the bias-corrected alpha. (fit_powerlaw_smallN ranks them by
# D - 0.868 / sqrt(tail), but WWFit then keeps the first argmin of D, which this follows.)
SMALL_N = 20
SMALL_N_MIN_TAIL = 8
SMALL_N_MIN_LOGSUM = 1e-12


def fit_set(evals: torch.Tensor, opts: FitOptions) -> torch.Tensor:
    """The eigenvalues the fit sees: > 0, or > evals_thresh with filter_zeros (ascending)."""
    floor = opts.evals_thresh if opts.filter_zeros else 0.0
    return evals[evals > floor]


def tail_log_sums(logx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_i = n - i`` and ``s_i = sum_{j>=i} ln(x_j / x_i)`` for i = 0 .. n-2 (suffix sums)."""
    n = logx.numel()
    suffix = torch.flip(torch.cumsum(torch.flip(logx, (0,)), 0), (0,))
    tail = torch.arange(n, 1, -1, dtype=logx.dtype, device=logx.device)
    return tail, suffix[:-1] - tail * logx[:-1]


def candidate_alphas(logx: torch.Tensor) -> torch.Tensor:
    """``alpha_i = 1 + n_i / sum_{j>=i} ln(x_j / x_i)`` for i = 0 .. n-2 (Hill estimates)."""
    tail, logsum = tail_log_sums(logx)
    return 1.0 + tail / logsum


def ks_distances(logx: torch.Tensor, alphas: torch.Tensor, start: int, stop: int,
                 chunk_elems: int) -> torch.Tensor:
    """``D_i`` for candidates i in [start, stop); +inf where alpha_i is not a finite value > 1.

    ``D_i = max_{j>=i} |1 - (x_j/x_i)^(1-alpha_i) - (j-i)/n_i|``. Candidates are processed in
    blocks whose (block x remaining-tail) arrays hold at most ``chunk_elems`` entries.
    """
    n = logx.numel()
    dev, dt = logx.device, logx.dtype
    parts = []
    a = start
    while a < stop:
        b = min(stop, a + max(1, chunk_elems // (n - a)))
        i = torch.arange(a, b, device=dev, dtype=dt)[:, None]
        steps = torch.arange(a, n, device=dev, dtype=dt)[None, :] - i  # j - i, < 0 off the tail
        val = logx[None, a:] - logx[a:b, None]
        val.mul_(1.0 - alphas[a:b, None]).exp_()                # (x_j / x_i)^(1 - alpha_i)
        val.neg_().add_(1.0).sub_(steps / (n - i)).abs_()
        parts.append(val.masked_fill_(steps < 0, 0.0).amax(dim=1))
        a = b
    d = torch.cat(parts)
    valid = torch.isfinite(alphas[start:stop]) & (alphas[start:stop] > 1.0)
    return torch.where(valid, d, math.inf)


def peak_window(x: torch.Tensor, bins: int) -> tuple[float, float]:
    """The xmin_peak window [0.95 p, 1.5 p]: p = 10^(left edge of the first fullest bin).

    The histogram is numpy.histogram's: ``bins`` equal bins of log10(x) over [min, max]
    (widened by 0.5 each side when min == max), right edge included in the last bin.
    """
    lx = torch.log10(x)
    lo, hi = (float(v) for v in torch.stack((lx[0], lx[-1])).tolist())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.arange(bins + 1, dtype=x.dtype, device=x.device) * ((hi - lo) / bins) + lo
    edges[-1] = hi
    index = (torch.searchsorted(edges, lx, right=True) - 1).clamp_(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    p = 10.0 ** float(edges[torch.argmax(counts)])
    return 0.95 * p, 1.5 * p


def candidate_range(x: torch.Tensor, opts: FitOptions) -> tuple[int, int]:
    """Candidate indices [start, stop) for the chosen fix_fingers (all i <= n-2 for DKS)."""
    n = x.numel()
    if opts.fix_fingers == "xmin_mid":
        i = min(n // opts.xmin_pos, n - 2)
        return i, i + 1
    if opts.fix_fingers == "xmin_peak":
        low, high = peak_window(x, opts.bins)
        bounds = torch.tensor([low, high], dtype=x.dtype, device=x.device)
        start = int(torch.searchsorted(x, bounds[:1], right=False))
        stop = int(torch.searchsorted(x, bounds[1:], right=True))
        return start, min(stop, n - 1)
    return 0, n - 1


def power_law_fit(evals: torch.Tensor, opts: FitOptions) -> PowerLawFit:
    """Fit ``evals`` (ascending, float64) as metrics.md section 3 says; first argmin of D."""
    x = fit_set(evals, opts)
    n = x.numel()
    if n < 2:
        return FAILED_FIT
    if opts.fix_fingers == "DKS" and n < SMALL_N:
        return small_n_fit(x, opts)
    start, stop = candidate_range(x, opts)
    if start >= stop:
        return FAILED_FIT
    logx = torch.log(x)
    alphas = candidate_alphas(logx)
    d = ks_distances(logx, alphas, start, stop, opts.chunk_elems)
    k = torch.argmin(d)
    d_min, alpha, xmin = torch.stack((d[k], alphas[start + k], x[start + k])).tolist()
    if not math.isfinite(d_min):
        return FAILED_FIT
    return PowerLawFit(True, alpha, xmin, d_min, n - (start + int(k)))


def small_n_fit(x: torch.Tensor, opts: FitOptions) -> PowerLawFit:
    """WeightWatcher's DKS on fewer than SMALL_N eigenvalues ``x`` (ascending, n >= 2):
    ``alpha_i = 1 + (n_i - 1) / s_i``, ``D_i`` as in the full scan, and the first argmin of
    ``D_i`` among the tails of at least ``min(SMALL_N_MIN_TAIL, n)`` eigenvalues with
    ``s_i > SMALL_N_MIN_LOGSUM``; none such (all eigenvalues equal): the fit fails."""
    n = x.numel()
    logx = torch.log(x)
    tail, logsum = tail_log_sums(logx)
    alphas = 1.0 + (tail - 1.0) / logsum
    d = ks_distances(logx, alphas, 0, n - 1, opts.chunk_elems)
    usable = (tail >= min(SMALL_N_MIN_TAIL, n)) & (logsum > SMALL_N_MIN_LOGSUM)
    d = torch.where(usable, d, math.inf)
    k = torch.argmin(d)
    d_min, alpha, xmin = torch.stack((d[k], alphas[k], x[k])).tolist()
    if not math.isfinite(d_min):
        return FAILED_FIT
    return PowerLawFit(True, alpha, xmin, d_min, n - int(k))


def norm_metrics(evals: torch.Tensor, n_rows: int, eps: float) -> dict[str, float]:
    """Fit-free columns over all eigenvalues: norms, stable rank, matrix rank, entropy.

    ``matrix_rank`` counts ``lambda > lambda_max * N * eps``: Gram eigenvalues carry an absolute
    round-off of order N * eps * lambda_max, so this is the rank the Gram can resolve.
    """
    lam_max = evals[-1]
    total = evals.sum()
    rank = (evals > lam_max * (n_rows * eps)).sum()
    p = evals[evals > 0] / total
    h = -(p * torch.log(p)).sum()
    log_rank = torch.log(rank.to(evals.dtype))
    entropy = torch.where(rank > 1, h / log_rank, math.nan)
    vals = torch.stack((lam_max, total, total / lam_max, rank.to(evals.dtype), entropy)).tolist()
    lam, norm, stable, rank_f, ent = vals
    return {
        "xmax": lam, "spectral_norm": lam, "log_spectral_norm": _log10(lam),
        "norm": norm, "log_norm": _log10(norm), "stable_rank": stable,
        "matrix_rank": int(rank_f), "entropy": ent,
    }


def log_alpha_norm(evals: torch.Tensor, alpha: float) -> float:
    """``log10 sum lambda^alpha`` over all eigenvalues, factored by lambda_max against overflow."""
    lam_max = float(evals[-1])
    if not lam_max > 0:
        return math.nan
    rest = float(torch.sum((evals / lam_max) ** alpha))
    return alpha * math.log10(lam_max) + math.log10(rest)


def spectral_metrics(evals: torch.Tensor, n_rows: int, eps: float,
                     opts: FitOptions) -> tuple[dict, bool]:
    """All METRIC_COLUMNS of one layer from its ascending float64 eigenvalues.

    Returns the columns and whether the fit succeeded. ``n_rows`` is the layer's N and ``eps``
    the machine epsilon of the dtype the eigenvalues were computed in (for matrix_rank).
    """
    out = norm_metrics(evals, n_rows, eps)
    fit = power_law_fit(evals, opts)
    nan = math.nan
    out.update(alpha=fit.alpha, xmin=fit.xmin, D=fit.D, sigma=nan, num_pl_spikes=nan,
               alpha_weighted=nan, log_alpha_norm=nan, warning="")
    if fit.ok:
        out.update(
            sigma=(fit.alpha - 1.0) / math.sqrt(fit.num_pl_spikes),
            num_pl_spikes=fit.num_pl_spikes,
            alpha_weighted=fit.alpha * out["log_spectral_norm"],
            log_alpha_norm=log_alpha_norm(evals, fit.alpha),
            warning=training_warning(fit.alpha),
        )
    return {c: out[c] for c in METRIC_COLUMNS}, fit.ok


def training_warning(alpha: float) -> str:
    if alpha < OVER_TRAINED_ALPHA:
        return "over-trained"
    if alpha > UNDER_TRAINED_ALPHA:
        return "under-trained"
    return ""


def _log10(v: float) -> float:
    """log10 that returns -inf for 0 (a zero matrix) rather than raising."""
    return math.log10(v) if v > 0 else (-math.inf if v == 0 else math.nan)
