"""Merging a PEFT adapter into its base model, tensor by tensor.

``MergePlan`` matches every tensor of a LoRA adapter file to the base checkpoint tensor it
changes, checks all shapes before anything is computed, and then streams the base with
each touched tensor replaced by what ``peft``'s ``merge_and_unload()`` produces::

    W' = W + scale * B @ A            (nn.Linear)
    W' = W + scale * (B @ A).T        (GPT-2 ``Conv1D``, stored (in, out); peft's fan_in_fan_out)
    E' = E + scale * (B @ A).T        (embedding LoRA: lora_embedding_A (r, vocab), _B (dim, r))
    b' = b + scale * lora_B.bias      (lora_bias=True)

with ``scale = lora_alpha / r`` or ``lora_alpha / sqrt(r)`` under ``use_rslora``, ``r`` and
``lora_alpha`` taken per module from ``rank_pattern`` / ``alpha_pattern`` exactly as peft
matches them. Merged tensors are computed and returned in float32. ``modules_to_save``
weights and saved ``base_layer`` weights replace the base tensor; a ``modules_to_save``
weight with no base counterpart (an untied ``lm_head`` over a tied base) is yielded as an
extra tensor. A LoRA on an output head that the base ties to its input embedding (the base
stores only the embedding) is merged into the embedding: peft merges in place into the one
shared parameter, so its merged model holds ``embedding = lm_head = E + scale * B @ A``, and
the stream yields that tensor once, under the embedding's name, as it yields every tied
weight. Adapter tensors that match no base tensor are an error, never ignored.

Adapters this arithmetic does not cover (DoRA, IA3, LoHa, LoKr, LoRA on convolutions, ...)
go through ``peft_merge.merged_with_peft``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from esd_experiment.adapters.module_names import module_names
from esd_experiment.core.errors import (
    CorruptCheckpointError,
    ShapeMismatchError,
    UnsupportedFormatError,
)
from esd_experiment.formats.checkpoint import (
    FLOAT_DTYPE_NAMES,
    CheckpointReader,
    natural_key,
)

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "base_model.model."
# Model families whose projections are GPT-2 ``Conv1D`` modules (weights stored (in, out)):
# peft transposes their LoRA delta whatever ``fan_in_fan_out`` says.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# LoraConfig fields that turn on a variant whose merge is not plain W + scale * B @ A.
_VARIANT_FIELDS = (
    ("use_dora", "DoRA (use_dora)"), ("velora_config", "VeLoRA"), ("use_bdlora", "BD-LoRA"),
    ("alora_invocation_tokens", "activated LoRA"), ("monteclora_config", "MonteCLoRA"),
    ("arrow_config", "Arrow"), ("kasa_config", "KaSA"), ("use_qalora", "QA-LoRA"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("trainable_token_indices", "trainable tokens"), ("layer_replication", "layer replication"),
)
_LORA_KEY = re.compile(  # the adapter's name (".default") where a state_dict was saved whole
    r"^(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(?:\.(?!(?:weight|bias)$)[^.]+)?"
    r"(?:\.(?P<param>weight|bias))?$")
_SAVED_MODULE_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save(?:\.default)?\.(?P<rest>.+)$")
# A module's own weight saved beside its LoRA or its trained copy (peft's
# save_embedding_layers, for a resized vocabulary): the merge's starting value.
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.(?:base_layer|original_module)\.(?P<rest>.+)$")
# Input-embedding tensors an output head is tied to, for a base transformers does not know.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                       "embed_in.weight", "tok_embeddings.weight", "shared.weight")
# The wrappers of a multimodal model's text model: nested one way in the checkpoints published
# first (``language_model.model.layers.0``; Qwen2-VL's ``model.layers.0``), the other way in
# those saved from transformers' modules since 4.52 (``model.language_model.layers.0``).
_TEXT_WRAPPERS = ("model", "language_model")


class NeedsPeftMerge(Exception):
    """Raised while planning when only peft itself can merge this adapter."""


def tied_weights(base_config: Mapping[str, Any]) -> dict[str, str]:
    """Tensors the base model ties to another one, ``{tied: stored}``, as transformers ties them.

    Empty when ``tie_word_embeddings`` is false (it defaults to true when unset). The pairs come
    from the ``_tied_weights_keys`` of the class ``architectures`` names; for a class
    transformers does not have (custom code), ``lm_head.weight`` is tied to an input embedding
    found by name (stored value ``""``).
    """
    text_config = base_config.get("text_config")
    text_config = text_config if isinstance(text_config, Mapping) else {}
    if not base_config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True)):
        return {}
    archs = base_config.get("architectures") or [""]
    try:
        import transformers

        keys = getattr(getattr(transformers, str(archs[0]), None), "_tied_weights_keys", None)
    except ImportError:  # a model class whose optional dependency is missing
        keys = None
    if isinstance(keys, Mapping) and keys:
        return {str(k): str(v) for k, v in keys.items()}
    return {"lm_head.weight": ""}


def task_model_filter(task_type: str, base_config: Mapping[str, Any]):
    """For an adapter whose task builds another model class than the base's own (a SEQ_CLS
    adapter on a causal LM), ``(kept, holds)``: predicates telling which base tensors that
    class keeps, and which names it holds (None when it cannot be built); ``(None, None)``
    when every base tensor is part of the merged model.

    The class is the one peft builds (``AutoModelForSequenceClassification`` for SEQ_CLS, ...),
    instantiated from the base's config on the meta device (no memory, no remote code); for a
    config transformers cannot build, the base's LM head (``lm_head``) is what is left out.
    """
    name = _TASK_CLASSES.get(str(task_type or "").upper())
    if name is None or name in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
        return None, None
    try:
        import torch
        import transformers

        config = transformers.AutoConfig.for_model(**dict(base_config))
        with torch.device("meta"):
            model = getattr(transformers, name).from_config(config)
        finder = _BaseNames([n for n, _ in model.named_parameters()])

        def holds(name: str) -> bool:
            return finder.find(name) is not None

        return holds, holds
    except Exception as exc:  # a custom architecture or a config the class cannot take
        logger.info("cannot build %s from the base config (%s: %s); leaving out its lm_head",
                    name, type(exc).__name__, exc)
        return (lambda n: not (n.startswith("lm_head.") or ".lm_head." in n)), None


def unsupported_variant(adapter_config: dict[str, Any]) -> str | None:
    """The adapter type when the per-tensor LoRA merge does not cover it, else None."""
    peft_type = str(adapter_config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        return peft_type
    for key, label in _VARIANT_FIELDS:
        if adapter_config.get(key):
            return label
    if adapter_config.get("init_lora_weights") == "mica":
        return "MiCA LoRA"
    return None


def pattern_key(pattern_keys, module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to ``module``, as peft matches."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LoraSettings:
    """The numbers of ``adapter_config.json`` that the merge uses."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: dict[str, Any], model_id: str) -> LoraSettings:
        try:
            return cls(int(cfg["r"]), float(cfg.get("lora_alpha", 8)),
                       bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out")),
                       dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {}),
                       tuple(cfg.get("modules_to_save") or ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{model_id}: adapter_config.json has no usable LoRA "
                                         f"rank/alpha ({exc!r})") from None

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        r_key = pattern_key(self.rank_pattern, module)
        a_key = pattern_key(self.alpha_pattern, module)
        r = int(self.rank_pattern[r_key]) if r_key is not None else self.r
        alpha = float(self.alpha_pattern[a_key]) if a_key is not None else self.lora_alpha
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)

    def saves_module(self, module: str) -> bool:
        """Whether ``module`` is, or lies in, a module of ``modules_to_save`` (RoBERTa's
        ``classifier`` head holds ``classifier.dense`` and ``classifier.out_proj``)."""
        parts = module.split(".")
        return any(p == m or p.endswith(f".{m}") for m in self.modules_to_save
                   for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)))


