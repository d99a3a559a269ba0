"""ESD metrics for every model of a list: one worker subprocess per model, on GPUs or CPUs.

Usage: python run_esd_experiment.py --model_list models.csv --output_dir results/ [--gpus 0 1 2 3]
       python run_esd_experiment.py --demo --output_dir demo/

Reads the model list (CSV: model_id, optional base_model_relation and source_model). Writes
under --output_dir one ``<org--name>.csv`` per model (columns: net_esd.RESULT_COLUMNS),
``failed_models.txt`` (model id, tab, cause), and one log per model under --log_dir.
Finished models are skipped on a rerun. Exit code: 0 when no model failed, 1 when some model
failed, 2 for bad input (list, flags, a second run on the same output), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from errors import ESDError, InputError
from esd_worker import EXIT_OK, EXIT_TRANSIENT, add_esd_arguments, esd_argv, model_paths
from gputracker import Dispatcher, Job, JobResult, detect_gpus
from net_esd import RESULT_COLUMNS
from paths import ModelPaths
from run_state import FailureLog, RunLock, is_complete, read_failure_cause

logger = logging.getLogger("run_esd_experiment")

EXIT_SOME_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
WORKER = Path(__file__).resolve().with_name("esd_worker.py")
LOG_TAIL_LINES = 5


@dataclass(frozen=True)
class ListEntry:
    model_id: str
    base_model_relation: str = ""
    source_model: str = ""


@dataclass(frozen=True)
class RunConfig:
    model_list: Path
    output_dir: Path
    log_dir: Path
    args: argparse.Namespace = field(repr=False)  # the ESD options, forwarded to every worker
    gpus: Optional[tuple[int, ...]] = None        # None: CPU mode
    num_gpus_per_job: int = 1
    gpu_memory_threshold: float = 500.0
    max_check: int = 10
    poll_interval: float = 10.0
    cpu_workers: int = 1
    overwrite: bool = False
    limit: Optional[int] = None
    skip_failed: bool = False
    max_retries: int = 2
    retry_backoff: float = 30.0
    cleanup_cache: bool = False
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# The model list.

def read_model_list(path: Path) -> list[ListEntry]:
    """Parse the list; tolerant of a BOM, blank lines, spaces and extra columns; de-duplicated."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model list {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"model list {path} is empty")
    reader = csv.DictReader(io.StringIO("\n".join(lines)), skipinitialspace=True)
    columns = {(name or "").strip() for name in reader.fieldnames or []}
    if "model_id" not in columns:
        raise InputError(f"model list {path} has no model_id column (columns: "
                         f"{', '.join(sorted(columns)) or 'none'}); the first line must be a header")
    entries, seen = [], set()
    for raw in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
        entry = ListEntry(row.get("model_id", ""), row.get("base_model_relation", ""),
                          row.get("source_model", ""))
        if entry.model_id and entry not in seen:
            seen.add(entry)
            entries.append(entry)
    if not entries:
        raise InputError(f"model list {path} names no model")
    return entries


# ---------------------------------------------------------------------------------------------
# Planning: which entries run, which are skipped.

@dataclass
class Plan:
    to_run: list[tuple[ListEntry, ModelPaths]]
    done: list[ListEntry]
    skipped_failed: list[ListEntry]
    invalid: list[tuple[ListEntry, str]]


def make_plan(entries: list[ListEntry], config: RunConfig, failures: FailureLog) -> Plan:
    plan = Plan([], [], [], [])
    for entry in entries[: config.limit] if config.limit is not None else entries:
        try:
            paths = model_paths(config.output_dir, entry.model_id, config.log_dir)
        except ESDError as exc:
            plan.invalid.append((entry, str(exc)))
            continue
        if not config.overwrite and is_complete(paths.csv, RESULT_COLUMNS):
            plan.done.append(entry)
        elif config.skip_failed and entry.model_id in failures:
            plan.skipped_failed.append(entry)
        else:
            plan.to_run.append((entry, paths))
    return plan


def worker_argv(entry: ListEntry, config: RunConfig, threads: Optional[int]) -> list[str]:
    argv = [sys.executable, str(WORKER), "--model_id", entry.model_id,
            "--output_dir", str(config.output_dir), "--log_dir", str(config.log_dir),
            "--parent_pid", str(os.getpid()), *esd_argv(config.args)]
    if entry.base_model_relation:
        argv += ["--base_model_relation", entry.base_model_relation]
    if entry.source_model:
        argv += ["--source_model", entry.source_model]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if config.cleanup_cache:
        argv.append("--cleanup_cache")
    if config.trust_remote_code:
        argv.append("--trust_remote_code")
    if config.cache_dir:
        argv += ["--cache_dir", config.cache_dir]
    return argv
