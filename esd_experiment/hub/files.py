"""A client of the Hugging Face hub (``HubClient``): a revision's files and sizes, safetensors
headers read with range requests, one file at a time into the cache (in this process or in the
download process); hub failures as the named errors of ``core/errors.py``, free of tokens.

``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` act as in
every Hugging Face tool. Offline, or when the hub cannot be reached, revisions resolve through
the cache's ``refs/<branch>`` and ``snapshots/<commit>`` folders. Imports no torch.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from esd_experiment.core.dtypes import DTYPE_SIZES, SAFETENSORS_DTYPES
from esd_experiment.core.errors import (
    CorruptCheckpointError,
    is_network_error,
)
from esd_experiment.hub.client import (
    METADATA_TIMEOUT_S,
    default_cache_dir,
    env_offline,
    fetch,
    scrub,
)

if TYPE_CHECKING:
    from esd_experiment.hub.cache import CacheSession
    from esd_experiment.hub.download import DownloadProcess

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Listing:
    """A resolved revision: its commit, file names and (where the hub said) byte sizes.

    ``partial``: listed from the local cache (offline, or the hub unreachable), which holds
    the files some earlier run fetched, not necessarily all the repository's: a file missing
    from such a listing is one not cached, not one the repository lacks."""

    commit: str
    files: tuple[str, ...]
    sizes: dict[str, int] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)  # what the cache names each blob
    partial: bool = False


class HubClient:
    """List a revision, read headers, fetch files.

    ``token=None`` lets huggingface_hub read ``HF_TOKEN`` or its token file; ``cache_dir=None``
    uses ``HF_HUB_CACHE`` / ``HF_HOME``; ``offline=None`` follows ``HF_HUB_OFFLINE`` (read now,
    so a process that sets it after importing huggingface_hub is still offline).
    """

    def __init__(self, token: str | None = None, cache_dir: str | None = None,
                 offline: bool | None = None, download_process: bool = False):
        self.token = token
        self.cache_dir = cache_dir
        self.offline = env_offline() if offline is None else offline
        # With ``download_process``, weight files download in a forked process of their own
        # (``hub/download.py``) from the first ``start_download_process()`` on.
        self._process_wanted = download_process and not self.offline
        self._process: DownloadProcess | None = None
        self._refs: dict[tuple[str, str], str] = {}  # (repo, commit) -> the branch or tag asked
        # (repo, commit, file) -> {tensor: (begin, end)} in the data of a safetensors file whose
        # header was read from the hub: what reading its tensors while it downloads needs
        self.spans: dict[tuple[str, str, str], dict[str, tuple[int, int]]] = {}

    def list_files(self, repo_id: str, revision: str | None) -> Listing:
        """The commit ``revision`` (default: main) resolves to, its files and their sizes."""
        if self.offline:
            return self._cached_listing(repo_id, revision)
        from huggingface_hub import HfApi
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            info = HfApi(token=self.token).model_info(
                repo_id, revision=revision, files_metadata=True, timeout=METADATA_TIMEOUT_S)
        except Exception as exc:
            if not is_network_error(exc):
                raise
            try:
                listing = self._cached_listing(repo_id, revision)
            except LocalEntryNotFoundError:
                raise exc from None
            logger.warning("%s: hub unreachable (%s); using the cached snapshot", repo_id,
                           scrub(str(exc), self.token))
            return listing
        siblings = list(info.siblings or ())
        if not _COMMIT.match(revision or ""):
            self._refs[(repo_id, str(info.sha))] = revision or "main"
        etags = {s.rfilename: s.lfs.sha256 if s.lfs is not None else s.blob_id
                 for s in siblings if s.lfs is not None or s.blob_id}
        return Listing(str(info.sha), tuple(s.rfilename for s in siblings),
                       {s.rfilename: int(s.size) for s in siblings if s.size is not None}, etags)

    def _cached_listing(self, repo_id: str, revision: str | None) -> Listing:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=self.cache_dir,
                                        local_files_only=True, allow_patterns=[]))
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        files = tuple(p.relative_to(folder).as_posix() for p in paths)
        return Listing(folder.name, files,
                       {f: p.stat().st_size for f, p in zip(files, paths, strict=True)},
                       partial=True)

    def cached(self, repo_id: str, commit: str, filename: str) -> Path | None:
        """The local path of a file already in the cache, else None."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, cache_dir=self.cache_dir,
                                       revision=commit)
        return Path(found) if isinstance(found, str) else None

    def start_download_process(self) -> None:
        """Fork the download process, if this client was asked for one and it is not there
        yet (``download_process.enabled()`` says where it can be). Call it from the main
        thread, before other threads start (see ``DownloadProcess``)."""
        if not self._process_wanted or self._process is not None:
            return
        from esd_experiment.hub import download as download_process

        self._process_wanted = False
        if not download_process.enabled():
            return
        try:
            self._process = download_process.DownloadProcess()
        except OSError as exc:  # no memory or process slot for it: download on a thread
            logger.warning("downloads stay in this process: could not start one for them "
                           "(%s)", exc)

    def close(self) -> None:
        """End the download process, if any (files already downloaded stay); the
        downloads it would have run are refused from now on."""
        if self._process is not None:
            self._process.close()

    def download(self, repo_id: str, commit: str, filename: str,
                 session: CacheSession | None = None, etag: str | None = None,
                 on_growing: Callable[[Path], object] | None = None, label: str = "",
                 background: bool = False) -> Path:
        """One file of ``commit`` in the cache (fetched unless it is there); its local path.

        ``session`` records the file as this run's before the download starts, so that a
        cleanup removes it even when the process dies half-way (``hub_cache``). With
        ``etag`` (the blob's name, from the listing) and ``on_growing``, a download that
        writes the file from its first byte to its last (huggingface_hub's HTTP download, not
        Xet's) hands ``on_growing`` the file it writes, so its beginning can be read meanwhile.
        ``background``: a download the shard fetcher runs ahead of the reader, which goes to
        the download process when there is one (its failures come as the project's errors,
        their text naming ``label``); the others (small files, an adapter's) run here, so
        that none of them waits behind a shard in flight.
        """
        found = self.cached(repo_id, commit, filename)
        if found is None:
            if session is not None:
                session.will_download(repo_id, commit, filename)
            blobs = None
            if etag and on_growing is not None and not self.offline:
                from esd_experiment.hub.cache import repo_folder_name

                blobs = default_cache_dir(self.cache_dir) / repo_folder_name(repo_id) / "blobs"
            if background and self._process is not None:
                from esd_experiment.hub.download import Request

                found = self._process.download(
                    Request(repo_id, filename, commit, self.cache_dir, self.token,
                            label or f"{repo_id}@{commit} ({filename})",
                            None if blobs is None else str(blobs), etag), on_growing)
            else:
                found = fetch(repo_id, filename, commit, self.cache_dir, self.token,
                              self.offline, blobs, etag, on_growing)
        if session is None or not session.cleanup:
            self._write_ref(repo_id, commit)
        return found

    def _write_ref(self, repo_id: str, commit: str) -> None:
        """Point the cache's ``refs/<branch>`` at ``commit`` once one of its files is cached,
        as huggingface_hub does when it downloads by branch: files are fetched here by commit,
        and without the ref a later offline run (``HF_HUB_OFFLINE=1``) of ``org/name`` could
        not tell which snapshot ``main`` is. Not under ``--cleanup_cache``, whose files go
        (a ref to a deleted snapshot would hide the one the ref named before). Once per
        listing: the first file cached records it, the next ones find nothing to do."""
        ref = self._refs.pop((repo_id, commit), None)
        if ref is None or any(part in ("", ".", "..") for part in ref.split("/")):
            return
        from esd_experiment.core.paths import write_text_atomic
        from esd_experiment.hub.cache import repo_folder_name

        path = default_cache_dir(self.cache_dir) / repo_folder_name(repo_id) / "refs" / ref
        try:
            if path.is_file() and path.read_text(encoding="utf-8").strip() == commit:
                return
            write_text_atomic(path, commit)
        except OSError as exc:  # a read-only cache: the files are there, only offline lookup
            logger.debug("%s: could not record %s -> %s in the cache: %s", repo_id, ref,
                         commit, exc)

    def safetensors_header(self, repo_id: str, commit: str, filename: str,
                           read_local: Callable[[Path, str], dict]) -> dict:
        """``{tensor: (shape, dtype)}`` of a safetensors file: ``read_local(path, label)`` of
        the cached file when it is there (the format's own reader), else read from the hub with
        range requests (the file itself is not downloaded)."""
        found = self.cached(repo_id, commit, filename)
        if found is not None or self.offline:
            path = found if found is not None else self.download(repo_id, commit, filename)
            return read_local(path, f"{repo_id}@{commit}")
        from huggingface_hub import HfApi

        meta = HfApi(token=self.token).parse_safetensors_file_metadata(
            repo_id, filename, revision=commit, timeout=METADATA_TIMEOUT_S)
        header = {name: (tuple(info.shape), SAFETENSORS_DTYPES.get(info.dtype, info.dtype))
                  for name, info in meta.tensors.items()}
        spans = {name: (int(info.data_offsets[0]), int(info.data_offsets[1]))
                 for name, info in meta.tensors.items()}
        check_spans(header, spans, f"{repo_id}@{commit}", filename)
        self.spans[(repo_id, commit, filename)] = spans
        return header


def check_spans(header: dict, spans: dict[str, tuple[int, int]], label: str,
                filename: str) -> None:
    """Refuse a safetensors header read from the hub that safetensors' own loader refuses on
    disk: sorted by offset, the tensors' spans must tile the data from byte 0, each exactly
    its shape's bytes (that they end where the data ends is checked once the header's length
    is read, with the file: ``CheckpointReader``)."""
    end = 0
    for name, (begin, stop) in sorted(spans.items(), key=lambda item: (item[1], item[0])):
        if begin != end or stop < begin:
            raise CorruptCheckpointError(
                f"{label}: {filename} places tensor {name!r} at bytes {begin}-{stop} of its "
                f"data, where the tensor before it ends at {end}: its tensors overlap or leave "
                f"a gap, which safetensors refuses; the file is damaged")
        shape, dtype = header[name]
        size = DTYPE_SIZES.get(dtype)
        if size is not None and math.prod(shape) * size != stop - begin:
            raise CorruptCheckpointError(
                f"{label}: {filename} gives tensor {name!r} ({dtype}, shape {list(shape)}) "
                f"{stop - begin} bytes of data, not the {math.prod(shape) * size} its shape "
                f"needs; the file is damaged")
        end = stop
