"""What a run does with its list: which models are done, which run, in which jobs, with which
worker command line; and, as jobs end, what each model's outcome is.

``make_plan`` sorts the listed models into done (a result computed with this run's estimator
options), skipped, invalid and to run; ``worker_argv`` is the one place that turns a job into
a worker command line; ``Outcomes`` reads how each model of a finished job ended (its result,
its failure record, or the job's exit) and keeps the outage rule: several different jobs
failing in a row because the hub cannot be reached stop the run, without recording their
models as failed. Imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from esd_experiment.core.delta_paths import DELTA_DIR, DELTA_KEY, delta_paths, has_delta
from esd_experiment.core.errors import ESDError
from esd_experiment.core.paths import ModelPaths, model_key, model_paths
from esd_experiment.core.results import eigs_options, is_current, split_options_key
from esd_experiment.estimator.metrics import METRIC_PATH_VAR, metric_dirs
from esd_experiment.estimator.options import esd_argv, esd_config_from_args
from esd_experiment.run.model_list import JobSpec, ListEntry
from esd_experiment.run.state import FailureLog, read_failure_cause, read_stage
from esd_experiment.run.worker import EXIT_DISK_FULL, EXIT_TRANSIENT

logger = logging.getLogger("run_esd_experiment")

# The worker door, beside the package (in a checkout, and where pip installs both)
WORKER = Path(__file__).resolve().parents[2] / "esd_worker.py"
LOG_TAIL_LINES = 5
OUTAGE_JOBS = 3  # different jobs failing in a row on the network: the hub is unreachable


@dataclass
class Plan:
    to_run: list[tuple[ListEntry, ModelPaths]] = field(default_factory=list)
    done: list[ListEntry] = field(default_factory=list)
    skipped_failed: list[ListEntry] = field(default_factory=list)
    invalid: list[tuple[ListEntry, str]] = field(default_factory=list)
    recomputed: list[ListEntry] = field(default_factory=list)  # from saved eigenvalues, now

    @property
    def total(self) -> int:
        return (len(self.to_run) + len(self.done) + len(self.skipped_failed)
                + len(self.invalid) + len(self.recomputed))


def make_plan(entries: list[ListEntry], output_dir: Path, log_dir: Path, options: str,
              save_eigs: bool, overwrite: bool, skip_failed: bool, failures: FailureLog,
              limit: int | None = None, delta: bool = False) -> Plan:
    plan = Plan()
    for entry in entries[:limit] if limit is not None else entries:
        try:
            paths = model_paths(output_dir, entry.model_id, log_dir, entry.gguf_file)
        except ESDError as exc:
            plan.invalid.append((entry, str(exc)))
            continue
        # (only an adapter: the list reads another model naming itself as naming none)
        if delta and entry.source_model.strip() and not entry.gguf_file and model_key(
                entry.source_model) == model_key(entry.model_id):
            plan.invalid.append((entry, "--delta: its source_model is the model itself"))
            continue
        # An adapter the list does not mark whose delta failed is held to its delta while
        # failed_models.txt records it (its own result is current: the delta failed after it).
        wants_delta = delta and (has_delta(entry) or entry.key in failures)
        if not overwrite and result_done(paths, options, save_eigs, wants_delta):
            plan.done.append(entry)
        elif skip_failed and entry.key in failures:
            plan.skipped_failed.append(entry)
        else:
            plan.to_run.append((entry, paths))
    return plan


def drop_old_results(key: str, found: list[ModelPaths], eigs: bool) -> None:
    """Remove the results of ``found`` (a model's, its delta's) that --overwrite was to
    replace and a failure left standing, their saved eigenvalues too when ``eigs`` (only a
    run that saves its own removes them: they record the options they were computed with)."""
    for paths in found:
        for path in (paths.csv, paths.eigs) if eigs else (paths.csv,):
            if path.exists():
                path.unlink()
                logger.warning("%s: removed %s, the result --overwrite was to replace", key,
                               path)


def result_done(paths: ModelPaths, options: str, save_eigs: bool, delta: bool = False) -> bool:
    """A model is done when its CSV (and, under --save_eigs, its eigenvalues) exists and was
    computed with the estimator options ``options`` (an ``options_key``; the eigenvalues
    record its part without custom metrics); with ``delta``, so does its delta's."""
    return is_current(paths.csv, options) and (
        not save_eigs or eigs_options(paths.eigs) == split_options_key(options)[0]) and (
        not delta or result_done(delta_paths(paths), options, save_eigs))


