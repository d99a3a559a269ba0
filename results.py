"""The result schema, and reading results back: one definition for the worker that writes
rows, the runner's resume check and every report. Imports neither torch nor transformers.

A result CSV has one row per layer, columns ``RESULT_COLUMNS`` in that order. Its
``esd_options`` column records the estimator options the row was computed with
(``options_key``), so a results directory never mixes incomparable numbers unnoticed: the
runner's resume check (``is_current``) treats a result computed with other options as not done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

# Filled by the worker from the model list and the resolved revision.
MODEL_COLUMNS = ("model_id", "revision", "source_model")
# Filled by the estimator from the tensor's name, shape and stored format.
SHAPE_COLUMNS = ("layer_id", "longname", "block", "layer_type", "storage",
                 "N", "M", "Q", "num_evals")
# Filled by the fit (esd_fit.spectral_metrics).
METRIC_COLUMNS = (
    "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "spectral_norm", "log_spectral_norm", "norm", "log_norm", "stable_rank",
    "alpha_weighted", "log_alpha_norm", "matrix_rank", "entropy", "warning",
)
LAYER_COLUMNS = SHAPE_COLUMNS + METRIC_COLUMNS + ("fix_fingers", "status")
RESULT_COLUMNS = MODEL_COLUMNS + LAYER_COLUMNS + ("esd_options",)

STATUSES = ("ok", "fit_failed", "too_small", "nonfinite", "unsupported_dtype")
# The estimator options that change the numbers, in the order options_key writes them.
OPTION_NAMES = ("fix_fingers", "xmin_pos", "bins", "evals_thresh", "filter_zeros",
                "conv_norm", "min_evals", "precision")
# Key of the options record inside an ``.eigs.npz``.
EIGS_OPTIONS_KEY = "__esd_options__"

# pandas dtypes of the columns (nullable integers: a too_small row has no matrix_rank).
STRING_COLUMNS = ("model_id", "revision", "source_model", "longname", "layer_type", "storage",
                  "warning", "fix_fingers", "status", "esd_options")
INTEGER_COLUMNS = ("layer_id", "block", "N", "M", "num_evals", "num_pl_spikes", "matrix_rank")


def options_key(options: Mapping[str, object]) -> str:
    """The canonical one-line form of estimator options: ``fix_fingers=DKS;xmin_pos=2;...``.

    ``options`` maps every name of ``OPTION_NAMES`` (an ``ESDConfig`` as a dict will do).
    """
    missing = [name for name in OPTION_NAMES if name not in options]
    if missing:
        raise KeyError(f"estimator options lack {missing}")
    return ";".join(f"{name}={options[name]!r}" if isinstance(options[name], float)
                    else f"{name}={options[name]}" for name in OPTION_NAMES)


def read_header_and_options(csv_path: Path) -> tuple[tuple[str, ...], str | None] | None:
    """The header and the first row's ``esd_options`` of a result CSV; None if it is absent.

    Only the first two lines are read: a result is written whole by one rename, so every row
    of a file carries the same options.
    """
    import csv

    try:
        with open(csv_path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = tuple(next(reader, ()))
            first = next(reader, None)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, csv.Error):
        return (), None
    if first is None or "esd_options" not in header or len(first) != len(header):
        return header, None
    return header, first[header.index("esd_options")]


def is_current(csv_path: Path, options: str, columns: Sequence[str] = RESULT_COLUMNS) -> bool:
    """True when ``csv_path`` is a finished result of the current schema computed with the
    estimator options ``options`` (an ``options_key``)."""
    found = read_header_and_options(csv_path)
    return found is not None and found[0] == tuple(columns) and found[1] == options


def eigs_options(npz_path: Path) -> str | None:
    """The options an ``.eigs.npz`` was computed with; None when absent or unreadable."""
    import zipfile

    import numpy as np

    try:
        with np.load(npz_path, allow_pickle=False) as data:
            if EIGS_OPTIONS_KEY not in data.files:
                return None
            return str(data[EIGS_OPTIONS_KEY])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
