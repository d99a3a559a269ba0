"""The CPU kernels behind the eigenvalues, side by side: Gram products and eigenvalue drivers.

Usage: python benchmarks/bench_kernels.py [--repeats 5] [--sizes 1024 2048]

For each size m, on a Gaussian float64 matrix of 8m x m (a Gram from a tall matrix) and its
m x m Gram, in one process, alternating, best and median of --repeats:

  gemm         torch W.T @ W (MKL, torch's threads): the old Gram
  syrk         esd_lapack.syrk_update: BLAS dsyrk, lower triangle only (SciPy's OpenBLAS)
  eigvalsh     torch.linalg.eigvalsh (MKL's syevd with eigenvectors off): the old solver
  dsyevr       esd_lapack.symmetric_eigenvalues: LAPACK dsyevr, jobz='N' (the choice)
  dsyevd       scipy.linalg.lapack.dsyevd, compute_v=0
  dsyev        scipy.linalg.lapack.dsyev, compute_v=0
  dsyevr_2stage  LAPACK 3.7's two-stage reduction, where SciPy's OpenBLAS exports it (its
               symbol, called through ctypes; not in SciPy's Python or Cython API)

Prints a markdown table (seconds) and the largest eigenvalue difference between drivers,
relative to lambda_max. Exit code 0.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import lapack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esd_experiment.estimator import lapack as esd_lapack  # noqa: E402


def two_stage():
    """dsyevr_2stage from SciPy's bundled OpenBLAS, or None where it is not exported."""
    import scipy

    libs = glob.glob(str(Path(scipy.__file__).parent.parent / "scipy.libs" / "*openblas*.so"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_dsyevr_2stage_", "dsyevr_2stage_"):
            if hasattr(lib, name):
                return getattr(lib, name)
    return None


def dsyevr_2stage(fn, gram: np.ndarray) -> np.ndarray:
    n = gram.shape[0]
    w, z, sup = np.empty(n), np.empty(1), np.empty(2, dtype=np.intc)
    found, info, zero = ctypes.c_int(), ctypes.c_int(), ctypes.byref(ctypes.c_double(0))

    def i(v):
        return ctypes.byref(ctypes.c_int(v))

    def call(work, lwork, iwork, liwork):
        p = ctypes.c_void_p
        fn(b"N", b"A", b"L", i(n), p(gram.ctypes.data), i(n), zero, zero, i(1), i(n), zero,
           ctypes.byref(found), p(w.ctypes.data), p(z.ctypes.data), i(1), p(sup.ctypes.data),
           p(work.ctypes.data), i(lwork), p(iwork.ctypes.data), i(liwork), ctypes.byref(info),
           ctypes.c_size_t(1), ctypes.c_size_t(1), ctypes.c_size_t(1))  # Fortran string lengths

    wq, iq = np.empty(1), np.empty(1, dtype=np.intc)
    call(wq, -1, iq, -1)
    call(np.empty(int(wq[0])), int(wq[0]), np.empty(int(iq[0]), dtype=np.intc), int(iq[0]))
    if info.value != 0:
        raise RuntimeError(f"dsyevr_2stage info={info.value}")
    return w


def kernels(m: int) -> dict:
    x = np.random.default_rng(m).standard_normal((8 * m, m))
    xt = torch.from_numpy(x)
    gram = np.asfortranarray(x.T @ x)
    gt = torch.from_numpy(np.ascontiguousarray(gram))

    def syrk():
        esd_lapack.syrk_update(esd_lapack.gram_buffer(m, np.float64), x)

    runs = {
        "gemm": lambda: xt.T @ xt,
        "syrk": syrk,
        "eigvalsh": lambda: torch.linalg.eigvalsh(gt).numpy(),
        "dsyevr": lambda: esd_lapack.symmetric_eigenvalues(gram.copy(order="F")),
        "dsyevd": lambda: lapack.dsyevd(gram, compute_v=0, lower=1)[0],
        "dsyev": lambda: lapack.dsyev(gram, compute_v=0, lower=1)[0],
    }
    fn = two_stage()
    if fn is not None:
        runs["dsyevr_2stage"] = lambda: dsyevr_2stage(fn, gram.copy(order="F"))
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    args = p.parse_args()
    esd_lapack.available()
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    for m in args.sizes:
        runs = kernels(m)
        times: dict[str, list[float]] = {name: [] for name in runs}
        evals = {}
        for r in range(args.repeats):
            for name in runs if r % 2 == 0 else reversed(list(runs)):
                t0 = time.perf_counter()
                out = runs[name]()
                times[name].append(time.perf_counter() - t0)
                if name not in ("gemm", "syrk"):
                    evals[name] = np.sort(np.asarray(out))
        ref = evals["dsyevr"]
        print(f"\n{8 * m} x {m} matrix, {m} x {m} Gram\n\n| kernel | best s | median s | "
              f"max abs eigenvalue difference / lambda_max vs dsyevr |\n|---|---|---|---|")
        for name, v in times.items():
            diff = (f"{np.abs(evals[name] - ref).max() / ref[-1]:.1e}" if name in evals else "")
            print(f"| {name} | {min(v):.3f} | {statistics.median(v):.3f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
