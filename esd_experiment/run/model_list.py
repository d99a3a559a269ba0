"""The model list, and the jobs made from it.

``read_model_list`` parses the CSV (``model_id`` and optional ``base_model_relation``,
``source_model``, ``gguf_file``). ``group_jobs`` turns the models still to run into jobs: a
base and its adapters (those the list marks as adapters, with the base given as
``source_model`` or named by the adapter's ``adapter_config.json``) make one job of at most
``max_group`` models, so the base is read and downloaded once for all of them; every other
model is a job of its own. Imports neither torch nor transformers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from esd_experiment.core.errors import InputError
from esd_experiment.core.paths import model_key

logger = logging.getLogger(__name__)

ADAPTER_RELATIONS = frozenset({"adapter", "lora", "peft"})  # as model_loader reads them


@dataclass(frozen=True)
class ListEntry:
    model_id: str
    base_model_relation: str = ""
    source_model: str = ""
    gguf_file: str = ""

    @property
    def is_adapter(self) -> bool:
        return self.base_model_relation.strip().lower() in ADAPTER_RELATIONS

    @property
    def key(self) -> str:
        """The entry's name in ``failed_models.txt`` and the log: its id, and for one GGUF
        file of a repository that file (``org/name#model-Q4_K_M.gguf``)."""
        return f"{self.model_id}#{self.gguf_file}" if self.gguf_file else self.model_id


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
    try:
        for raw in reader:
            _add_row(path, reader, raw, entries)
    except csv.Error as exc:
        raise InputError(f"model list {path}, line {reader.line_num}: a cell longer than "
                         f"csv's limit of {csv.field_size_limit()} characters, or not CSV "
                         f"({exc})") from None
    if not entries:
        raise InputError(f"model list {path} names no model")
    return list(entries.values())


def _add_row(path: Path, reader: csv.DictReader, raw: dict,
             entries: dict[str, ListEntry]) -> None:
    """One row of the list into ``entries`` (keyed by entry key; the first row wins)."""
    row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
    entry = ListEntry(row.get("model_id", ""), row.get("base_model_relation", ""),
                      row.get("source_model", ""), row.get("gguf_file", ""))
    if any(not ch.isprintable() for ch in entry.model_id + entry.source_model
           + entry.gguf_file):
        logger.warning("%s, line %d: skipped, its ids hold tabs, line breaks or other "
                       "control characters: %r", path, reader.line_num, entry.model_id)
        return
    if entry.source_model and not entry.is_adapter and not entry.gguf_file \
            and model_key(entry.source_model) == model_key(entry.model_id):
        logger.warning("%s, line %d: %s names itself as its source_model: analysed as a model "
                       "without one (its delta would be zero)", path, reader.line_num,
                       entry.model_id)
        entry = ListEntry(entry.model_id, entry.base_model_relation)
    if not entry.model_id:
        if any(row.values()):
            logger.warning("%s, line %d: skipped, it has no model_id: %r", path,
                           reader.line_num, ",".join(v for v in row.values() if v))
        return
    first = entries.setdefault(_same_model(entry), entry)
    if first.model_id != entry.model_id:  # one model, one result file: the first row wins
        logger.warning("%s, line %d: %s names the model of %s, listed before; that row is the "
                       "one run", path, reader.line_num, entry.model_id, first.model_id)
    elif first != entry:
        logger.warning("%s is listed twice with other columns; using the first row (%r, "
                       "%r)", entry.model_id, first.base_model_relation, first.source_model)


def _same_model(entry: ListEntry) -> str:
    """What makes two rows one model (``model_key``: a local directory whatever the spelling
    of its path); the GGUF file of a repository of several is part of it."""
    name = model_key(entry.model_id)
    return f"{name}#{entry.gguf_file}" if entry.gguf_file else name


@dataclass(frozen=True)
class JobSpec:
    """The models of one worker job: one model, or a base and adapters built on it (``base``:
    the base's id as the adapters name it; listed among ``entries`` when it runs too)."""

    entries: tuple[ListEntry, ...]
    base: str = ""

    @property
    def name(self) -> str:
        """The job's name, unique in a run: its first entry's key (a backend keys jobs by it)."""
        first = self.entries[0].key
        return first if len(self.entries) == 1 else f"{first} (+{len(self.entries) - 1})"


def adapter_base(entry: ListEntry, read_adapter_config: Callable[[str], dict | None]) -> str:
    """The base an adapter entry names: its ``source_model``, else the
    ``base_model_name_or_path`` of its ``adapter_config.json`` (as a hub id with its revision
    when the config pins one); "" when neither can be had."""
    if entry.source_model:
        return entry.source_model
    config = read_adapter_config(entry.model_id)
    name = (config or {}).get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        return ""
    revision = (config or {}).get("revision")
    return f"{name.strip()}@{revision}" if revision and "@" not in name else name.strip()


def group_jobs(entries: Sequence[ListEntry], max_group: int,
               read_adapter_config: Callable[[str], dict | None],
               fine_tunes: bool = False) -> list[JobSpec]:
    """Jobs in list order, each base with its adapters (the base first when it runs too)
    and, with ``fine_tunes`` (--delta), the full models whose ``source_model`` it is, unless
    such a model is itself the base of others (it then runs as a base, or alone).

    A group starts where its first member stands in the list and holds at most
    ``max_group`` models; a larger group is split, the base going with the first part.
    """
    bases = {e.model_id: adapter_base(e, read_adapter_config) for e in entries
             if e.is_adapter and not e.gguf_file}
    if fine_tunes:
        full = {e.model_id: e.source_model for e in entries
                if e.source_model and not e.is_adapter and not e.gguf_file}
        named = {model_key(b) for b in [*bases.values(), *full.values()] if b}
        bases.update((m, s) for m, s in full.items() if model_key(m) not in named)
    members: dict[str, list[ListEntry]] = {}  # by the base's model_key
    for entry in entries:
        if bases.get(entry.model_id):
            members.setdefault(model_key(bases[entry.model_id]), []).append(entry)
    jobs: list[JobSpec] = []
    placed: set[str] = set()
    for entry in entries:
        if entry.key in placed:
            continue
        # One GGUF file of a repository is a model of its own, not the checkpoint adapters of
        # that repository merge into: it runs alone, as its row says.
        key = "" if entry.gguf_file else model_key(bases.get(entry.model_id) or entry.model_id)
        if key not in members:
            jobs.append(JobSpec((entry,)))
            placed.add(entry.key)
            continue
        listed_base = [e for e in entries if model_key(e.model_id) == key
                       and not e.is_adapter and not e.gguf_file]
        # The base as listed, else as its first adapter names it: the worker knows the base
        # among the job's models by this spelling.
        base = listed_base[0].model_id if listed_base else bases[members[key][0].model_id]
        group = listed_base + members[key]
        for start in range(0, len(group), max_group):
            jobs.append(JobSpec(tuple(group[start:start + max_group]), base))
        placed.update(e.key for e in group)
    return jobs


def local_adapter_config(model_id: str) -> dict | None:
    """``adapter_config.json`` of a local adapter directory; None for anything else."""
    path = Path(model_id).expanduser() / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
