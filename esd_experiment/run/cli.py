"""ESD metrics for every model of a list: worker jobs on GPUs, CPUs, a Slurm cluster or Ray.

Usage: python run_esd_experiment.py --model_list models.csv --output_dir results/ [--gpus 0 1 2 3]
       python run_esd_experiment.py --model_list models.csv --output_dir results/ --dry_run
       python run_esd_experiment.py --demo --output_dir demo/

Reads the model list (CSV: model_id, optional base_model_relation, source_model, gguf_file).
Writes under --output_dir one ``<org--name>.csv`` per model (columns: results.RESULT_COLUMNS),
``failed_models.txt`` (model id, tab, cause), one log per model under --log_dir and the run's
own log, ``<log_dir>/esd_experiment.log``; with --dry_run only ``preflight/preflight.csv``.
A base and its listed adapters run as one job that reads the base once. Finished models are
skipped on a rerun. Every listed model ends done, failed or not reached (the run stopped),
checked before exit (run/accounts.py). Exit code: 0 only when every listed model is done, 1
when some model failed or the run stopped (hub unreachable, disk full), 2 for bad input (list,
flags, a second run on the same output), 70 when the accounting does not add up (an internal
error), 128 +
the signal number when interrupted (130 after Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from esd_experiment.backends.task_workers import worker_for_tasks
from esd_experiment.core.delta_paths import has_delta
from esd_experiment.core.errors import ESDError, InputError, disk_full_error
from esd_experiment.core.paths import SLURM_STATE, model_paths
from esd_experiment.estimator.options import add_esd_arguments, esd_config_from_args
from esd_experiment.run.accounts import (
    DONE,
    EXIT_INTERNAL,
    FAILED,
    Accounts,
    internal_error_message,
)
from esd_experiment.run.jobs import RunConfig, Runner
from esd_experiment.run.model_list import JobSpec, group_jobs, local_adapter_config, read_model_list
from esd_experiment.run.plan import WORKER, disk_full_message, estimator_options, make_plan
from esd_experiment.run.progress import Progress, format_duration, run_log, summary_table
from esd_experiment.run.saved_eigs import recompute_planned
from esd_experiment.run.state import FailureLog, RunLock, check_options, holds_results
from gputracker import Dispatcher, detect_gpus, install_signal_handlers
from gputracker.pool import launcher_for

logger = logging.getLogger("run_esd_experiment")

EXIT_SOME_FAILED = 1
EXIT_BAD_INPUT = 2
RUN_LOG = "esd_experiment.log"  # the runner's own log, beside the per-model logs
BACKENDS = ("local", "slurm", "ray")


class BasePins:
    """Under --cleanup_cache, a hub base whose models run in several jobs stays in the cache
    until the last of those jobs has finished (a lease held by the runner), then goes."""

    def __init__(self, cache_dir: Path, specs: Sequence[JobSpec]):
        from esd_experiment.hub.cache import CacheSession

        self.session = CacheSession(cache_dir, cleanup=True)
        self.jobs: dict[str, int] = {}
        for spec in specs:
            if spec.base and not Path(spec.base).expanduser().exists():
                self.jobs[spec.base] = self.jobs.get(spec.base, 0) + 1
        for base, count in self.jobs.items():
            if count > 1:
                self.session.lease(base.partition("@")[0])

    def done(self, base: str) -> None:
        if base in self.jobs:
            self.jobs[base] -= 1
            if self.jobs[base] == 0:
                self.session.unlease(base.partition("@")[0])

    def close(self) -> None:
        self.session.close()


def make_backend(config: RunConfig):
    """Where the workers run: the local dispatcher, Slurm (submitit) or Ray."""
    args = config.args
    gpus = 0 if args.device == "cpu" else config.num_gpus_per_job
    if config.backend == "slurm":
        from esd_experiment.backends.slurm import SlurmBackend, slurm_options_from_args

        return SlurmBackend(slurm_options_from_args(args, default_gpus=gpus, job_name="esd",
                                                    require_gpus=gpus_required(args)),
                            (config.output_dir / SLURM_STATE).parent,
                            worker_script=worker_for_tasks(WORKER))
    if config.backend == "ray":
        from esd_experiment.backends.ray_backend import RayBackend, ray_options_from_args

        return RayBackend(ray_options_from_args(args, gpus_per_job=gpus,
                                                require_gpus=gpus_required(args)),
                          worker_script=worker_for_tasks(WORKER))
    return Dispatcher(
        list(config.gpus) if config.gpus else None, gpus_per_job=config.num_gpus_per_job,
        memory_threshold_mb=config.gpu_memory_threshold, max_check=config.max_check,
        poll_interval=config.poll_interval, cpu_slots=config.cpu_workers,
        launcher=launcher_for(WORKER))


def adapter_config_reader(config: RunConfig):
    """How the runner learns an adapter's base: its local ``adapter_config.json`` or, for a
    hub adapter, the same file fetched (small; the worker reuses the cached copy, and under
    --cleanup_cache it is recorded for removal like every download)."""
    from esd_experiment.hub.cache import CacheSession
    from esd_experiment.hub.client import default_cache_dir, hub_json, scrub

    session = CacheSession(default_cache_dir(config.cache_dir), config.cleanup_cache)
    unreachable: list[str] = []  # once the hub cannot be reached, only the cache is read

    def read(model_id: str) -> dict | None:
        found = local_adapter_config(model_id)
        if found is not None:
            return found
        try:
            return hub_json(model_id, "adapter_config.json", config.cache_dir, session,
                            raise_network=True, cached_only=bool(unreachable))
        except Exception as exc:  # noqa: BLE001  (a network failure: hub_json raises no other)
            if unreachable:
                return None
            unreachable.append(model_id)
            logger.warning("the hub could not be reached for %s's adapter_config.json (%s): "
                           "the other adapters listed without a source_model find their bases "
                           "in the cache or run alone", model_id, scrub(str(exc)))
            return None
    return read


def run(config: RunConfig, backend=None) -> int:
    """Run the whole list; returns the process exit code."""
    started = time.monotonic()
    entries = read_model_list(config.model_list)
    backend = backend or make_backend(config)
    with RunLock(config.output_dir), run_log(config.log_dir / RUN_LOG):
        # The options as pinned (worker_args): the metrics' versions the run started with.
        # A directory without results has none to keep comparable: its options are replaced.
        check_options(config.output_dir, estimator_options(config.worker_args),
                      config.overwrite or not holds_results(config.output_dir))
        if config.backend != "slurm":
            refuse_beside_slurm_jobs(config.output_dir)
        failures = FailureLog(config.output_dir)
        plan = make_plan(entries, config.output_dir, config.log_dir, config.options_key,
                         config.args.save_eigs, config.overwrite, config.skip_failed, failures,
                         config.limit, config.args.delta)
        recompute_planned(plan, config.esd, config.args.delta, config.overwrite)
        accounts = Accounts(e.key for e in entries[:config.limit])
        done = plan.done + plan.recomputed
        failures.clear_all(e.key for e in done)  # a killed run may have left a line
        for entry in done:
            accounts.done(entry.key)
        for entry in plan.skipped_failed:
            accounts.failed(entry.key)
        for entry, reason in plan.invalid:
            failures.record(entry.key, reason)
            accounts.failed(entry.key)
        specs = group_jobs([e for e, _ in plan.to_run], config.max_group,
                           adapter_config_reader(config), config.args.delta)
        logger.info("%d models: %d to run, %s%d already done, %d failed before and skipped, "
                    "%d invalid; %d job(s), %s", plan.total, len(plan.to_run),
                    f"{len(plan.recomputed)} computed from saved eigenvalues, "
                    if plan.recomputed else "", len(plan.done), len(plan.skipped_failed),
                    len(plan.invalid), len(specs), describe_backend(config, backend))
        if config.limit is not None and len(entries) > config.limit:
            logger.info("--limit %d: the other %d model(s) of the list are left for a run "
                        "with a larger --limit, or none", config.limit,
                        len(entries) - config.limit)
        pins = sweep_cache(config, specs)
        progress = Progress(len(plan.to_run), config.progress, lambda: backend.running_jobs)
        runner = Runner(config, backend, failures, progress, pins, accounts)
        restore = install_signal_handlers(backend)
        lost = ""  # the machine failed us (GPUs no longer readable): the run stops
        try:
            backend.run([runner.job(spec) for spec in specs], runner.on_finish)
            runner.finish()
        except InputError:
            raise
        except ESDError as exc:
            lost = str(exc)
        except OSError as exc:  # the runner's own write (a job's log) on a full disk
            full = disk_full_error(exc)
            if full is None:
                raise
            runner.stop_on_full_disk(str(full.filename or ""), [])
        finally:
            restore()
            progress.close()
            if pins is not None:
                pins.close()
                sweep_cache(config, ())
        detached = getattr(getattr(backend, "options", None), "detach", False)
        stop_cause = runner.stop_cause or lost
        disk = on_disk(config, entries[:config.limit])
        if (stop_cause or backend.stopped) and not config.overwrite:
            # A job stopped with the run may have written its result first: it is done.
            for key in accounts.not_reached:
                if disk(key) == (True, False):
                    accounts.done(key)
        state = "stopped" if stop_cause else (
            "interrupted" if backend.stopped else "finished")
        failed = accounts.count(FAILED) - len(plan.skipped_failed)  # in this run
        logger.info("%s: done %d, skipped %d, failed %d, not reached %d, in %s%s", state,
                    accounts.count(DONE) - len(plan.done),
                    len(plan.done) + len(plan.skipped_failed), failed,
                    len(accounts.not_reached), format_duration(time.monotonic() - started),
                    f"; failures in {failures.path}" if failed else "")
        if detached:
            logger.info("submitted: Slurm job(s) %s, %d model job(s) queued or running; rerun "
                        "the same command to collect the results; cancel with: %s",
                        " ".join(backend.job_ids), len(backend.left_running),
                        backend.scancel_command())
        code = exit_code(accounts, stop_cause, backend, detached)
        broken = accounts.check(bool(stop_cause) or backend.stopped or detached, disk)
    if stop_cause:
        logger.error("%s", stop_cause)
    if broken:
        logger.error("%s", internal_error_message(broken))
        return EXIT_INTERNAL
    return code


def refuse_beside_slurm_jobs(output_dir: Path) -> None:
    """A run on another backend would compute the models an earlier Slurm run left queued or
    running beside them, two writers of one result: refused, saying how to go on."""
    from esd_experiment.backends.slurm import pending_tasks

    tasks = pending_tasks(output_dir)
    if tasks:
        raise InputError(
            f"{output_dir}: {len(tasks)} Slurm task(s) an earlier run submitted are queued or "
            f"running ({', '.join(tasks[:5])}{', ...' if len(tasks) > 5 else ''}); rerun with "
            f"--backend slurm to collect them, or cancel them first: "
            f"{shlex.join(['scancel', *sorted({t.split('_')[0] for t in tasks})])}")


def exit_code(accounts: Accounts, stop_cause: str, backend, detached: bool) -> int:
    """The run's exit status from its accounts and how it ended."""
    if stop_cause:
        return EXIT_SOME_FAILED
    if detached:
        return 0  # submitted: a rerun collects the results and says how they ended
    if backend.stopped:
        return 128 + (backend.stop_signum or signal.SIGINT)
    return accounts.exit_code(None)


