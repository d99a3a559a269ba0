"""Pairing a fine-tune's tensors with its source's across the two expert layouts of one
mixture-of-experts architecture, for the delta view (run/delta.py).

A published checkpoint stores each expert as its own matrices (Mixtral's
``block_sparse_moe.experts.3.w1.weight``, Qwen-MoE's ``mlp.experts.3.gate_proj.weight``);
transformers' modules hold them fused, one 3-D stack per projection
(``mlp.experts.gate_up_proj[e] = [w1; w3]``, ``mlp.experts.down_proj[e] = w2``), and a
fine-tune saved from the module's ``state_dict`` keeps that layout. Which names fuse into
which, and how, is transformers' own conversion mapping of the architecture
(``get_checkpoint_conversion_mapping(model_type)``: renamings, and converters that stack the
experts (``MergeModulelist(dim=0)``) and concatenate the parts (``Concatenate(dim=1)``)). With
it, each per-expert matrix is paired with its rows of the fused stack: ``ΔW`` is per-expert,
named as the per-expert checkpoint names it. A GGUF's expert matrices (llama.cpp's
``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``, one matrix at a time) pair with the
per-expert ones (``gate_up_proj``'s parts in their converter's order, and ``down_proj``),
or with their parts of the fused stacks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """Rows ``[index·rows/parts, (index+1)·rows/parts)`` of expert ``expert`` of a 3-D stack."""

    expert: int
    index: int
    parts: int

    def of(self, stack):
        rows = stack.shape[1] // self.parts
        return stack[self.expert, self.index * rows:(self.index + 1) * rows]


@dataclass(frozen=True)
class LayoutPair:
    """One delta row across layouts: ``name`` (the per-expert name), the fine-tune tensor
    ``ft`` (``ft_part`` of it, when it is the stack) minus the source tensor ``source``
    (``source_part`` of it); a renamed tensor (a router) has neither part."""

    name: str
    ft: str
    source: str
    ft_part: Part | None = None
    source_part: Part | None = None


@dataclass(frozen=True)
class _Canonical:
    fused: str              # the name in transformers' module layout
    part: Part | None       # a per-expert matrix's place in its stack


def _conversions(model_types: Iterable[str]) -> tuple[list, list] | None:
    """(renamings ``[(old, new)]``, converters ``[(compiled sources, target)]``) of the
    first model type transformers has a conversion mapping of; None without one."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a transformers without conversion mappings: names match or not
        return None
    for model_type in model_types:
        try:
            mapping = get_checkpoint_conversion_mapping(model_type) or []
        except Exception as exc:  # noqa: BLE001  (a mapping that cannot be built pairs nothing)
            logger.debug("no conversion mapping of %s: %s", model_type, exc)
            continue
        renames, converters = [], []
        for conv in mapping:
            kind = type(conv).__name__
            ops = [repr(op) for op in getattr(conv, "operations", None) or ()]
            sources, targets = list(conv.source_patterns), list(conv.target_patterns)
            if kind == "WeightRenaming" and len(sources) == len(targets) == 1:
                renames.append((sources[0], targets[0]))
            elif (kind == "WeightConverter" and len(targets) == 1
                  and all(s.count("*") == 1 for s in sources)
                  and ops == ["MergeModulelist(dim=0)"] + (
                      ["Concatenate(dim=1)"] if len(sources) > 1 else [])):
                converters.append(([re.compile(re.escape(s).replace(r"\*", r"(\d+)") + "$")
                                    for s in sources], targets[0]))
        if renames or converters:
            return renames, converters
    return None


def _canonical(name: str, renames: list, converters: list) -> _Canonical:
    for old, new in renames:
        name = name.replace(old, new)
    for sources, target in converters:
        for index, pattern in enumerate(sources):
            match = pattern.search(name)
            if match is not None:
                return _Canonical(name[:match.start()] + target,
                                  Part(int(match[1]), index, len(sources)))
    return _Canonical(name, None)


