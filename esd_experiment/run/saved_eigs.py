"""Results recomputed from saved eigenvalues (``--save_eigs``), without loading a model:
``esd_report.py refit`` with new fit options or metrics, and the runner when only the custom
metrics changed.

``rows_from_eigs`` rebuilds a model's rows exactly as the worker builds them, fits and custom
metrics recomputed; ``eigs_obstacle`` says why a result cannot be recomputed so;
``recompute_metrics`` is the runner's door.
"""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from esd_experiment.core.errors import InputError
from esd_experiment.core.paths import ModelPaths
from esd_experiment.core.results import (
    EIGS_LAYERS_KEY,
    EIGS_OPTIONS_KEY,
    INTEGER_COLUMNS,
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    STRING_COLUMNS,
    read_results_file,
    split_options_key,
)
from esd_experiment.estimator.options import ESDConfig
from esd_experiment.run.plan import drop_old_results

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

logger = logging.getLogger("run_esd_experiment")  # the runner's log: it calls recompute_planned

FITTED = ("ok", "fit_failed")  # statuses whose layers had eigenvalues to fit


def weights_needed(config: ESDConfig) -> str:
    """The first custom metric that takes ``W`` (the weights, which eigenvalues lack), or ''."""
    return next((m.name for m in config.metrics if m.wants_W), "")


def eigs_path(csv: Path) -> Path:
    return csv.with_name(f"{csv.stem}.eigs.npz")


def eigs_obstacle(rows: pd.DataFrame, csv: Path) -> str:
    """Why the saved eigenvalues beside ``csv`` cannot rebuild its rows, or ''."""
    import numpy as np

    key = split_options_key(rows["esd_options"].iat[0])[0]
    eigs = eigs_path(csv)
    if not eigs.is_file():
        return "no saved eigenvalues (rerun it with --save_eigs)"
    try:
        with np.load(eigs, allow_pickle=False) as data:
            if EIGS_OPTIONS_KEY not in data.files or str(data[EIGS_OPTIONS_KEY]) != key:
                return f"{eigs.name} was saved with other options than {csv.name}"
            missing = set(rows["longname"][rows["status"].isin(FITTED)]) - set(data.files)
            rowless = set(data.files) - {EIGS_OPTIONS_KEY, EIGS_LAYERS_KEY} - set(rows["longname"])
            # the model's layers, as the file lists them (those without eigenvalues too)
            if EIGS_LAYERS_KEY in data.files:
                rowless |= set(data[EIGS_LAYERS_KEY].tolist()) - set(rows["longname"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return f"{eigs.name} cannot be read: {exc}"
    if missing:
        return f"{eigs.name} lacks the eigenvalues of {len(missing)} layer(s), e.g. {min(missing)}"
    # Rows a user removed: the eigenvalues do not give a layer's shape, nor a row at all to a
    # layer that had none (too small) where the file does not list the layers: the model must
    # be run.
    if rowless or sorted(rows["layer_id"]) != list(range(len(rows))):
        return f"{csv.name} lacks rows of the model's layers (rerun the model)"
    return ""


def read_eigs(csv: Path) -> dict[str, np.ndarray]:
    import numpy as np

    with np.load(eigs_path(csv), allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k not in (EIGS_OPTIONS_KEY, EIGS_LAYERS_KEY)}


def rows_from_eigs(rows: pd.DataFrame, eigs: dict[str, np.ndarray],
                   config: ESDConfig) -> list[dict]:
    """A model's rows as the worker builds them with ``config``: fits and custom metrics
    recomputed from its saved eigenvalues (a layer without any keeps NaN metrics)."""
    from esd_experiment.estimator.metrics import declared_columns, metric_columns
    from esd_experiment.estimator.net_esd import fit_from_evals

    if weights_needed(config):
        raise InputError(f"metric {weights_needed(config)} takes W, the weights: saved "
                         "eigenvalues cannot give it (run the model)")
    out = []
    for record in rows.sort_values("layer_id").to_dict("records"):  # a user may have sorted
        row = {c: _plain(record[c], c) for c in RESULT_COLUMNS}
        row["Q"] = row["N"] / row["M"] if row["M"] > 0 else math.nan  # as the estimator does
        metrics = {c: math.nan for c in METRIC_COLUMNS}
        metrics.update(warning="", fix_fingers=config.fix_fingers)
        custom = declared_columns(config.metrics)
        if row["status"] in FITTED:
            evals = eigs[row["longname"]]
            metrics = fit_from_evals(evals, config, N=row["N"])
            if config.metrics:
                custom = metric_columns(config.metrics, evals, lambda: None, RESULT_COLUMNS,
                                        row["N"], row["M"])
        out.append({**row, **metrics, "esd_options": config.options_key, **custom})
    return out


def _plain(value, column: str):
    """A typed DataFrame cell as the worker's Python value (int, float, str or None)."""
    import pandas as pd

    if column in STRING_COLUMNS:
        return str(value)
    if value is None or value is pd.NA:
        return None
    return int(value) if column in INTEGER_COLUMNS else value


def recompute_metrics(paths: ModelPaths, config: ESDConfig) -> bool:
    """The runner's shortcut: when a model's result differs from ``config`` in its custom
    metrics alone and its eigenvalues are saved, rewrite its CSV from them (no model is
    loaded) and say so in its log; True when done. Metrics that take ``W`` need the model."""
    from esd_experiment.run.worker import write_results

    if weights_needed(config) or not paths.csv.is_file():
        return False
    try:
        rows = read_results_file(paths.csv)
    except InputError:
        return False
    key = rows["esd_options"].iat[0]
    if split_options_key(key)[0] != config.eigs_key or key == config.options_key \
            or eigs_obstacle(rows, paths.csv):
        return False
    out = rows_from_eigs(rows, read_eigs(paths.csv), config)
    write_results(paths, out, None, config.eigs_key)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.log, "a", encoding="utf-8") as fh:
        fh.write(f"{paths.csv.name}: rows recomputed from its saved eigenvalues with "
                 f"{config.options_key}\n")
    return True


def recompute_planned(plan, config: ESDConfig, delta: bool = False,
                      overwrite: bool = False) -> None:
    """Move each model of ``plan.to_run`` (run_plan.Plan) that ``recompute_metrics`` rewrites
    to ``plan.recomputed``, logging it; one whose metric fails on them to ``plan.invalid``, with
    the cause the worker would give (its eigenvalues kept; its old result too, unless
    ``overwrite``: old numbers must not pass for this run's). Under ``delta`` a model with a
    delta is rewritten so when its delta is too (delta first), else runs again."""
    from esd_experiment.core.delta_paths import delta_paths, has_delta
    from esd_experiment.estimator.metrics import MetricError

    for entry, paths in list(plan.to_run):
        try:
            recomputed = (not (delta and has_delta(entry))
                          or recompute_metrics(delta_paths(paths), config)) \
                and recompute_metrics(paths, config)
        except MetricError as exc:
            plan.to_run.remove((entry, paths))
            plan.invalid.append((entry, f"{type(exc).__name__}: {exc}"))
            logger.warning("%s: FAILED on its saved eigenvalues: %s", entry.key, exc)
            if overwrite:  # its eigenvalues stand: they are what the metric failed on
                drop_old_results(entry.key, [paths] + ([delta_paths(paths)]
                                                       if delta and has_delta(entry) else []),
                                 eigs=False)
            continue
        if recomputed:
            plan.to_run.remove((entry, paths))
            plan.recomputed.append(entry)
            logger.info("%s: custom metrics computed from its saved eigenvalues, no model "
                        "loaded", entry.key)