def on_disk(config: RunConfig, entries: Sequence) -> Callable[[str], tuple[bool, bool]]:
    """For the accounting check: whether an entry has a current result, and a line in
    failed_models.txt, as the directory holds them now (read afresh)."""
    from esd_experiment.run.plan import result_done

    failures = FailureLog(config.output_dir)
    by_key = {e.key: e for e in entries}

    def state(key: str) -> tuple[bool, bool]:
        entry = by_key.get(key)
        if entry is None:
            return False, key in failures
        try:
            paths = model_paths(config.output_dir, entry.model_id, config.log_dir,
                                entry.gguf_file)
        except ESDError:
            return False, key in failures
        failed = key in failures
        # A failed model's own result may be current beside its worker's failure record (the
        # delta of an adapter the list does not mark failed): it is not the model's result.
        done = result_done(paths, config.options_key, config.args.save_eigs,
                           config.args.delta and has_delta(entry))
        return done and not (failed and paths.failure.is_file()), failed
    return state


def describe_backend(config: RunConfig, backend) -> str:
    if config.backend != "local":
        return f"backend {config.backend}"
    if config.gpus:
        return f"GPUs {list(config.gpus)}, {config.num_gpus_per_job} per job"
    return f"CPU, {config.cpu_workers} worker(s) of {backend.threads_per_job} threads"


