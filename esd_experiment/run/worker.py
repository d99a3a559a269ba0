"""Analyse the models of one job: load -> ESD -> one per-layer CSV per model, written atomically.

Usage: python esd_worker.py --model_id org/name[@revision] --output_dir results/ [ESD options]
       python esd_worker.py --model_id BASE ADAPTER1 ADAPTER2 --source_model BASE \
           --base_model_relation adapter --output_dir results/

Reads models from the Hugging Face hub or local directories; an adapter is merged into its
base tensor by tensor. Several ids make one job: the models built on one base (the base itself,
listed by the same id as ``--source_model``, and its adapters) share one pass over the base,
which is read, and downloaded, once. Writes per model ``<output_dir>/<org--name>.csv``
(columns: results.RESULT_COLUMNS), with ``--save_eigs`` also ``<org--name>.eigs.npz``, and on
failure ``<log_dir>/<org--name>.failure.json`` for the runner; one model's failure leaves the
others' results. With ``--stage_file`` it keeps the stage it is in there (resolve, download,
merge, analyse, write). Exit code: 0 every model succeeded, 1 some model failed
deterministically (retrying will not help), 75 every failure is transient (worth a retry),
74 a disk it writes to is full (no model is to blame), 2 usage error. ``esd_worker.py --serve
FD`` runs one job after another in this process for the runner's long-lived workers
(gputracker/pool.py, docs/workers.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from esd_experiment.core.errors import (
    ESDError,
    InputError,
    NetworkError,
    NoWeightsError,
    TransientError,
    disk_full_error,
    internal_error,
    is_network_error,
    is_transient,
)
from esd_experiment.core.paths import ModelPaths, model_paths, write_atomic, write_text_atomic
from esd_experiment.core.results import (
    EIGS_LAYERS_KEY,
    EIGS_OPTIONS_KEY,
    eigs_options,
    inert_frame,
    is_current,
    result_frame,
    split_options_key,
    write_eigs,
)
from esd_experiment.estimator.metrics import MetricChanged
from esd_experiment.estimator.options import ESDConfig, add_esd_arguments, esd_config_from_args
from esd_experiment.estimator.randomize import WORDS
from esd_experiment.run.devices import CpuShare, layer_results, on_devices
from esd_experiment.run.model_list import ListEntry
from esd_experiment.run.state import StageLog

if TYPE_CHECKING:  # the estimator (and torch) is imported when a model is analysed
    pass

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TRANSIENT = 75  # sysexits.h EX_TEMPFAIL: "try again later"
EXIT_DISK_FULL = 74  # sysexits.h EX_IOERR: a disk it writes to is full, no model is to blame
PROGRESS_EVERY_S = 5.0  # seconds between layer-progress log lines
WATCHDOG_INTERVAL_S = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    model_ids: tuple[str, ...]
    output_dir: Path
    log_dir: Path
    esd: ESDConfig
    base_model_relation: str = ""
    source_model: str = ""
    save_eigs: bool = False
    parallel_esd: bool = False
    cleanup_cache: bool = False
    trust_remote_code: bool = False
    cache_dir: str | None = None
    threads: int | None = None
    parent_pid: int | None = None
    stage_file: Path | None = None
    gguf_file: str = ""
    base_source_model: str = ""  # the base's own source_model, as its list row gives it
    delta: bool = False  # also write the ESD of W - W_source (run/delta_worker.py)
    keep_current: bool = False  # a result current for these options is kept as it stands

    def read_beside_sources(self) -> list[str]:
        """The repositories of the job's full models that --delta reads in their source's
        pass: their shards are fetched in that pass's order (run/delta.py)."""
        from esd_experiment.core.ids import parse_model_id

        beside = []
        for request in self.requests() if self.delta else []:
            if request.source_model and not request.marked_adapter:
                with contextlib.suppress(ESDError):  # a bad id fails as the model opens
                    beside.append(parse_model_id(request.model_id)[0])
        return beside

    def requests(self):
        """The job's models; an id equal to ``--source_model`` is the base itself."""
        from esd_experiment.loader.opener import ModelRequest

        return [ModelRequest(m, "", self.base_source_model)
                if self.source_model and m == self.source_model
                else ModelRequest(m, self.base_model_relation, self.source_model, self.gguf_file)
                for m in self.model_ids]


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda`` when a CUDA device is visible, else ``cpu``."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_id", required=True, nargs="+",
                   help="org/name, org/name@revision or a local directory; several ids (a base "
                        "and its adapters) share one pass over the base")
    p.add_argument("--base_model_relation", default="", help="adapter, lora or peft for adapters")
    p.add_argument("--source_model", default="",
                   help="base model of the adapters (an id equal to it is the base itself)")
    p.add_argument("--base_source_model", default="",
                   help="the source_model of that base's own list row, for its result")
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--log_dir", type=Path, default=None, help="default: <output_dir>/logs")
    p.add_argument("--cleanup_cache", action="store_true",
                   help="delete the model's downloaded hub files once its result is written")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow a model's own code to run (only the adapter fallback needs it)")
    p.add_argument("--cache_dir", default=None, help="Hugging Face cache (default: HF_HOME's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--parent_pid", type=int, default=None,
                   help="exit when this process (the runner) is gone")
    p.add_argument("--gguf_file", default="",
                   help="for a repository of GGUF files: the one to read (a file name, one "
                        "part of a split set, or a tag such as Q4_K_M)")
    p.add_argument("--stage_file", type=Path, default=None,
                   help="keep the current stage in this file (the runner reads it on a timeout)")
    p.add_argument("--keep_current", action="store_true",
                   help="keep a result already computed with these options as it stands (a "
                        "user's columns and all); write only what it lacks (its eigenvalues)")
    add_esd_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    ids = model_ids_of(args)
    return WorkerConfig(
        model_ids=ids, output_dir=args.output_dir, log_dir=log_dir_of(args),
        esd=esd_config_from_args(args, resolve_device(args.device)),
        base_model_relation=args.base_model_relation.strip(),
        source_model=args.source_model.strip(), save_eigs=args.save_eigs,
        parallel_esd=args.parallel_esd, cleanup_cache=args.cleanup_cache,
        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
        threads=args.threads, parent_pid=args.parent_pid, stage_file=args.stage_file,
        gguf_file=args.gguf_file.strip(), base_source_model=args.base_source_model.strip(),
        delta=args.delta, keep_current=args.keep_current)


