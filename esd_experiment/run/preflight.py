"""``--dry_run``: every model of the list resolved and checked, no weight file downloaded.

Writes ``<output_dir>/preflight/preflight.csv``, one row per model: ``model_id``, ``revision`` (the
resolved commit), ``kind`` (model or adapter), ``source_model``, ``format`` (safetensors, bin,
gguf, quantized:METHOD, none), ``weight_bytes`` (what the analysis reads of the model itself),
``base_bytes`` (an adapter's base; under --delta, a fine-tune's source), ``largest_shard_bytes``,
``status`` (ok, not_found, revision_not_found, gated, no_weights, unsupported, no_base, invalid,
error) and ``detail``;
prints the totals: models ok and refused, bytes to download (a base shared by adapters
counted once), and the disk the largest model needs with and without ``--cleanup_cache``.
Reads only listings, ``config.json``, ``adapter_config.json`` and weight indexes. Exit code
0 when every row is ok, else 1.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from esd_experiment.core.errors import (
    AdapterBaseError,
    ESDError,
    GatedModelError,
    InputError,
    ModelNotFoundError,
    NoWeightsError,
    RevisionNotFoundError,
    TransientError,
    UnsupportedFormatError,
)
from esd_experiment.core.ids import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ModelRequest,
    Source,
    is_adapter_repo,
    is_gguf_repo,
    parse_model_id,
)
from esd_experiment.core.paths import PREFLIGHT_FILE, write_text_atomic
from esd_experiment.core.results import inert_cell
from esd_experiment.formats.checkpoint import (
    CONFIG_FILE,
    index_shards,
    read_json,
    select_weight_files,
)
from esd_experiment.formats.quantized import quantization_format
from esd_experiment.loader.opener import (
    HubClient,
    Opener,
)
from esd_experiment.run.delta_worker import source_request
from esd_experiment.run.model_list import ListEntry, group_jobs

logger = logging.getLogger(__name__)

# Small files the analysis reads beside the shards (config, index): a disk margin.
SMALL_FILES_MARGIN = 10 * 2**20
_STATUSES = ((RevisionNotFoundError, "revision_not_found"), (ModelNotFoundError, "not_found"),
             (GatedModelError, "gated"), (NoWeightsError, "no_weights"),
             (UnsupportedFormatError, "unsupported"), (AdapterBaseError, "no_base"),
             (InputError, "invalid"))


@dataclass
class Row:
    model_id: str
    revision: str = ""
    kind: str = ""
    source_model: str = ""
    format: str = "none"
    weight_bytes: int = 0
    base_bytes: int = 0
    largest_shard_bytes: int = 0
    status: str = "ok"
    detail: str = ""
    # Not columns (repr=False): what the disk figures are made of.
    files: dict = field(default_factory=dict, repr=False)  # (repo, commit, file) -> bytes
    shards: list = field(default_factory=list, repr=False)  # the checkpoint read's shards
    # The shard sizes of each part downloaded: a model's own, an adapter's file and its
    # base's; none for what is read where it lies (a local model or base).
    held: list = field(default_factory=list, repr=False)
    source_shards: list = field(default_factory=list, repr=False)  # streamed beside (--delta)


COLUMNS = [f.name for f in fields(Row) if f.repr]


def checkpoint_info(opener: Opener, source: Source, row: Row, prefix: str = "",
                    gguf_file: str = "") -> tuple[dict, list[int]]:
    """A full model's format (into ``row.format``, even when it is refused), the bytes of
    each weight file the analysis reads, and the shard sizes."""
    key = (source.model_id, source.revision or "local")
    if gguf_file or is_gguf_repo(source.files):
        from esd_experiment.formats.gguf_file import select_gguf_files

        row.format = prefix + "gguf"
        names = opener.choose(source, select_gguf_files, gguf_file or None, source.label)
        sizes = [source.sizes.get(n, 0) for n in names]
        return {(*key, n): size for n, size in zip(names, sizes, strict=True)}, [sum(sizes)]
    weights = opener.choose(source, select_weight_files, source.label)
    row.format = prefix + weights.kind
    if CONFIG_FILE in source.files:
        config = read_json(opener.file(source, CONFIG_FILE), source.label)
        quant = config.get("quantization_config")
        if isinstance(quant, dict) and quant:
            row.format = f"{prefix}quantized:{quant.get('quant_method', 'unknown')}"
        quantization_format(config, source.label)
    shards = list(weights.shards)
    if weights.index:
        _, shards = index_shards(opener.file(source, weights.index), source.label)
    missing = [s for s in shards if s not in source.files]
    if missing and source.partial:
        raise opener.not_cached(source, ", ".join(missing[:5]))
    files = {(*key, s): source.sizes.get(s, 0) for s in shards}
    return files, [source.sizes.get(s, 0) for s in shards]


def check(opener: Opener, entry: ListEntry, delta: bool = False) -> Row:
    """One entry's row; under ``delta``, a full model's ``source_model`` is checked too (it
    is read beside the model, in one pass)."""
    row = Row(entry.key)
    try:
        model_id, revision = parse_model_id(entry.model_id)
        source = opener.locate(model_id, revision)
        row.revision = source.revision or ""
        request = ModelRequest(entry.model_id, entry.base_model_relation, entry.source_model)
        if request.marked_adapter or is_adapter_repo(source.files):
            _adapter(opener, request, source, row)
        else:
            row.kind = "model"
            row.files, row.shards = checkpoint_info(opener, source, row,
                                                    gguf_file=entry.gguf_file)
            row.weight_bytes = sum(row.files.values())
            if source.on_hub:
                row.held.append(row.shards)
            if delta and entry.source_model:
                _source(opener, entry.source_model, row)
    except ESDError as exc:
        row.status = next((s for cls, s in _STATUSES if isinstance(exc, cls)), "error")
        row.detail = " ".join(str(exc).split())[:300]
    row.largest_shard_bytes = max(row.shards, default=0)
    return row


def _adapter(opener: Opener, request: ModelRequest, source: Source, row: Row) -> None:
    from esd_experiment.adapters.adapter_files import resolve_base

    row.kind = "adapter"
    if source.partial and not is_adapter_repo(source.files):
        raise opener.not_cached(source, f"{ADAPTER_CONFIG} or the adapter's weights")
    if not is_adapter_repo(source.files):
        raise NoWeightsError(f"{source.label}: marked as an adapter but holds no "
                             f"{ADAPTER_CONFIG} with adapter weights")
    source = opener.with_root(source, ADAPTER_CONFIG)
    adapter_config = read_json(source.root / ADAPTER_CONFIG, source.label)
    weights = next(w for w in ADAPTER_WEIGHTS if w in source.files)
    row.weight_bytes = source.sizes.get(weights, 0)
    row.files[(source.model_id, source.revision or "local", weights)] = row.weight_bytes
    if source.on_hub:
        row.held.append([row.weight_bytes])
    base = resolve_base(opener, request, source, adapter_config)
    row.source_model = base.label
    files, row.shards = checkpoint_info(opener, base, row, prefix="adapter+")
    row.base_bytes = sum(files.values())
    row.files.update(files)
    if base.on_hub:
        row.held.append(row.shards)


def _source(opener: Opener, source_model: str, row: Row) -> None:
    """A fine-tune's source model under --delta: its files count as the fine-tune's base."""
    request = source_request(source_model)
    try:
        source = opener.locate(*parse_model_id(request.model_id))
        if is_adapter_repo(source.files):
            raise AdapterBaseError(f"{source.label} is an adapter, not a full model")
        files, shards = checkpoint_info(opener, source, Row(source_model),
                                        gguf_file=request.gguf_file)
    except TransientError:
        raise
    except ESDError as exc:
        raise AdapterBaseError(f"--delta: its source model cannot be read: {exc}") from None
    row.source_model = source_model
    row.base_bytes = sum(files.values())
    row.files.update(files)
    if source.on_hub:  # a local source is read where it lies: nothing to hold on disk
        row.source_shards = shards


def preflight(entries: list[ListEntry], output_dir: Path, cache_dir: str | None = None,
              hub: HubClient | None = None, delta: bool = False, max_group: int = 8) -> int:
    """Check every entry (``delta``: and the sources of fine-tunes), write
    ``preflight.csv``, print the totals; the exit code. ``max_group``: as the run's, which
    under ``delta`` puts up to that many fine-tunes of one source in one pass."""
    hub = hub if hub is not None else HubClient(cache_dir=cache_dir)
    opener = Opener(hub, None, None, nullcontext)
    rows = [check(opener, entry, delta) for entry in entries]
    jobs: list[list[Row]] = []
    if delta:  # the fine-tunes of a source that stream in one pass (adapters: per row)
        row_of = {entry.key: row for entry, row in zip(entries, rows, strict=True)}
        jobs = [[row_of[e.key] for e in spec.entries]
                for spec in group_jobs(entries, max_group, lambda _: None, fine_tunes=True)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: inert_cell(v) for k, v in asdict(r).items()} for r in rows)
    out = Path(output_dir) / PREFLIGHT_FILE
    write_text_atomic(out, buffer.getvalue())
    print(totals(rows, out, jobs))
    if any(r.status == "unsupported" for r in rows):
        from esd_experiment.formats.quantized import supported_formats

        print("formats read:\n  " + "\n  ".join(supported_formats()))
    return 0 if all(r.status == "ok" for r in rows) else 1


def _two(shards: list[int]) -> int:
    return sum(sorted(shards)[-2:])


def _pass_disk(job: list[Row]) -> int:
    """What one pass holds at once under --cleanup_cache: its source's two largest shards,
    once, and each fine-tune's own two largest (each streams beside it, --delta)."""
    fine_tunes = [r for r in job if r.status == "ok" and r.source_shards]
    if not fine_tunes:
        return 0
    return max(_two(r.source_shards) for r in fine_tunes) + sum(map(_own, fine_tunes))


