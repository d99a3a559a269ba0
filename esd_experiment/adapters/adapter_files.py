"""An adapter row of the list: its files, its base model, and how its tensors are made.

A LoRA adapter is merged tensor by tensor into its base (``lora_merge.MergePlan``) while the
base checkpoint streams, so the adapters of one base share one pass over it. Adapter types
the per-tensor merge does not cover (DoRA, IA3, LoHa, ...) are merged by peft on a float32
copy of the base, which needs the whole base on disk, and streamed on their own.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from esd_experiment.core.errors import (
    AdapterBaseError,
    ESDError,
    InputError,
    ModelNotFoundError,
    NoWeightsError,
)
from esd_experiment.core.ids import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ModelRequest,
    Source,
    is_adapter_repo,
    parse_model_id,
)
from esd_experiment.formats.checkpoint import CONFIG_FILE, CheckpointReader, WeightFiles, read_json
from esd_experiment.formats.model import LoadedModel

logger = logging.getLogger(__name__)


def open_adapter(opener, request: ModelRequest, source: Source,
                 trust_remote_code: bool) -> LoadedModel:
    """Open an adapter and its base: the base's checkpoint (shared with the other models of
    the job built on it) and the plan that merges the adapter into it."""
    from esd_experiment.adapters.lora_merge import (
        CONV1D_MODEL_TYPES,
        LoraSettings,
        MergePlan,
        NeedsPeftMerge,
        unsupported_variant,
    )
    from esd_experiment.adapters.peft_merge import merged_with_peft

    label = source.label
    if source.partial and not is_adapter_repo(source.files):
        raise opener.not_cached(source, f"{ADAPTER_CONFIG} or the adapter's weights")
    if ADAPTER_CONFIG not in source.files:
        raise NoWeightsError(
            f"{label}: marked as an adapter (base_model_relation={request.base_model_relation!r}) "
            f"but holds no {ADAPTER_CONFIG}; found: {', '.join(source.files[:20]) or 'no files'}")
    weights = next((w for w in ADAPTER_WEIGHTS if w in source.files), None)
    if weights is None:
        raise NoWeightsError(f"{label}: adapter holds {ADAPTER_CONFIG} but no "
                             f"{' or '.join(ADAPTER_WEIGHTS)}")
    source = opener.with_root(source, ADAPTER_CONFIG)
    if CONFIG_FILE in source.files:
        opener.file(source, CONFIG_FILE)
    adapter_config = read_json(source.root / ADAPTER_CONFIG, label)
    base_source = resolve_base(opener, request, source, adapter_config)
    try:
        checkpoint = opener.checkpoint(base_source)
    except ESDError as exc:  # same class, with the adapter named first
        raise type(exc)(f"{label}: its base model cannot be read: {exc}") from None
    base_source, base_config = checkpoint.source, checkpoint.config
    opener.file(source, weights)  # after the base passed its checks
    adapter_reader = CheckpointReader(
        source.root, WeightFiles(weights.rpartition(".")[2], None, (weights,)), label)
    variant = unsupported_variant(adapter_config)
    if variant is None:
        try:
            plan = MergePlan(checkpoint.reader, adapter_reader,
                             LoraSettings.from_config(adapter_config, label), model_id=label,
                             base_id=base_source.label, base_config=base_config,
                             conv1d=base_config.get("model_type") in CONV1D_MODEL_TYPES,
                             task_type=str(adapter_config.get("task_type") or ""))
        except NeedsPeftMerge as reason:
            variant = f"LoRA ({reason})"
        else:
            return LoadedModel(request.model_id, source.revision, base_source.model_id,
                               base_source.revision, True, checkpoint, plan)
    logger.info("%s: %s adapter; merging with peft on a float32 copy of %s", label, variant,
                base_source.label)
    if checkpoint.fetcher is not None:
        checkpoint.fetcher.fetch_all()
    base_root = _with_remote_code(opener, base_source, base_config, trust_remote_code)
    stream = partial(merged_with_peft, base_root, source.root, adapter_config, base_config,
                     model_id=label, variant=variant, trust_remote_code=trust_remote_code)
    return LoadedModel(request.model_id, source.revision, base_source.model_id,
                       base_source.revision, True, None, _own=stream)


def _with_remote_code(opener, base: Source, config: dict, trust_remote_code: bool) -> Path:
    """The base's folder, with the ``*.py`` files transformers needs to build a custom-code
    model when the user allows it."""
    if trust_remote_code and config.get("auto_map"):
        for name in (f for f in base.files if f.endswith(".py") and "/" not in f):
            opener.file(base, name)
    return base.root


def base_candidates(source: Source, adapter_config: dict) -> list[tuple[str, str]]:
    """(where it came from, model id with optional @revision), in the order they are tried."""
    out = []
    name = adapter_config.get("base_model_name_or_path")
    if isinstance(name, str) and name.strip():
        rev = adapter_config.get("revision")
        has_rev = "@" in name or Path(name).expanduser().is_dir()
        out.append(("adapter_config.json base_model_name_or_path",
                    f"{name.strip()}@{rev}" if rev and not has_rev else name.strip()))
    if CONFIG_FILE in source.files:
        config = read_json(source.root / CONFIG_FILE, source.label)
        for key in ("base_model_name_or_path", "_name_or_path"):
            value = config.get(key)
            if isinstance(value, str) and value.strip():
                out.append((f"config.json {key}", value.strip()))
    return out


def resolve_base(opener, request: ModelRequest, source: Source, adapter_config: dict) -> Source:
    """The adapter's base: ``source_model`` if given (authoritative), else the first
    candidate named by the adapter's own files that exists."""
    label = source.label
    if request.source_model.strip():
        candidates = [("source_model", request.source_model.strip())]
    else:
        candidates = base_candidates(source, adapter_config)
    tried = []
    for origin, text in candidates:
        try:
            base_id, base_rev = parse_model_id(text)
            base = opener.locate(base_id, base_rev)
        except (InputError, ModelNotFoundError) as exc:
            tried.append(f"{origin} {text!r}: {exc}")
            continue
        if is_adapter_repo(base.files):
            raise AdapterBaseError(f"{label}: base {base.label} ({origin}) is itself an adapter; "
                                   f"adapters of adapters are not merged")
        return base
    what = "; ".join(tried) or ("nothing: no source_model, no base_model_name_or_path in "
                                f"{ADAPTER_CONFIG}, no config.json naming a base")
    raise AdapterBaseError(f"{label}: cannot determine the adapter's base model. Tried {what}. "
                           f"Set source_model in the model list")
