"""What a run does with its jobs: the run's configuration, the worker job of each group of
models, and, as each job ends, each model's result, retry or failure record, and its state in
the run's accounts. A full disk or an unreachable hub stops the run instead of failing models.
Imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from esd_experiment.core.delta_paths import delta_paths, has_delta
from esd_experiment.core.errors import disk_full_error
from esd_experiment.core.paths import model_paths
from esd_experiment.estimator.options import ESDConfig, esd_config_from_args, pinned_args
from esd_experiment.run.accounts import Accounts
from esd_experiment.run.model_list import JobSpec
from esd_experiment.run.plan import (
    OutageWatch,
    Outcome,
    disk_full_message,
    drop_old_results,
    fullest_disk,
    model_outcomes,
    outage_message,
    result_signature,
    stage_file_of,
    worker_argv,
    worker_env,
)
from esd_experiment.run.progress import Progress
from esd_experiment.run.state import FailureLog
from gputracker import Job, JobResult

logger = logging.getLogger("run_esd_experiment")


@dataclass(frozen=True)
class RunConfig:
    model_list: Path
    output_dir: Path
    log_dir: Path
    args: argparse.Namespace = field(repr=False)  # ESD and backend options, forwarded
    gpus: tuple[int, ...] | None = None        # None: CPU mode
    num_gpus_per_job: int = 1
    gpu_memory_threshold: float = 500.0
    max_check: int = 10
    poll_interval: float = 10.0
    cpu_workers: int = 1
    overwrite: bool = False
    limit: int | None = None
    skip_failed: bool = False
    max_retries: int = 2
    retry_backoff: float = 30.0
    cleanup_cache: bool = False
    cache_dir: str | None = None
    progress: bool = True
    max_group: int = 8                 # models per job for a base and its adapters
    model_timeout: float | None = None  # seconds one attempt may take, on any backend
    backend: str = "local"
    # The estimator's options, custom metrics loaded once: the run holds to the versions of
    # the metrics' files it started with, whatever becomes of the files meanwhile.
    esd: ESDConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "esd", esd_config_from_args(self.args, "cpu"))

    @property
    def options_key(self) -> str:
        return self.esd.options_key

    @property
    def worker_args(self) -> argparse.Namespace:
        """``args`` as the workers get them: each ``--metric`` pinned to the version of its
        file the run started with (a worker that finds another fails the model)."""
        return pinned_args(self.args, self.esd)


class Runner:
    """Turns finished jobs into results, retries and failure records, model by model, and
    gives each list entry its state in ``accounts``."""

    def __init__(self, config: RunConfig, backend, failures: FailureLog, progress: Progress,
                 pins=None, accounts: Accounts | None = None):
        self.config, self.backend = config, backend
        self.failures, self.progress, self.pins = failures, progress, pins
        self.accounts = accounts if accounts is not None else Accounts(None)
        self.watch = OutageWatch()
        self.outage: list[str] = []
        self.disk_full = ""  # why the run stopped on a full disk

    def job(self, spec: JobSpec, attempt: int = 1, not_before: float | None = None) -> Job:
        paths = [model_paths(self.config.output_dir, e.model_id, self.config.log_dir, e.gguf_file)
                 for e in spec.entries]
        log = paths[0].log
        local = self.config.backend == "local"
        argv = worker_argv(spec, self.config.worker_args, self.config.output_dir,
                           self.config.log_dir, stage_file_of(log), os.getpid() if local else None)
        start = log.stat().st_size if log.is_file() else 0  # where this run's output begins
        # Under --overwrite only a result the job writes counts (its delta's too): what stands
        # there now does not, and stays until the model fails (a stopped run leaves it).
        before = [(result_signature(p.csv), result_signature(delta_paths(p).csv))
                  for p in paths] if self.config.overwrite else None
        return Job(name=spec.name, argv=argv, env=worker_env(self.config.args), log_path=log,
                   payload=(spec, paths, start, before), attempt=attempt,
                   not_before=not_before, timeout=self.config.model_timeout)

    def on_finish(self, result: JobResult) -> list[Job]:
        spec, paths, start, before = result.job.payload
        if result.stopped:
            return []  # interrupted: neither a result nor a failure; the next run retries it
        _share_log(result.job.log_path, start, paths[1:])
        outcomes = model_outcomes(result, spec, paths, self.config.options_key,
                                  self.config.args.save_eigs, before, self.config.args.delta)
        for outcome in outcomes:
            if outcome.state == "done":
                self._done(outcome)
        full = [o for o in outcomes if o.state == "disk_full"]
        if full:
            self.stop_on_full_disk(full[0].cause, [o.entry.key for o in full])
            return []
        last = result.job.attempt > self.config.max_retries
        retry = [o for o in outcomes if o.state == "retry" and not last]
        final = [replace(o, state="failed") for o in outcomes
                 if o.state == "failed" or o.state == "retry" and last]
        if outcomes and all(o.network for o in outcomes):
            # One job failing on the network, however many models it holds, counts once.
            if self.watch.network_failure(spec.base or spec.entries[0].key, final):
                self.outage = list(self.watch.jobs)
                self.backend.stop("the hub cannot be reached")
                return []
        else:
            self._record_held()
            for outcome in final:
                self._fail(outcome)
        jobs = []
        if retry and not self.stop_cause:
            delay = self.config.retry_backoff * 2 ** (result.job.attempt - 1)
            for outcome in retry:
                logger.warning("%s: transient failure (%s), retry %d/%d in %.0f s",
                               outcome.entry.key, outcome.cause, result.job.attempt,
                               self.config.max_retries, delay)
            entries = tuple(o.entry for o in retry)
            only_base = [e.model_id for e in entries] == [spec.base]
            again = JobSpec(entries, "" if only_base else spec.base)
            jobs.append(self.job(again, result.job.attempt + 1, self.backend.now() + delay))
        if self.pins is not None and not jobs:
            self.pins.done(spec.base)
        return jobs

    @property
    def stop_cause(self) -> str:
        """Why the run stopped before its list was done ("" while it goes on)."""
        if self.outage:
            return outage_message(self.outage)
        return self.disk_full

    def finish(self) -> None:
        """At the end of a run without an outage: record the network failures held back."""
        self._record_held()

    def _record_held(self) -> None:
        if self.stop_cause:  # an outage holds them: not reached, as its message says
            return
        for held in self.watch.other():
            self._fail(held)

    def _done(self, outcome: Outcome) -> None:
        key = outcome.entry.key
        if self._write_failures(key, lambda: self.failures.clear(key)):
            self.accounts.done(key)
            self.progress.finished(key, True, self.backend.running_jobs)

    def _fail(self, outcome: Outcome) -> None:
        if self.disk_full:
            return  # nothing more is written to a full disk: the model is not reached
        key = outcome.entry.key
        if self.config.overwrite:  # old numbers must not pass for new
            self._drop_old_result(outcome.entry, own=not outcome.fresh)
        if self._write_failures(key, lambda: self.failures.record(key, outcome.cause)):
            self.accounts.failed(key)
            self.progress.finished(key, False, self.backend.running_jobs, outcome.cause)

    def _write_failures(self, key: str, change) -> bool:
        """Apply ``change`` to failed_models.txt; on a full disk stop the run instead."""
        if self.disk_full:
            return False
        try:
            change()
        except OSError as exc:
            if disk_full_error(exc) is None:
                raise
            self.stop_on_full_disk(str(self.failures.path), [key])
            return False
        return True

    def _drop_old_result(self, entry, own: bool = True) -> None:
        """Remove a failed model's old result (``own``) and its delta's, under --overwrite."""
        paths = model_paths(self.config.output_dir, entry.model_id, self.config.log_dir,
                            entry.gguf_file)
        found = [paths] if own else []
        if self.config.args.delta and has_delta(entry):
            found.append(delta_paths(paths))
        drop_old_results(entry.key, found, eigs=self.config.args.save_eigs)

    def stop_on_full_disk(self, path: str, models: list[str]) -> None:
        if self.disk_full:
            return
        where = path or fullest_disk([self.config.output_dir, self.config.log_dir,
                                      hub_cache_dir(self.config)])
        self.disk_full = disk_full_message(where, models)
        self.backend.stop("a disk is full")


def hub_cache_dir(config: RunConfig) -> Path:
    from esd_experiment.hub.client import default_cache_dir

    return Path(default_cache_dir(config.cache_dir))


def _share_log(job_log: Path, start: int, others: Sequence) -> None:
    """Each model of a job gets this run's output of the job in its own log."""
    if not others or not job_log.is_file():
        return
    try:
        with open(job_log, "rb") as fh:
            fh.seek(start)
            text = fh.read()
        for paths in others:
            paths.log.parent.mkdir(parents=True, exist_ok=True)
            with open(paths.log, "ab") as fh:
                fh.write(f"# output of the job shared with {job_log.name}\n".encode() + text)
    except OSError as exc:  # a copy of a log is worth no model's result
        logger.warning("the log of %s could not be shared with its models: %s", job_log.name,
                       exc)
