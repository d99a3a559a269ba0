"""The result schema, and reading results back: one definition for the worker that writes
rows, the runner's resume check and every report. Imports neither torch nor transformers.

A result CSV has one row per layer, columns ``RESULT_COLUMNS`` in that order. Its
``esd_options`` column records the estimator options the row was computed with
(``options_key``), so a results directory never mixes incomparable numbers unnoticed: the
runner's resume check (``is_current``) treats a result computed with other options as not done.

``load_results(output_dir)`` reads every result CSV of a directory into one typed DataFrame
(``summary=True``: one row per model, ``SUMMARY_COLUMNS``); ``read_results`` also says which
files were skipped and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from esd_experiment.core.errors import InputError
from esd_experiment.core.paths import OLD_PREFLIGHT_FILE, is_own_file, model_key, within

if TYPE_CHECKING:  # pandas is imported by the functions that read results
    import pandas as pd

# Filled by the worker from the model list and the resolved revision.
MODEL_COLUMNS = ("model_id", "revision", "source_model")
# Filled by the estimator from the tensor's name, shape and stored format.
SHAPE_COLUMNS = ("layer_id", "longname", "block", "layer_type", "storage",
                 "N", "M", "Q", "num_evals")
# Filled by the fit (esd_fit.spectral_metrics).
METRIC_COLUMNS = (
    "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "spectral_norm", "log_spectral_norm", "norm", "log_norm", "stable_rank",
    "alpha_weighted", "log_alpha_norm", "matrix_rank", "entropy", "warning",
)
# ``stack``: the repeated blocks a row's ``block`` counts in (``model.layers``,
# ``visual.blocks``; empty outside blocks), after the columns it was added to, so that every
# older column keeps its place.
LAYER_COLUMNS = SHAPE_COLUMNS + METRIC_COLUMNS + ("fix_fingers", "status", "stack")
RESULT_COLUMNS = MODEL_COLUMNS + LAYER_COLUMNS + ("esd_options",)
# The columns of results written before ``stack``: still read, with an empty stack.
LEGACY_COLUMNS = tuple(c for c in RESULT_COLUMNS if c != "stack")

STATUSES = ("ok", "fit_failed", "too_small", "nonfinite", "unsupported_dtype")
# The estimator options that change the numbers, in the order options_key writes them.
OPTION_NAMES = ("fix_fingers", "xmin_pos", "bins", "evals_thresh", "filter_zeros",
                "conv_norm", "min_evals", "precision")
# The name under which an options_key records custom metrics (estimator/metrics.py).
METRICS_KEY = "metrics"
# Keys of the options and of the model's layers (every row's longname) in an ``.eigs.npz``.
EIGS_OPTIONS_KEY, EIGS_LAYERS_KEY = "__esd_options__", "__esd_layers__"

# pandas dtypes of the columns (nullable integers: a too_small row has no matrix_rank).
STRING_COLUMNS = ("model_id", "revision", "source_model", "longname", "layer_type", "storage",
                  "warning", "fix_fingers", "status", "stack", "esd_options")
INTEGER_COLUMNS = ("layer_id", "block", "N", "M", "num_evals", "num_pl_spikes", "matrix_rank")
FLOAT_COLUMNS = tuple(c for c in RESULT_COLUMNS
                      if c not in STRING_COLUMNS and c not in INTEGER_COLUMNS)

# The `warning` column's thresholds (WeightWatcher's): alpha below over-, above under-trained.
OVER_TRAINED_ALPHA = 2.0
UNDER_TRAINED_ALPHA = 6.0

# One row per model (``summarize``); means are over fitted (status ok) layers.
SUMMARY_COLUMNS = (
    "model_id", "revision", "source_model", "layers", "fitted", "alpha_mean", "alpha_median",
    "alpha_weighted_mean", "log_spectral_norm_mean", "log_norm_mean", "stable_rank_mean",
    "entropy_mean", "over_trained", "under_trained", "delta_alpha_mean", "esd_options",
)
_MEANS = ("alpha_weighted", "log_spectral_norm", "log_norm", "stable_rank", "entropy")


# Text cells are written so that a spreadsheet never runs them as a formula: a cell that
# begins with one of these characters (or with the quote itself, so that every cell reads back
# exactly) gets a leading single quote, which the project's readers remove again. Numeric
# columns are never quoted: a negative number stays a number.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def inert_cell(value):
    """A text cell as written to a CSV: ``=1+1`` -> ``'=1+1``; anything else unchanged.
    ``read_results`` removes the quote again."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def inert_frame(frame: pd.DataFrame, columns: Sequence[str] = STRING_COLUMNS) -> pd.DataFrame:
    """``frame`` with its text ``columns`` (those present) made inert (a copy)."""
    present = [c for c in columns if c in frame.columns]
    return frame.assign(**{c: frame[c].map(inert_cell) for c in present})


