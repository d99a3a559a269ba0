"""The Hugging Face hub through ``huggingface_hub``: a revision's files and sizes, safetensors
headers read with range requests, one file at a time into the cache; hub failures as the
named errors of ``errors.py``, free of tokens.

``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` act as in
every Hugging Face tool. Offline, or when the hub cannot be reached, revisions resolve through
the cache's ``refs/<branch>`` and ``snapshots/<commit>`` folders. Imports no torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from esd_experiment.core.errors import (
    CorruptCheckpointError,
    ESDError,
    GatedModelError,
    InputError,
    ModelNotFoundError,
    NetworkError,
    RevisionNotFoundError,
    TransientError,
    is_network_error,
)

if TYPE_CHECKING:
    from esd_experiment.hub.cache import CacheSession
    from esd_experiment.hub.download import DownloadProcess

logger = logging.getLogger(__name__)

# Seconds without an answer before a metadata request gives up (huggingface_hub sends no
# timeout with model_info, so a stalled hub would hang the call for good).
METADATA_TIMEOUT_S = 30.0

# Hub tokens as huggingface_hub prints them, and HTTP authorisation headers.
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{16,}")
_BEARER_PATTERN = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)
_FALSE = {"", "0", "false", "no", "off"}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# safetensors header dtypes under torch's names, so every format reports dtypes alike.
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Bytes per element of the dtypes a safetensors header names (as torch spells them): what a
# tensor's span must measure, known before torch is imported.
DTYPE_SIZES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
               "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
               "bool": 1}


def scrub(text: str, token: str | None = None) -> str:
    """``text`` with every hub token (given, from the environment, or token-shaped) masked."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_PATTERN.sub("hf_***", _BEARER_PATTERN.sub(r"\1***", text))


def env_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().lower() not in _FALSE


def default_cache_dir(cache_dir: str | Path | None) -> Path:
    """The hub cache a client uses: ``cache_dir`` or huggingface_hub's (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)


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
        # (``download_process.py``) from the first ``start_download_process()`` on.
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

    def safetensors_header(self, repo_id: str, commit: str, filename: str) -> dict:
        """``{tensor: (shape, dtype)}`` of a safetensors file, from the cache when it is there,
        else read from the hub with range requests (the file itself is not downloaded)."""
        found = self.cached(repo_id, commit, filename)
        if found is not None or self.offline:
            from esd_experiment.formats.checkpoint import read_header

            path = found if found is not None else self.download(repo_id, commit, filename)
            return read_header(path, f"{repo_id}@{commit}")
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


# The progress bar huggingface_hub's plain HTTP download opens: that download writes its
# temporary file in order, from the first byte (resuming after a dropped connection at the
# end; starting again from the first byte, with the same bytes, where a server ignores the
# resumed range). Xet's download, which opens another, may write a file's parts in any order.
_SEQUENTIAL_DOWNLOAD = "huggingface_hub.http_get"


def fetch(repo_id: str, filename: str, commit: str, cache_dir: str | None,
          token: str | None, offline: bool = False, blobs: Path | None = None,
          etag: str | None = None, on_growing: Callable[[Path], object] | None = None) -> Path:
    """``hf_hub_download`` of one file into the cache, in this process (the worker's thread
    or the download process); with ``blobs``, ``etag`` and ``on_growing``, the file a plain
    HTTP download writes goes to ``on_growing`` as it starts (``_growing_file_progress``)."""
    from huggingface_hub import hf_hub_download

    progress = (_growing_file_progress(blobs, etag, on_growing)
                if blobs is not None and etag and on_growing is not None else None)
    return Path(hf_hub_download(repo_id, filename, revision=commit, cache_dir=cache_dir,
                                token=token, local_files_only=offline,
                                **({"tqdm_class": progress} if progress else {})))


def _growing_file_progress(blobs: Path, etag: str, on_growing: Callable[[Path], object]):
    """A ``tqdm_class`` for ``hf_hub_download`` that finds, when the plain HTTP download of the
    blob ``etag`` opens its progress bar, the temporary file it writes (``blobs/<etag>.*
    .incomplete``, made just before) and hands it to ``on_growing``. Nothing is handed over
    where the file cannot be told apart (several candidates) or the download is Xet's."""
    import glob
    import time

    from huggingface_hub.utils import tqdm as hub_tqdm

    started = time.time()

    class GrowingFile(hub_tqdm):
        def __init__(self, *args, **kwargs):
            sequential = kwargs.get("name") == _SEQUENTIAL_DOWNLOAD and not kwargs.get("initial")
            super().__init__(*args, **kwargs)
            if not sequential:
                return
            try:
                found = [p for p in blobs.glob(f"{glob.escape(etag)}*.incomplete")
                         if p.stat().st_mtime >= started - 1]
            except OSError:
                return
            if len(found) == 1:
                on_growing(found[0])

    return GrowingFile


def hub_error(exc: Exception, label: str, offline: bool, token: str | None) -> Exception:
    """The project error for a huggingface_hub failure, its message free of tokens."""
    from huggingface_hub import errors as hf

    detail = " ".join(scrub(str(exc), token).split())[:600]
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.GatedRepoError) or status in (401, 403) and not isinstance(
            exc, hf.RepositoryNotFoundError):
        return GatedModelError(f"{label}: access refused (gated or private repository; accept "
                               f"its terms on the hub and set HF_TOKEN): {detail}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ModelNotFoundError(f"{label}: repository not found on the hub (or private: set "
                                  f"HF_TOKEN): {detail}")
    if isinstance(exc, hf.RevisionNotFoundError):
        return RevisionNotFoundError(f"{label}: revision not found: {detail}")
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if not offline and is_network_error(exc):
            return NetworkError(f"{label}: hub unreachable and not cached: {detail}")
        hint = "HF_HUB_OFFLINE=1 and it is not" if offline else "it is not"
        return ModelNotFoundError(f"{label}: {hint} in the local hub cache: {detail}")
    if isinstance(exc, hf.EntryNotFoundError):
        return ModelNotFoundError(f"{label}: file not found: {detail}")
    if isinstance(exc, hf.HFValidationError):
        return InputError(f"{label}: invalid hub id or revision: {detail}")
    if isinstance(exc, hf.HfHubHTTPError) and (status == 429 or (status or 0) >= 500):
        return TransientError(f"{label}: hub error {status}, worth retrying: {detail}")
    if isinstance(exc, hf.HfHubHTTPError):
        return ModelNotFoundError(f"{label}: hub refused the request ({status}): {detail}")
    if is_network_error(exc):
        return NetworkError(f"{label}: network failure talking to the hub: {detail}")
    return exc


@contextmanager
def hub_errors(label: str, offline: bool, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub failures inside the block into the project's errors."""
    try:
        yield
    except ESDError:
        raise
    except Exception as exc:
        mapped = hub_error(exc, label, offline, token)
        if mapped is exc:
            raise
        raise mapped from None


def hub_json(model_id: str, filename: str, cache_dir: str | None = None,
             session: CacheSession | None = None) -> dict | None:
    """A small JSON file of a hub model (``org/name[@rev]``), fetched into the cache (and
    recorded in ``session`` when it was not there, for a cleanup); None when it cannot be had
    (not a hub id, no such file, no network: callers fall back)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo_id, _, revision = model_id.partition("@")
    if not repo_id or Path(model_id).expanduser().exists() or repo_id.count("/") > 1:
        return None
    try:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir,
                                        revision=revision or None)
        path = hf_hub_download(repo_id, filename, revision=revision or None,
                               cache_dir=cache_dir, local_files_only=env_offline(),
                               etag_timeout=METADATA_TIMEOUT_S)
        if session is not None and not isinstance(cached, str):
            session.record(repo_id, Path(path))
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as exc:  # any failure leaves the model to be handled on its own
        logger.debug("%s: no %s (%s)", model_id, filename, scrub(str(exc)))
        return None
    return data if isinstance(data, dict) else None