def estimator_options(args) -> dict:
    """The options that change the numbers (not where or how fast they are computed), and
    the custom metrics' names when there are any."""
    record = esd_config_from_args(args, "cpu").options_record
    return {**record, DELTA_KEY: True} if getattr(args, "delta", False) else record


def worker_argv(spec: JobSpec, args, output_dir: Path, log_dir: Path,
                stage_file: Path | None, parent_pid: int | None) -> list[str]:
    """The worker's command line for a job. Tokens travel in the environment, never here."""
    argv = [sys.executable, str(WORKER), "--model_id", *(e.model_id for e in spec.entries),
            "--output_dir", str(output_dir), "--log_dir", str(log_dir), *esd_argv(args)]
    if spec.base:  # a base and its adapters: the adapters are marked, the base named
        # (beside full fine-tunes of the base, under --delta, adapters are told by their files)
        full = any(e.source_model and not e.is_adapter and e.model_id != spec.base
                   for e in spec.entries)
        argv += ["--source_model", spec.base, "--base_model_relation", "" if full else "adapter"]
        argv += [a for e in spec.entries if e.model_id == spec.base and e.source_model
                 for a in ("--base_source_model", e.source_model)]
    else:
        (entry,) = spec.entries
        if entry.base_model_relation:
            argv += ["--base_model_relation", entry.base_model_relation]
        if entry.source_model:
            argv += ["--source_model", entry.source_model]
        if entry.gguf_file:
            argv += ["--gguf_file", entry.gguf_file]
    if parent_pid is not None:
        argv += ["--parent_pid", str(parent_pid)]
    if stage_file is not None:
        argv += ["--stage_file", str(stage_file)]
    if not args.overwrite:  # a result found current is the user's: it stays as it is
        argv.append("--keep_current")
    if args.cleanup_cache:
        argv.append("--cleanup_cache")
    if args.trust_remote_code:
        argv.append("--trust_remote_code")
    if args.cache_dir:
        argv += ["--cache_dir", args.cache_dir]
    return argv


def worker_env(args) -> dict[str, str]:
    """The worker's own environment variables: where the runner found the ``--metric
    package.module:FUNCTION`` metrics, for a worker that runs elsewhere."""
    dirs = metric_dirs(getattr(args, "metric", None) or ())
    return {METRIC_PATH_VAR: os.pathsep.join(dirs)} if dirs else {}


@dataclass(frozen=True)
class Outcome:
    """How one model of a finished job ended: ``done``, ``retry`` (transient), ``failed``,
    or ``disk_full`` (the run stops; ``cause`` is then the path whose disk is full, or "")."""

    entry: ListEntry
    state: str
    cause: str = ""
    network: bool = False
    # Its own result is one the job wrote (a failure is then its delta's): under --overwrite
    # that result stays, only an older one is dropped.
    fresh: bool = False


Signature = tuple[int, int, int] | None


def result_signature(csv: Path) -> Signature:
    """What tells a result file apart from the one that stood there before: inode, time and
    size (``write_atomic`` renames a new file into place); None when there is none."""
    try:
        st = csv.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def written_by(csv: Path, before: Signature, started_at: float) -> bool:
    """The result at ``csv`` was written by the job that started at ``started_at`` (wall
    clock) and found ``before`` there: it is another file, or (a job an earlier run
    submitted, collected by this one) a file written since the job started."""
    now = result_signature(csv)
    return now is not None and (now != before or now[1] / 1e9 >= started_at)


