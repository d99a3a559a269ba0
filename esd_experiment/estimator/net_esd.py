"""The ESD estimator: eigenvalues, power-law fits and metrics of weight matrices.

Pure computation: tensors and options in, result rows out. No file I/O, no logging setup,
no hub access; the device is passed in. The numerical contract is ``docs/metrics.md``.

Three doors, one implementation:

- ``iter_layer_results(named_tensors, config)``: a stream of ``(name, tensor)`` pairs (the
  worker's loader reads them one at a time) to one ``LayerResult`` per layer.
- ``net_esd_estimator(net, ...)``: TempBalance's call on an ``nn.Module``, returning a DataFrame.
- ``fit_from_evals(evals, config, N=...)``: the fit and metric columns from saved eigenvalues.

Eigenvalues are those of the smaller Gram matrix, accumulated from row chunks converted one at
a time to the computation dtype, so memory stays O(M^2 + chunk) even for a 128k-row embedding;
on the CPU by BLAS syrk and LAPACK syevr (``esd_lapack``), on a GPU by torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from esd_experiment.core.errors import InputError
from esd_experiment.core.layer_order import block_index, stack_of
from esd_experiment.core.naming import is_weight_name, layer_type_of, longname_of
from esd_experiment.core.results import LAYER_COLUMNS, METRIC_COLUMNS, RESULT_COLUMNS
from esd_experiment.estimator import lapack as esd_lapack
from esd_experiment.estimator.fit import spectral_metrics
from esd_experiment.estimator.metrics import (
    MP_FIT,
    declared_columns,
    metric_columns,
    randomize_metric,
)

# The result schema lives in core/results.py (torch-free); layer columns are filled here.
from esd_experiment.estimator.options import FIX_FINGERS, ESDConfig  # noqa: F401  (the estimator's public options)
from esd_experiment.estimator.randomize import WORDS, layer_rng, shuffled_bits

# The computation dtype of each --precision (esd_config.PRECISION_NAMES).
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}

# Background threads for --randomize's shuffles (ShuffledSpectra): the layers shuffled at
# once, one per device thread that analyses layers, up to this many.
SHUFFLE_THREADS = 4

# Storage dtypes analysed as numbers (half precisions are upcast chunk by chunk). Integer and
# bool tensors are packed quantized data; float8 values mean nothing without their scales.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LayerResult:
    """One result row (keys = LAYER_COLUMNS, then the custom metrics' columns of a layer with
    eigenvalues) and, when asked for, its eigenvalues."""

    row: dict[str, Any]
    evals: np.ndarray | None = None


def storage_of(dtype: torch.dtype) -> str:
    """The ``storage`` column of a tensor stored unquantized: its dtype name (``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class _Layer:
    """One result row's matrices: a 2-D weight, one expert, or a convolution's kernel slices."""

    longname: str
    layer_type: str
    dtype: torch.dtype
    mats: list[torch.Tensor] = field(repr=False)
    evals_scale: float = 1.0  # conv slices are scaled by sqrt(conv_norm): eigenvalues by conv_norm
    storage: str = ""         # the stored format; the dtype name when empty

    @property
    def N(self) -> int:
        return max(self.mats[0].shape)

    @property
    def M(self) -> int:
        return min(self.mats[0].shape)

    @property
    def num_evals(self) -> int:
        return self.M * len(self.mats)


def split_layers(name: str, tensor: torch.Tensor, layer_type: str | None,
                 conv_norm: float, storage: str = "") -> Iterator[_Layer]:
    """The result rows of one tensor: experts one by one, convolutions as pooled slices."""
    layer_type = layer_type or layer_type_of(name, tensor.ndim)
    longname = longname_of(name)
    storage = storage or storage_of(tensor.dtype)
    if layer_type == "expert" and tensor.ndim == 3:
        for e in range(tensor.shape[0]):
            yield _Layer(f"{longname}[{e}]", layer_type, tensor.dtype, [tensor[e]],
                         storage=storage)
    elif tensor.ndim >= 3:
        kernel = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
        mats = [kernel[:, :, k] for k in range(kernel.shape[2])]
        yield _Layer(longname, layer_type, tensor.dtype, mats, evals_scale=conv_norm,
                     storage=storage)
    else:
        yield _Layer(longname, layer_type, tensor.dtype, [tensor], storage=storage)


# ---------------------------------------------------------------------------------------------
# Eigenvalues (metrics.md section 2).

def gram_eigenvalues(w: torch.Tensor, device: torch.device, dtype: torch.dtype,
                     chunk_elems: int) -> torch.Tensor | None:
    """Ascending eigenvalues of the smaller Gram matrix of ``w``; None if it is not finite.

    ``G = sum_chunks C^T C`` over row chunks of the taller orientation, one chunk at a time
    converted to the computation dtype (on the CPU into one reused buffer; for a GPU after
    moving it in its stored dtype), so neither a float64 copy of the whole matrix nor a device
    copy of it ever exists. Negative round-off is clamped to 0.

    On the CPU, BLAS ``syrk`` and LAPACK ``syevr`` (``esd_lapack``): half the Gram flops of a
    ``gemm``, eigenvalues without eigenvectors, and the GIL left free for a thread reading the
    next tensor. Elsewhere (CUDA), or where SciPy's routines cannot be bound, torch's
    ``addmm_`` and ``eigvalsh``.
    """
    if w.shape[0] < w.shape[1]:
        w = w.T
    rows = max(1, chunk_elems // w.shape[1])
    if device.type == "cpu" and esd_lapack.available():
        return _lapack_gram_eigenvalues(w, dtype, rows)
    return _torch_gram_eigenvalues(w, device, dtype, rows)


def _lapack_gram_eigenvalues(w: torch.Tensor, dtype: torch.dtype,
                             rows: int) -> torch.Tensor | None:
    gram = esd_lapack.gram_buffer(w.shape[1], _NUMPY_DTYPES[dtype])
    as_array = _chunk_converter(w, dtype, min(rows, w.shape[0]))
    for r0 in range(0, w.shape[0], rows):
        esd_lapack.syrk_update(gram, as_array(w[r0:r0 + rows]))
    if not np.isfinite(gram).all():
        return None
    return torch.from_numpy(esd_lapack.symmetric_eigenvalues(gram)).clamp_(min=0)


def _chunk_converter(w: torch.Tensor, dtype: torch.dtype,
                     rows: int) -> Callable[[torch.Tensor], np.ndarray]:
    """Row chunks of ``w`` as NumPy arrays in the computation dtype.

    A CPU matrix already in that dtype is read in place. Otherwise each chunk is converted
    into one reused buffer (a fresh array per chunk costs page faults) by NumPy, on this
    thread: torch's conversion would wake its OpenMP threads between BLAS calls, and the two
    thread pools waiting for each other cost several times the conversion on a busy machine.
    """
    if w.dtype == dtype and w.device.type == "cpu":
        return lambda chunk: chunk.numpy(force=True)
    buf = np.empty((rows, w.shape[1]), dtype=_NUMPY_DTYPES[dtype])
    if w.dtype != torch.bfloat16:
        def convert(chunk: torch.Tensor) -> np.ndarray:
            out = buf[:chunk.shape[0]]
            np.copyto(out, chunk.numpy(force=True))
            return out
        return convert
    bits = np.empty((rows, w.shape[1]), dtype=np.uint32)

    def convert_bf16(chunk: torch.Tensor) -> np.ndarray:
        # NumPy has no bfloat16; a bfloat16 is the upper half of a float32's bits.
        k = chunk.shape[0]
        half = chunk.detach().cpu().view(torch.int16).numpy().view(np.uint16)
        np.left_shift(half, 16, out=bits[:k], dtype=np.uint32)
        np.copyto(buf[:k], bits[:k].view(np.float32))
        return buf[:k]
    return convert_bf16


def _torch_gram_eigenvalues(w: torch.Tensor, device: torch.device, dtype: torch.dtype,
                            rows: int) -> torch.Tensor | None:
    gram = torch.zeros((w.shape[1], w.shape[1]), dtype=dtype, device=device)
    for r0 in range(0, w.shape[0], rows):
        # Moved first, converted second: a half-precision chunk crosses to the GPU at half size.
        chunk = w[r0:r0 + rows].to(device).to(dtype)
        gram.addmm_(chunk.T, chunk)
    if not bool(torch.isfinite(gram).all()):
        return None
    return torch.linalg.eigvalsh(gram).clamp_(min=0)


def layer_eigenvalues(layer: _Layer, config: ESDConfig) -> torch.Tensor | None:
    """The layer's ``num_evals`` eigenvalues (float64, ascending) on ``config.device``.

    A convolution's ESD is the union of its slices' spectra, each scaled by conv_norm.
    None when the weights hold NaN/Inf (or their Gram overflows the computation dtype).
    """
    device, dtype = torch.device(config.device), PRECISIONS[config.precision]
    parts = []
    for mat in layer.mats:
        ev = gram_eigenvalues(mat, device, dtype, config.chunk_elems)
        if ev is None:
            return None
        parts.append(ev)
    evals = parts[0] if len(parts) == 1 else torch.sort(torch.cat(parts)).values
    evals = evals.to(torch.float64)
    if layer.evals_scale != 1.0:
        evals = evals * layer.evals_scale
    return evals


def computation_eps(config: ESDConfig) -> float:
    """Machine epsilon of the dtype the eigenvalues are computed in (for matrix_rank)."""
    return float(torch.finfo(PRECISIONS[config.precision]).eps)


# ---------------------------------------------------------------------------------------------
# Rows.

def _empty_metrics() -> dict[str, Any]:
    out: dict[str, Any] = {c: math.nan for c in METRIC_COLUMNS}
    out["warning"] = ""
    return out


def analyse_layer(layer: _Layer, layer_id: int, config: ESDConfig, *,
                  evals_of: Callable[[], torch.Tensor | None] | None = None,
                  matrix_of: Callable[[], np.ndarray] | None = None) -> LayerResult:
    """One row: shapes always; metrics unless the layer is unsupported, too small or non-finite.
    ``evals_of`` / ``matrix_of``: the layer's eigenvalues and matrix when they are not those of
    ``layer.mats`` (esd_delta's low-rank differences)."""
    n, m = layer.N, layer.M
    row: dict[str, Any] = {
        "layer_id": layer_id, "longname": layer.longname, "block": block_index(layer.longname),
        "stack": stack_of(layer.longname),
        "layer_type": layer.layer_type, "storage": layer.storage or storage_of(layer.dtype),
        "N": n, "M": m, "Q": n / m if m > 0 else math.nan, "num_evals": layer.num_evals,
        "fix_fingers": config.fix_fingers,
    }
    row.update(_empty_metrics())
    evals, custom = None, {}
    shuffles = ShuffledSpectra(layer, config, matrix_of)
    try:
        if layer.dtype not in FLOAT_DTYPES:
            row["status"] = "unsupported_dtype"
        elif m == 0 or layer.num_evals < config.min_evals:
            row["status"] = "too_small"
        else:
            if evals_of is None:
                shuffles.start()  # while the layer's own eigenvalues are computed
            evals = layer_eigenvalues(layer, config) if evals_of is None else evals_of()
            if evals is None:
                row["status"] = "nonfinite"
            else:
                metrics, ok = spectral_metrics(evals, n, computation_eps(config), config)
                row.update(metrics, status="ok" if ok else "fit_failed")
        if config.metrics and evals is not None:
            custom = metric_columns(config.metrics, evals.cpu().numpy(),
                                    matrix_of or (lambda: analysed_matrix(layer, config)),
                                    RESULT_COLUMNS, n, m, shuffles)
        else:
            custom = declared_columns(config.metrics)
    finally:
        shuffles.cancel()  # a shuffle started ahead and not used: a non-finite layer, an error
    kept = evals.cpu().numpy() if (config.keep_evals and evals is not None) else None
    return LayerResult(row={**{c: row[c] for c in LAYER_COLUMNS}, **custom}, evals=kept)


def analysed_matrix(layer: _Layer, config: ESDConfig) -> np.ndarray:
    """The matrix whose eigenvalues a layer's row holds, as a NumPy array in the computation
    dtype (a custom metric's ``W``): the weight as stored (out x in), or for a convolution
    the stack of its kernel slices (k x out x in), each scaled by sqrt(conv_norm)."""
    dtype = PRECISIONS[config.precision]
    mats = [m.detach().to("cpu", dtype) for m in layer.mats]
    if len(mats) == 1 and layer.evals_scale == 1.0:
        return mats[0].numpy()
    return (torch.stack(mats) * math.sqrt(layer.evals_scale)).numpy()


# The dtype a shuffled matrix's eigenvalues are computed in: its spectrum is one draw of a null
# distribution whose spread from draw to draw is of order 1e-2; float32's error (1e-6 to 1e-5
# relative) is far below that, at half float64's cost (docs/metrics.md, section 4).
SHUFFLED_PRECISION = "float32"
# A layer's shuffled matrices and the word buffers they lie in (``shuffled_mats``).
Shuffled = tuple[list[torch.Tensor], list[np.ndarray]]


def shuffled_eigenvalues(layer: _Layer, config: ESDConfig, seed: int, replica: int, *,
                         shuffled: Shuffled | None = None) -> np.ndarray | None:
    """The eigenvalues (float64 NumPy, ascending) of ``layer`` with each of its matrices
    shuffled element-wise (``shuffled_mats``; ``shuffled``: its result, when made already),
    solved like the layer itself (``layer_eigenvalues``) but in ``SHUFFLED_PRECISION``. None
    when they are not finite."""
    mats, words = shuffled_mats(layer, config, seed, replica) if shuffled is None else shuffled
    try:
        in_float32 = replace(config, precision=SHUFFLED_PRECISION)
        evals = layer_eigenvalues(replace(layer, mats=mats), in_float32)
        # A Gram that overflowed float32, or one so small that products of entries underflow:
        # solved again with the entries scaled by a power of two (exact), where that helps.
        scale = 1.0
        if evals is None or float(evals[-1]) < 2.0 ** -60:
            scale = _float32_safe_scale(mats)
        if scale != 1.0:
            mats = [m.to(PRECISIONS[SHUFFLED_PRECISION]) * scale for m in mats]
            evals = layer_eigenvalues(replace(layer, mats=mats), in_float32)
        return None if evals is None else evals.cpu().numpy() / scale ** 2
    finally:
        for buffer in words:
            WORDS.give(buffer)


def _float32_safe_scale(mats: list[torch.Tensor]) -> float:
    """1.0, or the power of two (exact) that brings ``mats``' largest entry to about 1 where
    their Gram in float32 would overflow (entries beyond ``2**60 / sqrt(rows)``) or lose the
    products of their entries to underflow (the largest below ``2**-40``). NaN or infinite
    entries: 1.0 (the layer is not finite either way)."""
    top = max(max(-float(low), float(high)) for low, high in map(torch.aminmax, mats))
    rows = max(max(m.shape) for m in mats)
    if not math.isfinite(top) or 2.0 ** -40 <= top <= 2.0 ** 60 / math.sqrt(rows) or top == 0:
        return 1.0
    return 2.0 ** -math.frexp(top)[1]


def shuffled_mats(layer: _Layer, config: ESDConfig, seed: int, replica: int) -> Shuffled:
    """``layer``'s matrices, each shuffled element-wise in its stored dtype by
    ``esd_randomize.layer_rng(seed, longname, replica)``, in turn (on the CPU; the shuffle's
    sort runs on ``config.device``), and the buffers of ``esd_randomize.WORDS`` they lie in,
    to give back once they are solved."""
    rng = layer_rng(seed, layer.longname, replica)
    sort = device_sort(torch.device(config.device))
    mats, words = [], []
    for m in layer.mats:
        bits = m.detach().cpu().view(_SAME_WIDTH[m.element_size()]).numpy()
        room = WORDS.take(m.numel()) if m.element_size() < 8 else None  # 8 bytes: no words
        if room is not None:
            words.append(room)
        mats.append(torch.from_numpy(shuffled_bits(bits, rng, sort, room)).view(m.dtype))
    return mats, words


def device_sort(device: torch.device) -> Callable[[np.ndarray], np.ndarray] | None:
    """The sort of ``esd_randomize.sort_shuffle``'s words on ``device``: None on the CPU
    (NumPy's), ``torch_sort`` elsewhere. Both give one order, so a seed's shuffle is the same
    on every device."""
    return None if device.type == "cpu" else functools.partial(torch_sort, device=device)


def torch_sort(words: np.ndarray, device: torch.device) -> np.ndarray:
    """uint64 ``words`` sorted in place in NumPy's order, by torch on ``device``: torch sorts
    int64, whose order is that of the words with their top bit flipped. Where the device has
    not the memory (about 3 x 8 bytes per entry), NumPy sorts them on the CPU: the same
    order. Returns ``words``."""
    as_int = torch.from_numpy(words.view(np.int64))
    try:
        flipped = as_int.to(device, copy=True)
        flipped ^= _TOP_BIT
        ordered = torch.sort(flipped).values
        del flipped
        ordered ^= _TOP_BIT
        as_int.copy_(ordered)  # back into the words' own memory: no new host array
    except torch.OutOfMemoryError:
        words.sort()
    return words


_TOP_BIT = -(2 ** 63)  # int64 with only the top bit set


@functools.cache
def _shuffler() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=SHUFFLE_THREADS, thread_name_prefix="esd-shuffle")


class ShuffledSpectra:
    """``shuffled_evals(seed, replica)`` of estimator/metrics.py for one layer: the eigenvalues
    of the layer shuffled element-wise, or of ``matrix_of()``'s matrix shuffled when the row's
    matrix is not ``layer.mats`` (a delta's ΔW).

    ``start()`` shuffles the first replica of every --randomize seed on a background thread,
    to be called before the layer's own eigenvalues are computed: the shuffle is NumPy work
    that releases the GIL, so on a machine with a core to spare (or while a GPU solves) it
    runs in the eigensolve's shadow. The result is the same either way."""

    def __init__(self, layer: _Layer, config: ESDConfig,
                 matrix_of: Callable[[], np.ndarray] | None = None):
        self.layer, self.config, self.matrix_of = layer, config, matrix_of
        self.ahead: dict[int, Future] = {}

    def start(self) -> None:
        seeds = {m.shuffle_seed for m in self.config.metrics if m.shuffle_seed is not None}
        if self.matrix_of is None:
            self.ahead = {seed: _shuffler().submit(shuffled_mats, self.layer, self.config,
                                                   seed, 0) for seed in seeds}

    def cancel(self) -> None:
        """Drop the shuffles started ahead and not used (one running goes on to its end)."""
        for pending in self.ahead.values():
            pending.cancel()
        self.ahead = {}

    def __call__(self, seed: int, replica: int) -> np.ndarray | None:
        layer = self.layer
        if self.matrix_of is not None:  # the row's own matrix, slices scaled: no evals_scale
            w = torch.from_numpy(self.matrix_of())
            layer = replace(layer, mats=list(w) if w.dim() == 3 else [w], evals_scale=1.0)
        pending = self.ahead.pop(seed, None) if replica == 0 else None
        shuffled = pending.result() if pending is not None else None
        return shuffled_eigenvalues(layer, self.config, seed, replica, shuffled=shuffled)


_SAME_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # NumPy has no bfloat16


def _as_tensor(tensor: Any) -> torch.Tensor:
    """A tensor outside autograd (a generator must not hold a no_grad context across yields)."""
    return tensor.detach() if isinstance(tensor, torch.Tensor) else torch.as_tensor(tensor)


def iter_layer_results(named_tensors: Iterable[tuple],
                       config: ESDConfig) -> Iterator[LayerResult]:
    """One ``LayerResult`` per layer of a ``(name, tensor)`` or ``(name, tensor, storage)``
    stream, in stream order (``storage``: the stored format, default the dtype's name).

    Tensors with fewer than 2 dimensions and non-weights (see ``is_weight_name``) give no row.
    A 3-D expert tensor gives one row per expert, with consecutive ``layer_id``s. Only the
    current tensor is held: it is released before the next one is read.
    """
    _check_device(config)
    layer_id = 0
    with WORDS.reused():  # --randomize's word buffer, from layer to layer
        for item in named_tensors:
            name, tensor, storage = item if len(item) == 3 else (*item, "")
            t = _as_tensor(tensor)
            del tensor, item
            if t.ndim >= 2 and is_weight_name(name):
                for layer in split_layers(name, t, None, config.conv_norm, storage):
                    result = analyse_layer(layer, layer_id, config)
                    del layer  # holds a view of t
                    layer_id += 1
                    yield result
            del t


def fit_from_evals(evals: np.ndarray, config: ESDConfig, *, N: int | None = None) -> dict:
    """The fit and metric columns (METRIC_COLUMNS, fix_fingers, status) of saved eigenvalues.

    ``evals``: a layer's eigenvalues as saved with ``keep_evals`` (any order; negatives are
    clamped to 0). ``N``: the layer's larger dimension, which sets matrix_rank's tolerance
    (``lambda_max * N * eps``); it defaults to the number of eigenvalues, a square matrix.
    The eigenvalues are assumed computed in ``config.precision``. This is the same function
    the tensor path runs, so a saved layer refits to its row exactly.
    """
    arr = np.asarray(evals, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise InputError(f"fit_from_evals needs a non-empty 1-D array of finite eigenvalues, "
                         f"got shape {arr.shape} (finite: {bool(np.isfinite(arr).all())})")
    _check_device(config)
    t = torch.as_tensor(np.sort(arr), device=torch.device(config.device)).clamp_(min=0)
    metrics, ok = spectral_metrics(t, arr.size if N is None else N, computation_eps(config),
                                   config)
    return {**metrics, "fix_fingers": config.fix_fingers, "status": "ok" if ok else "fit_failed"}


def _check_device(config: ESDConfig) -> None:
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={config.device!r} asked for, but torch sees no CUDA device")


# ---------------------------------------------------------------------------------------------
# The nn.Module door (TempBalance's net_esd_estimator).

def module_layers(net: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(name.weight, weight, layer_type)`` for Linear, Conv2d, Embedding and HF Conv1D.

    A weight shared by several modules (tied embeddings) is analysed once.
    """
    seen: set[int] = set()
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            layer_type = "conv2d"
        elif isinstance(module, torch.nn.Embedding):
            layer_type = "embedding"
        elif isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            by_name = layer_type_of(f"{name}.weight", 2)  # what the checkpoint door says
            layer_type = by_name if by_name in ("lm_head", "expert") else "linear"
        else:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))
        yield f"{name}.weight", weight.detach(), layer_type


# TempBalance's names for the fit methods: its Tempbalance class's ``pl_fitting`` values, and
# its net_esd_estimator's ``fix_fingers=None`` (the full scan).
PL_FITTING = {"median": "xmin_mid", "fix-finger": "xmin_peak", "goodness-of-fit": "DKS"}


def fit_method(fix_fingers: str | None, pl_fitting: str | None = None) -> str:
    """Our ``fix_fingers`` for either spelling: ``None`` is DKS (TempBalance's full scan);
    ``pl_fitting``, when given, must agree with a ``fix_fingers`` other than the default."""
    method = "DKS" if fix_fingers is None else fix_fingers
    if pl_fitting is None:
        return method
    if pl_fitting not in PL_FITTING:
        raise InputError(f"pl_fitting={pl_fitting!r} is not one of {tuple(PL_FITTING)} "
                         f"(or pass fix_fingers, one of {FIX_FINGERS})")
    if method not in ("xmin_mid", PL_FITTING[pl_fitting]):
        raise InputError(f"fix_fingers={fix_fingers!r} and pl_fitting={pl_fitting!r} ask for "
                         "different fits; pass one of them")
    return PL_FITTING[pl_fitting]


def net_esd_estimator(net: torch.nn.Module, EVALS_THRESH: float = 1e-5, bins: int = 100,
                      fix_fingers: str | None = "xmin_mid", xmin_pos: int = 2,
                      conv_norm: float = 0.5, filter_zeros: bool = False,
                      device: str | None = None, eigs: bool = False, *,
                      precision: str = "float64", pl_fitting: str | None = None,
                      metrics: Iterable = (), mp_fit: bool = False, randomize: bool = False,
                      seed: int = 0):
    """TempBalance's estimator: a DataFrame with one row per Linear/Conv2d/Embedding/Conv1D.

    Columns: LAYER_COLUMNS, ``alphahat`` (= alpha_weighted) and, with ``eigs=True``, ``eigs``
    (each layer's eigenvalues, float64 numpy, ascending). ``device=None`` computes each layer
    on its parameter's own device. Layers with fewer than 10 eigenvalues get status too_small.

    TempBalance's spellings are accepted: ``fix_fingers=None`` is its full scan (our ``DKS``),
    and ``pl_fitting`` is ``'median'`` (xmin_mid), ``'fix-finger'`` (xmin_peak) or
    ``'goodness-of-fit'`` (DKS). Its use of the result works unchanged: ``metrics['alpha']``,
    ``metrics['longname']``, ``pd.DataFrame({k: metrics[k] for k in metrics if k != 'eigs'})``.

    ``metrics``: custom metrics (functions, or ``FILE.py:FUNCTION`` specs; estimator/metrics.py),
    whose columns come last (NaN where a layer has no eigenvalues); ``mp_fit=True`` adds
    WeightWatcher's Marchenko-Pastur fit columns before them (estimator/mp_fit.py), ``randomize=True``
    its randomized-ESD columns after those, the shuffle seeded by ``seed`` (estimator/randomize.py).
    """
    import pandas as pd

    if hasattr(net, "peft_config") and hasattr(net, "get_base_model"):
        raise InputError(
            "net_esd_estimator: a PeftModel's modules are its base's weights and its LoRA "
            "factors apart, not the model it computes; analyse it merged with "
            "esd_experiment.analyze(model) (as the CLI merges the adapter), or pass "
            "model.merge_and_unload()")
    base = ESDConfig(fix_fingers=fit_method(fix_fingers, pl_fitting), xmin_pos=xmin_pos,
                     bins=bins, evals_thresh=EVALS_THRESH, filter_zeros=filter_zeros,
                     conv_norm=conv_norm, precision=precision, keep_evals=eigs,
                     device=device or "cpu",
                     metrics=((MP_FIT,) if mp_fit else ())
                     + ((randomize_metric(seed),) if randomize else ()) + tuple(metrics))
    configs: dict[str, ESDConfig] = {}
    rows = []
    layer_id = 0
    with torch.no_grad(), WORDS.reused():
        for name, weight, layer_type in module_layers(net):
            dev = device or str(weight.device)
            config = configs.setdefault(dev, replace(base, device=dev))
            for layer in split_layers(name, weight, layer_type, conv_norm):
                result = analyse_layer(layer, layer_id, config)
                layer_id += 1
                row = {**result.row, "alphahat": result.row["alpha_weighted"]}
                if eigs:
                    row["eigs"] = result.evals
                rows.append(row)
    columns = list(LAYER_COLUMNS) + ["alphahat"] + (["eigs"] if eigs else [])
    custom = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in columns]
    return pd.DataFrame(rows, columns=columns + custom)
