"""ESD metrics for every model of a list: one worker subprocess per model, on GPUs or CPUs.

Usage: python run_esd_experiment.py --model_list models.csv --output_dir results/ [--gpus 0 1 2 3]
       python run_esd_experiment.py --demo --output_dir demo/

Reads the model list (CSV: model_id, optional base_model_relation and source_model). Writes
under --output_dir one ``<org--name>.csv`` per model (columns: results.RESULT_COLUMNS),
``failed_models.txt`` (model id, tab, cause), one log per model under --log_dir and the
run's own log, ``<log_dir>/esd_experiment.log``.
Finished models are skipped on a rerun. Exit code: 0 when no model failed, 1 when some model
failed, 2 for bad input (list, flags, a second run on the same output), 128 + the signal
number when interrupted (130 after Ctrl-C).
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
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from errors import ESDError, InputError
from esd_config import add_esd_arguments, esd_argv, esd_config_from_args
from esd_worker import EXIT_TRANSIENT, model_paths
from gputracker import Dispatcher, Job, JobResult, detect_gpus, install_signal_handlers
from paths import ModelPaths
from results import eigs_options, is_current
from run_state import FailureLog, RunLock, check_options, read_failure_cause

logger = logging.getLogger("run_esd_experiment")

EXIT_SOME_FAILED = 1
EXIT_BAD_INPUT = 2
WORKER = Path(__file__).resolve().with_name("esd_worker.py")
LOG_TAIL_LINES = 5
RUN_LOG = "esd_experiment.log"  # the runner's own log, beside the per-model logs


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
    trust_remote_code: bool = False
    cache_dir: str | None = None
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# The model list.

def read_model_list(path: Path) -> list[ListEntry]:
    """Parse the list; tolerant of a BOM, blank lines, spaces and extra columns; de-duplicated."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model list {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"model list {path} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start}): save it as UTF-8 CSV") from None
    except OSError as exc:
        raise InputError(f"model list {path} cannot be read: {exc.strerror}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"model list {path} is empty")
    reader = csv.DictReader(io.StringIO("\n".join(lines)), skipinitialspace=True)
    columns = {(name or "").strip() for name in reader.fieldnames or []}
    if "model_id" not in columns:
        raise InputError(f"model list {path} has no model_id column (columns: "
                         f"{', '.join(sorted(columns)) or 'none'}); the first line must be a header")
    entries: dict[str, ListEntry] = {}
    for raw in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
        entry = ListEntry(row.get("model_id", ""), row.get("base_model_relation", ""),
                          row.get("source_model", ""))
        if any(not ch.isprintable() for ch in entry.model_id + entry.source_model):
            logger.warning("%s, line %d: skipped, its ids hold tabs, line breaks or other "
                           "control characters: %r", path, reader.line_num, entry.model_id)
            continue
        first = entries.setdefault(entry.model_id, entry) if entry.model_id else entry
        if first != entry:  # one result file per model id: the first row wins
            logger.warning("%s is listed twice with different adapter columns; using the "
                           "first row (%r, %r)", entry.model_id, first.base_model_relation,
                           first.source_model)
    if not entries:
        raise InputError(f"model list {path} names no model")
    return list(entries.values())


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
        if not config.overwrite and result_done(paths, config):
            plan.done.append(entry)
        elif config.skip_failed and entry.model_id in failures:
            plan.skipped_failed.append(entry)
        else:
            plan.to_run.append((entry, paths))
    return plan


def result_done(paths: ModelPaths, config: RunConfig) -> bool:
    """A model is done when its CSV (and, under --save_eigs, its eigenvalues) exists and was
    computed with this run's estimator options."""
    options = esd_config_from_args(config.args, "cpu").options_key
    return is_current(paths.csv, options) and (
        not config.args.save_eigs or eigs_options(paths.eigs) == options)


def estimator_options(args: argparse.Namespace) -> dict:
    """The options that change the numbers (not where or how fast they are computed)."""
    config = esd_config_from_args(args, "cpu")
    return {name: getattr(config, name) for name in ("fix_fingers", "xmin_pos", "bins",
            "evals_thresh", "filter_zeros", "conv_norm", "min_evals", "precision")}


def worker_argv(entry: ListEntry, config: RunConfig) -> list[str]:
    """The worker's command line. Tokens travel in the environment, never here."""
    argv = [sys.executable, str(WORKER), "--model_id", entry.model_id,
            "--output_dir", str(config.output_dir), "--log_dir", str(config.log_dir),
            "--parent_pid", str(os.getpid()), *esd_argv(config.args)]
    if entry.base_model_relation:
        argv += ["--base_model_relation", entry.base_model_relation]
    if entry.source_model:
        argv += ["--source_model", entry.source_model]
    if config.cleanup_cache:
        argv.append("--cleanup_cache")
    if config.trust_remote_code:
        argv.append("--trust_remote_code")
    if config.cache_dir:
        argv += ["--cache_dir", config.cache_dir]
    return argv


# ---------------------------------------------------------------------------------------------
# Running: dispatch, retries, failure records, progress.

class _BarSafeHandler(logging.Handler):
    """Writes log records above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


class Progress:
    """A progress bar (done / failed / running, ETA) on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.failed = total, 0, 0
        self._bar = None
        self._saved_handlers: list[logging.Handler] = []
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm

            root = logging.getLogger()
            self._saved_handlers = list(root.handlers)
            consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
            handler = _BarSafeHandler()
            if consoles:
                handler.setFormatter(consoles[0].formatter)
            root.handlers = [h for h in root.handlers if h not in consoles] + [handler]
            # Per-job start/exit lines would bury the bar; failures are still reported below.
            logging.getLogger("gputracker").setLevel(logging.WARNING)
            self._bar = tqdm(total=total, unit="model", dynamic_ncols=True, file=sys.stderr)

    def finished(self, model_id: str, ok: bool, running: int, detail: str = "") -> None:
        self.done += ok
        self.failed += not ok
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(done=self.done, failed=self.failed, running=running)
        if not ok:
            logger.warning("[%d/%d] FAILED %s: %s", self.done + self.failed, self.total,
                           model_id, detail)
        elif self._bar is None:
            logger.info("[%d/%d] done %s", self.done + self.failed, self.total, model_id)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            logging.getLogger().handlers = self._saved_handlers
            logging.getLogger("gputracker").setLevel(logging.NOTSET)


class Runner:
    """Turns finished jobs into results, retries and failure records."""

    def __init__(self, config: RunConfig, dispatcher: Dispatcher, failures: FailureLog,
                 progress: Progress):
        self.config, self.dispatcher = config, dispatcher
        self.failures, self.progress = failures, progress

    def job(self, entry: ListEntry, paths: ModelPaths) -> Job:
        return Job(name=entry.model_id, argv=worker_argv(entry, self.config),
                   log_path=paths.log, payload=(entry, paths))

    def on_finish(self, result: JobResult) -> list[Job]:
        entry, paths = result.job.payload
        running = self.dispatcher.running_jobs
        if result.stopped:
            return []  # interrupted: neither a result nor a failure; the next run retries it
        if result.ok and result_done(paths, self.config):
            self.failures.clear(entry.model_id)
            self.progress.finished(entry.model_id, True, running)
            return []
        # A worker killed by a signal it did not ask for (the kernel's OOM killer) may pass.
        transient = result.returncode == EXIT_TRANSIENT or result.returncode < 0
        attempt = result.job.attempt
        if transient and attempt <= self.config.max_retries:
            delay = self.config.retry_backoff * 2 ** (attempt - 1)
            logger.warning("%s: transient failure (%s), retry %d/%d in %.0f s; log %s",
                           entry.model_id, result.describe(), attempt, self.config.max_retries,
                           delay, paths.log)
            return [replace(result.job, attempt=attempt + 1,
                            not_before=self.dispatcher.now() + delay)]
        cause = self.cause(result, paths)
        self.failures.record(entry.model_id, cause)
        self.progress.finished(entry.model_id, False, running, cause)
        return []

    def cause(self, result: JobResult, paths: ModelPaths) -> str:
        recorded = read_failure_cause(paths.failure)
        if recorded:
            return recorded
        if result.ok:
            return f"worker exited 0 but {paths.csv.name} is missing or incomplete; log {paths.log}"
        try:
            tail = " | ".join(line.strip() for line in result.tail(LOG_TAIL_LINES) if line.strip())
        except OSError:
            tail = ""
        return f"worker {result.describe()}; log {paths.log}: {tail or 'empty'}"


def make_dispatcher(config: RunConfig) -> Dispatcher:
    return Dispatcher(
        list(config.gpus) if config.gpus else None, gpus_per_job=config.num_gpus_per_job,
        memory_threshold_mb=config.gpu_memory_threshold, max_check=config.max_check,
        poll_interval=config.poll_interval, cpu_slots=config.cpu_workers,
    )


def run(config: RunConfig, dispatcher: Dispatcher | None = None) -> int:
    """Run the whole list; returns the process exit code."""
    started = time.monotonic()
    entries = read_model_list(config.model_list)
    dispatcher = dispatcher or make_dispatcher(config)
    with RunLock(config.output_dir), run_log(config.log_dir / RUN_LOG):
        check_options(config.output_dir, estimator_options(config.args), config.overwrite)
        failures = FailureLog(config.output_dir)
        plan = make_plan(entries, config, failures)
        for entry, reason in plan.invalid:
            failures.record(entry.model_id, reason)
        mode = (f"GPUs {list(config.gpus)}, {config.num_gpus_per_job} per job" if config.gpus
                else f"CPU, {config.cpu_workers} worker(s) of {dispatcher.threads_per_job} threads")
        logger.info("%d models: %d to run, %d already done, %d failed before and skipped, "
                    "%d invalid; %s", len(plan.to_run) + len(plan.done) + len(plan.skipped_failed)
                    + len(plan.invalid), len(plan.to_run), len(plan.done),
                    len(plan.skipped_failed), len(plan.invalid), mode)
        progress = Progress(len(plan.to_run), config.progress)
        runner = Runner(config, dispatcher, failures, progress)
        restore = install_signal_handlers(dispatcher)
        try:
            dispatcher.run([runner.job(e, p) for e, p in plan.to_run], runner.on_finish)
        finally:
            restore()
            progress.close()
        failed = progress.failed + len(plan.invalid)
        logger.info("%s: done %d, skipped %d, failed %d, in %s%s",
                    "interrupted" if dispatcher.stopped else "finished", progress.done,
                    len(plan.done) + len(plan.skipped_failed), failed,
                    format_duration(time.monotonic() - started),
                    f"; failures in {failures.path}" if failed else "")
    if dispatcher.stopped:
        return 128 + (dispatcher.stop_signum or signal.SIGINT)
    return EXIT_SOME_FAILED if failed else 0


@contextmanager
def run_log(path: Path):
    """Copy this process's log lines to ``path`` (appended: one file tells every run's story)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def summary_table(config: RunConfig) -> str:
    """One line per listed model with a result: layers, fitted layers and alpha statistics."""
    import pandas as pd

    lines = []
    for entry in read_model_list(config.model_list):
        paths = model_paths(config.output_dir, entry.model_id, config.log_dir)
        if result_done(paths, config):
            df = pd.read_csv(paths.csv)
            ok = df[df.status == "ok"]
            lines.append({"model": Path(entry.model_id).name, "layers": len(df),
                          "fitted": len(ok), "mean_alpha": ok.alpha.mean(),
                          "median_alpha": ok.alpha.median(), "result": paths.csv.name})
    return pd.DataFrame(lines).to_string(index=False, float_format="%.2f") if lines else ""


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_list", type=Path, help="CSV with model_id[,base_model_relation,source_model]")
    p.add_argument("--output_dir", type=Path, required=True, help="one CSV per model goes here")
    p.add_argument("--log_dir", type=Path, default=None, help="per-model logs (default: <output_dir>/logs)")
    p.add_argument("--demo", action="store_true",
                   help="build a small offline model zoo under <output_dir>/zoo and analyse it")
    g = p.add_argument_group("scheduling")
    g.add_argument("--gpus", type=int, nargs="*", default=None,
                   help="GPU indices to use (default: all that NVML reports; none -> CPU)")
    g.add_argument("--num_gpus_per_job", type=int, default=1, help="GPUs per model")
    g.add_argument("--gpu_memory_threshold", type=float, default=500,
                   help="MB: a GPU using less is free")
    g.add_argument("--max_check", type=int, default=10,
                   help="consecutive free readings before a GPU is used")
    g.add_argument("--poll_interval", type=float, default=10.0, help="seconds between GPU polls")
    g.add_argument("--cpu_workers", type=int, default=1,
                   help="CPU mode: models analysed at once (the cores are split between them)")
    g = p.add_argument_group("experiment control")
    g.add_argument("--overwrite", action="store_true", help="recompute models that have a result")
    g.add_argument("--limit", type=int, default=None, help="only the first N models of the list")
    g.add_argument("--skip_failed", action="store_true",
                   help="skip models listed in failed_models.txt instead of retrying them")
    g.add_argument("--max_retries", type=int, default=2,
                   help="retries of a transient failure (OOM, hub timeout) within the run")
    g.add_argument("--retry_backoff", type=float, default=30.0,
                   help="seconds before the first retry, doubled for each next one")
    g.add_argument("--cleanup_cache", action="store_true",
                   help="delete each hub model's downloaded files once its result is written")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="allow a model's own code to run (only the adapter fallback needs it)")
    g.add_argument("--cache_dir", default=None, help="Hugging Face cache (default: HF_HOME's)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on a terminal")
    add_esd_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    for name in ("num_gpus_per_job", "max_check", "cpu_workers"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 0:
        raise InputError(f"--limit must be 0 or more, got {args.limit}")
    if args.max_retries < 0 or args.retry_backoff < 0 or args.poll_interval <= 0:
        raise InputError("--max_retries and --retry_backoff must be >= 0, --poll_interval > 0")
    esd_config_from_args(args, "cpu")  # refuses bad estimator options before any worker starts
    if args.device.startswith("cuda:"):
        raise InputError(f"--device {args.device}: the runner gives each job its GPUs; choose "
                         "them with --gpus (esd_worker.py alone takes --device cuda:N)")
    if args.model_list is None:
        raise InputError("--model_list is required (or --demo)")
    gpus = choose_gpus(args)
    if gpus and args.num_gpus_per_job > len(gpus):
        raise InputError(f"--num_gpus_per_job {args.num_gpus_per_job} exceeds the "
                         f"{len(gpus)} GPU(s) available: {list(gpus)}")
    output_dir = args.output_dir.resolve()
    return RunConfig(
        model_list=args.model_list, output_dir=output_dir,
        log_dir=(args.log_dir or output_dir / "logs").resolve(), args=args, gpus=gpus,
        num_gpus_per_job=args.num_gpus_per_job, gpu_memory_threshold=args.gpu_memory_threshold,
        max_check=args.max_check, poll_interval=args.poll_interval, cpu_workers=args.cpu_workers,
        overwrite=args.overwrite, limit=args.limit, skip_failed=args.skip_failed,
        max_retries=args.max_retries, retry_backoff=args.retry_backoff,
        cleanup_cache=args.cleanup_cache, trust_remote_code=args.trust_remote_code,
        cache_dir=args.cache_dir, progress=args.progress,
    )


def choose_gpus(args: argparse.Namespace) -> tuple[int, ...] | None:
    """CPU mode for --device cpu or when no GPU is found; else --gpus, or every GPU NVML lists."""
    if args.device == "cpu":
        return None
    if args.gpus is not None:
        return tuple(args.gpus) or None
    found = detect_gpus()
    if not found and args.device.startswith("cuda"):
        raise InputError(f"--device {args.device} asked for, but NVML reports no GPU")
    return tuple(found) or None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.demo:
            from demo import DEMO_LIST, build_demo_zoo

            device = "cpu" if args.device == "auto" and not detect_gpus() else args.device
            model_list = args.output_dir / "zoo" / DEMO_LIST
            if not model_list.is_file():  # built once: a rerun resumes like any other run
                model_list = build_demo_zoo(args.output_dir / "zoo")
            args = argparse.Namespace(**{**vars(args), "model_list": model_list, "device": device})
        config = config_from_args(args)
        code = run(config)
        if args.demo:
            print(summary_table(config))
        return code
    except InputError as exc:
        print(f"run_esd_experiment: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ESDError as exc:  # the machine failed us (a GPU lost mid-run): results so far are kept
        print(f"run_esd_experiment: error: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED


if __name__ == "__main__":
    sys.exit(main())
