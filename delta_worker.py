"""The worker's half of ``--delta``: beside each opened model that has a source (an adapter,
or a model whose list row names a ``source_model``), a run whose model is its delta
(esd_delta.py), written to ``<output_dir>/delta/<the model's file name>``.

An adapter's delta joins its base's pass (the base is read once for the whole job); a full
fine-tune's joins the fine-tune's own pass (each of its tensors is read once for both
results), its source model opened here and read beside it, tensor by tensor.
"""

from __future__ import annotations

import logging

from delta_paths import delta_paths
from errors import ESDError, ShapeMismatchError

logger = logging.getLogger(__name__)


def delta_runs(config, runs: list, make_run, hub, session, stage) -> list:
    """One run (``make_run(model_id, paths)``, an esd_worker.ModelRun) per opened model of
    ``runs`` that has a source; a delta that cannot be set up keeps its error."""
    from esd_delta import AdapterDelta, FineTuneDelta
    from model_loader import ModelRequest, open_models

    out = []
    for run in runs:
        model = run.model
        if run.error is not None or not (model.is_adapter or model.source_model):
            continue
        delta = make_run(run.model_id, delta_paths(run.paths))
        try:
            if model.is_adapter:
                delta.model = AdapterDelta(model, config.esd)
            else:
                (source,) = open_models([ModelRequest(model.source_model)], hub=hub,
                                        cache_dir=config.cache_dir, session=session,
                                        waiting=lambda: stage.during("download"))
                if isinstance(source, ESDError):
                    raise type(source)(f"{run.model_id}: --delta: its source model "
                                       f"{model.source_model} cannot be read: {source}")
                delta.model = FineTuneDelta(model, source, config.esd)
                if not delta.model.pairs:
                    delta.model.close()
                    raise ShapeMismatchError(
                        f"{run.model_id}: --delta: no weight of it has a tensor of the same "
                        f"name and shape in its source model {model.source_model}")
        except ESDError as exc:
            delta.error, delta.stage = exc, "resolve"
            logger.error("%s: its delta cannot be computed: %s", run.model_id, exc)
        out.append(delta)
    return out
