"""What a run keeps on disk between runs: finished results, failures, and the run lock."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from esd_experiment.core.delta_paths import DELTA_DIR, DELTA_KEY
from esd_experiment.core.errors import InputError
from esd_experiment.core.paths import (
    FAILED_MODELS_FILE,
    LOCK_FILE,
    OPTIONS_FILE,
    SLURM_STATE,
    write_text_atomic,
)
from esd_experiment.core.results import (
    LEGACY_COLUMNS,
    METRICS_KEY,
    options_key,
    read_header_and_options,
    result_files,
    schema_order,
)


def read_failure_cause(failure_json: Path) -> str | None:
    """The one-line cause a worker recorded, or None when it left no record."""
    try:
        record = json.loads(failure_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    message = record.get("message") if isinstance(record, dict) else None
    return f"{record.get('error', 'Error')}: {message}" if message else None


class FailureLog:
    """``failed_models.txt``: one line per failed model, ``model_id<TAB>cause``.

    The runner is its only writer; every change rewrites it atomically, so the file is
    current after each model even if the run is killed.
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / FAILED_MODELS_FILE
        self._causes: dict[str, str] = {}
        if self.path.is_file():
            # A user may have edited it: a BOM or a byte that is not UTF-8 is no reason to stop.
            text = self.path.read_text(encoding="utf-8-sig", errors="replace")
            for line in text.splitlines():
                model_id, _, cause = line.partition("\t")
                if model_id.strip():
                    self._causes[model_id.strip()] = cause.strip()

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._causes

    def __len__(self) -> int:
        return len(self._causes)

    def cause(self, model_id: str) -> str | None:
        return self._causes.get(model_id)

    def record(self, model_id: str, cause: str) -> None:
        self._change({**self._causes, model_id: " ".join(cause.split()) or "unknown error"})

    def clear(self, model_id: str) -> None:
        self.clear_all([model_id])

    def clear_all(self, model_ids: Iterable[str]) -> None:
        """Remove the lines of ``model_ids`` (one rewrite for them all)."""
        drop = set(model_ids)
        if drop & set(self._causes):
            self._change({m: c for m, c in self._causes.items() if m not in drop})

    def _change(self, causes: dict[str, str]) -> None:
        """Write ``causes``, then hold them: a write that fails (a full disk) changes nothing."""
        if causes or self.path.exists():
            write_text_atomic(self.path, "".join(f"{m}\t{c}\n" for m, c in causes.items()))
        self._causes = causes


class RunLock:
    """An exclusive lock on an output directory, released by the kernel if the run dies.

    The lock file names its holder (pid, host, start time, command) so a refused second run
    can say who holds it; ``flock`` means a crashed run never leaves it stuck.
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"output directory {self.path.parent} cannot be used: "
                             f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise InputError(f"{self.path.parent} is in use by another run ({holder}); wait for "
                             "it to finish or choose another --output_dir") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays for the next run
            self._fd = None


def check_options(output_dir: Path, options: dict, overwrite: bool) -> None:
    """Keep one directory's results comparable: refuse other estimator options without
    ``--overwrite``, and record the options in force."""
    path = Path(output_dir) / OPTIONS_FILE
    numbers = {k: v for k, v in options.items() if k != DELTA_KEY}  # --delta adds files only
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:  # results copied without it, or written by esd_worker.py alone
        recorded = None
        if not overwrite:
            _check_results_options(Path(output_dir), options_key(
                numbers, numbers.get(METRICS_KEY, ())))
    except (OSError, ValueError):
        recorded = {}
    if recorded is not None and {k: v for k, v in recorded.items() if k != DELTA_KEY} != numbers \
            and not overwrite:
        _refuse(output_dir, recorded, numbers)
    if recorded != options:
        write_text_atomic(path, json.dumps(options, indent=1, sort_keys=True) + "\n")


def _check_results_options(output_dir: Path, key: str) -> None:
    """Without a record of the directory's options, its results' own ``esd_options``: refuse
    when one of them is not ``key``."""
    for folder in (output_dir, output_dir / DELTA_DIR):
        for csv in result_files(folder):
            header, theirs = read_header_and_options(csv) or ((), None)
            if theirs is not None and theirs != key and (schema_order(header) is not None or
                                                         schema_order(header, LEGACY_COLUMNS)):
                old, new = (dict(p.partition("=")[::2] for p in k.split(";")) for k in (theirs, key))
                _refuse(output_dir, old, new, f"{csv.name}: ")


def _refuse(output_dir: Path, recorded: dict, options: dict, where: str = "") -> None:
    """Refuse a run whose options differ from those the directory's results were computed
    with, naming each change."""
    changed = ", ".join(f"{k}: {recorded.get(k)!r} -> {options.get(k)!r}"
                        for k in dict.fromkeys([*recorded, *options])
                        if recorded.get(k) != options.get(k) and k != DELTA_KEY)
    raise InputError(f"{output_dir} holds results computed with other estimator options "
                     f"({where}{changed}); rerun with --overwrite to recompute them, or choose "
                     "another --output_dir")


def holds_results(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a result of any options: a result CSV or saved
    eigenvalues, the model's own or its delta's (failure records and logs are none), or may
    still be given one: a record of Slurm jobs (a detached run's may be queued)."""
    if (Path(output_dir) / SLURM_STATE).is_file():
        return True
    for folder in (Path(output_dir), Path(output_dir) / DELTA_DIR):
        if result_files(folder) or any(not p.name.startswith(".")
                                       for p in folder.glob("*.eigs.npz")):
            return True
    return False


class StageLog:
    """Where a worker is: ``resolve``, ``download``, ``merge``, ``analyse`` or ``write``,
    written to a small file the runner reads when it times a model out. Without a path it
    only remembers the stage."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.current = ""

    def set(self, stage: str) -> None:
        if stage == self.current:
            return
        self.current = stage
        if self.path is not None:
            try:
                write_text_atomic(self.path, stage + "\n")
            except OSError:  # a stage report is worth no failure of the model
                pass

    @contextmanager
    def during(self, stage: str) -> Iterator[None]:
        """``stage`` for the duration of the block, then back to the stage before it."""
        before = self.current
        self.set(stage)
        try:
            yield
        finally:
            self.set(before)


def read_stage(path: Path) -> str:
    """The stage a worker last reported in ``path``; ``start`` when it reported none."""
    try:
        return Path(path).read_text(encoding="utf-8").strip() or "start"
    except OSError:
        return "start"
