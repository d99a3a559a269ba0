"""The zoo: every weight-bearing module of tiny real models of many architectures gets its
row(s) from the loader and the estimator, in both checkpoint layouts.

The expected rows come from the live model object, not from the project's name rules: every
module owning a parameter (or a parametrization) with two or more dimensions calls for rows.

- ``nn.Linear`` and transformers' ``Conv1D``: one ``linear`` row (``lm_head`` for the model's
  output embeddings), ``nn.Embedding``: one ``embedding`` row, any other module's 2-D
  ``weight`` (MoE routers): one ``linear`` row.
- ``nn.Conv*d`` / ``nn.ConvTranspose*d``, weight-normalised or not: exactly one ``conv`` row
  of the kernel as the module applies it (``g * v / ||v||`` under weight norm), N and M its
  first two dimensions, ``num_evals = M * prod(kernel)`` (metrics.md's pooled convention).
- Fused expert stacks (3-D ``(E, a, b)`` parameters of an experts module, or DBRX's 2-D
  ``(E * a, b)`` stacks): one ``expert`` row per expert, longname ``<parameter>[e]``.

A parameter tied to another counts once, under its first name in ``named_parameters`` order.
Every other parameter of two or more dimensions must be on ``NOT_ANALYSED`` with its reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import pytest
import torch
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from esd_experiment.core.results import STATUSES
from esd_experiment.estimator.net_esd import ESDConfig, iter_layer_results, net_esd_estimator
from esd_experiment.loader.opener import ModelRequest, open_model
from tests.zoo_models import BIN_INDEX, BUILDERS, LAYOUTS, ZooModel, build_zoo

# Tensors of two or more dimensions deliberately given no row, by parameter-name regex.
# (Every 1-D tensor -- biases, norm weights, Mamba's D and dt bias -- gets no row either:
# metrics.md section 1.)
NOT_ANALYSED = {
    r"\.A_log$": "state-space (Mamba) log decay rates of the diagonal state matrix A, "
                 "(d_inner, d_state): parameters of a recurrence, not a map applied to inputs",
    r"\.embeddings\.cls_token$": "ViT's class token (1, 1, hidden): one learned vector",
    r"\.embeddings\.position_embeddings$": "ViT's bare position table (1, patches + 1, hidden), "
                                           "added to the input, not an nn.Embedding module",
    r"\.attention\.emb_rel_[kv]$": "VITS' windowed relative-position tables "
                                   "(1, 2 * window + 1, head_dim), added to attention scores",
    r"flows\.\d+\.(translate|log_scale)$": "VITS' element-wise affine flow: per-channel "
                                             "vectors stored as (channels, 1)",
    r"\.experts\.\w+_bias$": "gpt-oss per-expert bias vectors stacked as (experts, out)",
}

# The same weights from memory and from a file: one eigensolver, so the same numbers up to a
# weight-normed kernel formed once by the module's own torch op and once by the reader.
MODULE_RTOL = 1e-5
NORM_RTOL = 1e-5   # a weight-normed kernel is formed in float32 by torch and maybe otherwise by
#                    the loader; plain float32 weights agree to ~1e-12 (summation order only)
CONV_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
              torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)

# Models whose checkpoints hold tied weights: transformers 4 listed every alias in the .bin
# index and stored the tensor once (the loader once refused these as damaged shards).
TIED = ("gpt2", "falcon", "bert", "t5", "bart", "whisper", "mamba")


def _cases():
    for name in BUILDERS:
        for layout in LAYOUTS:
            yield pytest.param(name, layout, id=f"{name}-{layout}")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, request):
    built = build_zoo(tmp_path_factory.mktemp("zoo"))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # the build time, shown whatever the capture
        print(f"\nzoo: {len(built.models)} models built and saved in {len(LAYOUTS)} layouts "
              f"in {built.seconds:.1f} s")
    return built


# ---------------------------------------------------------------------------------------------
# The oracle.

@dataclass(frozen=True)
class Expected:
    family: str       # conv, linear, embedding, lm_head, expert
    N: int
    M: int
    num_evals: int
    norm: float       # the row's `norm`: sum of eigenvalues (conv slices scaled by conv_norm)


def _weight_norm_names(module: torch.nn.Module, prefix: str) -> list[str] | None:
    """The stored names of a weight-normalised ``weight`` (either API); None if it is not."""
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations.weight
        return [f"{prefix}parametrizations.weight.{n}" for n, _ in plist.named_parameters()]
    if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
        return [f"{prefix}weight_g", f"{prefix}weight_v"]
    return None


def _legacy_weight_norm(module: torch.nn.Module) -> torch.Tensor:
    """``g * v / ||v||`` as the old ``torch.nn.utils.weight_norm`` hook computes it."""
    from torch.nn.utils.weight_norm import WeightNorm

    (hook,) = [h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm)]
    return hook.compute_weight(module)


def _module_weight(zm: ZooModel, name: str, module, head) -> tuple[str, list[str], torch.Tensor]:
    """(family, stored parameter names, weight as applied) of a weight-bearing module, or
    (None, [], None) for any other module."""
    prefix = f"{name}." if name else ""
    names = _weight_norm_names(module, prefix)
    if names is not None:
        weight = module.weight if names[0].endswith("original0") else _legacy_weight_norm(module)
        return ("conv" if isinstance(module, CONV_TYPES) else "linear"), names, weight
    if isinstance(module, CONV_TYPES):
        return "conv", [f"{prefix}weight"], module.weight
    if isinstance(module, torch.nn.Embedding):
        return "embedding", [f"{prefix}weight"], module.weight
    if isinstance(module, (torch.nn.Linear, Conv1D)):
        is_head = module is head or name in zm.heads
        return ("lm_head" if is_head else "linear"), [f"{prefix}weight"], module.weight
    return None, [], None


def _matrix(family: str, w: torch.Tensor, conv_norm: float) -> Expected:
    w = w.detach().double()
    n, m = max(w.shape[:2]), min(w.shape[:2])
    kernel = math.prod(w.shape[2:])
    scale = conv_norm if family == "conv" else 1.0
    return Expected(family, n, m, m * kernel, scale * float(w.square().sum()))


def expected_rows(zm: ZooModel, conv_norm: float) -> tuple[dict[str, Expected], list[str]]:
    """The rows the model's modules call for, by longname, and the names of the parameters of
    two or more dimensions that no rule covers (each must be on ``NOT_ANALYSED``)."""
    model = zm.model
    params = dict(model.named_parameters())  # tied parameters under their first name only
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows: dict[str, Expected] = {}
    covered: set[str] = set()
    for name, module in model.named_modules():
        family, names, weight = _module_weight(zm, name, module, head)
        if family is not None and all(n in params for n in names):
            covered.update(names)
            rows[name] = _matrix(family, weight, conv_norm)
        for pname, p in module.named_parameters(recurse=False, prefix=name):
            if pname in covered or pname not in params or p.ndim < 2:
                continue
            stack = [e for pat, e in zm.expert_stacks.items() if re.search(pat, pname)]
            if stack or (p.ndim == 3 and "Expert" in type(module).__name__):
                experts = p.reshape(stack[0], -1, p.shape[-1]) if stack else p
                rows.update({f"{pname}[{e}]": _matrix("expert", experts[e], conv_norm)
                             for e in range(experts.shape[0])})
            elif pname.endswith(".weight") and p.ndim == 2:  # a router's bare weight
                rows[pname.removesuffix(".weight")] = _matrix("linear", p, conv_norm)
            else:
                continue
            covered.add(pname)
    left = [n for n, p in params.items() if p.ndim >= 2 and n not in covered]
    return rows, left


# ---------------------------------------------------------------------------------------------
# What the loader and the estimator make of each checkpoint.

def loader_rows(path, config: ESDConfig) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    loaded = open_model(ModelRequest(str(path)))
    for result in iter_layer_results(loaded.iter_tensors(), config):
        rows.setdefault(result.row["longname"], []).append(result.row)
    return rows


def _family(layer_type: str) -> str:
    return "conv" if re.fullmatch(r"conv\dd", layer_type) else layer_type


def row_problems(expected: dict[str, Expected], rows: dict[str, list[dict]],
                 config: ESDConfig) -> list[str]:
    """Every difference between the expected rows and the loader's, one line each."""
    problems = [f"missing: {n} ({e.family} {e.N}x{e.M})" for n, e in expected.items()
                if n not in rows]
    extra = [n for n in rows if n not in expected]
    if extra:
        problems.append(f"{len(extra)} unexpected row(s): {', '.join(extra[:8])}"
                        f"{' ...' if len(extra) > 8 else ''}")
    for name in [n for n in expected if n in rows]:
        exp, found = expected[name], rows[name]
        if len(found) != 1:
            problems.append(f"{name}: {len(found)} rows, one expected")
        row = found[0]
        got = (_family(row["layer_type"]), row["N"], row["M"], row["num_evals"])
        want = (exp.family, exp.N, exp.M, exp.num_evals)
        if got != want:
            problems.append(f"{name}: (family, N, M, num_evals) = {got}, expected {want}")
        problems += _status_problems(name, exp, row, config)
    return problems


