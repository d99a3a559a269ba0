"""The report's figures: each function takes a DataFrame (and, for ESDs, eigenvalues) and
returns a matplotlib Figure; ``to_png`` renders one. No file is read or written here.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no display needed).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from esd_experiment.core.results import OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA, fitted_layers

DPI = 90
WIDE = (7.5, 2.6)         # inches: one model's layers by depth
PLOT_BOX = (0.08, 0.2, 0.7, 0.68)  # axes of a WIDE figure, leaving room for the legend
SQUARE = (5.0, 3.0)
TYPE_COLORS = {"embedding": "#1b9e77", "linear": "#7570b3", "lm_head": "#d95f02",
               "conv2d": "#e7298a", "expert": "#66a61e"}
OTHER_COLOR = "#666666"
BAND_COLOR = "#f2e6e6"    # the over-trained (< 2) and under-trained (> 6) regions
ALPHA_CLIP = (1.0, 10.0)  # alpha axis limits: a few wild fits must not flatten the rest
HIST_MIN_PAD = 0.05       # alpha units beside the extreme alpha_mean values
DEPTH_BINS = 40           # columns of the depth map (relative depth 0..1)
MAX_LABELLED_ROWS = 60    # depth-map rows get model names up to this many models


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _bands(ax) -> None:
    """Shade alpha < 2 and alpha > 6 (WeightWatcher's over- and under-trained ranges)."""
    ax.axhspan(ALPHA_CLIP[0], OVER_TRAINED_ALPHA, color=BAND_COLOR, zorder=0)
    ax.axhspan(UNDER_TRAINED_ALPHA, ALPHA_CLIP[1], color=BAND_COLOR, zorder=0)
    for y in (OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA):
        ax.axhline(y, color="#b07070", linewidth=0.8, linestyle="--", zorder=1)


def _alpha_axis(ax, values: pd.Series) -> None:
    finite = values[np.isfinite(values)]
    top = max(UNDER_TRAINED_ALPHA + 1, min(ALPHA_CLIP[1], float(finite.max()) + 0.5)) \
        if len(finite) else ALPHA_CLIP[1]
    ax.set_ylim(ALPHA_CLIP[0], top)
    ax.set_ylabel("alpha")


def alpha_by_depth(layers: pd.DataFrame, title: str) -> Figure:
    """One model's fitted alphas against ``layer_id`` (depth order), coloured by layer_type,
    with the < 2 and > 6 bands. Values outside the axis are drawn at its edge as triangles."""
    fig = Figure(figsize=WIDE)
    ax = fig.add_axes(PLOT_BOX)
    ok = fitted_layers(layers)
    _bands(ax)
    _alpha_axis(ax, ok["alpha"])
    low, high = ax.get_ylim()
    for layer_type, group in ok.groupby("layer_type", sort=True):
        color = TYPE_COLORS.get(layer_type, OTHER_COLOR)
        inside = group[(group["alpha"] >= low) & (group["alpha"] <= high)]
        ax.plot(inside["layer_id"], inside["alpha"], "o", markersize=3.5, color=color,
                label=_literal(f"{layer_type} ({len(group)})"))
        above = group[group["alpha"] > high]
        ax.plot(above["layer_id"], np.full(len(above), high), "^", color=color, markersize=5,
                clip_on=False)
    last = float(layers["layer_id"].max())
    pad = max(0.5, 0.015 * last)  # keep the first and last layers' markers whole
    ax.set_xlim(-pad, last + pad)
    ax.set_xlabel("layer (depth order)")
    ax.set_title(_literal(title), fontsize=9, loc="left")
    if len(ok):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    else:
        ax.text(0.5, 0.5, "no fitted layer", transform=ax.transAxes, ha="center")
    return fig


def alpha_mean_distribution(summary: pd.DataFrame) -> Figure:
    """Histogram of the models' mean alpha, with the 2 and 6 thresholds."""
    fig = Figure(figsize=SQUARE)
    ax = fig.add_axes((0.14, 0.17, 0.82, 0.72))
    values = summary["alpha_mean"].dropna()
    ax.axvspan(min(ALPHA_CLIP[0], values.min() if len(values) else 1), OVER_TRAINED_ALPHA,
               color=BAND_COLOR, zorder=0)
    ax.axvspan(UNDER_TRAINED_ALPHA, max(UNDER_TRAINED_ALPHA + 1,
                                        values.max() if len(values) else 7),
               color=BAND_COLOR, zorder=0)
    if len(values):
        low, high = float(values.min()), float(values.max())
        pad = max(HIST_MIN_PAD, 0.02 * (high - low))
        bins = int(np.clip(3 * math.sqrt(len(values)), 5, 40))
        ax.hist(values, bins=np.linspace(low - pad, high + pad, bins + 1), color="#7570b3",
                edgecolor="white")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("mean alpha over fitted layers")
    ax.set_ylabel("models")
    ax.set_title(f"alpha_mean of {len(values)} models", fontsize=9, loc="left")
    return fig


def depth_map(layers: pd.DataFrame, model_ids: list[str]) -> Figure:
    """Every model's alpha profile in one image: a row per model, columns the relative depth
    (layer_id / last layer_id) in DEPTH_BINS bins, colour the mean fitted alpha."""
    ok = fitted_layers(layers)
    row_of = {m: i for i, m in enumerate(model_ids)}
    last = layers.groupby("model_id")["layer_id"].max().astype(float)
    bins = int(min(DEPTH_BINS, max(1.0, last.max() + 1))) if len(last) else 1
    grid = np.full((len(model_ids), bins), np.nan)
    if len(ok):
        depth = ok["layer_id"].astype(float) / ok["model_id"].map(last.clip(lower=1.0))
        cells = pd.DataFrame({
            "row": ok["model_id"].map(row_of),
            "col": np.minimum((depth * bins).astype(int), bins - 1),
            "alpha": ok["alpha"]}).groupby(["row", "col"])["alpha"].mean()
        grid[cells.index.get_level_values(0), cells.index.get_level_values(1)] = cells.values
    height = min(12.0, 1.2 + 0.16 * len(model_ids))
    fig = Figure(figsize=(7.5, height))
    labelled = len(model_ids) <= MAX_LABELLED_ROWS
    ax = fig.add_axes((0.3 if labelled else 0.06, 0.6 / height + 0.02, 0.55 if labelled else 0.79,
                       1 - 1.1 / height))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=ALPHA_CLIP[0],
                      vmax=UNDER_TRAINED_ALPHA + 2, interpolation="nearest",
                      extent=(0, 1, len(model_ids) - 0.5, -0.5))
    if labelled:
        ax.set_yticks(range(len(model_ids)), [_short(m) for m in model_ids], fontsize=7)
    else:
        ax.set_ylabel(f"{len(model_ids)} models (summary order)")
    ax.set_xlabel("relative depth (0 = first layer, 1 = last)")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="mean alpha")
    return fig


