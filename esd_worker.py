"""Analyse one model: load -> ESD -> per-layer CSV, written atomically.

Usage: python esd_worker.py --model_id org/name[@revision] --output_dir results/ [ESD options]

Reads the model from the Hugging Face hub or a local directory (an adapter is merged into
its base tensor by tensor). Writes ``<output_dir>/<org--name>.csv`` (columns: results.RESULT_COLUMNS),
with ``--save_eigs`` also ``<org--name>.eigs.npz``, and on failure ``<log_dir>/<org--name>.failure.json``
for the runner. Exit code: 0 success, 1 deterministic failure (retrying will not help),
75 transient failure (worth a retry), 2 usage error.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from errors import ESDError, InputError, NoWeightsError, is_transient
from esd_config import ESDConfig, add_esd_arguments, esd_config_from_args
from paths import ModelPaths, write_atomic, write_text_atomic
from results import EIGS_OPTIONS_KEY, RESULT_COLUMNS

if TYPE_CHECKING:  # the estimator (and torch) is imported when a model is analysed
    from net_esd import LayerResult

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TRANSIENT = 75  # sysexits.h EX_TEMPFAIL: "try again later"
PROGRESS_EVERY_S = 5.0  # seconds between layer-progress log lines
WATCHDOG_INTERVAL_S = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    model_id: str
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


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda`` when a CUDA device is visible, else ``cpu``."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_id", required=True, help="org/name, org/name@revision or a local directory")
    p.add_argument("--base_model_relation", default="", help="adapter, lora or peft for adapters")
    p.add_argument("--source_model", default="", help="base model of an adapter")
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
    add_esd_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    output_dir = args.output_dir
    return WorkerConfig(
        model_id=args.model_id.strip(), output_dir=output_dir,
        log_dir=args.log_dir if args.log_dir is not None else output_dir / "logs",
        esd=esd_config_from_args(args, resolve_device(args.device)),
        base_model_relation=args.base_model_relation.strip(),
        source_model=args.source_model.strip(), save_eigs=args.save_eigs,
        parallel_esd=args.parallel_esd, cleanup_cache=args.cleanup_cache,
        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
        threads=args.threads, parent_pid=args.parent_pid,
    )


# ---------------------------------------------------------------------------------------------
# The analysis.

def model_paths(output_dir: Path, model_id: str, log_dir: Path | None = None) -> ModelPaths:
    """The files of a list entry: named from its id and the revision written in it."""
    from model_loader import parse_model_id

    repo_id, revision = parse_model_id(model_id)
    return ModelPaths.for_model(output_dir, repo_id, revision, log_dir=log_dir)


def parallel_layer_results(
    named_tensors: Iterable[tuple[str, object]], config: ESDConfig, devices: Sequence[str],
) -> Iterator[LayerResult]:
    """Like ``iter_layer_results`` but each tensor goes to the next free device's thread.

    Rows come back in stream order with consecutive ``layer_id``s, exactly as the serial path
    numbers them. At most ``2 * len(devices)`` tensors are held at once.
    """
    from net_esd import iter_layer_results

    todo: queue.Queue = queue.Queue(maxsize=len(devices))
    done: dict[int, list[LayerResult]] = {}
    cond = threading.Condition()
    failure: list[BaseException] = []

    def work(device: str) -> None:
        dev_config = replace(config, device=device)
        while (item := todo.get()) is not None:
            index, name, tensor = item
            try:
                out = list(iter_layer_results([(name, tensor)], dev_config))
            except BaseException as exc:  # handed to the consumer, which re-raises
                out = []
                failure.append(exc)
            with cond:
                done[index] = out
                cond.notify_all()

    threads = [threading.Thread(target=work, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    next_index, produced, layer_id = 0, 0, 0
    stream = iter(named_tensors)
    try:
        while True:
            while produced - next_index < 2 * len(devices):
                item = next(stream, None)
                if item is None:
                    break
                todo.put((produced, item[0], item[1]))
                produced += 1
            if next_index == produced:
                return
            with cond:
                cond.wait_for(lambda i=next_index: i in done or bool(failure))
                if failure:
                    raise failure[0]
                results = done.pop(next_index)
            next_index += 1
            for result in results:
                result.row["layer_id"] = layer_id
                layer_id += 1
                yield result
    finally:
        # Stop the threads and wait for them: a thread left inside torch when the process
        # exits aborts it (SIGABRT), which would read as a transient failure.
        while True:
            try:
                todo.get_nowait()
            except queue.Empty:
                break
        for _ in threads:
            todo.put(None)
        for t in threads:
            t.join()


def analysis_devices(config: WorkerConfig) -> list[str]:
    """Devices for one model: all visible GPUs under --parallel_esd, else the one asked for."""
    if not config.parallel_esd or not config.esd.device.startswith("cuda"):
        return [config.esd.device]
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or [config.esd.device]


def analyse(config: WorkerConfig, model) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Run the estimator over a loaded model's tensor stream; returns rows and eigenvalues."""
    from net_esd import iter_layer_results

    devices = analysis_devices(config)
    if len(devices) > 1:
        stream = parallel_layer_results(model.iter_tensors(), config.esd, devices)
    else:
        stream = iter_layer_results(model.iter_tensors(), config.esd)
    model_cols = {"model_id": config.model_id, "revision": model.revision or "",
                  "source_model": model.source_model or "",
                  "esd_options": config.esd.options_key}
    rows, eigs = [], {}
    last_log = time.monotonic()
    for result in stream:
        rows.append({**model_cols, **result.row})
        if result.evals is not None:
            eigs[result.row["longname"]] = result.evals
        if time.monotonic() - last_log >= PROGRESS_EVERY_S:
            last_log = time.monotonic()
            logger.info("%s: %d layers analysed, last %s", config.model_id, len(rows),
                        result.row["longname"])
    if not rows:
        raise NoWeightsError(f"{config.model_id}: no weight matrix with two or more dimensions found")
    return rows, eigs