def layout_pairs(ft_names: Iterable[str], ft_shape: Callable, source_names: Iterable[str],
                 source_shape: Callable, model_types: Iterable[str]) -> list[LayoutPair]:
    """The pairs across the two layouts among ``ft_names`` and ``source_names`` (the tensors
    not matched by name), their shapes checked: a per-expert matrix against its rows of the
    other's stack, a renamed tensor against its new name."""
    ft_names, source_names = list(ft_names), list(source_names)
    if not ft_names or not source_names:
        return []
    found = _conversions(t for t in model_types if t)
    if found is None:
        return []
    renames, converters = found
    sources: dict[tuple, str] = {}
    stacks: dict[str, list[tuple[Part, str]]] = {}  # the stacks held per expert there
    for name in source_names:
        canon = _canonical(name, renames, converters)
        sources[(canon.fused, canon.part)] = name
        if canon.part is not None:
            stacks.setdefault(canon.fused, []).append((canon.part, name))
    out = []
    for name in ft_names:
        canon = _canonical(name, renames, converters)
        whole = sources.get((canon.fused, None))
        if canon.part is not None:  # a per-expert matrix here, the source's stack
            if whole is not None and _fits(source_shape(whole), ft_shape(name), canon.part):
                out.append(LayoutPair(name, name, whole, source_part=canon.part))
        elif canon.fused in stacks:  # a stack here, the source's per-expert matrices
            out += [LayoutPair(source, name, source, ft_part=part)
                    for part, source in stacks[canon.fused]
                    if _fits(ft_shape(name), source_shape(source), part)]
        elif whole is not None and whole != name and \
                tuple(ft_shape(name)) == tuple(source_shape(whole)):  # renamed (a router)
            out.append(LayoutPair(name, name, whole))
    # A GGUF's expert matrices (ffn_up_exps[e]) against per-expert ones, one to one.
    paired = {p.ft for p in out}
    used = {p.source for p in out}
    experts = {key: name for name in source_names if name not in used
               and (key := _expert_key(name, renames, converters)) is not None}
    for name in ft_names:
        key = None if name in paired else _expert_key(name, renames, converters)
        source = experts.get(key) if key is not None else None
        if source is not None and tuple(ft_shape(name)) == tuple(source_shape(source)):
            out.append(LayoutPair(name, name, source))
    # A GGUF's expert matrices against the other's fused stacks: each with its part of them,
    # named as the GGUF names it.
    paired, used = {p.ft for p in out}, {p.source for p in out}
    source_stacks = _stack_parts([n for n in source_names if n not in used], source_shape,
                                 renames, converters)
    ft_stacks = _stack_parts([n for n in ft_names if n not in paired], ft_shape, renames,
                             converters)
    for name, key in _gguf_experts(n for n in ft_names if n not in paired):
        stack, part = source_stacks.get(key, (None, None))
        if stack is not None and _fits(source_shape(stack), ft_shape(name), part):
            out.append(LayoutPair(name, name, stack, source_part=part))
    for source, key in _gguf_experts(n for n in source_names if n not in used):
        stack, part = ft_stacks.get(key, (None, None))
        if stack is not None and _fits(ft_shape(stack), source_shape(source), part):
            out.append(LayoutPair(source, stack, source, ft_part=part))
    return out


def _gguf_experts(names: Iterable[str]) -> Iterable[tuple[str, tuple[str, str, int]]]:
    """``(name, (block, gate / up / down, expert))`` of each GGUF expert matrix of ``names``."""
    for name in names:
        match = _GGUF_EXPERT.match(name)
        if match is not None:
            yield name, (match["block"], match["which"], int(match["expert"]))


def _stack_parts(names: Iterable[str], shape: Callable, renames: list,
                 converters: list) -> dict[tuple[str, str, int], tuple[str, Part]]:
    """``(block, gate / up / down, expert) -> (stack, its Part)`` of every expert of the fused
    stacks among ``names`` (transformers' ``gate_up_proj`` = [gate; up], ``down_proj``)."""
    out = {}
    for name in names:
        canon, block, dims = _canonical(name, renames, converters), _BLOCK.match(name), shape(name)
        which = (("gate", "up") if canon.fused.endswith("gate_up_proj") else
                 ("down",) if canon.fused.endswith("down_proj") else ())
        if canon.part is not None or block is None or len(dims) != 3 or not which:
            continue
        for expert in range(dims[0]):
            for index, kind in enumerate(which):
                out[(block[1], kind, expert)] = (name, Part(expert, index, len(which)))
    return out


# llama.cpp's expert matrices, read one at a time (gguf_file.py): under the block's name.
_GGUF_EXPERT = re.compile(r"^(?P<block>.+\.layers\.\d+)\.ffn_(?P<which>gate|up|down)_exps"
                          r"(?:\.weight)?\[(?P<expert>\d+)\]$")
_BLOCK = re.compile(r"^(.+?\.layers\.\d+)\.")


def _expert_key(name: str, renames: list, converters: list) -> tuple[str, str, int] | None:
    """(block, gate / up / down, expert) of a GGUF's or a per-expert checkpoint's expert
    matrix (the parts of transformers' ``gate_up_proj`` in its converter's order)."""
    match = _GGUF_EXPERT.match(name)
    if match is not None:
        return match["block"], match["which"], int(match["expert"])
    canon, block = _canonical(name, renames, converters), _BLOCK.match(name)
    if canon.part is None or block is None:
        return None
    if canon.fused.endswith("gate_up_proj") and canon.part.parts == 2:
        return block[1], ("gate", "up")[canon.part.index], canon.part.expert
    if canon.fused.endswith("down_proj") and canon.part.parts == 1:
        return block[1], "down", canon.part.expert
    return None


def _fits(stack: tuple, matrix: tuple, part: Part) -> bool:
    """Whether ``matrix`` is the shape of ``part`` of a 3-D ``stack``."""
    stack, matrix = tuple(stack), tuple(matrix)
    return (len(stack) == 3 and len(matrix) == 2 and part.expert < stack[0]
            and stack[1] == part.parts * matrix[0] and stack[2] == matrix[1])