def result_frame(rows: Sequence[Mapping[str, object]]) -> pd.DataFrame:
    """Result rows as a model's CSV holds them: RESULT_COLUMNS, then custom metrics' columns
    (NaN where a row has none); counts stay integers where a row has none (a too_small layer
    has no rank): "12", not "12.0"."""
    import pandas as pd

    added = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in RESULT_COLUMNS]
    frame = pd.DataFrame(list(rows), columns=[*RESULT_COLUMNS, *added])
    return frame.astype({c: "Int64" for c in INTEGER_COLUMNS})


def options_key(options: Mapping[str, object], metrics: Sequence[str] = ()) -> str:
    """The canonical one-line form of estimator options: ``fix_fingers=DKS;xmin_pos=2;...``,
    and when custom metrics are asked for, ``;metrics=<name>,<name>`` after them.

    ``options`` maps every name of ``OPTION_NAMES`` (an ``ESDConfig`` as a dict will do);
    ``metrics``: the recorded names of the custom metrics (custom_metrics.Metric.name).
    """
    missing = [name for name in OPTION_NAMES if name not in options]
    if missing:
        raise KeyError(f"estimator options lack {missing}")
    key = ";".join(f"{name}={options[name]!r}" if isinstance(options[name], float)
                   else f"{name}={options[name]}" for name in OPTION_NAMES)
    return f"{key};{METRICS_KEY}={','.join(metrics)}" if metrics else key


def split_options_key(key: str) -> tuple[str, tuple[str, ...]]:
    """``(the estimator's options, the custom metrics' names)`` of an ``options_key``. The
    first part is what eigenvalues depend on: an ``.eigs.npz`` records it."""
    base, sep, names = key.partition(f";{METRICS_KEY}=")
    return base, tuple(n for n in names.split(",") if n) if sep else ()


def read_header_and_options(csv_path: Path) -> tuple[tuple[str, ...], str | None] | None:
    """The header and the first row's ``esd_options`` of a result CSV; None if it is absent.
    Only the first two lines are read: a result is written whole by one rename, so every row
    of a file carries the same options."""
    import csv

    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:  # a BOM (Excel's) or none
            reader = csv.reader(fh)
            header = tuple(next(reader, ()))
            first = next(reader, None)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, csv.Error):
        return (), None
    if first is None or "esd_options" not in header or len(first) != len(header):
        return header, None
    return header, first[header.index("esd_options")]


def is_current(csv_path: Path, options: str, columns: Sequence[str] = RESULT_COLUMNS) -> bool:
    """True when ``csv_path`` is a finished result of the current schema (``schema_order``:
    columns a user or custom metrics added leave it one) computed with the options ``options``
    (an ``options_key``)."""
    found = read_header_and_options(csv_path)
    return found is not None and found[1] == options and schema_order(found[0], columns) is not None