def model_ids_of(args: argparse.Namespace) -> tuple[str, ...]:
    ids = tuple(dict.fromkeys(m.strip() for m in args.model_id if m.strip()))
    if not ids:
        raise InputError("--model_id is empty")
    return ids


def log_dir_of(args: argparse.Namespace) -> Path:
    return args.log_dir if args.log_dir is not None else args.output_dir / "logs"


# ---------------------------------------------------------------------------------------------
# The analysis.

def analysis_devices(config: WorkerConfig) -> list[str]:
    """Devices for one job: all visible GPUs under --parallel_esd, else the one asked for."""
    if not config.parallel_esd or not config.esd.device.startswith("cuda"):
        return [config.esd.device]
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or [config.esd.device]


@dataclass
class ModelRun:
    """One model of the job: its result rows and eigenvalues so far, or why it failed."""

    model_id: str
    paths: ModelPaths
    model: object = None
    rows: list[dict] = field(default_factory=list)
    eigs: dict[str, np.ndarray] = field(default_factory=dict)
    error: BaseException | None = None
    stage: str = ""  # the stage the job was in when ``error`` happened
    kept: bool = False  # its result stays as it stands: its layers are not solved (``finish``)


def analyse(config: WorkerConfig, runs: list[ModelRun], stage: StageLog) -> None:
    """Stream every opened model (each base read once for all its models) through the
    estimator, filling each run's rows; a model that fails keeps its error."""
    from esd_experiment.formats.stream import stream_models

    by_model = {id(r.model): r for r in runs if r.error is None}
    if not by_model:
        return
    devices = analysis_devices(config)
    fallback = any(r.model.checkpoint is None for r in by_model.values())
    stage.set("merge" if fallback else "analyse")
    items = stream_models([r.model for r in by_model.values()])
    share = CpuShare([r.model.checkpoint.fetcher for r in by_model.values()
                      if r.model.checkpoint is not None])

    for run in by_model.values():
        run.kept = kept_as_it_stands(config, run)

    def solve(item, device: str):
        if item.error is not None:
            return item.error
        if by_model[id(item.model)].kept:  # read for the pass's other models only
            return []
        share.before_solve(device)
        if (solver := getattr(item.model, "layer_results", None)) is not None:  # esd_delta's
            return solver(item.name, item.tensor, item.storage, replace(config.esd, device=device))
        return layer_results((item.name, item.tensor, item.storage), config.esd, device)

    analysed = on_devices(solve, items, devices)
    last_log = time.monotonic()
    with WORDS.reused():  # --randomize's word buffer, from layer to layer of the job
        for item, value in analysed:
            run = by_model[id(item.model)]
            if run.error is not None:
                continue
            stage.set("analyse")
            if isinstance(value, BaseException):
                run.error, run.stage = value, stage.current
                logger.error("%s failed while analysed: %s", run.model_id, one_line(str(value)))
                continue
            for result in value:
                run.rows.append(result.row)
                if result.evals is not None:
                    run.eigs[result.row["longname"]] = result.evals
            if time.monotonic() - last_log >= PROGRESS_EVERY_S:
                last_log = time.monotonic()
                logger.info("%s: %d layers analysed, last %s", run.model_id, len(run.rows),
                            item.name)