def _status_problems(name: str, exp: Expected, row: dict, config: ESDConfig) -> list[str]:
    """A row that is not ``ok`` must say why, and an analysed one must hold this weight."""
    status = row["status"]
    want = "too_small" if exp.num_evals < config.min_evals else ("ok", "fit_failed")
    if status not in STATUSES or (status != want if isinstance(want, str)
                                  else status not in want):
        return [f"{name}: status {status!r}, expected {want}"]
    if status != "too_small" and not math.isclose(row["norm"], exp.norm, rel_tol=NORM_RTOL):
        return [f"{name}: norm {row['norm']:.6g}, the module's weight gives {exp.norm:.6g}"]
    return []


# ---------------------------------------------------------------------------------------------
# Tests.

@pytest.mark.parametrize("name", list(BUILDERS))
def test_oracle_accounts_for_every_parameter(zoo, name):
    """Each matrix-shaped parameter is a layer of the oracle or deliberately not analysed."""
    _, left = expected_rows(zoo.models[name], ESDConfig().conv_norm)
    unexplained = [n for n in left if not any(re.search(p, n) for p in NOT_ANALYSED)]
    assert not unexplained, f"{name}: no rule and no NOT_ANALYSED entry for {unexplained}"


def test_not_analysed_entries_are_all_used(zoo):
    """No stale entry: every NOT_ANALYSED pattern names a parameter of some zoo model."""
    left = [n for zm in zoo.models.values()
            for n in expected_rows(zm, ESDConfig().conv_norm)[1]]
    unused = [p for p in NOT_ANALYSED if not any(re.search(p, n) for n in left)]
    assert not unused


