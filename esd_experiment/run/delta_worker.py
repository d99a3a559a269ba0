"""The worker's half of ``--delta``: beside each opened model that has a source (an adapter,
or a model whose list row names a ``source_model``), a run whose model is its delta
(run/delta.py), written to ``<output_dir>/delta/<the model's file name>``.

Every delta joins its source's pass, so a source is read once for the whole job: an
adapter's is its base's pass already; a full fine-tune is moved into its source's pass
(``FineTuneOnSource``: its tensors read there, beside the source's, for its own result and its
delta alike). The source is the checkpoint a model of the job opened already (the base
itself, or the base of its adapters), else opened here, once for the job's fine-tunes of it.
"""

from __future__ import annotations

import logging

from esd_experiment.core.delta_paths import delta_paths
from esd_experiment.core.errors import AdapterBaseError, ESDError, ShapeMismatchError
from esd_experiment.core.paths import model_key

logger = logging.getLogger(__name__)


def delta_runs(config, runs: list, make_run, hub, session, stage) -> list:
    """One run (``make_run(model_id, paths)``, an esd_worker.ModelRun) per opened model of
    ``runs`` that has a source; a delta that cannot be set up keeps its error. A full
    fine-tune's own run gets the model that reads it in its source's pass."""
    from esd_experiment.run.delta import AdapterDelta, FineTuneDelta, FineTuneOnSource

    checkpoints = [("" if r.model.is_adapter else r.model_id, r.model.checkpoint)  # as listed
                   for r in runs if r.error is None and r.model.checkpoint is not None]
    opened: list = []  # (id, checkpoint) of the sources opened here, each a pass of its own
    used: set[int] = set()
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
                source = _source(model, checkpoints + opened, opened, config, hub, session,
                                 stage)
                shared = any(r is not run and r.error is None
                             and r.model.checkpoint is model.checkpoint for r in runs)
                fine_tune = FineTuneOnSource(model, source, shared)
                if not fine_tune.paired_weights:
                    raise ShapeMismatchError(
                        f"{run.model_id}: --delta: no weight of it has a tensor of the same "
                        f"name and shape in its source model {model.source_model}")
                used.add(id(source))
                note = fine_tune.unpaired_note()
                if note is not None:
                    logger.warning("%s", note)
                run.model, delta.model = fine_tune, FineTuneDelta(fine_tune, config.esd)
        except ESDError as exc:
            delta.error, delta.stage = exc, "resolve"
            logger.error("%s: its delta cannot be computed: %s", run.model_id, exc)
        out.append(delta)
    for _, checkpoint in opened:  # a source no fine-tune could use is not streamed: close it
        if id(checkpoint) not in used:
            checkpoint.reader.close()
            if checkpoint.fetcher is not None:
                checkpoint.fetcher.close()
    return out


def _source(model, known: list, opened: list, config, hub, session, stage):
    """The checkpoint of ``model``'s source model: one the job holds (listed as the source is
    spelled, a tag or branch included, or at the commit the source names), else opened now."""
    from esd_experiment.loader.opener import open_models, parse_model_id

    request = source_request(model.source_model)
    try:
        wanted, revision = parse_model_id(request.model_id)
    except ESDError as exc:
        raise type(exc)(f"{model.model_id}: --delta: its source model: {exc}") from None
    for listed, checkpoint in [] if request.gguf_file else known:
        found = checkpoint.source
        if model_key(listed) == model_key(request.model_id) or (
                model_key(found.model_id) == model_key(wanted)
                and (revision is None or revision == found.revision)):
            return checkpoint
    (source,) = open_models([request], hub=hub, cache_dir=config.cache_dir, session=session,
                            waiting=lambda: stage.during("download"))
    if isinstance(source, AdapterBaseError):  # an adapter whose own base is not found
        raise ShapeMismatchError(f"{model.model_id}: --delta: its source model "
                                 f"{model.source_model} is an adapter, not a full model")
    if isinstance(source, ESDError):
        detail = str(source)
        if not request.gguf_file and "gguf_file column" in detail:  # the fine-tune's row's
            detail = f"{detail.rsplit('; ', 1)[0]}; name one as source_model {wanted}#<file>"
        raise type(source)(f"{model.model_id}: --delta: its source model "
                           f"{model.source_model} cannot be read: {detail}")
    if source.is_adapter or source.checkpoint is None:
        raise ShapeMismatchError(f"{model.model_id}: --delta: its source model "
                                 f"{model.source_model} is an adapter, not a full model")
    opened.append((request.model_id, source.checkpoint))
    return source.checkpoint


def source_request(source_model: str):
    """The request of a ``source_model``: ``org/name#<gguf_file>``, as results name one GGUF
    file of a repository, is that file (a local path holding ``#`` stays a path)."""
    from pathlib import Path

    from esd_experiment.loader.opener import ModelRequest

    text = source_model.strip()
    repo, mark, gguf_file = text.partition("#")
    if mark and repo.strip() and gguf_file.strip() and not Path(text).expanduser().exists():
        return ModelRequest(repo.strip(), gguf_file=gguf_file.strip())
    return ModelRequest(text)
