"""Where the delta view's results go, and which list rows have one (``--delta``).

A model whose list row names a ``source_model`` (a full fine-tune, or an adapter) or that the
list marks as an adapter gets, besides its result, ``<output_dir>/delta/<its result's file
name>``: the ESD of ``W - W_source`` layer by layer (run/delta.py, docs/metrics.md). Imports
neither torch nor pandas, so the runner uses it.
"""

from __future__ import annotations

from esd_experiment.core.paths import ModelPaths

DELTA_DIR = "delta"  # under --output_dir; a model's delta CSV has its result's file name
DELTA_KEY = "delta"  # the entry of ``.esd_options.json`` that records --delta


def delta_paths(paths: ModelPaths) -> ModelPaths:
    """The delta's files of the model whose files are ``paths``: the same names in
    ``<output_dir>/delta`` (its log and failure record are the model's own)."""
    return ModelPaths(paths.output_dir / DELTA_DIR, paths.log_dir, paths.stem)


def has_delta(entry) -> bool:
    """Whether a list entry (model_list.ListEntry) has a delta: it names its source model, or
    is marked as an adapter (whose base the adapter's own files may name)."""
    return bool(entry.source_model.strip()) or entry.is_adapter
