"""Depth order of a model's layers: embeddings, then blocks 0..n, then heads.

Checkpoints list tensors by name (``lm_head`` before ``model.layers.0``, a ResNet's classifier
first), so rows in checkpoint order make "alpha by depth" wrong. ``depth_order`` ranks layer
names the way the model computes with them:

- **From the model's config** (``config.json`` as a dict): the order in which the transformers
  class named by ``config["architectures"][0]`` defines its parameters. The class is built on
  the meta device (no memory, no weights) from transformers itself, never from code in a
  repository. Checkpoint names the class renames on loading (Mixtral's
  ``block_sparse_moe.experts.3.w1`` is part of ``mlp.experts.gate_up_proj``) take the place of
  the parameter they load into; a name with no parameter at all (a packed ``qweight``) goes
  right after the last parameter of the deepest module whose path it shares.
- **By the name rule** (``name_key``), when there is no config, transformers lacks the class,
  the class cannot be built from the config, or fewer than half the names find a parameter:
  1. embeddings outside an encoder or decoder come first (GGUF's ``token_embd`` too), heads
     (``lm_head``, ``classifier``, ``pooler``, ``score``, ``cls``, ``fc``, a top-level
     ``output`` as in GGUF and InternLM2 or ``linear`` as in the CIFAR ResNets, ...) and
     anything under them come last;
  2. in between, encoder before unmarked before decoder; within each, embeddings, then other
     layers outside blocks (stems such as a ResNet's ``conv1``; among themselves in natural
     order), then blocks;
  3. blocks compare by the components before their first number (torchvision's ``layer1``
     before ``layer2``), then by all their numbers (``layers.3`` -> 3, ``stages.1.layers.0``
     -> (1, 0)) compared as numbers, so ``layers.2`` comes before ``layers.10``;
  4. inside a block, and wherever names still tie, components compare by a fixed rank --
     attention before cross-attention before the feed-forward part; ``q, k, v`` before ``o``;
     ``gate, up`` before ``down`` (``w1, w3`` before ``w2``, ``wi`` before ``wo``, ``fc1``
     before ``fc2``, both after a layer's attention); GGUF's ``attn_*`` before ``ffn_*``, each
     in computation order; token before position embeddings -- and otherwise in natural order
     (digits compared as numbers). The matrices of a stack (``name[e]``) follow in order.

``block_index`` and ``stack_of`` say which repeated block a layer is in: the first number of
its name, when the numbered module holds modules of its own (``model.layers.3.self_attn...``),
and the path before it; a layer in a ``Sequential`` outside them (``visual.merger.mlp.0``) has
none.

The rule reproduces the parameter order of Llama, GPT-2, BERT, T5 and ResNet checkpoints
(tests/test_layer_order.py); the config path also orders Mixtral's experts as the model does.

- **From the module itself**, for an ``nn.Module`` analysed in memory without a config: the
  order in which it defines its parameters (a researcher's own LeNet or ResNet).

For the worker: ``rows = in_depth_order(rows, config, parameters)`` sorts result rows by depth
and renumbers ``layer_id``; ``config`` is the model's ``config.json`` (the base's, for an
adapter), or None; ``parameters`` an in-memory module's tensor names, or empty. Building the
meta instance imports transformers (about 2.5 s of CPU once per process,
then milliseconds per config; see BENCHMARKS.md), so what a config's class gives (its parameter
order, the renamings looked up, or that it cannot be built) is kept on disk, one small JSON file
per config and transformers version, under ``$ESD_CACHE_DIR/layer-order`` (default
``$XDG_CACHE_HOME/esd-experiment``, else ``~/.cache/esd-experiment``). The fine-tunes of one
base share their config, so on a list of them only the first worker imports transformers for
the order. A name the file has no renaming for builds the class again and adds it; a file that
cannot be read or written is ignored (the class is built, as without the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

# Names a config must have this share of for its parameter order to be trusted over the rule.
MIN_MATCHED_SHARE = 0.5

_HEADS = frozenset({
    "lm_head", "embed_out", "classifier", "score", "pooler", "cls", "qa_outputs", "proj_out",
    "head", "heads", "fc", "output_projection", "seq_relationship", "logits",
})
_EMBEDDINGS = frozenset({"wte", "wpe", "shared", "emb", "tok_emb", "pos_emb", "tok_embeddings",
                         "token_embd", "pos_embd", "token_types"})  # the last three: GGUF's
# Heads stored at the top level under these names (GGUF's and InternLM2's output.weight; the
# classifier of the CIFAR ResNets, DenseNets and MobileNets TempBalance trains, ``linear``).
_TOP_HEADS = ("output", "linear")
_SIDES = {"encoder": 0, "decoder": 2}  # names with neither are 1
_UNMARKED_SIDE = 1
_DEFAULT_RANK = 50
# Rank of a name component where components otherwise tie (lower comes first).
_COMPONENT_RANK = {
    # embeddings: tokens, then positions, then token types
    **dict.fromkeys(("wte", "word_embeddings", "embed_tokens", "tok_embeddings"), 1),
    **dict.fromkeys(("wpe", "position_embeddings", "embed_positions"), 2),
    "token_type_embeddings": 3,
    # containers inside a block: attention, cross-attention, feed-forward
    **dict.fromkeys(("self", "in_proj"), 1),
    **dict.fromkeys(("attn", "self_attn", "attention", "selfattention", "self_attention",
                     "norm_attn_norm"), 20),
    **dict.fromkeys(("crossattention", "encdecattention", "encoder_attn", "cross_attn"), 25),
    **dict.fromkeys(("mlp", "ffn", "feed_forward", "densereludense", "block_sparse_moe",
                     "moe", "intermediate"), 30),
    "output": 40,
    # projections: inputs before outputs, in the conventional q, k, v / gate, up order
    **dict.fromkeys(("q_proj", "q", "query", "wq", "c_attn", "qkv_proj", "qkv", "wqkv",
                     "query_key_value"), 2),
    **dict.fromkeys(("k_proj", "k", "key", "wk"), 3),
    **dict.fromkeys(("v_proj", "v", "value", "wv"), 4),
    **dict.fromkeys(("gate", "router"), 5),
    "experts": 6,
    **dict.fromkeys(("gate_proj", "w1", "wi", "wi_0", "c_fc", "dense_h_to_4h",
                     "gate_up_proj"), 11),
    **dict.fromkeys(("up_proj", "w3", "wi_1"), 12),
    **dict.fromkeys(("o_proj", "o", "out_proj", "wo", "c_proj", "down_proj", "w2",
                     "dense_4h_to_h"), 14),
    # the feed-forward pair of layers that hold it beside their attention (Whisper, BART)
    "fc1": 31, "fc2": 32,
}
# GGUF block tensors (llama.cpp's names): ``attn_*`` rank as attention and ``ffn_*`` as the
# feed-forward part, each in computation order by what follows the prefix.
_GGUF_PART = re.compile(r"^(?P<group>attn|ffn)_(?P<rest>.+)$")
_GGUF_GROUP = {"attn": 20, "ffn": 30}
_GGUF_ORDER = {rest: i + 1 for i, rest in enumerate((
    "norm", "q_a", "q_a_norm", "q_b", "kv_a_mqa", "kv_a_norm", "kv_b", "k_b", "v_b", "qkv",
    "q", "q_norm", "k", "k_norm", "v", "output", "post_norm",
    "gate_inp", "gate_exps", "gate_up_exps", "up_exps", "down_exps", "gate_inp_shexp",
    "gate_shexp", "up_shexp", "down_shexp", "gate", "up", "down"))}
_EXPERT_SUFFIX = re.compile(r"^(.*)\[(\d+)\]$")
_DIGITS = re.compile(r"(\d+)")


# ---------------------------------------------------------------------------------------------
# The name rule.

def _parts(name: str) -> list[str]:
    """A layer name as components: ``.weight`` dropped, an expert suffix ``[e]`` made one."""
    m = _EXPERT_SUFFIX.match(name)
    base, expert = (m.group(1), m.group(2)) if m else (name, None)
    parts = base.split(".")
    if len(parts) > 1 and parts[-1] == "weight":
        parts.pop()
    return parts + [expert] if expert is not None else parts


def _natural(part: str) -> tuple:
    """``layer10`` -> ('layer', 10, ''): digits compare as numbers (str and int alternate)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(part.lower())))