@dataclass
class _Lora:
    """The adapter tensors of one LoRA-wrapped module."""

    module: str
    a: str | None = None
    b: str | None = None
    b_bias: str | None = None
    embedding: bool = False


@dataclass
class _Op:
    """How one output tensor is made."""

    base: str | None = None          # base tensor it starts from (None: an extra tensor)
    replace: str | None = None       # adapter tensor that replaces the base value
    lora: _Lora | None = None        # delta scale * B @ A added to a weight
    bias_of: _Lora | None = None     # delta scale * lora_B.bias added to a bias
    scale: float = 1.0
    transpose: bool = False
    adapter_keys: list[str] = field(default_factory=list)
    # An extra tensor's stand-in in the base model: the stored tensor the base ties it to (a
    # saved lm_head over a tied base: its embedding), which its delta is taken against.
    tied_to: str | None = None


def _parse_adapter_keys(names, model_id: str) -> tuple[dict[str, _Lora], dict[str, str]]:
    """LoRA modules by module name, and replacement weights by parameter name."""
    loras: dict[str, _Lora] = {}
    replacements: dict[str, str] = {}
    ranks: dict[str, int] = {}
    for key in names:
        path = key.removeprefix(ADAPTER_PREFIX)
        match = _LORA_KEY.match(path)
        if match:
            lora = loras.setdefault(match["module"], _Lora(match["module"]))
            part, param = match["part"], match["param"]
            if part.startswith("embedding") != (param is None):
                raise CorruptCheckpointError(f"{model_id}: adapter tensor {key!r} is malformed")
            lora.embedding = lora.embedding or part.startswith("embedding")
            if param == "bias":
                lora.b_bias = key
            else:
                setattr(lora, "a" if part.endswith("A") else "b", key)
            continue
        saved, own = _SAVED_MODULE_KEY.match(path), _BASE_LAYER_KEY.match(path)
        match = saved or own
        target = f"{match['module']}.{match['rest']}" if match else path
        rank = 2 if saved else 0 if own else 1  # the trained copy is what the model uses
        if target not in replacements or rank > ranks[target]:
            replacements[target], ranks[target] = key, rank
    for lora in loras.values():
        if lora.a is None or lora.b is None:
            present = lora.a or lora.b or lora.b_bias
            raise CorruptCheckpointError(
                f"{model_id}: adapter tensor {present!r} has no lora_A/lora_B partner")
    return loras, replacements


