"""BLAS ``syrk`` and LAPACK ``syevr`` for Gram eigenvalues, called without holding the GIL.

The CPU eigenvalue path of ``net_esd``: a Gram matrix accumulated by symmetric rank-k updates
(``dsyrk``/``ssyrk``: half the flops of the ``gemm`` behind ``W.T @ W``) and its eigenvalues
alone (``dsyevr``/``ssyevr`` with ``jobz='N'``: tridiagonal reduction, then the root-free QR of
``?sterf``; no eigenvectors, so no MRRR step and nothing of it to lose accuracy).

SciPy's f2py wrappers (``scipy.linalg.blas.dsyrk``, ``scipy.linalg.lapack.dsyevr``) hold the
GIL for the whole call, so a thread reading the next tensor would wait for the eigensolver.
The same routines are taken here from SciPy's Cython API (the function pointers that
``scipy.linalg.cython_blas`` and ``cython_lapack`` export for Cython code, as numba binds them)
and called through ctypes, which releases the GIL. Same library (SciPy's OpenBLAS), same
results. Each pointer's C signature, which the capsule names, is checked before it is bound.

Pure computation on NumPy arrays, in Fortran (column-major) order. ``available()`` is False
where SciPy is missing or its Cython API lacks the expected 32-bit-integer signatures; callers
then take another path.
"""

from __future__ import annotations

import ctypes
import functools
import re

import numpy as np

from esd_experiment.core.errors import ESDError

_C = {np.dtype(np.float64): ("d", ctypes.c_double), np.dtype(np.float32): ("s", ctypes.c_float)}
# The C signatures the bindings assume, SciPy's element typedefs written as "x".
_SYRK_SIG = "void (char *, char *, int *, int *, x *, x *, int *, x *, x *, int *)"
_SYEVR_SIG = ("void (char *, char *, char *, int *, x *, int *, x *, x *, int *, int *, x *, "
              "int *, x *, x *, int *, int *, x *, int *, int *, int *, int *)")
_TYPEDEF = re.compile(r"__pyx_t_\w*?cython_(?:blas|lapack)_([a-z])\b")
_P = ctypes.c_void_p
# Private prototypes of the two C-API calls (setting restype on ctypes.pythonapi's shared
# function objects would change them for every other user in the process).
_capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
    ("PyCapsule_GetName", ctypes.pythonapi))
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def _bind(module, routine: str, signature: str, letter: str):
    """A ctypes function for one exported routine, or None when its signature differs."""
    capsule = getattr(module, "__pyx_capi__", {}).get(routine)
    if capsule is None:
        return None
    name = _capsule_name(capsule)
    if name is None or _TYPEDEF.sub(r"\1", name.decode()) != signature.replace("x", letter):
        return None
    # CFUNCTYPE, not PYFUNCTYPE: ctypes drops the GIL for the call.
    return ctypes.CFUNCTYPE(None, *[_P] * (signature.count(",") + 1))(_capsule_pointer(capsule, name))


@functools.cache
def _routines() -> dict[str, object]:
    """The four bound routines, or {} where any cannot be bound. SciPy is imported on first
    use, so a process that computes on a GPU never loads it."""
    try:
        from scipy.linalg import cython_blas, cython_lapack
    except ImportError:
        return {}
    out = {}
    for letter, _ in _C.values():
        out[f"{letter}syrk"] = _bind(cython_blas, f"{letter}syrk", _SYRK_SIG, letter)
        out[f"{letter}syevr"] = _bind(cython_lapack, f"{letter}syevr", _SYEVR_SIG, letter)
    return out if all(out.values()) else {}


def available() -> bool:
    """True where SciPy's syrk and syevr could be bound (callers use another path otherwise)."""
    return bool(_routines())


def _int(value: int):
    return ctypes.byref(ctypes.c_int(value))


def _char(value: str):
    return ctypes.c_char_p(value.encode())


def gram_buffer(m: int, dtype: np.dtype) -> np.ndarray:
    """A zeroed ``m x m`` Fortran-order accumulator for ``syrk_update`` (float64 or float32)."""
    return np.zeros((m, m), dtype=dtype, order="F")