def _component(part: str) -> tuple:
    low = part.lower()
    gguf = _GGUF_PART.match(low) if low not in _COMPONENT_RANK else None
    if gguf is not None:
        return (_GGUF_GROUP[gguf["group"]], _GGUF_ORDER.get(gguf["rest"], len(_GGUF_ORDER) + 1),
                _natural(part))
    return _COMPONENT_RANK.get(low, _DEFAULT_RANK), 0, _natural(part)


def _is_embedding(part: str) -> bool:
    low = part.lower()
    return "embed" in low or low in _EMBEDDINGS


def _classify(parts: list[str]) -> tuple[int, int, int, int]:
    """(major, side, kind, index of the first numeric component) of a name's components."""
    first = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
    outer = [p.lower() for p in parts[:first]]
    side = next((_SIDES[p] for p in outer if p in _SIDES), _UNMARKED_SIDE)
    if any(p in _HEADS for p in outer) or (outer and outer[0] in _TOP_HEADS):
        return 2, side, 0, first
    embedding = any(_is_embedding(p) for p in outer)
    if embedding and side == _UNMARKED_SIDE:
        return 0, side, 0, first
    kind = 0 if embedding else (2 if first < len(parts) else 1)
    return 1, side, kind, first


def name_key(name: str) -> tuple:
    """The name rule's sort key of one layer name (see the module docstring)."""
    parts = _parts(name)
    major, side, kind, first = _classify(parts)
    index = _EXPERT_SUFFIX.match(name)  # one matrix of a stack: after the stack's own place
    own = parts[:-1] if index else parts
    blocks = tuple(int(p) for p in own if p.isdigit())
    # Layers outside blocks (stems, a LeNet's layers) compare by name alone: the ranks order
    # the parts of a block (a top-level fc1 is not a block's feed-forward layer).
    component = _component if kind != 1 else (lambda p: (_DEFAULT_RANK, 0, _natural(p)))
    return (major, side, kind, tuple(component(p) for p in own[:first]), blocks,
            tuple(_component(p) for p in own[first:] if not p.isdigit()),
            int(index.group(2)) if index else -1)


