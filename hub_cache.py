"""The files of the Hugging Face hub cache that opening a model added, and their removal.

The cache holds ``models--org--name/snapshots/<commit>/<file>`` links into
``models--org--name/blobs/``; a blob can be shared by several snapshots (files with the same
content), so a blob is removed only when no snapshot links to it any more.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def snapshot_files(folder: Path, names: list[str]) -> list[Path]:
    """The snapshot links ``names`` in ``folder`` that exist, each followed by its blob."""
    found: list[Path] = []
    for name in names:
        link = folder / name
        if link.is_symlink():
            found += [link, Path(os.path.realpath(link))]
        elif link.is_file():
            found.append(link)
    return found


def remove_cache_files(paths: list[Path]) -> None:
    """Delete hub cache snapshot links and blobs as ``cleanup_cache`` does; paths outside a
    hub cache (``models--org--name`` folders) are left alone."""
    repos: set[Path] = set()
    links = [p for p in paths if _repo_folder(p) is not None]
    blobs = [p for p in links if p.parent.name == "blobs"]
    for path in links:
        if path.parent.name != "blobs":
            repos.add(_repo_folder(path))
            path.unlink(missing_ok=True)
    for blob in blobs:
        if not _still_linked(blob, _repo_folder(blob)):
            blob.unlink(missing_ok=True)
    for repo in repos:
        _prune(repo)


def _repo_folder(path: Path) -> Path | None:
    """The ``models--org--name`` cache folder holding ``path``; None outside a hub cache."""
    for parent in path.parents:
        if parent.name.startswith("models--") and parent.parent.is_dir():
            return parent
    return None


def _still_linked(blob: Path, repo: Path) -> bool:
    snapshots, target = repo / "snapshots", os.path.realpath(blob)
    return snapshots.is_dir() and any(
        p.is_symlink() and os.path.realpath(p) == target for p in snapshots.rglob("*"))


def _prune(repo: Path) -> None:
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        for folder in sorted(snapshots.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    if not snapshots.is_dir() or not any(snapshots.iterdir()):
        shutil.rmtree(repo, ignore_errors=True)
        logger.info("removed %s from the hub cache", repo.name)
