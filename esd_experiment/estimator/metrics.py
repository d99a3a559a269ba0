"""A user's own per-layer metrics: ``--metric FILE.py:FUNCTION`` or
``--metric package.module:FUNCTION``.

``FUNCTION(evals)`` gets a layer's eigenvalues (float64, ascending, docs/metrics.md section 2)
and returns ``{column: number}``; a function that also names a parameter ``W`` gets the weight
matrix as analysed (read-only), and ``N`` / ``M`` its larger / smaller dimension. ``--mp_fit``
is one such metric (``MP_FIT``, estimator/mp_fit.py), and so is ``--randomize``
(``randomize_metric``, estimator/randomize.py), which takes ``shuffled_evals``: the eigenvalues
of the layer's matrices shuffled element-wise. The columns follow the built-in ones in every
row. Which metrics a result holds is part of its ``esd_options`` (``results.options_key``),
under the name each metric is recorded by: ``<file name>:FUNCTION@<digest>`` or
``package.module:FUNCTION@<digest>``, the digest that of the file that defines the function
(and of the file or module named, when that only imports it from another), so that results
computed before an edit of the file are told apart from those after. A spec that ends in
``@<digest>`` is held to that version (the runner so pins its workers to the versions it
started with): another version of the file fails with ``MetricChanged``.

The code loaded here is the user's own, named on the command line; nothing found in a
checkpoint or a results directory is ever loaded. Imports neither torch nor pandas.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from esd_experiment.core.errors import InputError
from esd_experiment.core.results import FORMULA_START, SUMMARY_COLUMNS
from esd_experiment.estimator.mp_fit import MP_COLUMNS, MP_FIT_NAME, mp_fit
from esd_experiment.estimator.randomize import RANDOM_COLUMNS, randomized_columns, recorded_name

# Names a metric may not give its columns besides the result's own (passed in by the caller):
# net_esd_estimator's extra columns, and the column results.read_results tells files apart by.
RESERVED_COLUMNS = frozenset({"alphahat", "eigs", "_file"})
# Columns whose summary mean (``<column>_mean``) would be named as the summary's own column.
SUMMARY_NAMES = frozenset(c.removesuffix("_mean") for c in SUMMARY_COLUMNS if c.endswith("_mean"))
# What a recorded name may hold: it is written inside the esd_options cell, where ";" and ","
# separate options and metrics.
_RECORDED_NAME = re.compile(r"^[\w.\-+]+:[A-Za-z_]\w*(@[0-9a-f]+)?$")
# Hex digits of the SHA-256 of a metric's file that its recorded name carries.
DIGEST_CHARS = 12
# What a metric may take that only the weights give (saved eigenvalues cannot).
NEEDS_WEIGHTS = frozenset({"W", "shuffled_evals"})
# Directories (os.pathsep-separated) a worker also imports ``package.module`` metrics from:
# the runner names those its own metrics came from (``metric_dirs``), so that a worker in
# another directory or on another node (Ray's, Slurm's) finds them as the runner did.
METRIC_PATH_VAR = "ESD_METRIC_PATH"


class MetricError(InputError):
    """A metric that raised, or returned something other than ``{column: number}``: the model
    fails with this cause (deterministic; a retry gives the same answer)."""


class MetricChanged(MetricError):
    """A pinned spec (``FUNCTION@<digest>``) whose file now holds another version: the model
    fails rather than be computed with code other than the version the run records."""


@dataclass(frozen=True)
class Metric:
    """One loaded metric: the name results record it by, the function, and which of the
    layer's ``W``, ``N``, ``M`` it takes besides the eigenvalues."""

    name: str
    fn: Callable
    takes: frozenset = frozenset()
    shuffle_seed: int | None = None  # --randomize's seed: its shuffle can start ahead
    # The columns it always gives (--mp_fit's, --randomize's), NaN in a layer without
    # eigenvalues even when no layer has any; a user's metric's are known from what it returns.
    columns: tuple = ()

    @property
    def wants_W(self) -> bool:
        """True when the metric needs the weights: ``W``, or the shuffled layer's spectrum."""
        return bool(self.takes & NEEDS_WEIGHTS)


# WeightWatcher's Marchenko-Pastur fit (--mp_fit).
MP_FIT = Metric(MP_FIT_NAME, mp_fit, frozenset({"N", "M"}), columns=MP_COLUMNS)