def result_rows(config: WorkerConfig, run: ModelRun) -> list[dict]:
    """One model's result rows, as its CSV holds them: in layer order, model columns filled
    (what ``esd_experiment.analyze`` returns)."""
    if not run.rows:
        raise NoWeightsError(f"{run.model_id}: no weight matrix with two or more dimensions found")
    from esd_experiment.core.layer_order import in_depth_order

    model = run.model
    # The list entry's key (``org/name#<gguf_file>`` for one GGUF file of a repository), so
    # that two files of one repository stay two models wherever results are read back.
    key = ListEntry(run.model_id, gguf_file=config.gguf_file).key
    fixed = {"model_id": key, "revision": model.revision or "",
             "source_model": model.source_model or "", "esd_options": config.esd.options_key}
    opened = model.checkpoint
    config_json, order = (opened.config, opened.order) if opened else (None, ())
    rows = in_depth_order(run.rows, config_json, order)  # layer_id follows the model's depth
    for row in rows:
        row.update(fixed)
    return rows


def kept_as_it_stands(config: WorkerConfig, run: ModelRun) -> bool:
    """True when ``run``'s result is current and kept (``keep_current``), with its current
    eigenvalues under --save_eigs: a model the job streams for another's sake (the base of its
    adapters, a fine-tune whose delta is missing) is then not solved again."""
    options = config.esd.options_key
    return config.keep_current and is_current(run.paths.csv, options) and (
        not config.save_eigs or eigs_options(run.paths.eigs) == split_options_key(options)[0])


def finish(config: WorkerConfig, run: ModelRun) -> None:
    """Write one model's result (``result_rows``), atomically. Under ``keep_current`` a
    result computed with these options stays as it is (a user may have added columns, sorted
    or reformatted it): only its eigenvalues are written beside it."""
    if run.kept:
        if not kept_as_it_stands(config, run):  # removed or replaced while the job ran
            raise TransientError(f"{run.model_id}: its result {run.paths.csv.name} changed "
                                 f"while the job ran, which did not solve its layers again")
        logger.info("%s: %s is current and kept as it is; its layers were not solved again",
                    run.model_id, run.paths.csv)
        return
    rows = result_rows(config, run)
    eigs = run.eigs if config.save_eigs else None
    if config.keep_current and is_current(run.paths.csv, config.esd.options_key):
        if eigs is not None:
            write_results(run.paths, rows, eigs, config.esd.eigs_key, csv=False)
        logger.info("%s: %s is current and kept as it is%s", run.model_id, run.paths.csv,
                    "; its eigenvalues written beside it" if eigs is not None else "")
        return
    write_results(run.paths, rows, eigs, config.esd.eigs_key)
    statuses = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    logger.info("%s: %d rows %s -> %s", run.model_id, len(rows), statuses, run.paths.csv)


def write_results(paths: ModelPaths, rows: list[dict], eigs: dict[str, np.ndarray] | None,
                  options: str, *, csv: bool = True) -> None:
    """The model's CSV of ``rows`` (unless not ``csv``) and, when ``eigs`` is not None, its
    ``.eigs.npz`` recording ``options`` and the rows' layers (written first, and written even
    when empty, so that the result counts as done). Without ``eigs`` an earlier run's
    ``.eigs.npz`` stays: the options it records say whether it matches the CSV. Custom
    metrics' columns follow RESULT_COLUMNS, NaN where a row has none."""
    if eigs is not None:
        record = {**eigs, EIGS_OPTIONS_KEY: np.array(options),
                  EIGS_LAYERS_KEY: np.array([r["longname"] for r in rows], dtype=str)}
        write_atomic(paths.eigs, lambda tmp: write_eigs(tmp, record))
    if csv:
        frame = result_frame(rows)
        write_atomic(paths.csv, lambda tmp: inert_frame(frame).to_csv(tmp, index=False))


