"""Checkpoints as published on the hub (tests/zoo_published.py): every tensor accounted for,
each expert one row, rows in depth order, block numbers only inside the repeated blocks, and
each row's lambda_max that of the matrix as written, by numpy's SVD."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from esd_experiment.core.layer_order import in_depth_order
from esd_experiment.estimator.options import ESDConfig
from tests.test_zoo import loader_rows
from tests.zoo_published import LAYOUTS, ROW_KINDS, SKIPPED, E, Published, build

# Eigenvalues from the float64 Gram matrix against a float64 SVD of the same float32 weights:
# the contract's accuracy (metrics.md section 2) is 1e-9 relative.
LAMBDA_RTOL = 1e-9
ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
MLP = re.compile(r"mlp|ffn|feed_forward|densereludense|moe|experts|fc1", re.IGNORECASE)


def _longname(name: str) -> str:
    return name.removesuffix(".weight")


def expected_rows(model: Published, conv_norm: float) -> dict[str, tuple[str, float]]:
    """longname -> (layer_type, lambda_max) of every row the tensors call for."""
    out = {}
    for t in model.tensors:
        if t.kind not in ROW_KINDS:
            assert t.kind in SKIPPED, t
            continue
        w = model.values[t.name].double().numpy()
        if t.kind in ("stack3d", "stack2d"):
            stack = w.reshape(E, -1, w.shape[-1])
            for e in range(E):
                out[f"{_longname(t.name)}[{e}]"] = ("expert", _lambda_max(stack[e]))
        elif t.kind == "conv":
            kernel = w.reshape(w.shape[0], w.shape[1], -1)
            top = max(_lambda_max(kernel[:, :, k]) for k in range(kernel.shape[2]))
            out[_longname(t.name)] = (f"conv{w.ndim - 2}d", conv_norm * top)
        else:
            out[_longname(t.name)] = (t.kind, _lambda_max(w))
    return out


def _lambda_max(w: np.ndarray) -> float:
    return float(np.linalg.svd(w, compute_uv=False)[0] ** 2)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {name: build(name, root) for name in LAYOUTS}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_published_layout_rows(published, name):
    model, path = published[name]
    config = ESDConfig()
    expected = expected_rows(model, config.conv_norm)
    found = loader_rows(path, config)  # a refusal raises, naming the cause
    problems = [f"missing: {n}" for n in expected if n not in found]
    problems += [f"unexpected row: {n}" for n in found if n not in expected]
    for n, (layer_type, top) in expected.items():
        rows = found.get(n, [])
        if len(rows) > 1:
            problems.append(f"{n}: {len(rows)} rows")
        if not rows:
            continue
        row = rows[0]
        if row["layer_type"] != layer_type:
            problems.append(f"{n}: layer_type {row['layer_type']}, expected {layer_type}")
        if row["status"] in ("ok", "fit_failed") and not math.isclose(
                row["spectral_norm"], top, rel_tol=LAMBDA_RTOL):
            problems.append(f"{n}: lambda_max {row['spectral_norm']!r}, SVD gives {top!r}")
        elif row["status"] == "too_small" and row["num_evals"] >= config.min_evals:
            problems.append(f"{n}: too_small with {row['num_evals']} eigenvalues")
    assert not problems, f"{name}: {len(problems)} problem(s)\n  " + "\n  ".join(problems[:12])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_published_layout_depth_and_blocks(published, name):
    """Rows in depth order: within each stack blocks ascend, attention before the MLP in a
    block, the head last; only the repeated blocks carry a block number."""
    model, path = published[name]
    rows = [r for rs in loader_rows(path, ESDConfig()).values() for r in rs]
    rows = in_depth_order(rows, model.config)
    names = [r["longname"] for r in rows]
    problems = []
    for r in rows:
        stack = next((s for s in model.stacks if r["longname"].startswith(f"{s}.")), None)
        want = None if stack is None else int(r["longname"][len(stack) + 1:].split(".")[0])
        if r["block"] != want:
            problems.append(f"{r['longname']}: block {r['block']}, expected {want}")
        if "stack" in r and r["stack"] != (stack or ""):
            problems.append(f"{r['longname']}: stack {r['stack']!r}, expected {stack!r}")
    for stack in model.stacks:
        mine = [r for r in rows if r["longname"].startswith(f"{stack}.")]
        blocks = [r["block"] for r in mine]
        if blocks != sorted(blocks):
            problems.append(f"{stack}: blocks out of order {blocks}")
        for b in set(blocks):
            inside = [r["longname"].split(f"{stack}.{b}.", 1)[1] for r in mine
                      if r["block"] == b]
            attn = [i for i, n in enumerate(inside) if ATTENTION.search(n) and not MLP.search(n)]
            mlp = [i for i, n in enumerate(inside) if MLP.search(n)]
            first, then = (mlp, attn) if model.mlp_first else (attn, mlp)
            if first and then and max(first) > min(then):
                problems.append(f"{stack}.{b}: {'attention' if model.mlp_first else 'MLP'} "
                                f"before the {'MLP' if model.mlp_first else 'attention'}: {inside}")
    heads = [n for n, t in ((r["longname"], r["layer_type"]) for r in rows) if t == "lm_head"]
    if heads and names[-1] != heads[-1]:
        problems.append(f"head {heads} not last: {names[-3:]}")
    assert not problems, f"{name}: {len(problems)} problem(s)\n  " + "\n  ".join(problems[:12])