def schema_order(header: Sequence[str],
                 columns: Sequence[str] = RESULT_COLUMNS) -> list[int] | None:
    """The positions of ``header``'s fields in the order a result is read: ``columns`` (the
    schema's), then every other column as the file has it; None when ``header`` is not a
    result's. A result a user saved again with pandas stays one: ``to_csv(path)`` writes the
    index first, unnamed (left out here); the user's and the schema's columns in any order."""
    start = 1 if len(header) > 1 and header[0] == "" else 0
    where = {name: i for i, name in enumerate(header) if i >= start}
    ours = [where.get(name) for name in columns]
    if None in ours or len(where) != len(header) - start:
        return None
    return ours + sorted(set(range(start, len(header))) - set(ours))


def _reordered(data: bytes, order: list[int], width: int) -> bytes:
    """A CSV of ``width`` fields a line, its fields in ``order`` (``schema_order``'s)."""
    import csv
    import io

    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except UnicodeDecodeError:
        raise BadResultError("cannot be parsed: it is not UTF-8 text") from None
    if any(row and len(row) != width for row in rows):
        raise BadResultError("a line has another number of fields than the header")
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([row[i] for i in order] for row in rows if row)
    return out.getvalue().encode("utf-8")


def write_eigs(path: Path, arrays: Mapping[str, object]) -> None:
    """Write ``arrays`` to ``path`` as ``np.savez_compressed`` does (a zip of ``<name>.npy``
    members, read back by ``np.load``), under any names: that function takes the arrays as
    keyword arguments, so a layer named ``file`` fails and one named ``allow_pickle`` is
    taken for its flag and dropped."""
    import zipfile

    import numpy as np

    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED,
                                                 allowZip64=True) as archive:
        for name, values in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(values), allow_pickle=False)


def eigs_options(npz_path: Path) -> str | None:
    """The options an ``.eigs.npz`` was computed with; None when absent or unreadable."""
    import zipfile

    import numpy as np

    try:
        with np.load(npz_path, allow_pickle=False) as data:
            if EIGS_OPTIONS_KEY not in data.files:
                return None
            return str(data[EIGS_OPTIONS_KEY])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def parse_options_key(key: str) -> dict[str, str]:
    """``options_key`` back to ``{name: text}`` (values as written; the caller types them;
    custom metrics, which ``split_options_key`` gives, left out)."""
    pairs = dict(part.partition("=")[::2] for part in split_options_key(key)[0].split(";")
                 if part)
    if tuple(pairs) != OPTION_NAMES:
        raise InputError(f"estimator options {key!r} are not of this version's form "
                         f"({'; '.join(OPTION_NAMES)})")
    return pairs


# ---------------------------------------------------------------------------------------------
# Reading a results directory.

class BadResultError(InputError):
    """A file among the results that is not a complete result CSV of this schema."""


@dataclass(frozen=True)
class LoadedResults:
    """A results directory as read: the rows of every good CSV and the files left out."""

    layers: pd.DataFrame                                   # RESULT_COLUMNS, typed
    files: dict[str, Path] = field(default_factory=dict)  # model_id -> its CSV
    skipped: dict[Path, str] = field(default_factory=dict)  # file -> why it was not read


# CSVs that earlier versions wrote beside the results and are not results (``--dry_run``'s).
NOT_RESULTS = frozenset({OLD_PREFLIGHT_FILE})
NOT_A_RESULT = "not a result CSV"  # why a user's own CSV is skipped: no model is missing


def result_files(output_dir: Path) -> list[Path]:
    """The CSVs directly in ``output_dir`` (not hidden or temporary, not the preflight)."""
    return sorted(p for p in Path(output_dir).glob("*.csv")
                  if not p.name.startswith(".") and p.name not in NOT_RESULTS and p.is_file())