def syrk_update(gram: np.ndarray, x: np.ndarray) -> None:
    """``gram += x.T @ x`` in place, lower triangle only; ``x`` is ``(rows, m)``.

    ``x`` is used where it lies when either of its axes is contiguous (a row block of a
    C-order matrix, or of the transposed view of a wide one: a Fortran matrix whose leading
    dimension is the full row length), so neither orientation is copied.
    """
    letter, ctype = _C[gram.dtype]
    if x.dtype != gram.dtype or gram.shape != (x.shape[1], x.shape[1]) or \
            not gram.flags.f_contiguous:
        raise ValueError(f"syrk_update needs a Fortran {gram.dtype} ({x.shape[1]}, {x.shape[1]}) "
                         f"accumulator for a {x.dtype} {x.shape} block, got {gram.shape}")
    rows, m = x.shape
    s0, s1 = (s // x.itemsize for s in x.strides)
    if s1 == 1 and s0 >= max(1, m):      # Fortran view: an m x rows matrix, C = A A^T
        trans, lda = "N", s0
    elif s0 == 1 and s1 >= max(1, rows):  # Fortran view: a rows x m matrix, C = A^T A
        trans, lda = "T", s1
    else:
        x = np.ascontiguousarray(x)
        trans, lda = "N", m
    one = ctypes.byref(ctype(1.0))
    _routines()[f"{letter}syrk"](_char("L"), _char(trans), _int(m), _int(rows), one,
                               _P(x.ctypes.data), _int(lda), one, _P(gram.ctypes.data), _int(m))


def symmetric_eigenvalues(gram: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of the symmetric matrix in ``gram``'s lower triangle.

    ``gram`` (Fortran order, as ``gram_buffer`` makes it) is overwritten. ``?syevr`` scales a
    matrix whose norm is near under- or overflow before reducing it, so badly scaled Grams
    keep their accuracy.
    """
    letter, ctype = _C[gram.dtype]
    n = gram.shape[0]
    if gram.shape != (n, n) or not gram.flags.f_contiguous:
        raise ValueError(f"symmetric_eigenvalues needs a square Fortran array, got {gram.shape}")
    evals = np.empty(n, dtype=gram.dtype)
    # Eigenvectors and their supports are not referenced with jobz='N'.
    no_vectors, no_support = np.empty(1, dtype=gram.dtype), np.empty(2, dtype=np.intc)
    found, info, zero = ctypes.c_int(0), ctypes.c_int(0), ctypes.byref(ctype(0.0))

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        _routines()[f"{letter}syevr"](
            _char("N"), _char("A"), _char("L"), _int(n), _P(gram.ctypes.data), _int(max(1, n)),
            zero, zero, _int(1), _int(n), zero, ctypes.byref(found), _P(evals.ctypes.data),
            _P(no_vectors.ctypes.data), _int(1), _P(no_support.ctypes.data), _P(work.ctypes.data),
            _int(lwork), _P(iwork.ctypes.data), _int(liwork), ctypes.byref(info))

    work, iwork = np.empty(1, dtype=gram.dtype), np.empty(1, dtype=np.intc)
    call(work, -1, iwork, -1)  # workspace query
    lwork, liwork = int(work[0]), int(iwork[0])
    call(np.empty(lwork, dtype=gram.dtype), lwork, np.empty(liwork, dtype=np.intc), liwork)
    if info.value != 0 or found.value != n:
        raise ESDError(f"LAPACK {letter}syevr failed on a {n} x {n} Gram matrix "
                       f"(info={info.value}, {found.value} of {n} eigenvalues)")
    return evals


def blas_threads() -> int:
    """The threads the loaded BLAS libraries run on (the most of any), 1 when none is seen."""
    from threadpoolctl import threadpool_info

    _routines()  # SciPy's BLAS loaded, so that it is among the libraries seen
    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"),
               default=1)


def set_blas_threads(count: int) -> None:
    """Run the BLAS libraries loaded so far on ``count`` threads from now on (one loaded
    later reads its count from ``OPENBLAS_NUM_THREADS`` and the like). Call it between
    eigenvalue computations, from the thread that runs them."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=count, user_api="blas")
