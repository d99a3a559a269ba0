"""Oracle parity: WeightWatcher's analyze() for DKS, a plain NumPy loop for every fit.

Column mapping to WeightWatcher 0.7 (read from its source, weightwatcher.py / RMT_Util.py /
WW_powerlaw.py): its default fit is DKS over eigenvalues > 1e-5 (our ``filter_zeros=True``);
``norm`` is sum(lambda) = ||W||_F^2 and ``xmax`` is lambda_max, as in metrics.md; its
``entropy`` adds 1e-10 to every p and to the rank (a regulariser worth ~1e-8 relative), so
that column is compared at ENTROPY_RTOL; ``layer_id`` counts every module, so rows are
matched by ``longname``. Below 20 fit eigenvalues WeightWatcher fits another way
(``WWFit.fit_powerlaw_smallN``); DKS follows it there too, checked on M = 10 .. 21.
"""

import logging

import numpy as np
import pytest
import torch

from esd_experiment.estimator.net_esd import ESDConfig, fit_from_evals, net_esd_estimator

ww = pytest.importorskip("weightwatcher")

PARITY_RTOL = 1e-6     # the bar; the float64 paths agree to ~1e-13
ENTROPY_RTOL = 1e-6    # WeightWatcher's 1e-10 regulariser moves entropy by ~3e-8
REFERENCE_RTOL = 1e-10  # same formulas in NumPy, only summation order differs
SHARED = ("alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes", "spectral_norm",
          "log_spectral_norm", "norm", "log_norm", "stable_rank", "alpha_weighted",
          "log_alpha_norm", "matrix_rank", "entropy", "N", "M", "Q", "num_evals")


def heavy_tailed(n, m, alpha, rng):
    """n x m weights with a power-law spectrum (density ~ lambda^-alpha), like trained layers."""
    k = min(n, m)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((m, k)))
    lam = 0.01 * (1.0 - rng.random(k)) ** (-1.0 / (alpha - 1.0))
    noise = 0.002 * rng.standard_normal((n, m))
    return (u * np.sqrt(lam)) @ v.T + noise


def compare_with_weightwatcher(shapes, seed):
    """Rows of a Sequential of (n, m, alpha) heavy-tailed Linear layers, ours against WW's."""
    rng = np.random.default_rng(seed)
    net = torch.nn.Sequential(*[torch.nn.Linear(m, n) for n, m, _ in shapes])
    with torch.no_grad():
        for layer, (n, m, a) in zip(net, shapes, strict=True):
            layer.weight.copy_(torch.tensor(heavy_tailed(n, m, a, rng)))
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    theirs = ww.WeightWatcher(model=net).analyze().set_index("longname")
    ours = net_esd_estimator(net, fix_fingers="DKS", filter_zeros=True).set_index("longname")
    assert sorted(theirs.index) == sorted(ours.index) and len(ours) == len(shapes)
    assert (ours["status"] == "ok").all()
    for col in SHARED:
        rtol = ENTROPY_RTOL if col == "entropy" else PARITY_RTOL
        np.testing.assert_allclose(ours[col].to_numpy(float),
                                   theirs.loc[ours.index, col].to_numpy(float),
                                   rtol=rtol, atol=0, err_msg=col)
    assert ours["warning"].tolist() == theirs.loc[ours.index, "warning"].tolist()
    return ours


def test_dks_rows_match_weightwatcher():
    shapes = [(300, 100, 2.5), (120, 250, 3.5), (400, 400, 4.0), (500, 64, 2.0), (90, 90, 5.0),
              (300, 100, 1.6), (300, 100, 8.0)]  # the last two: over- and under-trained
    ours = compare_with_weightwatcher(shapes, seed=1)
    assert set(ours["warning"]) >= {"over-trained", "under-trained"}


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_dks_rows_match_weightwatcher_below_20_eigenvalues(seed):
    """M = 10 .. 21 eigenvalues, across WeightWatcher's switch at 20, in both orientations."""
    shapes = [(60, m, a) if m % 2 else (m, 60, a)
              for m, a in zip(range(10, 22), np.linspace(1.8, 7.0, 12), strict=True)]
    ours = compare_with_weightwatcher(shapes, seed)
    assert sorted(ours["M"]) == list(range(10, 22))


@pytest.mark.parametrize("positive", [2, 5, 7, 8, 12, 19, 20])
def test_dks_matches_wwfit_on_few_eigenvalues_after_the_zeros(positive):
    """Fit sets of 2 .. 20 eigenvalues left once zeros are filtered (WeightWatcher fits the
    whole set below its tail minimum of 8). Its sigma there is -1/sqrt(n), a bookkeeping slip
    of WWFit; ours stays (alpha - 1) / sqrt(num_pl_spikes), so sigma is not compared."""
    from weightwatcher.WW_powerlaw import WWFit

    rng = np.random.default_rng(positive)
    evals = np.concatenate([np.zeros(12), 0.01 * (1 - rng.random(positive)) ** (-1 / 2.5)])
    theirs = WWFit(evals[evals > 1e-5])
    ours = fit_from_evals(evals, ESDConfig(fix_fingers="DKS", filter_zeros=True))
    assert ours["status"] == "ok"
    # num_pl_spikes as WeightWatcher's analyze() counts it: eigenvalues >= xmin
    assert ours["xmin"] == theirs.xmin and ours["num_pl_spikes"] == np.sum(evals >= theirs.xmin)
    assert ours["alpha"] == pytest.approx(theirs.alpha, rel=PARITY_RTOL)
    assert ours["D"] == pytest.approx(theirs.D, rel=PARITY_RTOL)