def read_results(output_dir: Path) -> LoadedResults:
    """Every result CSV of ``output_dir``, checked and typed.

    A file that is not a complete result (another CSV, a truncated or older-schema one, a
    second file of one model) is left out and named in ``skipped`` with the reason. Raises
    InputError when the directory is missing or holds no readable result at all.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputError(f"results directory {output_dir} does not exist")
    paths = result_files(output_dir)
    if not paths:
        raise InputError(f"{output_dir} holds no result CSV (*.csv): is it an --output_dir of "
                         "run_esd_experiment.py?")
    blobs, skipped = {}, {}
    for path in paths:
        if not within(path, output_dir):
            skipped[path] = "a link to a file outside the results directory: not read"
            continue
        try:
            blobs[path] = _checked_bytes(path)
        except BadResultError as exc:
            skipped[path] = str(exc)
    raw, damaged = _parse_all(blobs)
    skipped.update(damaged)
    files: dict[str, Path] = {}
    layers = None
    if raw is not None:
        order = list(blobs)
        # Of two files of one model the one the runner names for it is read, not a user's
        # copy ("org--name copy.csv"); else the first by name.
        for index, model_id in raw.groupby("_file", sort=True)["model_id"].first().items():
            path, first = order[index], files.get(model_id)
            if first is not None:
                own = is_own_file(path, model_id) and not is_own_file(first, model_id)
                path, other = (path, first) if own else (first, path)
                skipped[other] = f"a second result of {model_id!r} (read: {path.name})"
            files[model_id] = path
        keep = ~raw["_file"].isin([i for i, path in enumerate(order) if path in skipped])
        if keep.any():
            layers = _typed(raw[keep])
    if layers is None:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in sorted(skipped.items()))
        raise InputError(f"{output_dir} holds no readable result CSV ({reasons})")
    return LoadedResults(layers, files, dict(sorted(skipped.items())))


def read_results_file(csv_path: Path) -> pd.DataFrame:
    """One result CSV, checked and typed as ``read_results`` reads it; raises
    BadResultError (an InputError) saying why it is not a complete result."""
    blob = {Path(csv_path): _checked_bytes(Path(csv_path))}
    frame, bad = _parse_all(blob)
    if frame is None or bad:
        raise BadResultError(next(iter(bad.values()), "holds no rows"))
    return _typed(frame)


def load_results(output_dir: Path, summary: bool = False) -> pd.DataFrame:
    """Every result CSV of ``output_dir`` as one DataFrame (``RESULT_COLUMNS``; strings as
    strings, counts as nullable integers), or with ``summary=True`` one row per model
    (``SUMMARY_COLUMNS``).

    Files that are not complete results are left out with a ``UserWarning`` naming each;
    ``df.attrs["skipped"]`` maps their paths to the reasons. Raises InputError (core/errors.py)
    when the directory holds no readable result.
    """
    loaded = read_results(output_dir)
    if loaded.skipped:
        warnings.warn(f"{len(loaded.skipped)} file(s) in {output_dir} skipped: " + "; ".join(
            f"{p.name}: {why}" for p, why in loaded.skipped.items()), stacklevel=2)
    kinds = loaded.layers["esd_options"].nunique()
    if kinds > 1:
        warnings.warn(f"{output_dir} mixes results computed with {kinds} different estimator "
                      "options (column esd_options): compare models with equal options only",
                      stacklevel=2)
    out = summarize(loaded.layers) if summary else loaded.layers
    out.attrs["skipped"] = {str(p): why for p, why in loaded.skipped.items()}
    return out


def _checked_bytes(path: Path) -> bytes:
    """A CSV's bytes after the checks that need no parsing: header, completeness, rows."""
    import csv

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadResultError(f"cannot be read: {exc.strerror}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # the byte-order mark of a file saved for Excel
    header = next(csv.reader([data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")]))
    order = schema_order(header) or schema_order(header, LEGACY_COLUMNS)
    if order is not None and order != list(range(len(header))):
        if not data.endswith(b"\n"):
            raise BadResultError("truncated: its last line is incomplete")
        data = _reordered(data, order, len(header))
        header = [header[i] for i in order]
    legacy = tuple(header) == LEGACY_COLUMNS
    added = header[len(RESULT_COLUMNS):]  # custom metrics' columns, or a user's own
    if tuple(header[:len(RESULT_COLUMNS)]) != RESULT_COLUMNS and not legacy:
        if "model_id" in header and "alpha" in header:
            missing = [c for c in RESULT_COLUMNS if c not in header]
            extra = [c for c in header if c not in RESULT_COLUMNS]
            raise BadResultError(f"a result of another schema version (missing columns: "
                                 f"{', '.join(missing) or 'none'}; unexpected: "
                                 f"{', '.join(extra) or 'none'}, or another order)")
        raise BadResultError(f"{NOT_A_RESULT} (its first line is not the result header)")
    if not legacy and (len(set(header)) != len(header) or not all(added) or "_file" in added):
        raise BadResultError("its columns after the result's own repeat a name or have none")
    if not data.endswith(b"\n"):
        raise BadResultError("truncated: its last line is incomplete")
    if not data.split(b"\n", 1)[1].strip():
        raise BadResultError("holds a header but no rows")
    return _with_stack(data) if legacy else data


def _with_stack(data: bytes) -> bytes:
    """A result of ``LEGACY_COLUMNS`` as one of ``RESULT_COLUMNS``, its stack empty (every
    other field as written)."""
    frame = _parse(data, typed=False)
    frame.insert(RESULT_COLUMNS.index("stack"), "stack", "")
    return frame.to_csv(index=False, lineterminator="\n").encode("utf-8")


_NUMERIC = FLOAT_COLUMNS + INTEGER_COLUMNS
# Parse numbers as float64 in the C parser (integers are checked and narrowed afterwards);
# an empty cell or "nan" is a missing value, any other text makes the parse fail.
_TYPED = {"dtype": {**dict.fromkeys(STRING_COLUMNS, str), **dict.fromkeys(_NUMERIC, "float64")},
          "na_values": dict.fromkeys(_NUMERIC, ["", "nan", "NaN"])}


def _parse(data: bytes, typed: bool = True) -> pd.DataFrame:
    import io

    import pandas as pd

    options = _TYPED if typed else {"dtype": str}
    added = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r").split(",")
    added = added[len(RESULT_COLUMNS):]
    if typed and added:  # added columns: numbers where every cell is one, else text
        options = {**options, "na_values": {**options["na_values"],
                                            **dict.fromkeys(added, ["", "nan", "NaN"])}}
    try:
        with warnings.catch_warnings():
            # A first row longer than the header would otherwise lose its extra fields (or,
            # without index_col=False, turn its first field into the index) with a warning.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(io.BytesIO(data), keep_default_na=False, encoding="utf-8",
                                index_col=False, **options)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.ParserWarning) as exc:
        message = " ".join(str(exc).split())[:200]
        if "'" in message or '"' in message:  # it quotes the file's text: never echoed
            message = "a cell is not of its column's type"
        raise BadResultError(f"cannot be parsed: {message}") from None
    if added:  # parsed a block per column: joined, or the next column added makes pandas warn
        frame = frame.copy()
    text = [c for c in STRING_COLUMNS if c in frame.columns]
    return frame.assign(**{c: frame[c].str.removeprefix("'") for c in text}) if typed else frame


def _parse_all(blobs: dict[Path, bytes]) -> tuple[pd.DataFrame | None, dict[Path, str]]:
    """All files' rows, typed, column ``_file`` the index of each row's file in ``blobs``
    (None when no file is left), and ``{file: reason}`` for the files that cannot be parsed
    or whose rows are damaged. Files with columns added after the schema's are parsed with
    the others of their header; an added column is NaN in the rows of files without it."""
    import numpy as np
    import pandas as pd

    order = list(blobs)
    groups: dict[bytes, list[int]] = {}
    for index, data in enumerate(blobs.values()):
        groups.setdefault(data[:data.index(b"\n") + 1].replace(b"\r", b""), []).append(index)
    frames, skipped = [], {}
    for header, indices in groups.items():
        frame, bad = _parse_same_header({order[i]: blobs[order[i]] for i in indices}, header)
        skipped.update(bad)
        if frame is not None:
            frames.append(frame.assign(_file=np.asarray(indices)[frame["_file"].to_numpy()]))
    if not frames:
        return None, skipped
    return (frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)), skipped


def _parse_same_header(blobs: dict[Path, bytes],
                       header: bytes) -> tuple[pd.DataFrame | None, dict[Path, str]]:
    """``_parse_all`` for files of one header: ``_file`` indexes ``blobs``."""
    import numpy as np
    import pandas as pd

    skipped: dict[Path, str] = {}
    counts = [data.count(b"\n") - 1 for data in blobs.values()]
    try:  # one parse of every file's rows is much faster than a parse per file
        frame = _parse(header + b"".join(d[d.index(b"\n") + 1:] for d in blobs.values()))
        if len(frame) == sum(counts):
            frame["_file"] = np.repeat(np.arange(len(blobs)), counts)
        else:  # blank lines or quoted line breaks: the rows cannot be told apart by lines
            frame = None
    except BadResultError:  # text in a number, a line with too many fields: find the file
        frame = None
    if frame is None:
        parts = []
        for index, (path, data) in enumerate(blobs.items()):
            try:
                parts.append(_parse(data).assign(_file=index))
            except BadResultError as exc:
                skipped[path] = _not_a_number(data) or str(exc)
        frame = pd.concat(parts, ignore_index=True) if parts else None
    if frame is None:
        return None, skipped
    order = list(blobs)
    for index in set(range(len(order))) - set(frame["_file"]):
        skipped.setdefault(order[index], "holds a header but no rows")
    for index, why in _row_problems(frame).items():
        skipped[order[index]] = why
    frame = frame[~frame["_file"].isin([i for i, path in enumerate(order) if path in skipped])]
    return (frame if len(frame) else None), skipped


def _not_a_number(data: bytes) -> str | None:
    """Which numeric column of a CSV holds text, e.g. ``column alpha holds 'abc'``."""
    import pandas as pd

    try:
        frame = _parse(data, typed=False)
    except BadResultError:
        return None
    for column in _NUMERIC:
        text = frame[column].str.strip()
        wrong = pd.to_numeric(text, errors="coerce").isna() & ~text.str.lower().isin(("", "nan"))
        if wrong.any():
            return f"line {wrong.idxmax() + 2}: column {column} holds text, not a number"
    return None


def _row_problems(frame: pd.DataFrame) -> dict[int, str]:
    """``{file index: reason}`` for files with a truncated row, rows that disagree on the
    model or the options, a status this schema does not have, or a fraction in a count."""
    problems: dict[int, str] = {}
    line = frame.groupby("_file").cumcount() + 2

    def note(mask, why) -> None:
        for index, at in zip(frame["_file"][mask], line[mask], strict=True):
            problems.setdefault(index, why(at))

    note(frame["esd_options"] == "", lambda at: f"truncated: line {at} has fewer fields than "
                                                "the header")
    for column in ("model_id", "esd_options"):
        distinct = frame.groupby("_file")[column].nunique()
        for index in distinct.index[distinct > 1]:
            problems.setdefault(index, f"its rows disagree on {column}: a damaged or merged "
                                       "file")
    note(~frame["status"].isin(STATUSES),
         lambda at: f"line {at}: a status that is not one of {', '.join(STATUSES)}")
    for column in INTEGER_COLUMNS:
        values = frame[column]
        note(values.notna() & (values != values.round()),
             lambda at, column=column: f"line {at}: column {column} holds a fraction")
    return problems


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """RESULT_COLUMNS with their dtypes (str, nullable Int64, float64), then added columns."""
    import pandas as pd

    out = {c: frame[c].astype("Int64") if c in INTEGER_COLUMNS else frame[c]
           for c in RESULT_COLUMNS}
    out.update((c, frame[c]) for c in added_columns(frame) if c != "_file")
    return pd.DataFrame(out).reset_index(drop=True)


def source_in(model_ids) -> Callable[[str], str | None]:
    """``source_model`` as written -> the id among ``model_ids`` it names, or None: equal
    ``model_key``s match (a local path with or without ``./`` or a trailing slash)."""
    by_key = {model_key(m): m for m in model_ids}
    return lambda source: by_key.get(model_key(source)) if source else None


def fitted_layers(layers: pd.DataFrame) -> pd.DataFrame:
    """The rows with a fitted alpha: status ``ok`` and a finite alpha (a hand-edited or foreign
    row may say ok without one; it is shown as missing, never drawn or averaged)."""
    import numpy as np

    return layers[(layers["status"] == "ok") & np.isfinite(layers["alpha"].astype(float))]


def added_columns(layers: pd.DataFrame) -> list[str]:
    """The columns of ``layers`` after the schema's: custom metrics' and a user's own."""
    return [c for c in layers.columns if c not in RESULT_COLUMNS]


def summarize(layers: pd.DataFrame) -> pd.DataFrame:
    """One row per model (``SUMMARY_COLUMNS``), in the order models first appear in ``layers``.

    Means, the median and the over/under-trained counts are over fitted (status ``ok``)
    layers. ``delta_alpha_mean`` is the model's ``alpha_mean`` minus that of its
    ``source_model`` (``source_in``) when the source is among ``layers`` and was computed with
    the same ``esd_options``, else NaN. Every column after the schema's that holds numbers (a
    custom metric's) adds ``<column>_mean``: its mean over the model's layers that have a value,
    NaN for a model with text there.
    """
    import pandas as pd

    models = layers.groupby("model_id", sort=False).agg(
        revision=("revision", "first"), source_model=("source_model", "first"),
        layers=("longname", "size"), esd_options=("esd_options", "first"))
    ok = fitted_layers(layers).assign(
        _over=lambda d: d["alpha"] < OVER_TRAINED_ALPHA,
        _under=lambda d: d["alpha"] > UNDER_TRAINED_ALPHA)
    fitted = ok.groupby("model_id", sort=False).agg(
        fitted=("alpha", "size"), alpha_mean=("alpha", "mean"),
        alpha_median=("alpha", "median"),
        **{f"{c}_mean": (c, "mean") for c in _MEANS},
        over_trained=("_over", "sum"), under_trained=("_under", "sum"))
    out = models.join(fitted, how="left")
    for column in ("fitted", "over_trained", "under_trained"):
        out[column] = out[column].fillna(0).astype("int64")
    source = out["source_model"].map(source_in(out.index))
    same = source.map(out["esd_options"]) == out["esd_options"]
    source_mean = source.map(out["alpha_mean"]).where(same)
    out["delta_alpha_mean"] = pd.to_numeric(out["alpha_mean"] - source_mean)
    numbers = {c: _numbers(layers, c) for c in added_columns(layers)}
    custom = [c for c, values in numbers.items() if values is not None]
    clash = [c for c in custom if f"{c}_mean" in SUMMARY_COLUMNS]
    if clash:
        warnings.warn(f"column(s) {', '.join(clash)} left out of the summary: their mean would "
                      "be named as the summary's own column", stacklevel=3)
    custom = [c for c in custom if c not in clash]
    means = pd.DataFrame({c: numbers[c] for c in custom}, index=layers.index).groupby(
        layers["model_id"], sort=False).mean().add_suffix("_mean")
    out = out.join(means, how="left")
    return out.reset_index()[list(SUMMARY_COLUMNS) + list(means.columns)]


def _numbers(layers: pd.DataFrame, column: str) -> pd.Series | None:
    """An added ``column`` as numbers: a model with text in it has none (NaN); None when no
    model has numbers there."""
    import pandas as pd

    values = layers[column]
    if pd.api.types.is_numeric_dtype(values):
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    text = values.notna() & numbers.isna()
    numbers = numbers.where(~layers["model_id"].isin(layers.loc[text, "model_id"]))
    return numbers.astype("float64") if numbers.notna().any() else None