@functools.cache
def randomize_metric(seed: int) -> Metric:
    """WeightWatcher's randomized ESD (--randomize), its shuffle seeded by ``seed`` (>= 0),
    recorded as ``randomize(seed=<seed>)``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"--seed must be a whole number >= 0, got {seed!r}")
    seed = int(seed)  # a NumPy integer is the same seed, recorded alike
    return Metric(recorded_name(seed), functools.partial(randomized_columns, seed=seed),
                  frozenset({"N", "M", "shuffled_evals"}), shuffle_seed=seed,
                  columns=RANDOM_COLUMNS)


def _takes(fn: Callable) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters) & {"W", "N", "M"}
    except (TypeError, ValueError):
        return frozenset()


def as_metric(item: Metric | Callable | str) -> Metric:
    """A ``Metric`` from a loaded one, a function (Python callers), or a ``--metric`` spec."""
    if isinstance(item, Metric):
        return item
    if isinstance(item, str):
        return load_metric(item)
    if not callable(item):
        raise InputError(f"metrics: {item!r} is neither a function nor a FILE.py:FUNCTION spec")
    module = getattr(item, "__module__", None) or "python"
    name = f"{module}:{getattr(item, '__qualname__', type(item).__name__)}"
    name = re.sub(r"[^\w.\-+:]", "_", name)
    return Metric(name, item, _takes(item))


def load_metric(spec: str) -> Metric:
    """Load ``FILE.py:FUNCTION`` or ``package.module:FUNCTION``: a module once per process
    (as Python imports it), a file once per content (an edited file is read again); raises
    InputError with one line saying what is wrong with the spec. A spec pinned to a version
    (``...:FUNCTION@<digest>``) raises MetricChanged when its file now holds another."""
    spec, pin = _split_pin(spec)
    where, sep, func = spec.rpartition(":")
    if not sep or not where or not func.isidentifier():
        raise InputError(f"--metric {spec!r}: expected FILE.py:FUNCTION or "
                         "package.module:FUNCTION")
    label = f"file {Path(where).name}" if where.endswith(".py") else f"module {where}"
    try:
        metric = _load_metric(spec, _digest(_spec_file(spec)) if where.endswith(".py") else None)
    except InputError as exc:
        if pin is None:
            raise
        raise MetricChanged(f"metric {label} cannot be loaded as it was at the start of the "
                            f"run (digest {pin}): {exc}") from None
    now = metric.name.rpartition("@")[2] if "@" in metric.name else "none"
    if pin is not None and now != pin:
        raise MetricChanged(f"metric {label} changed during the run (digest {pin} at the "
                            f"start, {now} now): rerun with --overwrite to compute every "
                            "model with the new version")
    return metric


def _split_pin(spec: str) -> tuple[str, str | None]:
    """``(spec without its pin, the pinned digest or None)``: ``f.py:top@0a1b`` ->
    ``("f.py:top", "0a1b")``."""
    head, sep, tail = spec.strip().rpartition(":")
    func, at, pin = tail.partition("@")
    if sep and at and re.fullmatch(r"[0-9a-f]+", pin):
        return f"{head}:{func}", pin
    return spec.strip(), None


def _spec_file(spec: str) -> Path:
    """The file a ``FILE.py:FUNCTION`` spec names, which must exist."""
    path = Path(spec.rpartition(":")[0]).expanduser()
    if not path.is_file():
        raise InputError(f"--metric {spec!r}: no such file {path}")
    return path


def pinned_spec(spec: str, name: str) -> str:
    """``spec`` pinned to the version of its recorded ``name`` (``...@<digest>``), as the
    runner's workers load it; unchanged when the name records no digest."""
    spec = _split_pin(spec)[0]
    digest = name.rpartition("@")[2] if "@" in name else ""
    return f"{spec}@{digest}" if digest else spec


@functools.cache
def _load_metric(spec: str, digest: str | None) -> Metric:
    """``load_metric`` of an unpinned spec, ``digest`` that of a ``FILE.py``'s content (None
    for a module): a file is loaded again once its content changes."""
    where, _, func = spec.strip().rpartition(":")
    if digest is not None:
        path = Path(where).expanduser()
        name = f"{path.name}:{func}"
        module_name = f"_esd_metric_{abs(hash(str(path.resolve())))}"
        try:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # the file failed to run, or exited: one line
            hint = (" (a module beside it is imported as package.module:FUNCTION, from its "
                    "directory or PYTHONPATH)" if isinstance(exc, ModuleNotFoundError) else "")
            raise InputError(f"--metric {spec!r}: {path} cannot be loaded: "
                             f"{type(exc).__name__}: {_one_line(exc)}{hint}") from None
    else:
        name = f"{where}:{func}"
        try:
            module = _import_module(where)
        except (Exception, SystemExit) as exc:  # say where, in one line
            raise InputError(f"--metric {spec!r}: module {where!r} cannot be imported: "
                             f"{type(exc).__name__}: {_one_line(exc)}") from None
        path = Path(module.__file__) if getattr(module, "__file__", None) else None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise InputError(f"--metric {spec!r}: {where} has no function {func!r}")
    files = _source_files(path, fn)
    if files:
        name = f"{name}@{_digest(*files)}"
    if not _RECORDED_NAME.match(name):
        raise InputError(f"--metric {spec!r}: the name {name!r} it would be recorded by may "
                         "hold only letters, digits and . - + _ (rename the file)")
    return Metric(name, fn, _takes(fn))


def _source_files(named: Path | None, fn: Callable) -> list[Path]:
    """The files a metric's digest covers: the one named (a ``FILE.py``, a module's file)
    and, when it imports the function from another, the one that defines the function
    (``inspect.getsourcefile``; none for a builtin or a callable object)."""
    try:
        defining = inspect.getsourcefile(inspect.unwrap(fn))
    except (TypeError, ValueError):
        defining = None
    found = [p for p in (named, Path(defining) if defining else None) if p and p.is_file()]
    return list(dict.fromkeys(p.resolve() for p in found))


def _import_module(where: str):
    """``importlib.import_module(where)``; a package found nowhere on ``sys.path`` is also
    looked for, after it, in the current directory (as ``python -m`` finds it) and in the
    directories of ``METRIC_PATH_VAR``."""
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name != where.partition(".")[0]:
            raise  # the package is there; something it imports is not
        more = [d for d in (*os.environ.get(METRIC_PATH_VAR, "").split(os.pathsep), os.getcwd())
                if d and d not in sys.path]
        if not more:
            raise
        sys.path.extend(more)
        importlib.invalidate_caches()
        return importlib.import_module(where)


def metric_dirs(specs: Iterable[str]) -> list[str]:
    """The directories the ``package.module:FUNCTION`` specs among ``specs`` were imported
    from (loading them), for ``METRIC_PATH_VAR``: ``/a`` for ``pkg.mod`` read from
    ``/a/pkg/mod.py`` or ``/a/pkg/mod/__init__.py``."""
    dirs: dict[str, None] = {}
    for spec in specs:
        where = spec.strip().rpartition(":")[0] if isinstance(spec, str) else ""
        if not where or where.endswith(".py"):
            continue
        load_metric(spec)
        source = getattr(sys.modules.get(where), "__file__", None)
        if source:
            path = Path(source).resolve()
            depth = where.count(".") + (path.stem == "__init__")
            dirs[str(path.parents[depth])] = None
    return list(dirs)


def _digest(*paths: Path) -> str:
    """The start of the SHA-256 of a metric's file (of its files' contents one after the
    other): a result records it with the metric's name, so that one computed before a file
    was edited is not done."""
    sha = hashlib.sha256()
    for path in paths:
        try:
            sha.update(path.read_bytes())
        except OSError as exc:
            raise InputError(f"--metric: {path} cannot be read: {exc.strerror}") from None
    return sha.hexdigest()[:DIGEST_CHARS]


def load_metrics(items: Iterable[Metric | Callable | str] | None) -> tuple[Metric, ...]:
    """Every metric of ``items`` loaded, in order; a metric given twice is refused. Distinct
    Python functions of one name (two lambdas, closures of one factory) are told apart by
    their place among those of that name: ``<module>:<name>.2``, ``.3``, ..."""
    metrics: list[Metric] = []
    given: dict[str, int] = {}  # how many metrics of each name so far
    for item in items or ():
        metric = as_metric(item)
        if any(m.fn is metric.fn for m in metrics) or (
                metric.name in given and isinstance(item, (str, Metric))):
            raise InputError(f"metric {metric.name} is given twice")
        given[metric.name] = given.get(metric.name, 0) + 1
        if given[metric.name] > 1:
            metric = replace(metric, name=f"{metric.name}.{given[metric.name]}")
        metrics.append(metric)
    return tuple(metrics)


def metric_argv(spec: str) -> str:
    """A ``--metric`` spec as a worker elsewhere reads it: a file path made absolute (its
    pin, if any, kept)."""
    spec, pin = _split_pin(spec)
    where, _, func = spec.rpartition(":")
    if where.endswith(".py"):
        spec = f"{Path(where).expanduser().resolve()}:{func}"
    return f"{spec}@{pin}" if pin else spec


def declared_columns(metrics: Iterable[Metric]) -> dict[str, float]:
    """The columns of a layer without eigenvalues: NaN in every column a metric declares."""
    return {column: math.nan for metric in metrics for column in metric.columns}


def metric_columns(metrics: Iterable[Metric], evals, weights: Callable[[], object],
                   builtin: Iterable[str], N: int, M: int,
                   shuffled_evals: Callable | None = None) -> dict:
    """The columns of every metric for one layer: ``{column: float}``, in metric order.

    ``evals``: the layer's eigenvalues (float64 NumPy, ascending); each metric gets its own
    copy. ``weights()``: the matrix as analysed, built only when a metric takes ``W``, and
    handed to each such metric read-only.
    ``builtin``: the result's own columns, which no metric may name. ``N``, ``M``: the
    matrix's larger and smaller dimension (of each slice, for a convolution).
    ``shuffled_evals(seed, replica)``: the eigenvalues of the layer shuffled element-wise
    (net_esd.shuffled_eigenvalues), for the metrics that take it. Raises MetricError naming the metric when one raises or returns something else than
    ``{column: number}`` with new column names.
    """
    out: dict[str, float] = {}
    reserved = RESERVED_COLUMNS | frozenset(builtin)
    W = None
    for metric in metrics:
        try:
            if "W" in metric.takes and W is None:
                W = weights()
                if hasattr(W, "setflags"):  # one W for every metric, perhaps the caller's own
                    W.setflags(write=False)  # weights: a metric that changes it takes W.copy()
            given = {"W": W, "N": N, "M": M, "shuffled_evals": shuffled_evals}
            value = metric.fn(evals.copy(), **{k: given[k] for k in metric.takes})
        except (Exception, SystemExit) as exc:  # the user's code (exit() too): the model's cause
            raise MetricError(f"metric {metric.name} raised {type(exc).__name__}: "
                              f"{_one_line(exc)}") from None
        out.update(_checked(metric, value, reserved | out.keys()))
    return out


def _checked(metric: Metric, value: object, taken: Set[str]) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise MetricError(f"metric {metric.name} returned a {type(value).__name__}, not a "
                          "{column: number} dict")
    checked = {}
    for column, number in value.items():
        if not isinstance(column, str) or not column or column != column.strip() \
                or any(c in column for c in ",\"\r\n"):
            raise MetricError(f"metric {metric.name} returned the column name {column!r}: "
                              "a name needs text without commas, quotes or line breaks")
        if column.startswith(FORMULA_START):  # a spreadsheet would run the CSV's header
            raise MetricError(f"metric {metric.name} returned the column name {column!r}: "
                              "a name may not begin with = + - @ or '")
        if column in taken:
            raise MetricError(f"metric {metric.name} returned the column {column!r}, which "
                              "another column already has")
        if column in SUMMARY_NAMES:
            raise MetricError(f"metric {metric.name} returned the column {column!r}: its "
                              f"summary mean would be named as the summary's own "
                              f"{column}_mean (rename it)")
        try:
            if isinstance(number, (bool, np.bool_)):  # a test's answer: True/False as 1/0
                number = int(number)
            if not isinstance(number, numbers.Real):
                raise TypeError
            checked[column] = float(number)
        except (TypeError, ValueError, OverflowError):  # e.g. an int beyond float64
            raise MetricError(f"metric {metric.name} returned {type(number).__name__} "
                              f"{_short(number)} for column {column!r}, not a number of "
                              "float64") from None
    return checked


def _short(value: object) -> str:
    try:
        return repr(value)[:40]
    except Exception:  # the user's object, or an int of more digits than str() may write
        return "(no repr)"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