@pytest.mark.parametrize("name", TIED)
def test_bin_layout_is_transformers_4s(zoo, name):
    """The .bin fixture holds what transformers 4 wrote: >= 2 shards, an index listing every
    state_dict key, tied keys in one shard sharing one storage; transformers reads it back."""
    path, model = zoo.paths[name, "bin"], zoo.models[name].model
    weight_map = json.loads((path / BIN_INDEX).read_text())["weight_map"]
    state = model.state_dict()
    assert set(weight_map) == set(state) and len(set(weight_map.values())) >= 2
    shared = [k for k in state if state[k].data_ptr() == model.get_input_embeddings().weight
              .data_ptr()]
    assert len(shared) >= 2 and len({weight_map[k] for k in shared}) == 1
    shard = torch.load(path / weight_map[shared[0]], weights_only=True, mmap=True)
    assert len({shard[k].untyped_storage().data_ptr() for k in shared}) == 1
    reread = type(model).from_pretrained(path).state_dict()
    assert all(torch.equal(reread[k], v) for k, v in state.items())


@pytest.mark.parametrize("name, layout", list(_cases()))
def test_every_weight_has_its_rows(zoo, name, layout):
    config = ESDConfig()
    expected, _ = expected_rows(zoo.models[name], config.conv_norm)
    rows = loader_rows(zoo.paths[name, layout], config)  # a refusal raises, naming the cause
    problems = row_problems(expected, rows, config)
    assert not problems, f"{name} ({layout}):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_module_door_labels_as_the_checkpoint_door(zoo, name):
    """net_esd_estimator(model) and the model's checkpoint give a layer the same layer_type."""
    modules = net_esd_estimator(zoo.models[name].model)
    by_module = dict(zip(modules["longname"], modules["layer_type"], strict=True))
    rows = loader_rows(zoo.paths[name, "safetensors"], ESDConfig())
    differ = {n: (t, rows[n][0]["layer_type"]) for n, t in by_module.items()
              if n in rows and rows[n][0]["layer_type"] != t}
    assert not differ, f"{name}: (module, checkpoint) layer_type: {differ}"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_analyze_of_the_module_gives_the_rows_of_its_checkpoint(zoo, name, tmp_path):
    """analyze(model) and analyze(its save_pretrained directory): the same rows in the same
    order with the same numbers (weight-normalised layers, DBRX's 2-D expert stacks and
    transformers 5's renamed or fused weights read from the module as it saves them)."""
    from esd_experiment import analyze

    model = zoo.models[name].model
    model.save_pretrained(tmp_path)
    module = analyze(model, device="cpu")
    saved = analyze(str(tmp_path), device="cpu")
    assert list(module["longname"]) == list(saved["longname"])
    torch.testing.assert_close(torch.tensor(module["spectral_norm"].astype(float).to_numpy()),
                               torch.tensor(saved["spectral_norm"].astype(float).to_numpy()),
                               rtol=MODULE_RTOL, atol=0, equal_nan=True)


@pytest.mark.parametrize("name, targets", [("dbrx", ["Wqkv", "out_proj"]),
                                           ("hubert", ["q_proj", "v_proj"])])
def test_analyze_of_a_peft_model_gives_the_rows_of_its_merged_model(name, targets):
    """A PeftModel's base is read as its checkpoint is (DBRX's 2-D expert stacks one row per
    expert, HuBERT's weight-normalised positional convolution as its weight): the rows of
    peft's merge_and_unload() of it."""
    from peft import LoraConfig, get_peft_model

    from esd_experiment import analyze
    from tests.zoo_models import build

    torch.manual_seed(1)  # a model of its own: the merge changes it in place
    peft_model = get_peft_model(build(name).model,
                                LoraConfig(init_lora_weights=False, r=4, target_modules=targets))
    ours = analyze(peft_model, device="cpu")
    merged = analyze(peft_model.merge_and_unload(), device="cpu")
    assert list(ours["longname"]) == list(merged["longname"])
    torch.testing.assert_close(torch.tensor(ours["spectral_norm"].astype(float).to_numpy()),
                               torch.tensor(merged["spectral_norm"].astype(float).to_numpy()),
                               rtol=MODULE_RTOL, atol=0, equal_nan=True)