def model_outcomes(result, spec: JobSpec, paths: list[ModelPaths], options: str,
                   save_eigs: bool, before: list[tuple[Signature, Signature]] | None = None,
                   delta: bool = False) -> list[Outcome]:
    """Each model's outcome of a finished job (``gputracker.JobResult``), from its result
    file, else its failure record, else the job's own end (exit code, signal, timeout).
    With ``before`` (the signatures of each model's result and delta found when the job was
    made, under --overwrite) only a result and a delta this job wrote count as done."""
    out = []
    for i, (entry, model) in enumerate(zip(spec.entries, paths, strict=True)):
        with_delta = delta and has_delta(entry)
        mine = before is None or written_by(model.csv, before[i][0], result.started_at)
        delta_mine = before is None or not with_delta or written_by(
            delta_paths(model).csv, before[i][1], result.started_at)
        # The worker clears a model's failure record as it starts: one there now is this
        # job's (the delta of an adapter the list does not mark fails beside its result).
        record = _failure_record(model.failure)
        if result_done(model, options, save_eigs, with_delta) and mine and delta_mine \
                and record is None:
            out.append(Outcome(entry, "done"))  # also in a job that timed out later
            continue
        fresh = before is not None and mine and result_done(model, options, save_eigs)
        if record is not None and record.get("disk_full"):
            out.append(Outcome(entry, "disk_full", str(record.get("path") or "")))
        elif result.returncode == EXIT_DISK_FULL and not result.timed_out:
            out.append(Outcome(entry, "disk_full"))  # it could not even write its record
        elif result.timed_out:
            stage = read_stage(stage_file_of(result.job.log_path))
            out.append(Outcome(entry, "retry", f"timeout after {result.job.timeout:g} s in "
                                               f"{stage}; log {model.log}"))
        elif record is not None:
            cause = read_failure_cause(model.failure) or "unknown error"
            out.append(Outcome(entry, "retry" if record.get("transient") else "failed", cause,
                               bool(record.get("network"))))
        elif result.ok:
            own = mine and result_done(model, options, save_eigs)  # else its delta is missing
            missing = f"{DELTA_DIR}/{model.csv.name}" if own else model.csv.name
            out.append(Outcome(entry, "failed", f"worker exited 0 but {missing} is "
                                                f"missing or incomplete; log {model.log}"))
        else:
            # A worker killed by a signal it did not ask for (the kernel's OOM killer) may pass.
            transient = result.returncode == EXIT_TRANSIENT or result.returncode < 0
            out.append(Outcome(entry, "retry" if transient else "failed",
                               f"worker {result.describe()}; log {model.log}: "
                               f"{_tail(result) or 'empty'}"))
        if fresh:
            out[-1] = replace(out[-1], fresh=True)
    return out


def stage_file_of(log_path: Path) -> Path:
    """Where a job's worker keeps its stage: beside the job's log."""
    return Path(log_path).with_suffix(".stage")


def _failure_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _tail(result) -> str:
    try:
        return " | ".join(line.strip() for line in result.tail(LOG_TAIL_LINES) if line.strip())
    except OSError:
        return ""


class OutageWatch:
    """Network failures of several different jobs in a row mean the hub is unreachable.

    Counted per job, by its base (or its one model): the models of a base that cannot be
    reached fail together and count once, as do the retries of a job. The models such jobs
    failed for good are held back instead of being recorded; any other outcome ends the
    streak and lets them be recorded as the failures they are.
    """

    def __init__(self, threshold: int = OUTAGE_JOBS):
        self.threshold = threshold
        self.jobs: list[str] = []
        self.held: dict[str, Outcome] = {}

    def network_failure(self, job: str, failed: list[Outcome]) -> bool:
        """A job all of whose failures the network caused, with the models it failed for
        good; True when it makes an outage."""
        if job not in self.jobs:
            self.jobs.append(job)
        self.held.update((o.entry.key, o) for o in failed)
        return len(self.jobs) >= self.threshold

    def other(self) -> list[Outcome]:
        """Any other outcome: the held failures, to record now."""
        held, self.held, self.jobs = list(self.held.values()), {}, []
        return held


def outage_message(jobs: list[str]) -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return (f"the hub cannot be reached: {len(jobs)} jobs in a row failed on the network "
            f"({', '.join(jobs[:5])}); nothing was recorded as failed for them. Check the "
            f"network and HF_ENDPOINT ({endpoint}), or set HF_HUB_OFFLINE=1 to use the models "
            "already in the cache; rerun the same command to continue")


def disk_full_message(path: Path | str, models: list[str]) -> str:
    stopped = (f"{len(models)} model(s) stopped there ({', '.join(models[:5])}), "
               if models else "")
    return (f"the disk holding {path} is full (no space left, or the quota is used up); "
            f"{stopped}no model was recorded as failed because of it. Free space and rerun the same "
            "command to continue")


def fullest_disk(paths: list[Path]) -> Path:
    """Of the directories a run writes to, the one whose filesystem has the least room."""
    def room(path: Path) -> float:
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            st = os.statvfs(path)
        except OSError:
            return float("inf")
        return st.f_bavail * st.f_frsize

    return min(paths, key=room)