def write_results(paths: ModelPaths, rows: list[dict], eigs: dict[str, np.ndarray] | None,
                  options: str) -> None:
    """The model's CSV and, when ``eigs`` is not None, its ``.eigs.npz`` (written first, and
    written even when empty, so that the result counts as done). Without ``eigs`` an earlier
    run's ``.eigs.npz`` is removed: it would not match the new CSV beside it."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    if eigs is not None:
        record = {**eigs, EIGS_OPTIONS_KEY: np.array(options)}
        write_atomic(paths.eigs, lambda tmp: _save_npz(tmp, record))
    else:
        paths.eigs.unlink(missing_ok=True)
    write_atomic(paths.csv, lambda tmp: frame.to_csv(tmp, index=False))


def _save_npz(tmp: Path, eigs: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as fh:  # a file object keeps numpy from appending ".npz" to the name
        np.savez_compressed(fh, **eigs)


def run_model(config: WorkerConfig) -> ModelPaths:
    """Load, analyse and write one model. Raises ESDError subclasses on failure."""
    from model_loader import ModelRequest, cleanup_cache, open_model

    paths = model_paths(config.output_dir, config.model_id, config.log_dir)
    request = ModelRequest(config.model_id, config.base_model_relation, config.source_model)
    started = time.monotonic()
    model = open_model(request, cache_dir=config.cache_dir,
                       trust_remote_code=config.trust_remote_code,
                       cleanup_on_error=config.cleanup_cache)
    try:
        logger.info("%s: revision %s%s, analysing on %s", config.model_id, model.revision or "local",
                    f", adapter on {model.source_model}" if model.is_adapter else "",
                    config.esd.device)
        rows, eigs = analyse(config, model)
        write_results(paths, rows, eigs if config.save_eigs else None, config.esd.options_key)
    finally:
        if config.cleanup_cache:
            cleanup_cache(model)
    statuses = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    logger.info("%s: %d rows %s in %.1f s -> %s", config.model_id, len(rows), statuses,
                time.monotonic() - started, paths.csv)
    return paths


# ---------------------------------------------------------------------------------------------
# Process plumbing: the one place that turns exceptions into a failure record and exit code.

def write_failure(paths: ModelPaths, model_id: str, exc: BaseException, transient: bool) -> None:
    record = {"model_id": model_id, "error": type(exc).__name__,
              "message": one_line(str(exc) or type(exc).__name__), "transient": transient}
    write_text_atomic(paths.failure, json.dumps(record))


def one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def watch_parent(parent_pid: int) -> None:
    """Exit when the runner is gone: the kernel's parent-death signal, and a polling fallback."""
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
    except ESDError as exc:
        print(f"esd_worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.parent_pid is not None:
        watch_parent(config.parent_pid)
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    paths = None
    try:
        paths = model_paths(config.output_dir, config.model_id, config.log_dir)
        paths.failure.unlink(missing_ok=True)
        run_model(config)
        return EXIT_OK
    except Exception as exc:
        transient = is_transient(exc)
        if not isinstance(exc, ESDError):
            traceback.print_exc()
        logger.error("%s failed (%s): %s", config.model_id,
                     "transient" if transient else "deterministic", one_line(str(exc)))
        if paths is not None:
            write_failure(paths, config.model_id, exc, transient)
        return EXIT_TRANSIENT if transient else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
