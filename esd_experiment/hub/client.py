"""The Hugging Face hub through ``huggingface_hub``, one call at a time: one file into the
cache (``fetch``), a small JSON file (``hub_json``), and hub failures as the named errors of
``core/errors.py``, free of tokens (``hub_error``, ``scrub``). Stateless: ``files.HubClient``
and the download process (``download``) both call it. Imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from esd_experiment.core.errors import (
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

logger = logging.getLogger(__name__)

# Seconds without an answer before a metadata request gives up (huggingface_hub sends no
# timeout with model_info, so a stalled hub would hang the call for good).
METADATA_TIMEOUT_S = 30.0

# Hub tokens as huggingface_hub prints them, and HTTP authorisation headers.
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{16,}")
_BEARER_PATTERN = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)
_FALSE = {"", "0", "false", "no", "off"}


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
             session: CacheSession | None = None, raise_network: bool = False,
             cached_only: bool = False) -> dict | None:
    """A small JSON file of a hub model (``org/name[@rev]``), fetched into the cache (and
    recorded in ``session`` when it was not there, for a cleanup); None when it cannot be had
    (not a hub id, no such file, no network: callers fall back). ``raise_network``: a network
    failure (``is_network_error``) is raised instead; ``cached_only``: the hub is not asked."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo_id, _, revision = model_id.partition("@")
    if not repo_id or Path(model_id).expanduser().exists() or repo_id.count("/") > 1:
        return None
    try:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir,
                                        revision=revision or None)
        path = hf_hub_download(repo_id, filename, revision=revision or None,
                               cache_dir=cache_dir, local_files_only=env_offline() or cached_only,
                               etag_timeout=METADATA_TIMEOUT_S)
        if session is not None and not isinstance(cached, str):
            session.record(repo_id, Path(path))
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as exc:  # any failure leaves the model to be handled on its own
        if raise_network and is_network_error(exc):
            raise
        logger.debug("%s: no %s (%s)", model_id, filename, scrub(str(exc)))
        return None
    return data if isinstance(data, dict) else None
