"""The records of the hub stand-in (tests/hub_server.py): blobs, commits and repositories as
the hub stores them, the requests it served, and the faults it injects."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

# Files the hub's default .gitattributes stores in LFS; any file of 10 MiB or more is LFS too.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".gguf", ".msgpack",
                ".onnx", ".npy", ".npz", ".pkl", ".model", ".zip", ".tar", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024
# Depth of a throttled transfer's token bucket: the lateness of the stand-in's own wake-ups
# on a loaded machine (tens of ms) that it makes up for, as a rate limiter's burst does.
BURST_S = 0.05
_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")  # the hub's date format


@dataclass(frozen=True)
class _Blob:
    """A file's content and the ids git and git-lfs give it."""

    data: bytes
    sha256: str
    oid: str            # git blob sha1 of what git stores: the content, or the LFS pointer
    lfs: bool
    pointer_size: int

    @classmethod
    def of(cls, name: str, data: bytes) -> _Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        lfs = name.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        stored = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
                  f"size {len(data)}\n".encode() if lfs else data)
        return cls(data, sha256, _sha1(b"blob %d\0" % len(stored) + stored), lfs, len(stored))

    @property
    def etag(self) -> str:
        """What the client names the cache blob after: sha256 for LFS, else the git sha1."""
        return self.sha256 if self.lfs else self.oid


@dataclass
class _Commit:
    sha: str
    files: dict[str, _Blob]
    date: str


@dataclass
class _Repo:
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)      # branches and tags -> commit sha
    gated: bool = False
    private: bool = False
    authorized: frozenset[str] = frozenset()                 # tokens that may read it
    vanishing: dict[str, int] = field(default_factory=dict)  # file -> listings left to show it

    def visible(self, commit: _Commit) -> dict[str, _Blob]:
        return {k: v for k, v in commit.files.items() if self.vanishing.get(k, 1) > 0}


@dataclass
class Served:
    """One request as the stand-in answered it (``nbytes`` grows while its body is sent)."""

    method: str
    path: str                 # URL path, percent-decoded, without the query
    status: int               # 0: the connection was dropped before a status line
    repo_id: str | None
    filename: str | None      # the repo file of a resolve request
    range: str | None         # the request's Range header
    nbytes: int               # body bytes sent


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    kind: str                 # "info", "tree", "resolve" or "other"
    repo_id: str | None
    revision: str | None
    filename: str | None      # file (resolve) or folder (tree) path in the repo
    query: dict[str, list[str]]
    token: str | None
    range: str                # the Range header, or ""

    def query_flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() == "true"


@dataclass
class _Fault:
    kind: str                 # "fail", "drop" or "stall"
    times: int
    where: dict[str, str | None]
    status: int = 0
    retry_after: int | None = None
    after_bytes: int = 0
    seconds: float = 0.0

    def matches(self, req: _Request, body_size: int) -> bool:
        """``req`` is one this fault targets, and its body (of ``body_size``) is long enough
        for it: a drop or stall after K bytes skips HEADs and shorter bodies."""
        want = self.where
        return (all(want.get(k) in (None, getattr(req, k))
                    for k in ("repo_id", "filename", "method"))
                and req.path.startswith(want.get("path") or "")
                and (self.after_bytes == 0 or self.after_bytes < body_size))


class _Pacer:
    """Token bucket shared by every transfer it limits, ``BURST_S`` deep: a sender that wakes
    late (the stand-in shares the machine's cores with the client it serves, a real hub does
    not) sends what it owes at once, up to that much, instead of losing the bandwidth."""

    def __init__(self, bytes_per_s: float):
        self.rate, self.next_free, self.lock = bytes_per_s, 0.0, threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """When the next ``nbytes`` may be sent (a ``time.monotonic`` value)."""
        with self.lock:
            self.next_free = (max(self.next_free, time.monotonic() - BURST_S)
                              + nbytes / self.rate)
            return self.next_free


class _HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit
