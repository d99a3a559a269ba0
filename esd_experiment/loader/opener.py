"""Opening the models of a list, from the Hugging Face hub or a local directory, as streams.

``open_models([ModelRequest(...), ...])`` resolves each ``org/name``, ``org/name@revision`` or
local directory and checks what can be checked before any weight is read: ``config.json``
(a quantized format is refused before a weight file is downloaded), the safetensors headers
(read from the hub with range requests), an adapter's tensors against its base's shapes.
Models built on the same base checkpoint (a base and its LoRA adapters) share one opened
checkpoint, so ``tensor_stream.stream_models`` reads and downloads each base shard once for
all of them. Shards are fetched ahead of the reader (a tensor is read once its own bytes are
in, while the rest of its shard downloads) and, under ``--cleanup_cache``, deleted once read
(``hub_cache``: never while another job reads them).

What is fetched: ``config.json``, the safetensors shards and their index (``.bin`` only when a
repository has no safetensors), and for an adapter ``adapter_config.json`` and
``adapter_model.*``. No model class is built except for adapter types that only peft can merge,
so models with custom code are read without ``trust_remote_code``. Hub failures become the
named errors of ``core/errors.py`` (``hub_files``), free of tokens. Torch is imported only when a
tensor is read, so the runner and ``--dry_run`` use this module without it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esd_experiment.core.errors import (
    CorruptCheckpointError,
    ESDError,
    ModelNotFoundError,
    NetworkError,
)
from esd_experiment.core.ids import (
    ADAPTER_RELATIONS,
    ModelRequest,
    Source,
    is_adapter_repo,
    is_gguf_repo,
    looks_like_path,
    parse_model_id,
)
from esd_experiment.formats.checkpoint import (
    CONFIG_FILE,
    CheckpointReader,
    WeightFiles,
    index_shards,
    read_header,
    read_json,
    select_weight_files,
)
from esd_experiment.formats.model import Checkpoint, LoadedModel
from esd_experiment.formats.quantized import quantization_format
from esd_experiment.formats.stream import AHEAD_MEMORY_BYTES, MAX_HELD, ShardFetcher
from esd_experiment.hub.client import hub_errors, scrub
from esd_experiment.hub.files import HubClient, Listing

if TYPE_CHECKING:  # torch and the merge are imported when tensors are read

    from esd_experiment.hub.cache import CacheSession

logger = logging.getLogger(__name__)


__all__ = [
    "ADAPTER_RELATIONS", "HubClient", "LoadedModel", "ModelRequest", "open_model",
    "open_models", "parse_model_id", "scrub",
]


class Opener:
    """Resolves and fetches the files of the models of one job. Checkpoints are opened once
    per source, so the models of one base share it."""

    def __init__(self, hub: HubClient, token: str | None, session: CacheSession | None,
                 waiting, on_fetch: Callable[[], object] | None = None) -> None:
        self.hub, self.session, self.waiting = hub, session, waiting
        self.on_fetch = on_fetch  # called once, when the first weight download starts
        self.token = token if token is not None else getattr(hub, "token", None)
        self.checkpoints: dict[tuple[str, str | None], Checkpoint] = {}
        # Repositories whose shards wait for the order they are read in (``ShardFetcher``'s
        # ``start``): a fine-tune read in its source's pass (--delta).
        self.idle: frozenset[str] = frozenset()

    def locate(self, model_id: str, revision: str | None) -> Source:
        local = Path(model_id).expanduser()
        if local.is_file() and local.name.lower().endswith(".gguf"):  # one local GGUF file
            from esd_experiment.formats.gguf_file import local_gguf_paths

            paths = local_gguf_paths(local, model_id)
            return Source(model_id, None, local.parent, tuple(p.name for p in paths),
                          {p.name: p.stat().st_size for p in paths})
        if local.is_dir():
            files = tuple(sorted(p.name for p in local.iterdir() if p.is_file()))
            return Source(model_id, None, local, files,
                          {f: (local / f).stat().st_size for f in files})
        if looks_like_path(model_id):
            where = "" if local.is_absolute() else f" (relative to {Path.cwd()})"
            raise ModelNotFoundError(f"{model_id}: no such local directory{where}")
        label = model_id if revision is None else f"{model_id}@{revision}"
        with hub_errors(label, self.hub.offline, self.token):
            listing: Listing = self.hub.list_files(model_id, revision)
        if self.session is not None:
            self.session.lease(model_id)
        return Source(model_id, listing.commit, Path(), listing.files, listing.sizes,
                      listing.etags, listing.partial)

    def not_cached(self, source: Source, what: str) -> ESDError:
        """The error for a file ``source``'s cache listing lacks: offline, that it is not
        cached; otherwise the hub's outage (retried, and counted toward the run's outage
        rule), since the listing came from the cache only because the hub was unreachable."""
        if self.hub.offline:
            return ModelNotFoundError(f"{source.label}: HF_HUB_OFFLINE=1 and {what} is not in "
                                      f"the local hub cache")
        return NetworkError(f"{source.label}: the hub is unreachable and {what} is not in the "
                            f"local hub cache (which holds only part of the repository)")

    def choose(self, source: Source, select: Callable[..., Any], *args: Any) -> Any:
        """``select(source.files, *args)``: a choice among the repository's files that may
        refuse it; from a cache listing the refusal means only that they are not cached."""
        try:
            return select(source.files, *args)
        except ESDError:
            if source.partial:
                raise self.not_cached(source, "its weight files") from None
            raise

    def file(self, source: Source, name: str,
             on_growing: Callable[[Path], object] | None = None,
             background: bool = False) -> Path:
        """The local path of one file of ``source`` (downloaded for a hub model; a download
        that can be read while it grows hands its file to ``on_growing``; ``background``:
        the shard fetcher's, run in the hub client's download process where it has one)."""
        if not source.on_hub:
            return source.root / name
        if name not in source.files:
            if source.partial:
                raise self.not_cached(source, name)
            raise CorruptCheckpointError(f"{source.label}: the repository lacks {name}, named by "
                                         f"its weight index")
        label = f"{source.label} ({name})"
        with hub_errors(label, self.hub.offline, self.token):
            return self.hub.download(source.model_id, source.revision, name, self.session,
                                     etag=source.etags.get(name), on_growing=on_growing,
                                     label=label, background=background)

    def with_root(self, source: Source, name: str) -> Source:
        """``source`` with its snapshot folder known (after fetching ``name`` from the hub)."""
        path = self.file(source, name)
        if not source.on_hub:
            return source
        return replace(source, root=path.parents[len(Path(name).parts) - 1])

    def fetcher(self, source: Source, order: Sequence[str]) -> ShardFetcher | None:
        if not source.on_hub:
            return None
        self.hub.start_download_process()  # before on_fetch starts the estimator's import
        release = None
        if self.session is not None and self.session.cleanup:
            def release(shard: str) -> bool:
                return self.session.release(source.model_id, source.revision, shard)
        # Without cleanup every file stays in the cache anyway: no reason to hold any back.
        def download(shard: str, growing=None) -> Path:
            return self.file(source, shard, growing, background=True)

        fetcher = ShardFetcher(order, download, release, self.waiting,
                               max_held=None if release is None else MAX_HELD, growing=True,
                               memory=0 if release is None else AHEAD_MEMORY_BYTES,
                               start=source.model_id not in self.idle)
        if self.on_fetch is not None:
            on_fetch, self.on_fetch = self.on_fetch, None
            on_fetch()
        return fetcher

    def checkpoint(self, source: Source, gguf_file: str = "") -> Checkpoint:
        """Open a full model's checkpoint (once per source). ``config.json`` comes first: a
        quantization no reader handles is refused before any weight file is downloaded."""
        key = (source.model_id, source.revision, gguf_file)
        if key in self.checkpoints:
            return self.checkpoints[key]
        if gguf_file or is_gguf_repo(source.files):
            opened = self._gguf(source, gguf_file)
        else:
            weights = self.choose(source, select_weight_files, source.label)
            index = self._index_ahead(source, weights)
            try:
                config = {}
                if CONFIG_FILE in source.files:
                    source = self.with_root(source, CONFIG_FILE)
                    config = read_json(source.root / CONFIG_FILE, source.label)
                method = quantization_format(config, source.label)
            finally:
                # Its errors, if any, come again from _reader's own fetch. Joined even when
                # this model is refused: no request of it may be in flight when the next
                # model's fetcher forks the download process.
                if index is not None:
                    index.join()
            reader, fetcher = self._reader(source, weights)
            if method is not None:
                from esd_experiment.formats.quantized import dequantizing_reader

                reader = dequantizing_reader(reader, config["quantization_config"],
                                             source.label)
            from esd_experiment.formats.weight_forms import WeightFormsReader

            opened = Checkpoint(source, WeightFormsReader(reader, config, source.label),
                                config, fetcher)
        self.checkpoints[key] = opened
        return opened

    def _index_ahead(self, source: Source, weights: WeightFiles) -> threading.Thread | None:
        """Fetch a hub checkpoint's weight index on a thread while ``config.json`` is fetched
        (two small files, one round trip of the hub's latency instead of two)."""
        if not source.on_hub or not weights.index or weights.index not in source.files:
            return None

        def fetch() -> None:
            try:
                self.file(source, weights.index)
            except Exception as exc:  # noqa: BLE001  (reported by the fetch that needs it)
                logger.debug("%s: fetching %s ahead failed: %s", source.label, weights.index, exc)

        thread = threading.Thread(target=fetch, name="index-ahead", daemon=True)
        thread.start()
        return thread

    def _gguf(self, source: Source, gguf_file: str) -> Checkpoint:
        """A GGUF model: its file (or the parts of a split one), fetched whole, since each
        file's header describes it; tensors are dequantized as they are read."""
        from esd_experiment.formats.gguf_file import GGUFCheckpoint, select_gguf_files

        names = self.choose(source, select_gguf_files, gguf_file or None, source.label)
        fetcher = self.fetcher(source, names)
        paths = fetcher.fetch_all() if fetcher is not None else [source.root / n for n in names]
        reader = GGUFCheckpoint(paths, source.label, file_names=names)
        return Checkpoint(source, reader, {}, fetcher)

    def _reader(self, source: Source, weights: WeightFiles):
        if not source.on_hub:
            return CheckpointReader(source.root, weights, source.label), None
        shards = weights.shards
        weight_map: dict[str, str] = {}
        if weights.index:
            source = self.with_root(source, weights.index)
            weight_map, shards = index_shards(source.root / weights.index, source.label)
        missing = [s for s in shards if s not in source.files]
        if missing and source.partial:
            raise self.not_cached(source, ", ".join(missing[:5]))
        if missing:
            raise CorruptCheckpointError(f"{source.label}: the repository lacks "
                                         f"{', '.join(missing[:5])}, named by its weight index")
        fetcher = self.fetcher(source, shards)
        if weights.kind != "safetensors":  # a .bin has no header to read apart: fetch it whole
            root = self.with_root(source, shards[0]).root
            fetcher.fetch_all()
            return CheckpointReader(root, weights, source.label), fetcher
        with hub_errors(source.label, self.hub.offline, self.token):
            headers = {s: self.hub.safetensors_header(source.model_id, source.revision, s,
                                                      read_header)
                       for s in shards}
        spans = {s: found for s in shards
                 if (found := self.hub.spans.get((source.model_id, source.revision, s)))}
        reader = CheckpointReader.from_headers(headers, fetcher.path, source.label, weight_map,
                                               {s: source.sizes.get(s, 0) for s in shards},
                                               spans, fetcher.read_growing,
                                               copy=fetcher.max_held is not None)
        fetcher.in_memory_ok(reader.read_through_spans())
        return reader, fetcher


def open_models(requests: Sequence[ModelRequest], *, token: str | None = None,
                cache_dir: str | None = None, trust_remote_code: bool = False,
                hub: HubClient | None = None, session: CacheSession | None = None,
                waiting=nullcontext, on_fetch: Callable[[], object] | None = None,
                idle: Collection[str] = ()) -> list[LoadedModel | ESDError]:
    """Open the models of one job; each entry is the opened model or the error that stopped it.

    ``session`` (a ``hub_cache.CacheSession``) leases the repositories read and records the
    files downloaded, for a safe ``--cleanup_cache``; ``waiting()`` is the context entered
    while the reader waits for a download; ``on_fetch()`` is called once, as the first weight
    files start downloading (the worker imports the estimator then, while they download).
    ``idle``: repositories whose shards wait for the order they are read in (``Opener.idle``).
    """
    hub = hub if hub is not None else HubClient(token=token, cache_dir=cache_dir)
    opener = Opener(hub, token, session, waiting, on_fetch)
    opener.idle = frozenset(idle)
    opened: list[LoadedModel | ESDError] = []
    for request in requests:
        try:
            opened.append(_open(opener, request, trust_remote_code))
        except ESDError as exc:
            opened.append(exc)
    return opened


def open_model(request: ModelRequest, *, token: str | None = None,
               cache_dir: str | None = None, trust_remote_code: bool = False,
               hub: HubClient | None = None, session: CacheSession | None = None,
               waiting: Any = nullcontext) -> LoadedModel:
    """Resolve, fetch and check one model; stream its tensors with ``iter_tensors()``."""
    (model,) = open_models([request], token=token, cache_dir=cache_dir,
                           trust_remote_code=trust_remote_code, hub=hub, session=session,
                           waiting=waiting)
    if isinstance(model, ESDError):
        raise model
    return model


def _open(opener: Opener, request: ModelRequest, trust_remote_code: bool) -> LoadedModel:
    model_id, revision = parse_model_id(request.model_id)
    source = opener.locate(model_id, revision)
    if request.marked_adapter or is_adapter_repo(source.files):
        from esd_experiment.adapters.adapter_files import open_adapter

        return open_adapter(opener, request, source, trust_remote_code)
    checkpoint = opener.checkpoint(source, request.gguf_file)
    # A full model's source_model (a fine-tune's base, as the list gives it) is recorded as is.
    return LoadedModel(request.model_id, source.revision, request.source_model.strip(), None,
                       False, checkpoint)