def block_index(name: str) -> int | None:
    """The block a layer belongs to under the name rule: its first numeric component, or None
    for embeddings, stems and heads (``classifier.1`` is a head, not block 1). Only a repeated
    block holding modules of its own counts: the list index of a layer in a Sequential
    (a projector's ``visual.merger.mlp.0``, ``mm_projector.2``) is no block."""
    found = _block(name)
    return None if found is None else found[1]


def stack_of(name: str) -> str:
    """The repeated blocks a layer belongs to, named by the path before its block number
    (``model.layers``, ``visual.blocks``, ``model.encoder.layers``); "" outside blocks."""
    found = _block(name)
    return "" if found is None else found[0]


def _block(name: str) -> tuple[str, int] | None:
    """(stack path, block number) of a layer inside a repeated block, else None."""
    parts = _parts(name)
    major, _, kind, first = _classify(parts)
    own = len(parts) - (1 if _EXPERT_SUFFIX.match(name) else 0)  # without an expert index
    if major != 1 or kind != 2 or first >= own - 1:
        return None
    return ".".join(parts[:first]), int(parts[first])


# ---------------------------------------------------------------------------------------------
# The model's own order.

class ModelOrder:
    """Where each parameter of a model sits in its definition order, and how checkpoint names
    are renamed on loading; finds the parameter (or module) a layer name stands for."""

    def __init__(self, positions: Mapping[str, int], rename: Callable[[str], str]):
        self.positions = dict(positions)   # parameter name -> index in named_parameters()
        self.rename = rename               # checkpoint key -> parameter name (may raise
        #                                    NotRecorded when it comes from the disk cache)
        # Trailing runs of parameter names, for checkpoints with one prefix more or less than
        # the class (``layers.0.x`` vs ``model.layers.0.x``); a run two parameters share is
        # ambiguous (None).
        self._tails: dict[str, int | None] = {}
        self._module_last: dict[str, int] = {}  # module path -> its last parameter
        for key, pos in self.positions.items():
            parts = key.split(".")
            for i in range(len(parts)):
                if len(parts) - i >= 2 or i == 0:
                    _claim(self._tails, ".".join(parts[i:]), pos)
            for j in range(1, len(parts)):
                path = ".".join(parts[:j])
                self._module_last[path] = max(pos, self._module_last.get(path, pos))
        self._module_tails: dict[str, str | None] = {}
        for path in self._module_last:
            parts = path.split(".")
            for i in range(len(parts)):
                _claim(self._module_tails, ".".join(parts[i:]), path)

    def position(self, name: str) -> int | None:
        """Index of the parameter a layer name stands for, or None."""
        base = _EXPERT_SUFFIX.sub(r"\1", name)
        candidates = (f"{base}.weight", base)
        for cand in candidates:
            for key in (cand, self.rename(cand)):
                if key in self.positions:
                    return self.positions[key]
        for cand in candidates:
            parts = self.rename(cand).split(".")
            for i in range(max(1, len(parts) - 1)):
                pos = self._tails.get(".".join(parts[i:]))
                if pos is not None:
                    return pos
        return None

    def anchor(self, name: str) -> int | None:
        """The last parameter of the deepest module a layer name lies under, or None."""
        parts = self.rename(_EXPERT_SUFFIX.sub(r"\1", name)).split(".")
        for length in range(len(parts) - 1, 0, -1):
            for start in range(length):
                path = self._module_tails.get(".".join(parts[start:length]))
                if path is not None:
                    return self._module_last[path]
        return None


