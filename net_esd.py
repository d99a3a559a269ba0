"""The ESD estimator: eigenvalues, power-law fits and metrics of weight matrices.

Pure computation: tensors and options in, result rows out. No file I/O, no logging setup,
no hub access; the device is passed in. The numerical contract is ``docs/metrics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

# The result schema: one definition, imported by the worker, the runner's resume check and
# every report. Model-level columns are filled by the worker, layer columns by this module.
MODEL_COLUMNS = ("model_id", "revision", "source_model")
LAYER_COLUMNS = (
    "layer_id", "longname", "layer_type", "N", "M", "Q", "num_evals",
    "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "spectral_norm", "log_spectral_norm", "norm", "log_norm", "stable_rank",
    "alpha_weighted", "log_alpha_norm", "matrix_rank", "entropy",
    "warning", "fix_fingers", "status",
)
RESULT_COLUMNS = MODEL_COLUMNS + LAYER_COLUMNS

FIX_FINGERS = ("xmin_mid", "xmin_peak", "DKS")
STATUSES = ("ok", "fit_failed", "too_small", "nonfinite", "unsupported_dtype")


@dataclass(frozen=True)
class ESDConfig:
    """Every option of the estimator, with the references' defaults."""

    fix_fingers: str = "xmin_mid"   # xmin_mid | xmin_peak | DKS (metrics.md section 3)
    xmin_pos: int = 2               # xmin_mid: i = n // xmin_pos
    bins: int = 100                 # xmin_peak: histogram bins over log10(evals)
    evals_thresh: float = 1e-5      # fit set threshold when filter_zeros is on
    filter_zeros: bool = False      # TempBalance default; WeightWatcher always filters
    conv_norm: float = 0.5          # 4-D conv slices are scaled by sqrt(conv_norm)
    min_evals: int = 10             # fewer eigenvalues -> status "too_small"
    precision: str = "float64"      # float64 (exact, default) | float32 (faster, documented error)
    device: str = "cpu"             # "cpu", "cuda", "cuda:1"
    keep_evals: bool = False        # attach each layer's eigenvalues to its result


@dataclass
class LayerResult:
    """One result row (keys = LAYER_COLUMNS) and, when asked for, its eigenvalues."""

    row: dict[str, Any]
    evals: Optional[np.ndarray] = None