def _depth_order_ahead(runs: list[ModelRun]) -> threading.Thread:
    """Build the depth order of each model's config (transformers' class on the meta device,
    or layer_order's disk cache) and import the CSV writer's pandas on a thread, so that both
    overlap the download and the analysis instead of following them."""
    from esd_experiment.core.layer_order import model_order

    configs = [r.model.checkpoint.config for r in runs
               if r.error is None and r.model.checkpoint is not None]

    def build() -> None:
        for model_config in configs:
            try:
                model_order(model_config)
            except Exception as exc:  # finish() falls back to the name rule and says why
                logger.debug("depth order of a config could not be built ahead: %s", exc)
        import pandas  # noqa: F401  (write_results needs it once the last tensor is done)

    thread = threading.Thread(target=build, name="depth-order", daemon=True)
    thread.start()
    return thread


def _estimator_ahead(device: str) -> None:
    """Import the estimator (torch, about a second of CPU; SciPy's LAPACK for the CPU) on a
    thread while the first weight files download, so that the analysis starts as soon as the
    first shard is in rather than a second later. Started once the hub's listing, config and
    index are read: an import running beside those requests delays the first download."""

    def load() -> None:
        try:
            from esd_experiment.estimator import net_esd  # noqa: F401

            if device == "cpu":
                from esd_experiment.estimator import lapack as esd_lapack

                esd_lapack.available()
        except Exception as exc:  # the analysis imports it again and reports the failure
            logger.debug("importing the estimator ahead failed: %s", exc)

    threading.Thread(target=load, name="estimator-import", daemon=True).start()


def run_job(config: WorkerConfig, stage: StageLog, write: bool = True) -> list[ModelRun]:
    """Open, analyse and write every model of the job; each run says how its model ended.
    With ``write`` False nothing is written: each finished run's ``rows`` are its result's."""
    from esd_experiment.hub.cache import CacheSession
    from esd_experiment.hub.client import default_cache_dir
    from esd_experiment.hub.files import HubClient
    from esd_experiment.loader.opener import open_models
    from esd_experiment.run.delta_worker import delta_runs

    runs = [ModelRun(m, model_paths(config.output_dir, m, config.log_dir, config.gguf_file))
            for m in config.model_ids]
    started = time.monotonic()
    # Weight files download in a process of their own (hub/download.py), out of the
    # lock the analysis needs; ended with the job, which by then downloads nothing.
    hub = HubClient(cache_dir=config.cache_dir, download_process=True)
    with CacheSession(default_cache_dir(config.cache_dir), config.cleanup_cache) as session, \
            contextlib.closing(hub):
        stage.set("resolve")
        opened = open_models(config.requests(), cache_dir=config.cache_dir,
                             trust_remote_code=config.trust_remote_code, hub=hub,
                             session=session, waiting=lambda: stage.during("download"),
                             on_fetch=lambda: _estimator_ahead(config.esd.device),
                             idle=config.read_beside_sources())
        for run, model in zip(runs, opened, strict=True):
            if isinstance(model, ESDError):
                run.error, run.stage = model, "resolve"
                continue
            run.model = model
            logger.info("%s: revision %s%s, analysing on %s", run.model_id,
                        model.revision or "local",
                        f", adapter on {model.source_model}" if model.is_adapter else "",
                        config.esd.device)
        ordering = _depth_order_ahead(runs)
        deltas = delta_runs(config, runs, ModelRun, hub, session, stage) if config.delta else []
        analyse(config, runs + deltas, stage)
        ordering.join()  # the model classes' parameter order, built while the model streamed
        stage.set("write")
        for run in runs + deltas:
            if run.error is None:
                try:
                    if write:
                        finish(config, run)
                    else:
                        run.rows = result_rows(config, run)
                except Exception as exc:  # noqa: BLE001  (a write that fails fails its model)
                    run.error, run.stage = exc, "write"
    logger.info("job of %d model(s) done in %.1f s", len(runs), time.monotonic() - started)
    return deltas + runs  # a model's own failure record is written last, over its delta's


# ---------------------------------------------------------------------------------------------
# Process plumbing: the one place that turns exceptions into a failure record and exit code.

def write_failure(paths: ModelPaths, model_id: str, exc: BaseException, transient: bool,
                  stage: str = "") -> None:
    """The record the runner turns into a ``failed_models.txt`` line: the cause, whether a
    retry may help, whether the network failed (an outage when several models say so), and
    the stage the job was in; or, for a full disk, that and the file it could not write."""
    full = disk_full_error(exc)
    error, message = type(exc).__name__, str(exc) or type(exc).__name__
    if not isinstance(exc, ESDError) and not transient and full is None:
        error, message = "internal error", internal_error(exc, stage)  # a bug, not the model
    record = {"model_id": model_id, "error": error,
              "message": one_line(message), "transient": transient,
              "network": isinstance(exc, NetworkError) or is_network_error(exc), "stage": stage,
              "disk_full": full is not None,
              "path": str(full.filename or "") if full is not None else ""}
    write_text_atomic(paths.failure, json.dumps(record))


