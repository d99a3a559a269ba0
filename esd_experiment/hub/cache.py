"""Sharing the Hugging Face hub cache between concurrent jobs, and removing what they fetched.

The hub cache holds ``models--org--name/snapshots/<commit>/<file>`` links into
``models--org--name/blobs/``. With ``--cleanup_cache`` every job deletes the files it brought
into the cache, but two jobs may read the same repository at once (parallel workers, a base
shared by its adapters, ``org/x`` and ``org/x@main``), and a job may be killed mid-model. So
each process that reads a repository holds a *lease* on it, and deletion follows two rules:

- a file is deleted only by a process that finds no other live lease on its repository; a
  file another job may still read is left for the last one;
- a file is recorded as *ours* (``downloaded.json``) before its download starts, so whatever
  a killed job fetched, even half, is deleted by the next sweep (the runner sweeps at the start
  and end of a run); a file that was in the cache before is never recorded, never deleted.

State lives beside the cache, in ``<cache>/.esd/<models--org--name>/``: ``mutex`` (an ``flock``
serialising lease changes and deletions), ``users/<host>-<pid>-<id>`` (one per live lease, held
with ``flock``: the kernel releases it when the process dies, which is how a stale lease is
told from a live one) and ``downloaded.json``. ``flock`` works between processes of one
machine and on shared filesystems that support it (NFSv4, Lustre mounted with ``flock``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

STATE_DIR = ".esd"
_MANIFEST = "downloaded.json"


def repo_folder_name(repo_id: str) -> str:
    """The cache folder of a model repository, as huggingface_hub names it."""
    return "models--" + repo_id.replace("/", "--")


class CacheSession:
    """One process's use of the hub cache: leases on the repositories it reads, a record of
    the files it downloads and, with ``cleanup``, their removal. Use it as a context manager;
    leaving it releases every lease (and, with ``cleanup``, sweeps those repositories)."""

    def __init__(self, cache_dir: Path | str, cleanup: bool):
        self.cache_dir = Path(cache_dir)
        self.cleanup = cleanup
        self._leases: dict[str, int] = {}   # repo folder -> fd holding its users/ file's flock
        self._token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> CacheSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lease(self, repo_id: str) -> None:
        """Mark ``repo_id`` as read by this process until ``close`` (idempotent)."""
        folder = repo_folder_name(repo_id)
        if folder in self._leases:
            return
        state = self.cache_dir / STATE_DIR / folder
        with _mutex(state):
            user = state / "users" / self._token
            user.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(user, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._leases[folder] = fd

    def will_download(self, repo_id: str, commit: str, filename: str) -> None:
        """Record ``filename`` of ``commit`` as this run's download before it starts, unless
        it is in the cache already (then it is the user's, and stays)."""
        if not self.cleanup:
            return
        self.lease(repo_id)
        folder = repo_folder_name(repo_id)
        entry = f"snapshots/{commit}/{filename}"
        if os.path.lexists(self.cache_dir / folder / entry):
            return
        state = self.cache_dir / STATE_DIR / folder
        with _mutex(state):
            entries = _read_manifest(state)
            if entry not in entries:
                _write_manifest(state, entries + [entry])

    def record(self, repo_id: str, path: Path) -> None:
        """Record a file fetched into the cache by a client this session did not drive (its
        snapshot path), so that a cleanup removes it; with ``cleanup`` only."""
        if not self.cleanup:
            return
        folder = repo_folder_name(repo_id)
        entry = Path(path).relative_to(self.cache_dir / folder).as_posix()
        state = self.cache_dir / STATE_DIR / folder
        with _mutex(state):
            entries = _read_manifest(state)
            if entry not in entries:
                _write_manifest(state, entries + [entry])

    def release(self, repo_id: str, commit: str, filename: str) -> bool:
        """With ``cleanup``, delete ``filename`` now if this run downloaded it and no other
        process reads the repository; True when it was deleted."""
        if not self.cleanup:
            return False
        folder = repo_folder_name(repo_id)
        state = self.cache_dir / STATE_DIR / folder
        entry = f"snapshots/{commit}/{filename}"
        with _mutex(state):
            entries = _read_manifest(state)
            if entry not in entries or _other_users(state, self._token):
                return False
            _delete_entries(self.cache_dir / folder, [entry])
            _write_manifest(state, [e for e in entries if e != entry])
        return True

    def close(self) -> None:
        """Release every lease; with ``cleanup``, first delete the recorded files of each
        leased repository that no other process reads."""
        for folder in list(self._leases):
            self._unlease(folder)

    def unlease(self, repo_id: str) -> None:
        """Release the lease on one repository (as ``close`` does for all)."""
        if repo_folder_name(repo_id) in self._leases:
            self._unlease(repo_folder_name(repo_id))

    def _unlease(self, folder: str) -> None:
        fd = self._leases.pop(folder)
        state = self.cache_dir / STATE_DIR / folder
        try:
            with _mutex(state):
                if self.cleanup and not _other_users(state, self._token):
                    _sweep_locked(self.cache_dir, folder)
                (state / "users" / self._token).unlink(missing_ok=True)
        finally:
            os.close(fd)


def sweep(cache_dir: Path | str) -> list[str]:
    """Delete the files runs downloaded (and left behind when killed) from every repository
    that no process reads now; returns the repository folders cleaned."""
    root = Path(cache_dir) / STATE_DIR
    cleaned = []
    if not root.is_dir():
        return cleaned
    for state in sorted(p for p in root.iterdir() if p.is_dir()):
        with _mutex(state):
            if _read_manifest(state) and not _other_users(state, None):
                _sweep_locked(Path(cache_dir), state.name)
                cleaned.append(state.name)
    return cleaned


# ---------------------------------------------------------------------------------------------

@contextmanager
def _mutex(state: Path) -> Iterator[None]:
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "mutex", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _other_users(state: Path, own: str | None) -> bool:
    """Whether a live process other than ``own`` holds a lease; stale leases are removed."""
    users = state / "users"
    if not users.is_dir():
        return False
    live = False
    for user in users.iterdir():
        if user.name == own:
            continue
        try:
            fd = os.open(user, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live = True
        else:  # its owner died without releasing it
            user.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return live


def _read_manifest(state: Path) -> list[str]:
    try:
        entries = json.loads((state / _MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return []
    return [e for e in entries if isinstance(e, str)] if isinstance(entries, list) else []


def _write_manifest(state: Path, entries: list[str]) -> None:
    path = state / _MANIFEST
    if not entries:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{_MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries), encoding="utf-8")
    os.replace(tmp, path)


def _sweep_locked(cache_dir: Path, folder: str) -> None:
    """Delete every recorded file of ``folder`` and half-downloaded blobs; mutex held."""
    state = cache_dir / STATE_DIR / folder
    entries = _read_manifest(state)
    repo = cache_dir / folder
    _delete_entries(repo, entries)
    if entries:
        for partial in (repo / "blobs").glob("*.incomplete"):
            partial.unlink(missing_ok=True)
        logger.info("removed %d file(s) of %s from the hub cache", len(entries), folder)
    _write_manifest(state, [])
    _prune(repo)


def _delete_entries(repo: Path, entries: list[str]) -> None:
    """Delete snapshot links and the blobs no other snapshot link points to."""
    blobs = []
    for entry in entries:
        link = repo / entry
        if link.is_symlink():
            blobs.append(Path(os.path.realpath(link)))
        link.unlink(missing_ok=True)
    if blobs:
        linked = {os.path.realpath(p) for p in (repo / "snapshots").rglob("*") if p.is_symlink()}
        for blob in blobs:
            if str(blob) not in linked and blob.parent == repo / "blobs":
                blob.unlink(missing_ok=True)


def _prune(repo: Path) -> None:
    """Remove empty snapshot folders, and the repository's folder once no snapshot is left."""
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        for folder in sorted(snapshots.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
    if repo.is_dir() and (not snapshots.is_dir() or not any(snapshots.iterdir())):
        shutil.rmtree(repo, ignore_errors=True)
        logger.info("removed %s from the hub cache", repo.name)