def against_base(pair: pd.DataFrame, title: str) -> Figure:
    """A fine-tune's alpha and its base's, layer by layer in the base's depth order.

    ``pair`` has columns ``layer_id`` (the base's), ``alpha`` and ``alpha_base``.
    """
    fig = Figure(figsize=WIDE)
    ax = fig.add_axes(PLOT_BOX)
    _bands(ax)
    _alpha_axis(ax, pd.concat([pair["alpha"], pair["alpha_base"]]))
    ax.plot(pair["layer_id"], pair["alpha_base"], "o-", color="#999999", markersize=3,
            linewidth=0.8, label="base")
    ax.plot(pair["layer_id"], pair["alpha"], "o-", color="#d95f02", markersize=3,
            linewidth=0.8, label="fine-tune")
    changed = pair[(pair["alpha"] - pair["alpha_base"]).abs() > 0]
    ax.set_xlabel(f"layer of the base (depth order); {len(changed)} of {len(pair)} changed")
    ax.set_title(_literal(title), fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def esd_figure(rows: pd.DataFrame, evals: Mapping[str, np.ndarray],
               fit_floor: float = 0.0) -> Figure:
    """Log-log ESDs of some layers of one model, each with its fitted power law from xmin.

    ``rows``: the layers' result rows; ``evals[longname]``: their eigenvalues; ``fit_floor``:
    the fit set's lower bound (``evals_thresh`` under filter_zeros, else 0).
    """
    fig = Figure(figsize=(3.4 * max(1, len(rows)), 2.8))
    axes = fig.subplots(1, max(1, len(rows)), squeeze=False)[0]
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.18, top=0.84, wspace=0.35)
    for ax, (_, row) in zip(axes, rows.iterrows(), strict=False):
        x = np.asarray(evals[row["longname"]], dtype=np.float64)
        x = np.sort(x[x > fit_floor])
        edges = np.logspace(math.log10(x[0]), math.log10(x[-1]), 40) if x[0] < x[-1] \
            else np.array([x[0] / 1.1, x[0] * 1.1])
        counts, _ = np.histogram(x, bins=edges)
        density = counts / (len(x) * np.diff(edges))
        ax.stairs(density, edges, color="#7570b3", fill=True, alpha=0.5, label="ESD")
        alpha, xmin, tail = row["alpha"], row["xmin"], row["num_pl_spikes"]
        if np.isfinite(alpha) and np.isfinite(xmin) and xmin > 0:
            # Tail share times the normalised Pareto density (alpha-1)/xmin (x/xmin)^-alpha.
            xs = np.logspace(math.log10(xmin), math.log10(x[-1]), 50)
            ax.plot(xs, int(tail) / len(x) * (alpha - 1) / xmin * (xs / xmin) ** -alpha,
                    color="#d95f02", linewidth=1.5, label=f"fit alpha={alpha:.2f}")
            ax.axvline(xmin, color="#d95f02", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # minor log ticks cost most of the drawing time
            axis.set_major_locator(LogLocator(numticks=5))
            axis.set_minor_locator(NullLocator())
        ax.set_xlabel("eigenvalue")
        ax.set_title(_short(row["longname"], 40), fontsize=8)
        ax.legend(fontsize=6, loc="lower left", frameon=False)
    axes[0].set_ylabel("density")
    return fig


def _short(text: str, limit: int = 36) -> str:
    return _literal(text if len(text) <= limit else "…" + text[-(limit - 1):])


def _literal(text: str) -> str:
    """Names drawn as written: matplotlib reads text between two ``$`` as math (and fails on
    ``$^$``), so every ``$`` is escaped."""
    return str(text).replace("$", r"\$")