def test_dks_on_equal_eigenvalues_fails_the_fit():
    """No tail has a positive log-sum: WWFit reports alpha 0, D 1; the contract a failed fit."""
    out = fit_from_evals(np.full(12, 0.5), ESDConfig(fix_fingers="DKS"))
    assert out["status"] == "fit_failed" and np.isnan(out["alpha"])


# ---------------------------------------------------------------------------------------------
# An independent float64 NumPy reference of metrics.md section 3, one candidate at a time.

def reference_fit(evals, fix_fingers, xmin_pos=2, bins=100, thresh=1e-5, filter_zeros=False):
    """(i*, alpha, xmin, D) or None, straight from the formulas with a loop over candidates."""
    x = np.sort(evals)
    x = x[x > (thresh if filter_zeros else 0.0)]
    n = len(x)
    if n < 2:
        return None
    if fix_fingers == "xmin_mid":
        candidates = [min(n // xmin_pos, n - 2)]
    elif fix_fingers == "xmin_peak":
        counts, edges = np.histogram(np.log10(x), bins=bins)
        p = 10 ** edges[np.argmax(counts)]
        candidates = [i for i in range(n - 1) if 0.95 * p <= x[i] <= 1.5 * p]
    else:
        candidates = range(n - 1)
    best = None
    for i in candidates:
        ni = n - i
        with np.errstate(divide="ignore"):
            alpha = 1 + ni / np.sum(np.log(x[i:] / x[i]))
        if not (np.isfinite(alpha) and alpha > 1):
            continue
        d = np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - alpha) - np.arange(ni) / ni))
        if best is None or d < best[3]:
            best = (i, alpha, x[i], d)
    return best


def spectra():
    rng = np.random.default_rng(3)
    pareto = (1 - rng.random(400)) ** (-1 / 1.8)
    w = rng.standard_normal((600, 200))
    mp = np.linalg.eigvalsh(w.T @ w)
    with_zeros = np.concatenate([np.zeros(30), 10 ** rng.uniform(-9, -5, 40), pareto[:200]])
    ties = np.repeat(pareto[:60], 4)
    return {"pareto": pareto, "marchenko_pastur": mp, "zeros_and_tiny": with_zeros,
            "ties": ties}


@pytest.mark.parametrize("filter_zeros", [False, True])
@pytest.mark.parametrize("fix_fingers", ["xmin_mid", "xmin_peak", "DKS"])
@pytest.mark.parametrize("name", list(spectra()))
def test_fits_match_numpy_reference(name, fix_fingers, filter_zeros):
    evals = spectra()[name]
    ref = reference_fit(evals, fix_fingers, filter_zeros=filter_zeros)
    out = fit_from_evals(evals, ESDConfig(fix_fingers=fix_fingers, filter_zeros=filter_zeros))
    assert ref is not None and out["status"] == "ok"
    i, alpha, xmin, d = ref
    n = int(np.sum(evals > (1e-5 if filter_zeros else 0.0)))
    assert out["num_pl_spikes"] == n - i
    assert out["xmin"] == xmin
    assert out["alpha"] == pytest.approx(alpha, rel=REFERENCE_RTOL)
    assert out["D"] == pytest.approx(d, rel=REFERENCE_RTOL)


def test_xmin_mid_clamps_to_n_minus_2():
    """Two fit-set eigenvalues: xmin_mid's i = 2 // 2 = 1 is clamped to n - 2 = 0."""
    out = fit_from_evals(np.array([1.0, 3.0]), ESDConfig())
    assert out["status"] == "ok" and out["xmin"] == 1.0 and out["num_pl_spikes"] == 2
    assert out["alpha"] == pytest.approx(1 + 2 / np.log(3.0), rel=REFERENCE_RTOL)


def test_empty_peak_window_fails_the_fit():
    """Fullest of 2 log bins is [10^1.5, 10^3]: p = 31.6, and no x_i lies in [30, 47.4]."""
    evals = np.array([1.0, 50.0, 60.0, 70.0, 1000.0])
    assert reference_fit(evals, "xmin_peak", bins=2) is None
    out = fit_from_evals(evals, ESDConfig(fix_fingers="xmin_peak", bins=2))
    assert out["status"] == "fit_failed" and np.isnan(out["alpha"]) and np.isnan(out["D"])
    assert fit_from_evals(evals, ESDConfig(fix_fingers="DKS"))["status"] == "ok"