def one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_watched_parent: list[int] = []  # the runner a long-lived worker already watches


def watch_parent(parent_pid: int) -> None:
    """Exit when the runner is gone: the kernel's parent-death signal, and a polling fallback.
    Once per process: a long-lived worker gets the same --parent_pid with every job."""
    if parent_pid in _watched_parent:
        return
    _watched_parent.append(parent_pid)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass

    def poll() -> None:
        while True:
            if os.getppid() != parent_pid:
                logger.error("runner (pid %d) is gone; stopping", parent_pid)
                os._exit(EXIT_TRANSIENT)
            time.sleep(WATCHDOG_INTERVAL_S)

    if os.getppid() != parent_pid:
        os._exit(EXIT_TRANSIENT)
    threading.Thread(target=poll, name="parent-watchdog", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except MetricChanged as exc:  # not the version the run records: each model fails with it
        return metric_changed(args, exc)
    except ESDError as exc:
        print(f"esd_worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.parent_pid is not None:
        watch_parent(config.parent_pid)
    if config.threads is not None:
        # SciPy's BLAS reads its thread count when it loads and torch when it is imported,
        # both later than this (torch's import, a second, overlaps the first downloads);
        # NumPy's BLAS is loaded already.
        from esd_experiment.estimator.lapack import set_blas_threads
        from gputracker import THREAD_VARS

        os.environ.update(dict.fromkeys(THREAD_VARS, str(config.threads)))
        set_blas_threads(config.threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(config.threads)
    stage = StageLog(config.stage_file)
    runs = []
    for model_id in config.model_ids:
        try:
            paths = model_paths(config.output_dir, model_id, config.log_dir, config.gguf_file)
        except ESDError as exc:
            logger.error("%s: %s", model_id, exc)
            return EXIT_USAGE
        paths.failure.unlink(missing_ok=True)
        runs.append(paths)
    try:
        finished = run_job(config, stage)
    except Exception as exc:  # the job as a whole failed: every model shares the cause
        finished = [ModelRun(m, p, error=exc, stage=stage.current)
                    for m, p in zip(config.model_ids, runs, strict=True)]
    return report(finished, stage.current)


def metric_changed(args: argparse.Namespace, exc: MetricChanged) -> int:
    """Fail every model of the job with ``exc`` (a metric's file changed since the run
    started); nothing is computed with the other version."""
    try:
        runs = [ModelRun(m, model_paths(args.output_dir, m, log_dir_of(args),
                                        args.gguf_file.strip()), error=exc)
                for m in model_ids_of(args)]
    except ESDError as bad:
        print(f"esd_worker: {bad}", file=sys.stderr)
        return EXIT_USAGE
    return report(runs, "start")


def report(runs: list[ModelRun], stage: str) -> int:
    """Log and record each failed model; the job's exit code (``EXIT_DISK_FULL`` when a disk
    it writes to is full, whether or not the record could still be written)."""
    failures = [run for run in runs if run.error is not None]
    disk_full = False
    for run in failures:
        transient = is_transient(run.error)
        full = disk_full_error(run.error)
        disk_full = disk_full or full is not None
        if not isinstance(run.error, ESDError) and full is None:
            traceback.print_exception(run.error)
        logger.error("%s failed (%s): %s", run.model_id, "disk full" if full is not None else
                     "transient" if transient else "deterministic", one_line(str(run.error)))
        try:
            write_failure(run.paths, run.model_id, run.error, transient, run.stage or stage)
        except OSError as exc:
            if disk_full_error(exc) is None:
                raise
            disk_full = True
    if disk_full:
        return EXIT_DISK_FULL
    if not failures:
        return EXIT_OK
    return EXIT_TRANSIENT if all(is_transient(r.error) for r in failures) else EXIT_FAILED


def exit_now(code: int) -> None:
    """End the process with ``code`` once its output is flushed. Every result is written and
    fsynced by then; skipping the interpreter's teardown of torch and transformers saves about
    a second per job, which a list of hundreds of models pays for every model."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def command_line() -> None:
    """``python esd_worker.py ...``: one job, or with ``--serve FD`` a long-lived worker of
    ``gputracker.pool`` taking jobs until told to stop."""
    if sys.argv[1:2] == ["--serve"]:
        from gputracker.serve import serve

        exit_now(serve(main, int(sys.argv[2])))
    exit_now(main())


if __name__ == "__main__":
    command_line()