def _unwrapped(name: str) -> str:
    """``name`` without the text-model wrappers (``_TEXT_WRAPPERS``) it starts with."""
    parts = name.split(".")
    start = 0
    while start < len(parts) - 1 and parts[start] in _TEXT_WRAPPERS:
        start += 1
    return ".".join(parts[start:])


class _BaseNames:
    """Finds the base tensor an adapter path names, however the two prefix their keys.

    Exact match first; then without the adapter path's first component (adapter trained on
    ``*ForCausalLM``, base saved as the bare model); then base names without their first
    component (the reverse); then both without the text-model wrappers they start with (a
    multimodal model's two layouts), each when that is unambiguous or only one of the
    candidates ``fits`` (Qwen2.5-Omni's ``thinker.model.layers.N`` beside the narrower
    ``talker.model.layers.N``, for an adapter of the thinker); last, the base's names as
    transformers' modules of ``base_config`` name them (``module_names``: an adapter trained
    on a model transformers renamed on load). ``find_tied`` resolves a tensor the
    base does not store because it is tied to another (``base_config`` says which).
    """

    def __init__(self, names, base_config: Mapping[str, Any] | None = None):
        self.names = set(names)
        self.base_config = base_config
        self.stripped: dict[str, list[str]] = {}
        self.unwrapped: dict[str, list[str]] = {}
        for name in names:
            rest = name.partition(".")[2]
            if rest:
                self.stripped.setdefault(rest, []).append(name)
            self.unwrapped.setdefault(_unwrapped(name), []).append(name)

    def find(self, path: str, fits: Callable[[str], bool] | None = None) -> str | None:
        if path in self.names:
            return path
        rest = path.partition(".")[2]
        if rest in self.names:
            return rest
        for candidates in (self.stripped.get(path, []), self.unwrapped.get(_unwrapped(path), [])):
            if len(candidates) > 1 and fits is not None:
                candidates = [name for name in candidates if fits(name)]
            if len(candidates) == 1:
                return candidates[0]
        return self.module_names.get(path) or self.module_names.get(rest)

    @cached_property
    def module_names(self) -> dict[str, str]:  # built only when a lookup needs it
        return module_names(self.names, self.base_config) if self.base_config else {}

    @cached_property
    def tied(self) -> dict[str, str]:  # transformers is imported only when a lookup needs it
        return tied_weights(self.base_config) if self.base_config is not None else {}

    def find_tied(self, path: str) -> str | None:
        """The stored tensor that ``path`` shares, when the base ties ``path`` and lacks it."""
        if self.find(path) is not None:
            return None
        for tied, stored in self.tied.items():
            if tied in (path, path.partition(".")[2]) or _unwrapped(tied) == _unwrapped(path):
                return self.find(stored) if stored else self._embedding()
        return None

    def _embedding(self) -> str | None:
        found = [n for n in self.names
                 if any(n == s or n.endswith(f".{s}") for s in _EMBEDDING_SUFFIXES)]
        return found[0] if len(found) == 1 else None