def sweep_cache(config: RunConfig, specs: Sequence[JobSpec]) -> BasePins | None:
    """Under --cleanup_cache: delete what killed runs left in the hub cache (files no live job
    reads), and pin the bases whose models run in several jobs."""
    if not config.cleanup_cache:
        return None
    from esd_experiment.hub.cache import sweep
    from esd_experiment.hub.client import default_cache_dir

    cache = default_cache_dir(config.cache_dir)
    for folder in sweep(cache):
        logger.info("removed from the hub cache what an earlier run left of %s", folder)
    return BasePins(cache, specs) if specs else None


# ---------------------------------------------------------------------------------------------
# Command line.

class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where the help already says its default (or
    the flag is required and has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.required:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_DefaultsOnce)
    p.add_argument("--model_list", type=Path,
                   help="CSV with model_id[,base_model_relation,source_model,gguf_file]")
    p.add_argument("--output_dir", type=Path, required=True, help="one CSV per model goes here")
    p.add_argument("--log_dir", type=Path, default=None,
                   help="per-model logs (default: <output_dir>/logs)")
    p.add_argument("--demo", action="store_true",
                   help="build a small offline model zoo under <output_dir>/zoo and analyse it")
    p.add_argument("--dry_run", action="store_true",
                   help="resolve every model without downloading weights; write "
                        "preflight/preflight.csv")
    g = p.add_argument_group("scheduling")
    g.add_argument("--backend", choices=BACKENDS, default="local",
                   help="where the workers run: this machine's GPUs/CPUs, Slurm, or Ray")
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
    g.add_argument("--max_group", type=int, default=8,
                   help="at most this many models (a base and its adapters) share one job")
    g.add_argument("--model_timeout", type=float, default=None,
                   help="seconds one attempt at a job may take, then it is stopped (transient)")
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
                   help="delete each hub model's downloaded files once they are read "
                        "(a shard at a time; never while another job reads them)")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="allow a model's own code to run (only the adapter fallback needs it)")
    g.add_argument("--cache_dir", default=None, help="Hugging Face cache (default: HF_HOME's)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on a terminal")
    add_esd_arguments(p)
    from esd_experiment.backends.ray_backend import add_ray_arguments
    from esd_experiment.backends.slurm import add_slurm_arguments

    add_slurm_arguments(p)
    add_ray_arguments(p)
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Refuse bad flag values (InputError) before anything runs, --dry_run included."""
    for name in ("num_gpus_per_job", "max_check", "cpu_workers", "max_group"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 0:
        raise InputError(f"--limit must be 0 or more, got {args.limit}")
    if args.max_retries < 0 or args.retry_backoff < 0 or args.poll_interval <= 0:
        raise InputError("--max_retries and --retry_backoff must be >= 0, --poll_interval > 0")
    if args.model_timeout is not None and not args.model_timeout > 0:
        raise InputError(f"--model_timeout must be positive, got {args.model_timeout}")
    esd_config_from_args(args, "cpu")  # refuses bad estimator options before any worker starts
    if args.device.startswith("cuda:"):
        raise InputError(f"--device {args.device}: the runner gives each job its GPUs; choose "
                         "them with --gpus (esd_worker.py alone takes --device cuda:N)")
    if args.model_list is None:
        raise InputError("--model_list is required (or --demo)")


def prepare_dirs(output_dir: Path, log_dir: Path | None = None) -> None:
    """Create the output (and log) directory, or say in one line why it cannot be."""
    for flag, path in (("--output_dir", output_dir), ("--log_dir", log_dir)):
        if path is None:
            continue
        if Path(path).exists() and not Path(path).is_dir():
            raise InputError(f"{flag} {path} is a file, not a directory")
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{flag} {path} cannot be created: "
                             f"{exc.strerror or exc}") from None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    check_flags(args)
    gpus = choose_gpus(args) if args.backend == "local" else None
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
        cleanup_cache=args.cleanup_cache, cache_dir=args.cache_dir, progress=args.progress,
        max_group=args.max_group, model_timeout=args.model_timeout, backend=args.backend,
    )


def choose_gpus(args: argparse.Namespace) -> tuple[int, ...] | None:
    """CPU mode for --device cpu or when no GPU is found; else --gpus, or every GPU NVML lists."""
    if args.device == "cpu":
        return None
    if args.gpus is not None:
        return tuple(args.gpus) or None
    found = detect_gpus()
    if not found and gpus_required(args):
        raise InputError("GPUs asked for (--device cuda or --num_gpus_per_job above 1), but "
                         "NVML reports no GPU on this machine: use --device cpu")
    return tuple(found) or None


def gpus_required(args: argparse.Namespace) -> bool:
    """Whether the flags ask for GPUs in so many words (--device cuda, or more than the one
    GPU per job of the default): then a target without GPUs is refused, where --device auto
    alone runs on its CPUs (on this machine, on Slurm and on Ray alike)."""
    return args.device.startswith("cuda") or args.num_gpus_per_job > 1


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.demo:
            from esd_experiment.run.demo import DEMO_LIST, build_demo_zoo

            device = "cpu" if args.device == "auto" and not detect_gpus() else args.device
            prepare_dirs(args.output_dir)
            model_list = args.output_dir / "zoo" / DEMO_LIST
            if not model_list.is_file():  # built once: a rerun resumes like any other run
                model_list = build_demo_zoo(args.output_dir / "zoo")
            args = argparse.Namespace(**{**vars(args), "model_list": model_list, "device": device})
        if args.dry_run:
            from esd_experiment.run.preflight import preflight

            check_flags(args)
            entries = read_model_list(args.model_list)[:args.limit]
            prepare_dirs(args.output_dir)
            return preflight(entries, args.output_dir, cache_dir=args.cache_dir,
                             delta=args.delta, max_group=args.max_group)
        config = config_from_args(args)
        prepare_dirs(config.output_dir, config.log_dir)
        code = run(config)
        if args.demo:
            print(summary_table(demo_results(config)))
        return code
    except InputError as exc:
        print(f"run_esd_experiment: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ESDError as exc:  # the machine failed us (a GPU lost mid-run): results so far are kept
        print(f"run_esd_experiment: error: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except KeyboardInterrupt:  # Ctrl-C outside the jobs (their own handler counts what ran)
        print("run_esd_experiment: interrupted; results written so far are kept, rerun the "
              "same command to go on", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as exc:  # before any job: the lock, the options, failed_models.txt
        full = disk_full_error(exc)
        if full is None:
            raise
        print(f"run_esd_experiment: error: {disk_full_message(full.filename or args.output_dir, [])}",
              file=sys.stderr)
        return EXIT_SOME_FAILED


def demo_results(config: RunConfig) -> list[tuple[str, Path]]:
    from esd_experiment.run.plan import result_done

    out = []
    for entry in read_model_list(config.model_list):
        paths = model_paths(config.output_dir, entry.model_id, config.log_dir, entry.gguf_file)
        if result_done(paths, config.options_key, config.args.save_eigs,
                       config.args.delta and has_delta(entry)):
            out.append((entry.model_id, paths.csv))
    return out


if __name__ == "__main__":
    sys.exit(main())