def _claim(index: dict, key: str, value) -> None:
    """Record ``key -> value``; a key claimed with two different values becomes None."""
    if key not in index:
        index[key] = value
    elif index[key] != value:
        index[key] = None


def model_order(config: Mapping | None) -> ModelOrder | None:
    """The parameter order of the transformers class ``config["architectures"][0]``, built on
    the meta device or read from the disk cache; None without a config, a class, or when the
    class cannot be built."""
    text = _config_json(config)
    return None if text is None else _model_order(text)


def _config_json(config: Mapping | None) -> str | None:
    if not config or not isinstance(config.get("architectures"), list):
        return None
    archs = config["architectures"]
    if not archs or not isinstance(archs[0], str):
        return None
    try:
        return json.dumps(dict(config), sort_keys=True)
    except (TypeError, ValueError):
        return None


@lru_cache(maxsize=16)
def _model_order(config_json: str) -> ModelOrder | None:
    cached = _read_cached(config_json)
    return _built_order(config_json) if cached is _MISSING else cached


@lru_cache(maxsize=16)
def _built_order(config_json: str) -> ModelOrder | None:
    """The order from the class itself (importing transformers); recorded on disk when the
    class cannot be built or renames nothing, else once ``depth_order`` has used it."""
    model = _meta_model(json.loads(config_json))
    if model is None:
        _write_cached(config_json, None)
        return None
    positions: dict[str, int] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        positions.setdefault(name, len(positions))
    rename = _renamer(model)
    order = ModelOrder(positions, rename if rename is _identity else _Recording(rename))
    if rename is _identity:
        _write_cached(config_json, order)
    return order