class MergePlan:
    """Every output tensor of base + LoRA adapter, checked against shapes before streaming.

    ``base_config`` (the base's ``config.json``) tells which tensors the base ties, so that a
    LoRA on a tied ``lm_head`` lands in the embedding the base stores.
    """

    def __init__(self, base: CheckpointReader, adapter: CheckpointReader,
                 settings: LoraSettings, *, model_id: str, base_id: str, conv1d: bool,
                 base_config: Mapping[str, Any] | None = None, task_type: str = ""):
        self.base, self.adapter, self.settings = base, adapter, settings
        self.model_id, self.base_id, self.conv1d = model_id, base_id, conv1d
        self.ops: dict[str, _Op] = {}
        self._unused: list[str] = []
        self._shared: set[str] = set()  # stored tensors that a tied module's adapter changes
        loras, replacements = _parse_adapter_keys(adapter.names, model_id)
        self.resized: list[str] = []  # replaced by a tensor of more or fewer rows
        self.unseeded: list[str] = []  # LoRA modules of a layer the task model adds at random
        kept, self._holds = task_model_filter(task_type, base_config or {})
        finder = _BaseNames(base.names, base_config)
        # first: a LoRA may be added to one; a tied head's copy after what it is tied to
        for target, key in sorted(replacements.items(), key=lambda i: finder.find(i[0]) is None):
            self._plan_replacement(target, key, finder)
        for lora in loras.values():
            self._plan_lora(lora, finder)
        if self._unused:
            shown = ", ".join(sorted(self._unused, key=natural_key)[:8])
            raise ShapeMismatchError(
                f"{model_id}: {len(self._unused)} adapter tensor(s) match no tensor of the base "
                f"model {base_id}: {shown}. Check that source_model is the adapter's base")
        if self.unseeded:
            logger.warning("%s: LoRA on %d layer(s) that its %s model adds to %s, initialised at "
                           "random (not in the checkpoint), so not determined: left out: %s",
                           model_id, len(self.unseeded), task_type, base_id,
                           ", ".join(self.unseeded))
        names = set(self.ops) | {n for n in base.names if kept is None or kept(n)}
        if kept is not None and names != set(base.names) | set(self.ops):
            logger.info("%s: a %s adapter; %s tensors of %s that its model has no use for are "
                        "not part of it: %s", model_id, task_type, len(set(base.names) - names),
                        base_id, ", ".join(sorted(set(base.names) - names)[:5]))
        self.names = tuple(sorted(names, key=natural_key))

    def _op(self, name: str) -> _Op:
        return self.ops.setdefault(name, _Op(base=name))

    def _plan_lora(self, lora: _Lora, finder: _BaseNames) -> None:
        a_shape, b_shape = self.adapter.shape(lora.a), self.adapter.shape(lora.b)
        product = (b_shape[0], a_shape[-1])  # B @ A's shape, or its transpose in the base
        weight = finder.find(f"{lora.module}.weight",
                             lambda name: self.base.shape(name) in (product, product[::-1]))
        shared = weight is None
        if shared:
            weight = finder.find_tied(f"{lora.module}.weight")
        if weight is None and self._holds is not None and self._holds(f"{lora.module}.weight"):
            self.unseeded.append(lora.module)
            return
        if weight is None:
            self._unused += [k for k in (lora.a, lora.b, lora.b_bias) if k]
            return
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise NeedsPeftMerge(f"LoRA on a {len(a_shape)}-D weight ({lora.module})")
        r, scale = self.settings.rank_and_scale(lora.module)
        if not a_shape[0] == b_shape[1] == r:
            self._mismatch(f"{lora.a} {a_shape} and {lora.b} {b_shape} do not have the "
                           f"configured rank r={r}")
        op = self._op(weight)
        if op.lora is not None and (shared or weight in self._shared):
            raise NeedsPeftMerge(f"two LoRA modules on the tied weight {weight}")
        if op.lora is not None:
            raise CorruptCheckpointError(
                f"{self.model_id}: two LoRA modules of the adapter target {weight!r}")
        if shared:
            logger.info("%s: %s is tied to %s in %s; its LoRA is merged into that tensor",
                        self.model_id, lora.module, weight, self.base_id)
            self._shared.add(weight)
        op.lora, op.scale = lora, scale
        op.transpose = self._orientation(lora, weight, linear=shared)
        op.adapter_keys += [lora.a, lora.b]
        self._check_float(weight)
        if lora.b_bias is not None:
            self._plan_bias(lora, weight, scale, b_shape[0])

    def _orientation(self, lora: _Lora, weight: str, linear: bool = False) -> bool:
        """Whether B @ A is transposed before it is added to ``weight``; ``linear``: the
        module is known to be an ``nn.Linear`` (a tied output head), never ``Conv1D``."""
        (r, fan_in), (fan_out, _) = self.adapter.shape(lora.a), self.adapter.shape(lora.b)
        saved = self.ops[weight].replace
        shape = self.adapter.shape(saved) if saved else self.base.shape(weight)
        if lora.embedding:
            if shape != (fan_in, fan_out):
                self._mismatch(f"embedding {weight} {shape} vs lora_embedding_A {(r, fan_in)} "
                               f"and lora_embedding_B {(fan_out, r)}")
            return True
        plain, flipped = shape == (fan_out, fan_in), shape == (fan_in, fan_out)
        if not (plain or flipped):
            self._mismatch(f"{weight} {shape} vs B @ A {(fan_out, fan_in)} from {lora.b}")
        if plain and flipped:
            return not linear and (self.conv1d or self.settings.fan_in_fan_out)
        return flipped

    def _plan_bias(self, lora: _Lora, weight: str, scale: float, fan_out: int) -> None:
        bias = weight.removesuffix("weight") + "bias"
        if bias not in self.base.names:
            self._unused.append(lora.b_bias)
            return
        if self.base.shape(bias) != (fan_out,) or self.adapter.shape(lora.b_bias) != (fan_out,):
            self._mismatch(f"{bias} {self.base.shape(bias)} vs {lora.b_bias} "
                           f"{self.adapter.shape(lora.b_bias)}")
        op = self._op(bias)
        op.bias_of, op.scale = lora, scale
        op.adapter_keys.append(lora.b_bias)

    def _plan_replacement(self, target: str, key: str, finder: _BaseNames) -> None:
        name = finder.find(target, lambda n: self.base.shape(n) == self.adapter.shape(key))
        module = target.rpartition(".")[0]
        copy = False  # the tied head peft saved beside its embedding (save_embedding_layers)
        if name is None and ".modules_to_save." not in key and not self.settings.saves_module(
                module):
            name = finder.find_tied(target)
            copy = name is not None
        if name is None:
            if ".modules_to_save." in key or self.settings.saves_module(module):
                logger.info("%s: %s has no counterpart in %s; analysed as an extra tensor",
                            self.model_id, key, self.base_id)
                tied = finder.find_tied(target)
                same = tied is not None and self.base.shape(tied) == self.adapter.shape(key)
                self.ops[target] = _Op(replace=key, adapter_keys=[key],
                                       tied_to=tied if same else None)
            else:
                self._unused.append(key)
            return
        theirs, ours = tuple(self.adapter.shape(key)), tuple(self.base.shape(name))
        if theirs != ours and not (len(ours) == 2 and theirs[1:] == ours[1:]):
            self._mismatch(f"{key} {theirs} replaces {name} {ours}")
        op = self._op(name)
        if op.replace is not None and copy and ".modules_to_save." not in op.replace \
                and not self.settings.saves_module(name.rpartition(".")[0]):
            op.adapter_keys.append(key)  # the one tied parameter, saved under both names
            return
        if theirs != ours:  # a vocabulary resized for added tokens: the adapter's is the model's
            logger.info("%s: %s has %d rows where %s has %d in %s (a resized vocabulary)",
                        self.model_id, key, theirs[0], name, ours[0], self.base_id)
            self.resized.append(name)
        if op.replace is not None:
            raise NeedsPeftMerge(f"two adapter tensors ({op.replace}, {key}) set {name}, "
                                 f"which the base ties")
        op.replace = key
        op.adapter_keys.append(key)
        if ".modules_to_save." in key or self.settings.saves_module(target.rpartition(".")[0]):
            self._untie(name, finder)

    def _untie(self, name: str, finder: _BaseNames) -> None:
        """peft trains a copy of a saved module, so a weight the base ties to it keeps the
        original value: yield that original under the tied name, as peft's merged model has it."""
        for tied in finder.tied:
            if self._holds is not None and not self._holds(tied):
                continue  # a head the adapter's task model has none of (SEQ_CLS: no lm_head)
            if tied not in self.ops and finder.find(tied) is None and finder.find_tied(tied) == name:
                logger.info("%s: %s is saved by the adapter; %s, tied to it in %s, keeps the "
                            "original weights", self.model_id, name, tied, self.base_id)
                self.ops[tied] = _Op(base=name)

    def _mismatch(self, detail: str) -> None:
        raise ShapeMismatchError(
            f"{self.model_id}: adapter does not fit base model {self.base_id}: {detail}")

    def _check_float(self, name: str) -> None:
        if self.base.dtype(name) not in FLOAT_DTYPE_NAMES:
            raise UnsupportedFormatError(
                f"{self.model_id}: cannot merge LoRA into {name} of {self.base_id}: it is stored "
                f"as {self.base.dtype(name)}, not floating point")

    def source_of(self, name: str) -> str | None:
        """The base tensor output ``name`` starts from; None when the adapter alone gives it."""
        op = self.ops.get(name)
        if op is None:
            return name
        return None if op.replace else op.base

    def storage(self, name: str) -> str:
        """The stored format of the tensor output ``name`` starts from."""
        op = self.ops.get(name)
        if op is not None and op.replace:
            return self.adapter.storage(op.replace)
        return self.base.storage(name if op is None else op.base)

    def tensor(self, name: str, base_value: torch.Tensor | None = None) -> torch.Tensor:
        """The merged value of one output tensor; ``base_value``: its source base tensor, when
        the caller has read it already (a shared pass reads each base tensor once)."""
        op = self.ops.get(name)
        source = self.source_of(name)
        if source is not None and base_value is None:
            base_value = self.base.get(source)
        if op is None:
            return base_value
        value = self.adapter.get(op.replace) if op.replace else base_value
        if op.lora is not None:
            a = self.adapter.get(op.lora.a).to(torch.float32)
            b = self.adapter.get(op.lora.b).to(torch.float32)
            delta = b @ a
            if op.transpose:
                delta = delta.T
            value = value.to(torch.float32) + delta * op.scale
        elif op.bias_of is not None:
            bias = self.adapter.get(op.bias_of.b_bias).to(torch.float32)
            value = value.to(torch.float32) + bias * op.scale
        return value


_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}