def _own(row: Row) -> int:
    """What ``row`` holds at once under --cleanup_cache, its --delta source aside."""
    return sum(_two(part) for part in row.held)


def totals(rows: list[Row], out: Path, jobs: Sequence[list[Row]] = ()) -> str:
    ok = [r for r in rows if r.status == "ok"]
    unique: dict = {}
    whole = 0
    for r in ok:
        downloaded = {k: v for k, v in r.files.items() if k[1] != "local"}
        unique.update(downloaded)
        whole = max(whole, sum(downloaded.values()))
    streamed = max([_own(r) + _two(r.source_shards) for r in ok]
                   + [_pass_disk(job) for job in jobs], default=0)
    streamed += SMALL_FILES_MARGIN if ok else 0
    held = "its two largest shards" + (", and its source's under --delta"
                                       if any(r.source_shards for r in ok) else "")
    refused = [f"{r.model_id} ({r.status})" for r in rows if r.status != "ok"]
    lines = [f"preflight: {len(ok)} of {len(rows)} models ok, {len(refused)} refused"
             f"{': ' + ', '.join(refused[:10]) if refused else ''}",
             f"to download: {_size(sum(unique.values()))} (each file once)",
             f"disk for the largest model: {_size(whole)}; with --cleanup_cache "
             f"{_size(streamed)} ({held} at once, and {_size(SMALL_FILES_MARGIN)} for the "
             f"small files beside them)",
             f"rows: {out}"]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
