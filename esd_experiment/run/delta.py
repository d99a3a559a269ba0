"""The delta view: the ESD of ``ΔW = W - W_source`` for each layer a model shares, with equal
shapes, with the model it was made from (docs/metrics.md, "The delta view").

- A full fine-tune: in one pass over its source model, the fine-tune's tensor of each name
  is read beside the source's (``FineTuneOnSource``, whose reads also make the fine-tune's
  own result), and ``ΔW``'s eigenvalues summed from row chunks of the difference, as a
  weight's are from its own (``FineTuneDelta``, ``difference_eigenvalues``). The fine-tunes and adapters of one source in one job share the pass.
  Experts stored in the other layout than the source's pair per expert (``delta_layouts``).
- A LoRA adapter: ``ΔW = s·B·A`` (transposed where the merge transposes it), exactly the
  merged model minus its base. Its eigenvalues come from the r×r core of two thin QR
  factorisations, ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``: the nonzero eigenvalues of ``ΔWᵀΔW`` are
  the squared singular values of ``s·R_B R_Aᵀ``, the other ``M - r`` are 0; no large
  eigensolve and no merged or base matrix (``AdapterDelta``). A layer the adapter leaves
  alone has ``ΔW = 0``; a weight the adapter replaces (``modules_to_save``) is the replacement
  minus the base (plus ``s·B·A`` where a LoRA is on the saved weight: an embedding).

In both paths an eigenvalue at or below the rank tolerance ``λ_max · N · eps`` (the one
``matrix_rank`` counts with) is set to 0: it is round-off of a rank-deficient ``ΔW``, and in
the fit set it would fit noise. The two paths then give the same eigenvalues.

``delta_frame(model, base)`` is the door from Python: two ``nn.Module``s, or a
``peft.PeftModel`` (its LoRA layers by the low-rank path).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from esd_experiment.core.errors import InputError, UnsupportedFormatError
from esd_experiment.core.results import LAYER_COLUMNS
from esd_experiment.estimator import lapack as esd_lapack
from esd_experiment.estimator.net_esd import (
    FLOAT_DTYPES,
    PRECISIONS,
    LayerResult,
    _chunk_converter,
    analyse_layer,
    analysed_matrix,
    computation_eps,
    is_weight_name,
    layer_eigenvalues,
    module_layers,
    split_layers,
    storage_of,
)
from esd_experiment.estimator.options import ESDConfig

logger = logging.getLogger(__name__)


@dataclass
class LayerDelta:
    """``ΔW`` of one tensor: ``pair`` ``(W, W_source)`` gives it as their difference, or
    ``factors`` ``(A, B, s, transpose)`` as ``s·B·A`` (``.T`` when ``transpose``); neither:
    ``ΔW = 0``. ``dtype``: the stored dtype (one stored other than as floats makes the layer
    ``unsupported_dtype``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    storage: str = ""
    factors: tuple[torch.Tensor, torch.Tensor, float, bool] | None = None
    pair: tuple[torch.Tensor, torch.Tensor] | None = None


def difference(ft: torch.Tensor, base: torch.Tensor) -> LayerDelta:
    """``ft - base``, formed in the computation dtype as the layer is analysed. Stored other
    than as floats, either one makes the layer ``unsupported_dtype``."""
    stored = next((t.dtype for t in (ft, base) if t.dtype not in FLOAT_DTYPES), ft.dtype)
    return LayerDelta(tuple(ft.shape), stored, storage_of(ft.dtype),
                      pair=(ft.detach(), base.detach()))


def lowrank_eigenvalues(a: torch.Tensor, b: torch.Tensor, scale: float,
                        count: int) -> torch.Tensor:
    """The ``count`` eigenvalues (float64, ascending) of the smaller Gram matrix of
    ``scale·B·A`` (``B``: out×r, ``A``: r×in; ``count`` = min(out, in)): the squared singular
    values of the core ``scale·R_B·R_Aᵀ`` of thin QRs of ``B`` and ``Aᵀ``, and zeros."""
    r_b = torch.linalg.qr(b.detach().to("cpu", torch.float64), mode="r").R
    r_a = torch.linalg.qr(a.detach().to("cpu", torch.float64).T, mode="r").R
    values = (torch.linalg.svdvals(r_b @ r_a.T) * abs(scale)) ** 2
    values = values[:count]
    zeros = torch.zeros(count - values.numel(), dtype=torch.float64)
    return torch.sort(torch.cat([zeros, values])).values


def zero_roundoff(evals: torch.Tensor | None, n: int, config: ESDConfig) -> torch.Tensor | None:
    """Eigenvalues at or below ``λ_max · n · eps`` (matrix_rank's tolerance) set to 0."""
    if evals is None or evals.numel() == 0:
        return evals
    tol = evals.max() * n * computation_eps(config)
    return torch.where(evals <= tol, torch.zeros_like(evals), evals)


def _lowrank_dense(delta: LayerDelta, config: ESDConfig) -> torch.Tensor:
    """``s·B·A`` (transposed where the merge transposes it) in the computation dtype."""
    a, b, scale, transpose = delta.factors
    w = (b.detach().to(torch.float64) @ a.detach().to(torch.float64)) * scale
    return (w.T if transpose else w).to(PRECISIONS[config.precision])


def delta_layer_results(name: str, delta: LayerDelta, config: ESDConfig) -> list[LayerResult]:
    """The delta rows of one tensor (none for a non-weight or a tensor of fewer than two
    dimensions), built by the result's own row builder, ``net_esd.analyse_layer``."""
    if len(delta.shape) < 2 or not is_weight_name(name):
        return []
    if delta.pair is not None and delta.dtype in FLOAT_DTYPES:
        ft, base = delta.pair
        storage = delta.storage or storage_of(delta.dtype)
        out = []
        for mine, theirs in zip(split_layers(name, ft, None, config.conv_norm, storage),
                                split_layers(name, base, None, config.conv_norm), strict=True):
            layer = replace(mine, dtype=delta.dtype)
            out.append(analyse_layer(
                layer, 0, config,
                evals_of=lambda a=mine, b=theirs: zero_roundoff(
                    difference_eigenvalues(a, b, config), a.N, config),
                matrix_of=lambda a=mine, b=theirs: analysed_matrix(replace(a, mats=[
                    x.to("cpu", PRECISIONS[config.precision]) - y.to("cpu", PRECISIONS[
                        config.precision]) for x, y in zip(a.mats, b.mats, strict=True)]),
                    config)))
        return out
    shape_only = torch.empty(delta.shape, dtype=delta.dtype, device="meta")
    out = []
    for layer in split_layers(name, shape_only, None, config.conv_norm, delta.storage):
        out.append(analyse_layer(layer, 0, config,
                                 evals_of=lambda layer=layer: _shortcut_evals(layer, delta,
                                                                              config),
                                 matrix_of=lambda layer=layer: _matrix(layer, delta, config)))
    return out


def difference_eigenvalues(mine, theirs, config: ESDConfig) -> torch.Tensor | None:
    """The eigenvalues of ``ΔW = mine - theirs`` (two ``net_esd`` layers of one shape) as
    ``net_esd.layer_eigenvalues`` gives a layer's: on the CPU, ``ΔW``'s Gram matrix summed from
    row chunks of the two, each chunk's difference formed in the computation dtype in a
    reused buffer (no ``ΔW`` of the whole matrix); elsewhere from ``ΔW`` formed whole."""
    dtype = PRECISIONS[config.precision]
    if torch.device(config.device).type != "cpu" or not esd_lapack.available():
        return layer_eigenvalues(replace(mine, mats=[
            a.to("cpu", dtype) - b.to("cpu", dtype)
            for a, b in zip(mine.mats, theirs.mats, strict=True)]), config)
    parts = []
    for a, b in zip(mine.mats, theirs.mats, strict=True):
        ev = _lapack_difference(a, b, dtype, config.chunk_elems)
        if ev is None:
            return None
        parts.append(ev)
    evals = parts[0] if len(parts) == 1 else torch.sort(torch.cat(parts)).values
    evals = evals.to(torch.float64)
    return evals * mine.evals_scale if mine.evals_scale != 1.0 else evals


def _lapack_difference(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                       chunk_elems: int) -> torch.Tensor | None:
    if a.shape[0] < a.shape[1]:
        a, b = a.T, b.T
    rows = min(max(1, chunk_elems // a.shape[1]), a.shape[0])
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    gram = esd_lapack.gram_buffer(a.shape[1], np_dtype)
    mine, theirs = _chunk_converter(a, dtype, rows), _chunk_converter(b, dtype, rows)
    diff = np.empty((rows, a.shape[1]), dtype=np_dtype)
    for r0 in range(0, a.shape[0], rows):
        x, y = mine(a[r0:r0 + rows]), theirs(b[r0:r0 + rows])
        np.subtract(x, y, out=diff[:x.shape[0]])
        esd_lapack.syrk_update(gram, diff[:x.shape[0]])
    if not np.isfinite(gram).all():
        return None
    return torch.from_numpy(esd_lapack.symmetric_eigenvalues(gram)).clamp_(min=0)


def _shortcut_evals(layer, delta: LayerDelta, config: ESDConfig) -> torch.Tensor:
    if delta.factors is None:  # ΔW = 0
        evals = torch.zeros(layer.num_evals, dtype=torch.float64)
    else:
        a, b, scale, _ = delta.factors
        evals = zero_roundoff(lowrank_eigenvalues(a, b, scale, layer.M), layer.N, config)
    return evals.to(torch.device(config.device))


def _matrix(layer, delta: LayerDelta, config: ESDConfig) -> np.ndarray:
    """A shortcut layer's ``ΔW`` as a custom metric's ``W`` (formed only when one asks)."""
    if delta.factors is None:
        mats = [torch.zeros(m.shape, dtype=torch.float64) for m in layer.mats]
    else:
        mats = [_lowrank_dense(delta, config)]
    return analysed_matrix(replace(layer, mats=mats), config)


# ---------------------------------------------------------------------------------------------
# The worker's models: each joins a shared pass of tensor_stream.stream_models.

def _shared_names(own, base_reader, base_config=None):
    """``{fine-tune tensor: source tensor}`` for the tensors of the reader ``own`` and the
    source's (names matched as an adapter's are: exactly, or with one model's first prefix
    left out, of two such names the one of equal shape; a tensor the source ties to another
    and so does not store, an untied fine-tune's ``lm_head``, is matched to the one the
    source stores, as the source model uses it)."""
    from esd_experiment.adapters.lora_merge import _BaseNames

    finder = _BaseNames(base_reader.names, base_config)
    out = {}
    for name in own.names:
        shape = tuple(own.shape(name))
        found = (finder.find(name, lambda b, shape=shape: tuple(base_reader.shape(b)) == shape)
                 or finder.find_tied(name))
        if found is not None:
            out[name] = found
    return out


def _tied_in_fine_tune(own, own_config, base, taken: set[str]) -> list:
    """The delta rows of the weights the fine-tune ties to another and so does not store, that
    its source stores (a tied fine-tune's ``lm_head`` against an untied source's): the tensor
    the fine-tune stores for it minus the source's, named as the source names it."""
    from esd_experiment.adapters.lora_merge import _BaseNames
    from esd_experiment.run.delta_layouts import LayoutPair

    finder = _BaseNames(own.names, own_config)
    out = []
    for name in base.names:
        stored = finder.find_tied(name) if name not in taken else None
        if stored is not None and tuple(own.shape(stored)) == tuple(base.shape(name)):
            out.append(LayoutPair(name, stored, name))
    return out


class _DeltaRows:
    """What makes a model of a pass a delta: the worker solves its items here."""

    is_adapter = False

    @staticmethod
    def layer_results(name: str, delta: LayerDelta, storage: str,
                      config: ESDConfig) -> list[LayerResult]:
        return delta_layer_results(name, replace(delta, storage=storage), config)


class FineTuneOnSource:
    """A full fine-tune streamed in its source model's pass: for each source tensor, the
    fine-tune's tensor of that name and shape is read (then, after the pass, those the source
    lacks), so that a source shared by several fine-tunes and adapters of one job is read
    once for them all. Its files are released once no later tensor of the pass needs them,
    unless ``shared``: its checkpoint is read in another pass too (the base of adapters of the
    job), which then releases and closes it."""

    is_adapter = False
    plan = None

    def __init__(self, model, source, shared: bool = False):
        from esd_experiment.formats.stream import read_order
        from esd_experiment.run.delta_layouts import LayoutPair, layout_pairs

        self.model, self.checkpoint = model, source  # the pass it joins
        self.shared = shared
        self.model_id, self.revision = model.model_id, model.revision
        self.source_model = model.source_model
        own, base = model.checkpoint.reader, source.reader
        named = _shared_names(own, base, source.config)
        self.pairs = {n: b for n, b in named.items()
                      if tuple(own.shape(n)) == tuple(base.shape(b))}
        weights = [n for n in own.names if len(own.shape(n)) >= 2 and is_weight_name(n)]
        tied = _tied_in_fine_tune(own, model.checkpoint.config, base, set(self.pairs.values()))
        taken = {*self.pairs.values(), *(p.source for p in tied)}
        across = tied + layout_pairs(  # and an expert layout other than the source's
            [n for n in weights if n not in self.pairs], own.shape,
            [b for b in base.names if b not in taken], base.shape,
            [(c or {}).get("model_type") for c in (source.config, model.checkpoint.config)])
        # Each delta row: a fine-tune tensor (or rows of it) minus a source tensor (or rows).
        self.deltas = [LayoutPair(n, n, b) for n, b in self.pairs.items()] + across
        paired = {p.ft for p in self.deltas}
        self.weights = len(weights)
        self.paired_weights = len(paired & set(weights))  # what gives rows (norms give none)
        self.unpaired = (  # the weights with no delta row: (no such name, another shape)
            [n for n in weights if n not in named and n not in paired],
            [n for n in weights if n in named and n not in paired])
        base_order = read_order(base)
        at = {b: i for i, b in enumerate(base_order)}
        read_under: dict[str, str] = {}  # each fine-tune tensor, read once: at its first use
        for pair in self.deltas:
            if pair.ft not in read_under or at[pair.source] < at[read_under[pair.ft]]:
                read_under[pair.ft] = pair.source
        self.by_source: dict[str | None, list[str]] = {}
        for name, found in read_under.items():
            self.by_source.setdefault(found, []).append(name)
        self.delta_by_source: dict[str, list[str]] = {}
        for pair in self.deltas:
            self.delta_by_source.setdefault(pair.source, []).append(pair.name)
        self.delta_of = {pair.name: pair for pair in self.deltas}
        # Each fine-tune tensor read is held for its delta rows (a stack, whose expert
        # matrices pair with several source tensors, until the last one), and no longer
        # than the source tensor of its last row.
        self._at, self._read_under = at, read_under
        self._uses = Counter(p.ft for p in self.deltas)
        self._until: dict[str, int] = {}
        for pair in self.deltas:
            self._until[pair.ft] = max(self._until.get(pair.ft, -1), at[pair.source])
        self._held: dict[str, torch.Tensor] = {}
        # The tensors no delta row reads (norms, weights the source lacks): each beside the
        # last paired tensor of its file, so that the file is done there; else after the pass.
        anchor = {f: b for b in base_order for n in self.by_source.get(b, ())
                  for f in own.files_of(n)}
        for name in [n for n in read_order(own) if n not in read_under]:
            found = [anchor.get(f) for f in own.files_of(name)]
            if found and None not in found:
                read_under[name] = max(found, key=at.__getitem__)
            self.by_source.setdefault(read_under.get(name), []).append(name)
        order = [n for b in [*base_order, None] for n in self.by_source.get(b, ())]
        self._index = {name: i for i, name in enumerate(order)}
        self._last_use = {f: i for i, name in enumerate(order) for f in own.files_of(name)}
        if model.checkpoint.fetcher is not None:  # its shards fetched in the order used
            model.checkpoint.fetcher.reorder([f for name in order for f in own.files_of(name)])

    def value_of(self, name: str) -> torch.Tensor:
        """The fine-tune's tensor ``name`` for a delta row: as this pass read it (read again
        only where the fine-tune's own stream failed before it)."""
        if name in self._held:
            value = self._held[name]
            self._uses[name] -= 1
            if not self._uses[name]:
                del self._held[name]
            return value
        return self.model.checkpoint.reader.get(name)

    def unpaired_note(self) -> str | None:
        """One line naming the weights that have no delta row, and why; None when all do."""
        missing, reshaped = self.unpaired
        if not missing and not reshaped:
            return None
        causes = [f"{len(names)} {why} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                  for names, why in ((missing, "have no tensor of that name there"),
                                     (reshaped, "have another shape there")) if names]
        return (f"{self.model_id}: --delta: {len(missing) + len(reshaped)} of its {self.weights} "
                f"weight tensors have no delta row against its source model "
                f"{self.source_model}: {'; '.join(causes)}")

    def outputs_by_source(self) -> dict[str | None, list[str]]:
        return self.by_source

    def output(self, name: str, base_value: torch.Tensor | None) -> torch.Tensor:
        own = self.model.checkpoint
        now = self._at.get(self._read_under.get(name), len(self._at))
        for stale in [h for h in self._held if self._until[h] < now]:  # its delta is done
            del self._held[stale]
        value = own.reader.get(name)
        if self._uses.get(name):
            self._held[name] = value
        if own.fetcher is not None and not self.shared:
            for file in own.reader.files_of(name):
                if self._last_use.get(file) == self._index[name]:
                    own.fetcher.release(file)
        return value

    def output_storage(self, name: str) -> str:
        return self.model.checkpoint.reader.storage(name)

    def close(self) -> None:
        self._held.clear()
        own = self.model.checkpoint
        if self.shared:
            return
        own.reader.close()
        if own.fetcher is not None:
            own.fetcher.close()


class FineTuneDelta(_DeltaRows):
    """The delta of a full fine-tune (a ``FineTuneOnSource``): in the same pass, each of its
    tensors minus the source's, the fine-tune's tensor taken from the fine-tune's own read."""

    def __init__(self, fine_tune: FineTuneOnSource, config: ESDConfig):
        self.fine_tune, self.config = fine_tune, config
        self.checkpoint = fine_tune.checkpoint
        self.revision, self.source_model = fine_tune.revision, fine_tune.source_model

    def outputs_by_source(self) -> dict[str | None, list[str]]:
        return self.fine_tune.delta_by_source

    def output(self, name: str, base_value: torch.Tensor) -> LayerDelta:
        pair = self.fine_tune.delta_of[name]
        value = self.fine_tune.value_of(pair.ft)
        return difference(value if pair.ft_part is None else pair.ft_part.of(value),
                          base_value if pair.source_part is None else
                          pair.source_part.of(base_value))

    def output_storage(self, name: str) -> str:
        return self.fine_tune.output_storage(self.fine_tune.delta_of[name].ft)

    def close(self) -> None:
        """The fine-tune's files are closed by the fine-tune, the source's by the pass."""


class AdapterDelta(_DeltaRows):
    """The delta of a LoRA adapter: a model of its base's pass, whose tensors are the
    adapter's ``s·B·A`` factors (read from the adapter file alone), a replacement minus the
    base tensor, or nothing (``ΔW = 0``) where the adapter leaves the base alone."""

    is_adapter = True

    def __init__(self, model, config: ESDConfig):
        if model.plan is None:
            raise UnsupportedFormatError(
                f"{model.model_id}: --delta: this adapter is merged by peft (not a plain "
                f"LoRA), and its delta is not computed; run it without --delta, or list its "
                f"merged model with source_model {model.source_model}")
        self.model, self.config, self.plan = model, config, model.plan
        self.checkpoint = model.checkpoint
        self.revision, self.source_model = model.revision, model.source_model
        if self.plan.resized:  # as a full fine-tune's tensors of another shape: no row
            logger.warning("%s: --delta: %d weight tensor(s) have another shape in the adapter "
                           "than in its base %s (a resized vocabulary), and no delta row: %s",
                           model.model_id, len(self.plan.resized), model.source_model,
                           ", ".join(self.plan.resized))

    def outputs_by_source(self) -> dict[str | None, list[str]]:
        """Every output of the merge that starts from a base tensor, under that tensor (a
        saved head over a tied base: under the tensor the base uses as its head)."""
        out: dict[str | None, list[str]] = {}
        for name in self.plan.names:
            op = self.plan.ops.get(name)
            source = name if op is None else op.base or op.tied_to
            if source is not None and name not in self.plan.resized:
                out.setdefault(source, []).append(name)
        return out

    def output(self, name: str, base_value: torch.Tensor) -> LayerDelta:
        op = self.plan.ops.get(name)
        shape, dtype = tuple(base_value.shape), base_value.dtype
        if op is None or op.bias_of is not None or (op.lora is None and not op.replace):
            return LayerDelta(shape, dtype)
        if op.lora is None:
            return difference(self.plan.adapter.get(op.replace), base_value)
        a = self.plan.adapter.get(op.lora.a)
        b = self.plan.adapter.get(op.lora.b)
        lowrank = LayerDelta(shape, dtype, factors=(a, b, op.scale, op.transpose))
        if not op.replace:
            return lowrank
        # A saved weight with a LoRA on it (peft's save_embedding_layers): the merge adds
        # s·B·A to the saved weight, so ΔW = saved + s·B·A - base.
        saved = self.plan.adapter.get(op.replace).to(torch.float64)
        return difference(saved + _lowrank_dense(lowrank, self.config).to(torch.float64),
                          base_value)

    def output_storage(self, name: str) -> str:
        return self.plan.storage(name)

    def close(self) -> None:
        """The adapter file is closed by the adapter's own model, the base by the pass."""


# ---------------------------------------------------------------------------------------------
# From Python.

def delta_frame(model: torch.nn.Module, base: torch.nn.Module | None = None, *,
                config: ESDConfig | None = None, **options):
    """The delta rows of ``model`` against ``base``, a DataFrame with the columns of
    ``net_esd.net_esd_estimator`` without ``alphahat`` (LAYER_COLUMNS, then custom metrics').

    ``model`` and ``base``: two ``nn.Module``s; each Linear / Conv2d / Embedding / HF Conv1D
    weight of ``model`` with a weight of the same name and shape in ``base`` gives the rows of
    ``model - base``. Or ``model`` a ``peft.PeftModel`` and ``base`` None: its LoRA layers give
    ``s·B·A`` by the low-rank path, every other layer of its base model ``ΔW = 0`` (a weight in
    ``modules_to_save``: the trained copy minus the original). ``config`` (an ``ESDConfig``),
    or its fields as keywords (``fix_fingers="DKS"``, ``filter_zeros=True``, ...).
    """
    import pandas as pd

    config = config if config is not None else ESDConfig(**options)
    rows = []
    with torch.no_grad():
        for name, delta in (_module_deltas(model, base, config) if base is not None
                            else _peft_deltas(model, config)):
            for result in delta_layer_results(name, delta, config):
                result.row["layer_id"] = len(rows)
                rows.append(result.row)
    custom = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in LAYER_COLUMNS]
    return pd.DataFrame(rows, columns=[*LAYER_COLUMNS, *custom])


def _module_deltas(model, base, config: ESDConfig) -> Iterator[tuple[str, LayerDelta]]:
    theirs = {name: weight for name, weight, _ in module_layers(base)}
    for name, weight, _ in module_layers(model):
        other = theirs.get(name)
        if other is not None and tuple(other.shape) == tuple(weight.shape):
            yield name, difference(weight, other)


def _peft_deltas(model, config: ESDConfig) -> Iterator[tuple[str, LayerDelta]]:
    """The layers of a PeftModel's base model (as ``module_layers`` finds them), each with
    the active adapter's delta."""
    if not hasattr(model, "get_base_model") or not hasattr(model, "active_adapter"):
        raise InputError("delta_frame needs a base model, or a peft PeftModel")
    adapter = model.active_adapter
    inner = model.get_base_model()
    for name, weight, _ in module_layers(inner):
        module = name.removesuffix(".weight")
        if any(p in _PEFT_PARTS for p in module.split(".")):
            continue
        owner, _, last = module.rpartition(".")
        if last in ("base_layer", "original_module"):  # a LoRA layer, a modules_to_save one
            yield f"{owner}.weight", _peft_delta(inner.get_submodule(owner), weight, adapter,
                                                 owner, config)
        else:
            yield name, LayerDelta(tuple(weight.shape), weight.dtype)


# Modules of peft's own under a wrapped layer (its factors, its trained copies).
_PEFT_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                         "modules_to_save", "lora_magnitude_vector"})


