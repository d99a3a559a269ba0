"""``analyze``: one model's result from Python, by the runner's own pipeline.

``analyze(source, **options)`` opens ``source`` -- a hub id (``org/name@revision``), a local
directory, a ``.gguf`` file, an ``nn.Module`` or a ``peft.PeftModel`` (merged, as the CLI
merges the same adapter) -- streams it through the estimator the worker uses and returns the
rows the CLI writes for that model with those options, as a DataFrame: the same columns, the
same order, the same numbers. Options take the CLI's flag names (``fix_fingers="DKS"``,
``mp_fit=True``, ``device="cuda"``); ``metrics=[fn, "file.py:fn"]`` is ``--metric``.
"""

from __future__ import annotations

import argparse
import logging
import numbers
import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esd_experiment.core.errors import ESDError, InputError
from esd_experiment.core.ids import Source
from esd_experiment.core.paths import model_paths
from esd_experiment.core.results import result_frame
from esd_experiment.estimator.options import add_esd_arguments, esd_config_from_args
from esd_experiment.formats.model import Checkpoint, LoadedModel
from esd_experiment.formats.tensor_dict import TensorDictReader, module_tensors, saved_config
from esd_experiment.formats.weight_forms import WeightFormsReader
from esd_experiment.run.state import StageLog
from esd_experiment.run.worker import (
    ModelRun,
    WorkerConfig,
    analyse,
    resolve_device,
    result_rows,
    run_job,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# Where nothing is written: ``analyze`` computes paths only because a run names its files.
_NOWHERE = Path(os.devnull)


# The CLI's flags that mean nothing to analyze(), which writes no file and runs on one device.
_CLI_ONLY = {
    "save_eigs": "it writes no file; net_esd_estimator(model) returns each layer's eigenvalues "
                 "(column eigs), and the CLI's --save_eigs saves them",
    "parallel_esd": "it runs on one device (device=...); --parallel_esd spreads a CLI job's "
                    "layers over the GPUs the job holds",
}


def esd_options(metrics: Iterable = (), **options: Any):
    """The estimator's ``ESDConfig`` from options named as the CLI's flags (unknown names
    refused, listing the known ones)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_esd_arguments(parser)
    args = parser.parse_args([])
    unknown = sorted(set(options) - set(vars(args)) - {"metric"})
    for name in sorted(set(options) & set(_CLI_ONLY)):
        raise TypeError(f"analyze() takes no {name}: {_CLI_ONLY[name]}")
    if unknown:
        raise TypeError(f"analyze() got unknown option(s) {', '.join(unknown)}; options: "
                        f"metrics, {', '.join(sorted(set(vars(args)) - set(_CLI_ONLY)))}")
    actions = {a.dest: a for a in parser._actions}
    for name, value in options.items():
        setattr(args, name, _checked(actions[name], value))
    if callable(metrics) or isinstance(metrics, str):
        raise TypeError(f"analyze(): metrics takes a list, as metrics=[{metrics!r}]")
    args.metric = [*(args.metric or ()), *metrics]
    return esd_config_from_args(args, resolve_device(str(args.device)))


def _checked(action: argparse.Action, value: Any) -> Any:
    """``value`` of the option ``action`` parses, of the type the flag would give (an int
    given for a float converted): a bool for a switch, a number for a number, a list for
    ``metric``, else a string (its value checked by ``ESDConfig``). A string such as "False"
    for a switch would be taken as true: TypeError, naming the option."""
    kind = action.type
    if action.nargs == 0:  # NumPy's bool too (not an int: 1 for True is a slip of another kind)
        expected, ok = "True or False", type(value).__name__ in ("bool", "bool_")
        value = bool(value) if ok else value
    elif kind in (int, float):
        expected = "an integer" if kind is int else "a number"
        ok = isinstance(value, numbers.Integral if kind is int else numbers.Real) \
            and not isinstance(value, bool)
        value = kind(value) if ok else value
    elif isinstance(action, argparse._AppendAction):
        expected, ok = "a list", isinstance(value, (list, tuple))
    elif action.dest == "device":  # a torch.device names one as its string does
        expected, ok = "a string or a torch.device", isinstance(value, str) or \
            type(value).__name__ == "device"
        value = str(value)
    else:
        expected, ok = "a string", isinstance(value, str)
    if not ok:
        raise TypeError(f"analyze(): {action.dest}={value!r}: expected {expected}")
    return value


def analyze(source: Any, *, base: Any = None, metrics: Iterable = (),
            model_id: str | None = None, source_model: str = "", base_model_relation: str = "",
            gguf_file: str = "", cache_dir: str | None = None, trust_remote_code: bool = False,
            **options: Any) -> pd.DataFrame:
    """The result rows of one model, exactly as the CLI writes them for it.

    ``source``: a hub id or local path (``str`` or ``Path``), an ``nn.Module`` or a
    ``PeftModel``. ``model_id`` names a module in the ``model_id`` column (default: its
    config's ``_name_or_path``, else its class name). ``source_model``,
    ``base_model_relation`` and ``gguf_file`` are the model list's columns.

    ``base`` (the source model: an id or path for an id or path, a module for a module), or
    ``delta=True`` with a ``source_model`` or for an adapter or ``PeftModel``: the rows of the
    delta view instead, ``W - W_base`` layer by layer, as ``--delta`` writes them to
    ``delta/<name>.csv`` (a ``PeftModel``'s is its adapter's update on its own base model: a
    ``base`` other than that is refused). Raises the project's error
    (``esd_experiment.core.errors``) naming the model when it cannot be read.
    """
    delta = bool(options.pop("delta", False)) or base is not None
    esd = esd_options(metrics, **options)
    config = WorkerConfig(model_ids=(), output_dir=_NOWHERE, log_dir=_NOWHERE, esd=esd,
                          base_model_relation=base_model_relation.strip(),
                          source_model=source_model.strip(), cache_dir=cache_dir,
                          trust_remote_code=trust_remote_code, gguf_file=gguf_file.strip(),
                          delta=delta)
    if isinstance(source, (str, os.PathLike)):
        text = str(source).strip()
        if not text:
            raise InputError("analyze(): the model id is empty")
        if base is not None and not isinstance(base, (str, os.PathLike)):
            raise InputError(f"analyze(): {text}: base must be a model id or path too")
        config = replace(config, model_ids=(text,),
                         source_model=str(base).strip() if base is not None
                         else config.source_model)
        *deltas, run = run_job(config, StageLog(None), write=False)
    else:
        run, deltas = _module_runs(config, source, base, model_id, source_model.strip())
    if delta:
        if not deltas and run.error is None:
            raise InputError(f"analyze(): {run.model_id} has no source model to take a delta "
                             "against: give base=... (or source_model=...)")
        run = deltas[0] if deltas else run
    if run.error is not None:
        raise run.error
    return result_frame(run.rows)


def _module_runs(config: WorkerConfig, module: Any, base: Any, model_id: str | None,
                 source_model: str) -> tuple[ModelRun, list[ModelRun]]:
    """Analyse an in-memory model (and, under ``config.delta``, its delta against ``base``
    or its adapter's own update): its weights stream as a checkpoint's would."""
    from esd_experiment.adapters.peft_module import is_peft_model, open_peft_model
    from esd_experiment.run.delta import AdapterDelta, FineTuneDelta, FineTuneOnSource

    if not hasattr(module, "state_dict"):
        raise InputError(f"analyze(): {type(module).__name__} is neither a model id, a path "
                         "nor an nn.Module")
    if base is not None and not hasattr(base, "state_dict"):
        raise InputError("analyze(): base must be an nn.Module when the model is one")
    label = model_id or _module_name(module)
    deltas: list[ModelRun] = []
    if is_peft_model(module):
        if base is not None and base is not module.get_base_model():
            raise InputError(
                f"analyze(): {label} is a PeftModel: its delta is its adapter's update on its "
                f"own base model, so base= another module is not used; leave base out, or pass "
                f"merge_and_unload() of it to take its difference from {_module_name(base)}")
        model = open_peft_model(module, label, source_model)
        if config.delta:
            deltas.append(_run(label, AdapterDelta(model, config.esd)))
    else:
        source_model = source_model or (_module_name(base) if base is not None else "")
        model = LoadedModel(label, None, source_model, None, False, _checkpoint(label, module))
        if base is not None:
            model = FineTuneOnSource(model, _checkpoint(source_model, base))
            note = model.unpaired_note()
            if note is not None:
                logger.warning("%s", note)
            deltas.append(_run(label, FineTuneDelta(model, config.esd)))
    run = _run(label, model)
    analyse(config, [run, *deltas], StageLog(None))
    for each in (run, *deltas):
        if each.error is None:
            try:
                each.rows = result_rows(config, each)
            except ESDError as exc:
                each.error = exc
    return run, deltas


def _checkpoint(label: str, module: Any) -> Checkpoint:
    """A module's weights as an opened checkpoint (no files, no fetcher), read as a
    checkpoint on disk is (weight-normalised layers as their weight, 2-D expert stacks split)."""
    config = saved_config(module)
    tensors = module_tensors(module)
    reader = WeightFormsReader(TensorDictReader(tensors), config or {}, label)
    # Without a config the module's own order of definition is its layers' depth order.
    return Checkpoint(Source(label, None, Path("."), ()), reader, config, None,
                      order=() if config else tuple(tensors))


def _run(label: str, model: Any) -> ModelRun:
    return ModelRun(label, model_paths(_NOWHERE, label, _NOWHERE), model)


def _module_name(module: Any) -> str:
    config = getattr(module, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return str(name) or type(module).__name__
