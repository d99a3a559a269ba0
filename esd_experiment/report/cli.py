"""Look at a results directory: an offline HTML report, or a refit from saved eigenvalues.

Usage: python esd_report.py report RESULTS_DIR [--out DIR] [--max_figures 40]
       python esd_report.py refit RESULTS_DIR --output_dir NEW --fix_fingers DKS
           [--xmin_pos N] [--bins N] [--filter_zeros | --no-filter_zeros] [--evals_thresh X]
           [--metric FILE.py:FUNCTION] [--mp_fit]

``report`` reads every result CSV of RESULTS_DIR (``results.read_results``), its
``.eigs.npz`` files, ``failed_models.txt`` and ``logs/``, and writes into --out (default
RESULTS_DIR/report): ``summary.csv`` (one row per model, results.SUMMARY_COLUMNS) and
``index.html``, one self-contained page (figures embedded, no network) that links to the CSVs
and logs. Files that are not complete results are named in the report and skipped.

``refit`` refits every model that has saved eigenvalues with new fit options and writes, into
NEW, what a run with those options and --save_eigs would have written: result CSVs, eigenvalue
files, ``.esd_options.json`` and one log per model. No model is loaded.

Exit code: 0 success; 1 refit: some model could not be refit (each is listed); 2 bad input
(no results in RESULTS_DIR, NEW equal to RESULTS_DIR, options that conflict with NEW's).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from esd_experiment.core.delta_paths import DELTA_DIR, DELTA_KEY
from esd_experiment.core.errors import ESDError, InputError
from esd_experiment.core.paths import FAILED_MODELS_FILE, ModelPaths, within
from esd_experiment.core.results import (
    EIGS_OPTIONS_KEY,
    NOT_A_RESULT,
    LoadedResults,
    fitted_layers,
    is_current,
    parse_options_key,
    read_results,
    result_files,
    source_in,
    split_options_key,
    summarize,
)
from esd_experiment.estimator.options import FIX_FINGERS, ESDConfig, metrics_of
from esd_experiment.estimator.randomize import RANDOMIZE_NAME

if TYPE_CHECKING:  # pandas comes with results.read_results
    import pandas as pd

logger = logging.getLogger("esd_report")

EXIT_OK = 0
EXIT_SOME_SKIPPED = 1
EXIT_BAD_INPUT = 2
MAX_FIGURES = 40          # models (and fine-tune pairs) drawn in full; the rest get numbers only
REFIT_OPTIONS = ("fix_fingers", "xmin_pos", "bins", "filter_zeros", "evals_thresh")
DELTA_LABEL = "the delta of "  # a refit delta's name in messages: "the delta of org/name"


# ---------------------------------------------------------------------------------------------
# Compute: DataFrames and file paths, nothing drawn.

@dataclass(frozen=True)
class EsdSelection:
    """The layers of one model whose ESD is drawn, with their eigenvalues, or why none is."""

    rows: pd.DataFrame | None = None      # result rows of the lowest- and highest-alpha layer
    evals: dict = field(default_factory=dict)  # longname -> eigenvalues
    note: str = ""                        # why there is no ESD figure
    fit_floor: float = 0.0                # the fit set's lower bound (filter_zeros)


@dataclass(frozen=True)
class ModelView:
    """What the report shows of one model."""

    model_id: str
    anchor: str                     # HTML id of its section
    csv: Path
    log: Path | None
    layers: pd.DataFrame            # its rows, in depth (layer_id) order
    drawn: bool                     # within --max_figures
    esd: EsdSelection = EsdSelection()


@dataclass(frozen=True)
class ReportData:
    results_dir: Path
    out_dir: Path
    summary: pd.DataFrame           # SUMMARY_COLUMNS
    layers: pd.DataFrame            # RESULT_COLUMNS
    models: list[ModelView]
    pairs: list[tuple[str, str, pd.DataFrame]]  # (model, base, pair_table), the drawn ones
    pairs_total: int
    failed: list[tuple[str, str, Path | None]]  # (model_id, cause, log)
    skipped: dict[Path, str]
    max_figures: int
    unpaired: list[tuple[str, str]] = field(default_factory=list)  # (model, base): other options


def compute_report(results_dir: Path, out_dir: Path, log_dir: Path,
                   max_figures: int = MAX_FIGURES) -> ReportData:
    """Everything the report shows, read and computed; raises InputError for bad input."""
    loaded = read_results(results_dir)
    layers = loaded.layers
    summary = summarize(layers)
    by_model = dict(tuple(layers.groupby("model_id", sort=False)))
    models = []
    for i, model_id in enumerate(summary["model_id"]):
        csv = loaded.files[model_id]
        log = log_dir / f"{csv.stem}.log"
        drawn = i < max_figures
        models.append(ModelView(
            model_id, f"model-{i}", csv, log if log.is_file() else None, by_model[model_id],
            drawn, esd_selection(csv, by_model[model_id]) if drawn else EsdSelection()))
    pairs, unpaired = fine_tune_pairs(summary)
    drawn_pairs = [(m, b, pair_table(by_model[m], by_model[b])) for m, b in pairs[:max_figures]]
    return ReportData(results_dir, out_dir, summary, layers, models, drawn_pairs, len(pairs),
                      read_failed(results_dir, log_dir), loaded.skipped, max_figures, unpaired)


def fine_tune_pairs(summary: pd.DataFrame) -> tuple[list[tuple[str, str]],
                                                    list[tuple[str, str]]]:
    """``(model, base)`` for every model whose source_model is among the results: those
    computed with the same estimator options (compared), and those with other options (never
    compared: their alphas come from different fits)."""
    source = source_in(summary["model_id"])
    options = dict(zip(summary["model_id"], summary["esd_options"], strict=True))
    pairs, unpaired = [], []
    for model, written in zip(summary["model_id"], summary["source_model"], strict=True):
        base = source(written)
        if base and base != model:
            (pairs if options[base] == options[model] else unpaired).append((model, base))
    return pairs, unpaired


def pair_table(model: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """A fine-tune's fitted alpha beside its base's, per layer the two share (base order)."""
    ok_model = fitted_layers(model)[["longname", "alpha"]]
    ok_base = fitted_layers(base)[["longname", "layer_id", "alpha"]]
    return (ok_base.rename(columns={"alpha": "alpha_base"}).merge(ok_model, on="longname")
            .sort_values("layer_id"))


def esd_selection(csv: Path, layers: pd.DataFrame) -> EsdSelection:
    """The eigenvalues of the model's most extreme fitted layers (lowest and highest alpha),
    from the ``.eigs.npz`` beside its CSV."""
    import numpy as np

    eigs = csv.with_name(f"{csv.stem}.eigs.npz")
    ok = fitted_layers(layers)
    if not eigs.is_file():
        return EsdSelection(note="no eigenvalues saved (run with --save_eigs to see ESD plots)")
    if not within(eigs, csv.parent):
        return EsdSelection(note=f"{eigs.name} links outside the results directory: not read")
    if ok.empty:
        return EsdSelection(note="no fitted layer")
    options = layers["esd_options"].iat[0]
    picks = ok.loc[[ok["alpha"].idxmin(), ok["alpha"].idxmax()]].drop_duplicates("longname")
    try:
        with np.load(eigs, allow_pickle=False) as data:
            if (EIGS_OPTIONS_KEY not in data.files
                    or str(data[EIGS_OPTIONS_KEY]) != split_options_key(options)[0]):
                return EsdSelection(note=f"{eigs.name} was saved with other options than the CSV")
            evals = {n: data[n] for n in picks["longname"] if n in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return EsdSelection(note=f"{eigs.name} cannot be read: {exc}")
    opts = parse_options_key(options)
    floor = float(opts["evals_thresh"]) if opts["filter_zeros"] == "True" else 0.0
    return EsdSelection(picks[picks["longname"].isin(evals.keys())], evals, "", floor)


def read_failed(results_dir: Path, log_dir: Path) -> list[tuple[str, str, Path | None]]:
    """``(model_id, cause, log or None)`` from failed_models.txt (empty when there is none)."""
    from esd_experiment.core.paths import model_paths

    path = results_dir / FAILED_MODELS_FILE
    if path.is_symlink() and not within(path, results_dir):
        return [(f"({FAILED_MODELS_FILE})", "a link to a file outside the results directory: "
                 "not read", None)]
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [("(failed_models.txt)", f"cannot be read: {exc.strerror}", None)]
    out = []
    for line in text.splitlines():
        key, _, cause = line.partition("\t")
        key = key.strip()
        if not key:
            continue
        # A list entry's key: its id, or ``id#gguf_file`` for one GGUF file of a repository.
        named = [(key, "")] + ([tuple(key.rsplit("#", 1))] if "#" in key else [])
        logs = []
        for model_id, gguf_file in named:
            try:
                logs.append(model_paths(results_dir, model_id, log_dir, gguf_file).log)
            except ESDError:  # an id the runner could not name a file for has no log either
                pass
        log = next((path for path in logs if path.is_file()), None)
        out.append((key, cause.strip(), log))
    return out


# ---------------------------------------------------------------------------------------------
# Draw: figures as PNG bytes.

def figure_specs(data: ReportData) -> list[tuple[str, str, tuple]]:
    """``(name, report_figures function, its arguments)`` of every figure of the report."""
    specs = [("alpha_mean", "alpha_mean_distribution", (data.summary,)),
             ("depth_map", "depth_map", (data.layers[["model_id", "layer_id", "status", "alpha"]],
                                         list(data.summary["model_id"])))]
    for view in data.models:
        if view.drawn:
            specs.append((f"{view.anchor}-alpha", "alpha_by_depth", (view.layers, view.model_id)))
            if view.esd.rows is not None and len(view.esd.rows):
                specs.append((f"{view.anchor}-esd", "esd_figure",
                              (view.esd.rows, view.esd.evals, view.esd.fit_floor)))
    for i, (model, base, pair) in enumerate(data.pairs):
        title = f"{model.rsplit('/', 1)[-1]} against {base.rsplit('/', 1)[-1]}"
        specs.append((f"pair-{i}", "against_base", (pair, title)))
    return specs


def render_figure(spec: tuple[str, str, tuple]) -> tuple[str, bytes]:
    """Build one figure and render it to PNG (runs in a worker process when drawing in
    parallel)."""
    from esd_experiment.report import figures as report_figures

    name, function, args = spec
    return name, report_figures.to_png(getattr(report_figures, function)(*args))


def draw_report(data: ReportData, workers: int = 1) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes, keyed by name for the HTML writer; rendered
    by ``workers`` processes (rendering is most of a large report's time)."""
    specs = figure_specs(data)
    if workers <= 1 or len(specs) < 2 * workers:
        return dict(map(render_figure, specs))
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return dict(pool.map(render_figure, specs, chunksize=max(1, len(specs) // (4 * workers))))


# ---------------------------------------------------------------------------------------------
# The report command.

def run_report(results_dir: Path, out_dir: Path | None, log_dir: Path | None,
               max_figures: int = MAX_FIGURES, workers: int = 1) -> Path:
    """Compute, draw and write the report; returns the path of index.html."""
    from esd_experiment.report.html import write_report

    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "report"
    if _same_dir(out_dir, results_dir):
        raise InputError(f"--out {out_dir} is the results directory: its summary.csv would "
                         "be read as a result; choose a subdirectory (default: report/)")
    data = compute_report(results_dir, out_dir, Path(log_dir or results_dir / "logs"),
                          max_figures)
    try:  # before the figures are drawn, the longest part
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out_dir} cannot be created: {exc.strerror or exc}") from None
    images = draw_report(data, workers)
    try:
        return write_report(data, images)
    except OSError as exc:
        raise InputError(f"--out {out_dir} cannot be written: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# The refit command.

def config_from_key(key: str, **overrides) -> ESDConfig:
    """The ESDConfig an ``options_key`` records, with ``overrides`` applied (CPU)."""
    typed = {}
    defaults = ESDConfig()
    for name, text in parse_options_key(key).items():
        kind = type(getattr(defaults, name))
        typed[name] = (text == "True") if kind is bool else kind(text)
    return ESDConfig(**{**typed, **overrides, "device": "cpu"})


def refit(results_dir: Path, new_dir: Path, overrides: dict,
          overwrite: bool = False) -> tuple[list[str], dict[str, str]]:
    """Refit every model with saved eigenvalues into ``new_dir``; returns the model ids
    written and ``{model_id or file: reason}`` for those skipped."""
    from esd_experiment.run.plan import drop_old_results
    from esd_experiment.run.saved_eigs import eigs_path, weights_needed
    from esd_experiment.run.state import RunLock, check_options, holds_results

    results_dir, new_dir = Path(results_dir), Path(new_dir)
    if _same_dir(results_dir, new_dir):
        raise InputError(f"--output_dir {new_dir} is RESULTS_DIR: a refit writes new results "
                         "beside the old ones, never over them")
    for inner, outer, what in ((new_dir, results_dir, "RESULTS_DIR's"),
                               (results_dir, new_dir, "the --output_dir's")):
        if _same_dir(inner, outer / DELTA_DIR):  # one view's results over the other's
            raise InputError(f"--output_dir {new_dir}: {inner} is {what} {DELTA_DIR}/ (the "
                             "delta view): a refit writes new results beside the old ones, "
                             "never over them")
    loaded = read_results(results_dir)
    base_key = _directory_options(results_dir, loaded)
    config = config_from_key(base_key, **overrides)
    needed = weights_needed(config)
    if needed.startswith(f"{RANDOMIZE_NAME}("):  # named by the option: refit takes no --seed
        raise InputError("--randomize (the shuffled spectrum) needs the weights, which saved "
                         "eigenvalues lack: run the models with run_esd_experiment.py "
                         "--randomize")
    if needed:
        raise InputError(f"metric {needed} needs the weights, which saved "
                         "eigenvalues lack: compute it with run_esd_experiment.py")
    _say_metrics_left_out(results_dir, base_key, config)
    skipped = _models_skipped(loaded)
    plans = _refit_plans(loaded, base_key, new_dir, skipped)
    if not plans:
        raise InputError(f"no model in {results_dir} can be refit: {_reasons(skipped)}")
    models, record = len(plans), config.options_record
    deltas = results_dir / DELTA_DIR  # --delta's view, refit beside the results
    if deltas.is_dir() and within(deltas, results_dir) and result_files(deltas):
        try:
            found = read_results(deltas)
        except InputError as exc:
            skipped[DELTA_DIR] = str(exc)
        else:
            skipped.update(_models_skipped(found, f"{DELTA_DIR}/"))
            plans += [(f"{DELTA_LABEL}{m}", *rest) for m, *rest in _refit_plans(
                found, base_key, new_dir / DELTA_DIR, skipped, DELTA_LABEL)]
    if len(plans) > models:
        record = {**record, DELTA_KEY: True}
    done = []
    with RunLock(new_dir):
        check_options(new_dir, record, overwrite or not holds_results(new_dir))
        for n, (model_id, csv, rows, out) in enumerate(plans, 1):
            target = ModelPaths(out, new_dir / "logs", csv.stem).csv
            if not overwrite and is_current(target, config.options_key) \
                    and _newer(target, eigs_path(csv)):
                done.append(model_id)  # refit before, perhaps annotated since: the user's
                logger.info("[%d/%d] %s: refit already, kept", n, len(plans), model_id)
                continue
            try:
                _refit_model(csv, rows, config, out, new_dir / "logs")
                done.append(model_id)
                logger.info("[%d/%d] refit %s", n, len(plans), model_id)
            except ESDError as exc:
                skipped[model_id] = str(exc)
                if overwrite:  # old numbers must not pass for this refit's
                    drop_old_results(model_id, [ModelPaths(out, new_dir / "logs", csv.stem)],
                                     eigs=True)
    return done, skipped


def _models_skipped(loaded: LoadedResults, label: str = "") -> dict[str, str]:
    """The files of ``loaded`` left out that should have been results; a user's own CSVs
    (no model is missing: no saved eigenvalues beside them) are only named here, as the
    report names them."""
    from esd_experiment.run.saved_eigs import eigs_path

    own = {p for p, why in loaded.skipped.items()
           if why.startswith(NOT_A_RESULT) and not eigs_path(p).exists()}
    for path in own:
        print(f"not read {label}{path.name}: {loaded.skipped[path]}", file=sys.stderr)
    return {f"{label}{p.name}": why for p, why in loaded.skipped.items() if p not in own}


def _say_metrics_left_out(results_dir: Path, base_key: str, config: ESDConfig) -> None:
    """Warn of the directory's metrics whose columns the refit's results will not hold:
    --randomize's (the shuffled spectrum needs the weights) and those not asked again."""
    asked = set(config.options_record.get("metrics", ()))
    left = [n for n in split_options_key(base_key)[1] if n not in asked]
    shuffled = [n for n in left if n.startswith(f"{RANDOMIZE_NAME}(")]
    others = [n for n in left if n not in shuffled]
    if shuffled:
        logger.warning("%s: the refit leaves out the columns of %s: it needs the weights, "
                       "which saved eigenvalues lack (run the models with --randomize to have "
                       "them)", results_dir, ", ".join(shuffled))
    if others:
        logger.warning("%s: the refit leaves out the columns of %s, not asked again (pass "
                       "--mp_fit or --metric to keep them)", results_dir, ", ".join(others))


def _refit_plans(loaded: LoadedResults, base_key: str, out: Path, skipped: dict[str, str],
                 label: str = "") -> list[tuple[str, Path, pd.DataFrame, Path]]:
    """``(model_id, csv, rows, where its refit goes)`` of every model of ``loaded`` that can
    be refit; the others are added to ``skipped`` (their ids after ``label``)."""
    plans = []
    by_model = dict(tuple(loaded.layers.groupby("model_id", sort=False)))
    for model_id, csv in loaded.files.items():
        rows = by_model[model_id]
        reason = _refit_obstacle(rows, csv, base_key)
        if reason:
            skipped[f"{label}{model_id}"] = reason
        else:
            plans.append((model_id, csv, rows, out))
    return plans


def _reasons(skipped: dict[str, str]) -> str:
    """``skipped`` in one line: each reason once, with the one model it stops or how many
    (a directory of 500 results without eigenvalues gives one clause, not 500)."""
    by_reason: dict[str, list[str]] = {}
    for what, why in skipped.items():
        by_reason.setdefault(why, []).append(what)
    return "; ".join(f"{whats[0]}: {why}" if len(whats) == 1
                     else f"{len(whats)} models ({whats[0]}, ...): {why}"
                     for why, whats in by_reason.items())


def _directory_options(results_dir: Path, loaded: LoadedResults) -> str:
    """The options the directory's results were computed with: the most common ones."""
    counts = loaded.layers.drop_duplicates("model_id")["esd_options"].value_counts()
    return str(counts.index[0])


def _refit_obstacle(rows: pd.DataFrame, csv: Path, base_key: str) -> str:
    """Why a model cannot be refit to the directory's options, or ''."""
    from esd_experiment.run.saved_eigs import eigs_obstacle

    key = rows["esd_options"].iat[0]
    fixed = ("conv_norm", "min_evals", "precision")  # they change eigenvalues or statuses
    ours, theirs = parse_options_key(key), parse_options_key(base_key)
    if any(ours[n] != theirs[n] for n in fixed):
        return (f"computed with {key}, unlike the directory's {base_key}: refit it alone")
    return eigs_obstacle(rows, csv)


def _refit_model(csv: Path, rows: pd.DataFrame, config: ESDConfig, new_dir: Path,
                 log_dir: Path) -> None:
    """Rows exactly as the worker builds them, fits and custom metrics recomputed, written as
    the worker writes (a model's delta beside it, in ``delta/``; one log for both)."""
    from esd_experiment.run.saved_eigs import read_eigs, rows_from_eigs
    from esd_experiment.run.worker import write_results

    eigs = read_eigs(csv)
    out = rows_from_eigs(rows, eigs, config)
    paths = ModelPaths(new_dir, log_dir, csv.stem)  # the stem the run named it by
    write_results(paths, out, eigs, config.eigs_key)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.log, "a", encoding="utf-8") as fh:
        fh.write(f"refit of {csv} from its saved eigenvalues with {config.options_key}: "
                 f"{len(out)} rows -> {paths.csv}\n")


def _newer(path: Path, *sources: Path) -> bool:
    """Whether ``path`` was written after every one of ``sources`` (a refit after the
    eigenvalues it was made from; not after a model of them was computed again, which writes
    them anew: a user's edit of the result CSV is no recomputation)."""
    try:
        return all(path.stat().st_mtime_ns >= s.stat().st_mtime_ns for s in sources)
    except OSError:
        return False


def _same_dir(a: Path, b: Path) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="summary.csv and an offline index.html")
    r.add_argument("results_dir", type=Path, help="an --output_dir of run_esd_experiment.py")
    r.add_argument("--out", "--output_dir", type=Path, default=None, dest="out",
                   help="where the page goes (default: RESULTS_DIR/report)")
    r.add_argument("--log_dir", type=Path, default=None, help="default: RESULTS_DIR/logs")
    r.add_argument("--max_figures", type=int, default=MAX_FIGURES,
                   help="models (and fine-tune pairs) drawn in full (default: %(default)s)")
    r.add_argument("--jobs", type=int, default=None,
                   help="processes drawing figures (default: the CPUs this process may use)")
    f = sub.add_parser("refit", help="new results from saved eigenvalues with new fit options",
                       description="New results from the eigenvalues a run saved (--save_eigs), "
                                   "with other fit options or metrics; no model is loaded.")
    f.add_argument("results_dir", type=Path,
                   help="an --output_dir of run_esd_experiment.py whose run used --save_eigs")
    f.add_argument("--output_dir", type=Path, required=True,
                   help="where the new results go (not RESULTS_DIR)")
    kept = " (default: the results' own)"
    f.add_argument("--fix_fingers", choices=FIX_FINGERS, default=None,
                   help="how xmin is chosen" + kept)
    f.add_argument("--xmin_pos", type=int, default=None,
                   help="xmin_mid: xmin index = n // xmin_pos" + kept)
    f.add_argument("--bins", type=int, default=None, help="histogram bins for xmin_peak" + kept)
    f.add_argument("--filter_zeros", action=argparse.BooleanOptionalAction, default=None,
                   help="drop eigenvalues <= --evals_thresh from the fit" + kept)
    f.add_argument("--evals_thresh", type=float, default=None,
                   help="with --filter_zeros, fit only eigenvalues above this" + kept)
    f.add_argument("--metric", action="append", default=[], metavar="FILE.py:FUNCTION",
                   help="a custom metric computed from the saved eigenvalues (repeatable; "
                        "without it the new results hold none)")
    f.add_argument("--mp_fit", action="store_true",
                   help="add WeightWatcher's Marchenko-Pastur fit columns (without it the "
                        "new results hold none)")
    f.add_argument("--randomize", action="store_true",
                   help="refused: the randomized ESD needs the weights (run the models)")
    f.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    f.add_argument("--overwrite", action="store_true",
                   help="replace results in --output_dir computed with other options")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            if args.max_figures < 0:
                raise InputError(f"--max_figures must be 0 or more, got {args.max_figures}")
            workers = args.jobs if args.jobs is not None else len(os.sched_getaffinity(0))
            index = run_report(args.results_dir, args.out, args.log_dir, args.max_figures,
                               max(1, workers))
            print(f"report written to {index}")
            return EXIT_OK
        overrides = {n: getattr(args, n) for n in REFIT_OPTIONS if getattr(args, n) is not None}
        overrides["metrics"] = metrics_of(args)
        done, skipped = refit(args.results_dir, args.output_dir, overrides, args.overwrite)
    except InputError as exc:
        print(f"esd_report: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    deltas = sum(d.startswith(DELTA_LABEL) for d in done)
    print(f"refit {len(done) - deltas} model(s) into {args.output_dir}"
          + (f", and {deltas} delta(s) into {args.output_dir / DELTA_DIR}" if deltas else ""))
    for what, why in skipped.items():
        print(f"skipped {what}: {why}", file=sys.stderr)
    return EXIT_SOME_SKIPPED if skipped else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