def _peft_delta(owner, weight: torch.Tensor, adapter: str, name: str,
                config: ESDConfig) -> LayerDelta:
    shape, dtype = tuple(weight.shape), weight.dtype
    saved = getattr(owner, "modules_to_save", None)
    if saved is not None and adapter in saved:
        return difference(saved[adapter].weight, weight)
    if (getattr(owner, "use_dora", None) or {}).get(adapter):
        raise UnsupportedFormatError(f"{name}: a DoRA delta is not s·B·A; pass the merged "
                                     "model and its base to delta_frame")
    scale = float((getattr(owner, "scaling", None) or {}).get(adapter, 1.0))
    lora_a = getattr(owner, "lora_A", None) or {}
    emb_a = getattr(owner, "lora_embedding_A", None) or {}
    if adapter in lora_a:
        a, b = lora_a[adapter].weight, owner.lora_B[adapter].weight
        if a.ndim != 2:
            raise UnsupportedFormatError(f"{name}: a LoRA on a {a.ndim}-D weight; pass the "
                                         "merged model and its base to delta_frame")
        return LayerDelta(shape, dtype, factors=(a, b, scale, bool(owner.fan_in_fan_out)))
    if adapter in emb_a:
        a, b = emb_a[adapter], owner.lora_embedding_B[adapter]
        return LayerDelta(shape, dtype, factors=(a, b, scale, True))
    return LayerDelta(shape, dtype)