def _meta_model(config: dict):
    """An instance of the architecture's transformers class on the meta device, or None."""
    name = config["architectures"][0]
    try:
        import torch
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    # Any failure here (a class transformers lacks or cannot import, a config from another
    # version of the class) means the same thing: the name rule orders this model.
    try:
        cls = getattr(transformers, name, None)  # transformers' own classes only, no hub code
        if not isinstance(cls, type) or not hasattr(cls, "config_class"):
            logger.debug("transformers has no model class %s; ordering layers by name", name)
            return None
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a partial config draws advice we do not need
        try:
            model_config = cls.config_class.from_dict(dict(config))
            with torch.device("meta"):
                return cls(model_config)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as exc:
        logger.debug("cannot build %s on the meta device (%s: %s); ordering layers by name",
                     name, type(exc).__name__, exc)
        return None


def _renamer(model) -> Callable[[str], str]:
    """Checkpoint key -> parameter name, with the conversions transformers applies on loading
    (identity when this transformers version has none for the class)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception as exc:  # an internal API of transformers: absent or changed
        logger.debug("no checkpoint conversions for %s: %s", type(model).__name__, exc)
        return _identity
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    if not transforms:
        return _identity

    def rename(key: str) -> str:
        try:
            return rename_source_key(key, renamings, converters)[0]
        except Exception:  # a pattern that does not apply to this key leaves it unchanged
            return key

    return rename


def _identity(key: str) -> str:
    return key


# ---------------------------------------------------------------------------------------------
# The disk cache of what a config's class gives.

CACHE_FORMAT = 1
_MISSING = object()


class NotRecorded(LookupError):
    """A renaming the cached file does not hold: the class must be built to answer it."""


class _Recording:
    """transformers' renaming of checkpoint keys, remembering each answer for the disk cache."""

    def __init__(self, rename: Callable[[str], str]):
        self.rename = rename
        self.seen: dict[str, str] = {}
        self.written = -1  # how many renamings the disk holds (-1: none written yet)

    def __call__(self, key: str) -> str:
        if key not in self.seen:
            self.seen[key] = self.rename(key)
        return self.seen[key]


class _Recorded:
    """The renamings a cached file holds; any other key raises ``NotRecorded``."""

    def __init__(self, table: Mapping[str, str]):
        self.seen = dict(table)

    def __call__(self, key: str) -> str:
        try:
            return self.seen[key]
        except KeyError:
            raise NotRecorded(key) from None


def cache_dir() -> Path:
    """Where depth orders are kept: ``$ESD_CACHE_DIR/layer-order``, by default under
    ``$XDG_CACHE_HOME/esd-experiment`` or ``~/.cache/esd-experiment``."""
    root = os.environ.get("ESD_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "esd-experiment")
    return Path(root) / "layer-order"


@lru_cache(maxsize=1)
def _versions() -> dict[str, str] | None:
    """The installed transformers and torch versions (read once: each lookup scans the
    installed packages); None when transformers is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {p: version(p) for p in ("transformers", "torch")}
    except PackageNotFoundError:
        return None


def _cache_path(config_json: str) -> Path | None:
    """The file of one config under this transformers (and torch) version; None when
    transformers is not installed."""
    versions = _versions()
    if versions is None:
        return None
    key = json.dumps({"format": CACHE_FORMAT, "config": config_json, **versions}, sort_keys=True)
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _read_cached(config_json: str):
    """The cached ``ModelOrder`` (None: the class cannot be built), or ``_MISSING``."""
    path = _cache_path(config_json)
    if path is None:
        return _MISSING
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") != CACHE_FORMAT:
            return _MISSING
        if entry["parameters"] is None:
            return None
        positions = {str(n): i for i, n in enumerate(entry["parameters"])}
        renames = entry["renames"]
        if renames is None:
            return ModelOrder(positions, _identity)
        return ModelOrder(positions, _Recorded({str(k): str(v) for k, v in renames.items()}))
    except FileNotFoundError:
        return _MISSING
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.debug("ignoring the cached depth order %s: %s", path, exc)
        return _MISSING


def _write_cached(config_json: str, order: ModelOrder | None) -> None:
    """Record ``order`` (None: the class cannot be built) for this config, atomically; a
    cache that cannot be written is skipped."""
    path = _cache_path(config_json)
    if path is None:
        return
    renames = None
    if order is not None and order.rename is not _identity:
        renames = dict(getattr(order.rename, "seen", {}))
    entry = {"format": CACHE_FORMAT,
             "parameters": None if order is None else list(order.positions),
             "renames": renames}
    from esd_experiment.core.paths import write_text_atomic

    try:
        write_text_atomic(path, json.dumps(entry))
    except OSError as exc:
        logger.debug("cannot cache the depth order in %s: %s", path, exc)


# ---------------------------------------------------------------------------------------------
# Ranks.

def depth_order(names: Sequence[str], config: Mapping | None = None,
                parameters: Sequence[str] = ()) -> dict[str, int]:
    """``{name: rank}``, ranks 0..n-1 in depth order, for layer names (``longname`` values,
    with or without ``.weight``; expert rows ``name[e]``) of one model.

    ``config`` is the model's ``config.json`` as a dict; ``parameters`` the model's own tensor
    names in definition order, where they are known (an ``nn.Module`` analysed in memory),
    which rank the layers when the config does not. Without either, or when they do not
    describe these names, the name rule orders them. Duplicate names share one rank.
    """
    unique = list(dict.fromkeys(names))
    text = _config_json(config)
    order = None if text is None else _model_order(text)
    if order is None and parameters:
        order = ModelOrder({n: i for i, n in enumerate(dict.fromkeys(parameters))}, _identity)
    keys = None
    if order is not None:
        try:
            keys = _model_keys(unique, order)
        except NotRecorded:  # a name the cached renamings lack: ask the class itself
            known = order.rename.seen
            order = _built_order(text)
            if order is not None and isinstance(order.rename, _Recording):
                order.rename.seen = {**known, **order.rename.seen}
            keys = None if order is None else _model_keys(unique, order)
        recording = getattr(order, "rename", None)
        if isinstance(recording, _Recording) and recording.written != len(recording.seen):
            _write_cached(text, order)  # with the renamings these names needed
            recording.written = len(recording.seen)
    if keys is None:
        keys = {n: name_key(n) for n in unique}
    return {n: rank for rank, n in enumerate(sorted(unique, key=keys.__getitem__))}


def _model_keys(names: list[str], order: ModelOrder) -> dict[str, tuple] | None:
    """Sort keys from the model's parameter order; None when too few names match."""
    found = {n: order.position(n) for n in names}
    if sum(p is not None for p in found.values()) < MIN_MATCHED_SHARE * len(names):
        return None
    end = len(order.positions)
    keys = {}
    for n, pos in found.items():
        if pos is not None:
            keys[n] = (pos, 0, name_key(n))
        else:
            anchor = order.anchor(n)
            keys[n] = (end if anchor is None else anchor, 1, name_key(n))
    return keys


def in_depth_order(rows: Sequence[Mapping], config: Mapping | None = None,
                   parameters: Sequence[str] = ()) -> list[dict]:
    """Result rows (dicts with ``longname``) sorted by depth (``depth_order``), ``layer_id``
    renumbered 0..n-1.

    New dicts are returned; ``rows`` is left as it was. Rows of one name (never expected)
    keep their relative order.
    """
    ranks = depth_order([r["longname"] for r in rows], config, parameters)
    ordered = sorted(rows, key=lambda r: ranks[r["longname"]])
    return [{**row, "layer_id": i} for i, row in enumerate(ordered)]
