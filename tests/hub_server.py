"""A local stand-in of the Hugging Face hub: the real huggingface_hub client talks to it over
HTTP on 127.0.0.1, so tests exercise the client's own requests, retries, resumes and errors.

Serves model repositories that tests build on disk (``add_repo``), as huggingface.co answers
huggingface_hub 2.x:

    GET      /api/models/{repo}[/revision/{rev}]     model info: sha, siblings (size, blobId, lfs
                                                      with ?blobs=true), gated, private; ?expand=
    GET      /api/models/{repo}/tree/{rev}[/{path}]  tree listing (?recursive=), pages of
                                                      ``tree_page_size`` linked by Link: rel="next"
    HEAD/GET /{repo}/resolve/{rev}/{path}            a file: X-Repo-Commit, ETag (git blob sha1; for
                                                      LFS files the sha256, plus X-Linked-Etag and
                                                      X-Linked-Size), Content-Length, Range -> 206

A revision is a branch, a tag or a full commit sha. Errors carry ``X-Error-Code`` and
``X-Error-Message`` as the hub's do, so the client raises its own exceptions: RepoNotFound 401
(anonymous) or 404 (with a token), also for a private repository the token may not read;
RevisionNotFound 404; EntryNotFound 404 (with X-Repo-Commit); GatedRepo 401 (anonymous) or 403
(token not authorized) on file downloads of a gated repository (its metadata stays public).
Files are answered directly, without the hub's redirect to a CDN. LFS files: ``LFS_SUFFIXES``,
or 10 MiB and more.

What huggingface_hub 2.4 does with the faults (read from its source, asserted by
tests/test_hub_server.py): ``model_info`` makes one request, without retries. Tree listings
retry 408/429/5xx and network errors (5 times, waiting 1, 2, 4, 8 s, or Retry-After + 1 s).
``hf_hub_download`` makes its HEAD once without retries, then, with nothing cached, again with
them; its GET retries 408/429 but not 5xx, and after a dropped or timed-out read resumes with
``Range`` from the last whole 10 MiB chunk it wrote (5 times, 1 s apart).

Faults, configured at run time, each bounded in count (``times``) or time; ``where`` narrows
one to requests matching all of ``repo_id``, ``filename`` (repo file), ``path`` (URL path
prefix) and ``method``:

    fail(status, times=1, retry_after=None, **where)   answer 5xx/429 (Retry-After) instead
    drop(after_bytes, times=1, **where)                close the connection after that many
                                                       body bytes (0: before the headers)
    stall(seconds, after_bytes=0, times=1, **where)    pause the response after that many body
                                                       bytes (0: before the headers)
                                                       (after K > 0 bytes: only longer bodies)
    throttle(bytes_per_s, repo_id=None, filename=None) cap bandwidth: all bodies, or one file's
                                                       (a token bucket ``BURST_S`` deep)
    remove_file(repo_id, filename, after_listings=0)   the file vanishes (listings, downloads)
                                                       after that many more listings of its repo
    down(for_seconds=None) / up()                      connections refused, then served again

Accounting: ``log`` (one ``Served`` per request), ``bytes_served(repo_id, filename)`` (file body
bytes sent), ``request_count(...)``.

Use: request the ``hub`` fixture (tests/conftest.py). It yields a running ``HubServer`` with
``endpoint`` (http://127.0.0.1:PORT) that this process's huggingface_hub already talks to, with
a fresh default cache at ``hub.cache``; ``hub.env(cache)`` is the environment for a subprocess
(add PYTHONPATH for project imports). The server stops at teardown. Outside pytest:
``with HubServer() as hub: ...`` and run clients with ``hub.env(...)``. Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hub_records import (
    _EPOCH,
    Served,
    _Blob,
    _Commit,
    _Fault,
    _HubError,
    _Pacer,
    _Repo,
    _Request,
    _sha1,
    _stamp,
)

CHUNK = 64 * 1024  # body bytes per socket write
CHUNK_PACED = 1024 * 1024  # the most per write of a throttled transfer
MAX_FAULT_SECONDS = 60.0  # a stall or an outage longer than this is a test bug
# Low client timeouts (seconds; huggingface_hub reads them as integers from the environment)
# so that fault tests fail fast instead of waiting the default 10 s.
CLIENT_TIMEOUT_S = 2
# Unset for a client of the stand-in: proxies, and tokens of the machine's user.
CLIENT_UNSET_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                     "all_proxy", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")
class HubServer:
    """The stand-in hub: repositories, faults and accounting; ``start()`` serves it."""

    def __init__(self, tree_page_size: int = 1000):
        self.tree_page_size = tree_page_size   # the hub's page: 1000 entries
        self.log: list[Served] = []
        self.port = 0
        self.cache: Path | None = None         # set by the fixture: this test's hub cache
        self._repos: dict[str, _Repo] = {}
        self._faults: list[_Fault] = []
        self._pacers: dict[tuple[str, str] | None, _Pacer] = {}
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._timers: list[threading.Timer] = []

    # -- repositories -------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: Path, *, branches: Iterable[str] = ("main",),
                 tags: Iterable[str] = (), commit: str | None = None,
                 gated: bool | None = None, private: bool | None = None,
                 authorized: Iterable[str] | None = None) -> str:
        """Publish every file under ``folder`` (subfolders too) as a new commit of ``repo_id``
        on ``branches`` (created or moved) and ``tags``; return its sha (``commit`` if given,
        else derived from the repo, the parent commit and the content). ``gated``, ``private``
        and ``authorized`` (tokens allowed past both) change the repo when given."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                 if p.is_file()}
        blobs = {name: _Blob.of(name, path.read_bytes()) for name, path in files.items()}
        branches, tags = list(branches), list(tags)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            parent = repo.refs.get(branches[0], "") if branches else ""
            tree = json.dumps([repo_id, parent, {k: b.oid for k, b in blobs.items()}])
            sha = commit or _sha1(tree.encode())
            if len(sha) != 40 or any(c not in "0123456789abcdef" for c in sha):
                raise ValueError(f"commit {sha!r} is not a 40-hex sha")
            date = _stamp(_EPOCH + timedelta(minutes=len(repo.commits)))
            repo.commits[sha] = _Commit(sha, blobs, date)
            repo.refs.update({ref: sha for ref in branches + tags})
            repo.gated = repo.gated if gated is None else gated
            repo.private = repo.private if private is None else private
            if authorized is not None:
                repo.authorized = frozenset(authorized)
        return sha

    def remove_file(self, repo_id: str, filename: str, *, after_listings: int = 0) -> None:
        """``filename`` vanishes from every revision of ``repo_id`` (listings and downloads)
        once the repo's info or tree has been served ``after_listings`` more times."""
        with self._lock:
            self._repos[repo_id].vanishing[filename] = after_listings

    # -- faults -------------------------------------------------------------------------
    def fail(self, status: int, *, times: int = 1, retry_after: int | None = None,
             **where: str | None) -> None:
        """Answer the next ``times`` matching requests with ``status`` (a 5xx or 429)."""
        self._add(_Fault("fail", times, where, status=status, retry_after=retry_after))

    def drop(self, after_bytes: int, *, times: int = 1, **where: str | None) -> None:
        """Close the connection after ``after_bytes`` body bytes (0: before the headers)."""
        self._add(_Fault("drop", times, where, after_bytes=after_bytes))

    def stall(self, seconds: float, *, after_bytes: int = 0, times: int = 1,
              **where: str | None) -> None:
        """Pause ``seconds`` after ``after_bytes`` body bytes (0: before the headers)."""
        if not 0 < seconds <= MAX_FAULT_SECONDS:
            raise ValueError(f"stall of {seconds} s: must be in (0, {MAX_FAULT_SECONDS}]")
        self._add(_Fault("stall", times, where, after_bytes=after_bytes, seconds=seconds))

    def throttle(self, bytes_per_s: float | None, *, repo_id: str | None = None,
                 filename: str | None = None) -> None:
        """Cap the bandwidth of all response bodies together, or of one file's downloads
        together (``repo_id`` and ``filename``); ``None`` lifts the cap."""
        key = (repo_id, filename) if repo_id is not None else None
        if key is not None and filename is None or bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"throttle({bytes_per_s}, {repo_id=}, {filename=}): a rate above 0,"
                             " and a per-file cap names both repo_id and filename")
        with self._lock:
            if bytes_per_s is None:
                self._pacers.pop(key, None)
            else:
                self._pacers[key] = _Pacer(bytes_per_s)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._pacers.clear()

    def _add(self, fault: _Fault) -> None:
        unknown = set(fault.where) - {"repo_id", "filename", "path", "method"}
        if unknown or fault.times < 1:
            raise ValueError(f"fault {fault.kind}: bad matcher {sorted(unknown)} or times "
                             f"{fault.times} (must be >= 1)")
        with self._lock:
            self._faults.append(fault)

    def _take(self, kind: str, req: _Request, body_size: int = 0) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind == kind and fault.matches(req, body_size):
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- accounting ---------------------------------------------------------------------
    def bytes_served(self, repo_id: str | None = None, filename: str | None = None) -> int:
        """File body bytes sent by resolve requests, for one repo and/or file or all."""
        return sum(s.nbytes for s in self._matching(repo_id=repo_id, filename=filename)
                   if s.filename is not None)

    def request_count(self, *, method: str | None = None, path: str | None = None,
                      repo_id: str | None = None, filename: str | None = None,
                      status: int | None = None) -> int:
        """Requests matching every given criterion (``path``: the exact decoded URL path)."""
        return len(self._matching(method=method, path=path, repo_id=repo_id,
                                  filename=filename, status=status))

    def _matching(self, **want) -> list[Served]:
        with self._lock:
            return [s for s in self.log
                    if all(v is None or getattr(s, k) == v for k, v in want.items())]

    # -- serving ------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        server.daemon_threads = True
        server.hub = self
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"hub-stand-in:{self.port}", daemon=True).start()
        return self

    def down(self, for_seconds: float | None = None) -> None:
        """Stop listening and cut open connections (clients get "connection refused");
        back by itself after ``for_seconds`` if given, else at ``up()``. Call it from the
        test, not from a request handler."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shut(conn)
        if for_seconds is not None:
            if not 0 < for_seconds <= MAX_FAULT_SECONDS:
                raise ValueError(f"outage of {for_seconds} s: must be in (0, {MAX_FAULT_SECONDS}]")
            timer = threading.Timer(for_seconds, self.up)
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def up(self) -> None:
        """Serve again on the same port."""
        if self._server is None and not self._closing.is_set():
            self.start()

    def close(self) -> None:
        self._closing.set()   # wakes stalled and throttled transfers
        for timer in self._timers:
            timer.cancel()
        self.down()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def env(self, cache: Path, *, token: str | None = None) -> dict[str, str]:
        """The whole environment for a subprocess whose huggingface_hub uses this stand-in:
        this process's, less ``CLIENT_UNSET_VARS``, plus ``client_env(cache)`` and ``token``."""
        env = {k: v for k, v in os.environ.items() if k not in CLIENT_UNSET_VARS}
        env.update(self.client_env(Path(cache)))
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def client_env(self, cache: Path) -> dict[str, str]:
        """The variables that point huggingface_hub here, online, with ``cache`` as its hub
        cache and the sibling ``hf_home`` as HF_HOME (no token file there), low timeouts."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_CACHE": str(cache),
                "HF_HOME": str(cache.parent / "hf_home"), "HF_HUB_OFFLINE": "0",
                "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_ETAG_TIMEOUT": str(CLIENT_TIMEOUT_S),
                "HF_HUB_DOWNLOAD_TIMEOUT": str(CLIENT_TIMEOUT_S),
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

    def _sleep_until(self, deadline: float) -> None:
        self._closing.wait(max(0.0, deadline - time.monotonic()))

    # -- the hub's answers --------------------------------------------------------------
    def answer(self, req: _Request) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for ``req``; hub errors as the hub sends them."""
        try:
            if req.kind == "other":
                raise _HubError(404, "", f"no route for {req.path}")
            with self._lock:
                repo = self._readable(req)
                commit = self._commit(repo, req)
                if req.kind == "resolve":
                    return self._file(repo, commit, req)
                files = repo.visible(commit)
                for name in repo.vanishing:
                    repo.vanishing[name] = max(0, repo.vanishing[name] - 1)
            if req.kind == "info":
                return 200, {}, self._info(req, commit, files)
            body, next_cursor = self._tree(req, commit, files)
            if next_cursor is None:
                return 200, {}, body
            query = f"recursive={req.query_flag('recursive')}&cursor={next_cursor}"
            return 200, {"Link": f'<{self.endpoint}{req.path}?{query}>; rel="next"'}, body
        except _HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            return err.status, headers, json.dumps({"error": err.message}).encode()

    def _readable(self, req: _Request) -> _Repo:
        repo = self._repos.get(req.repo_id or "")
        if repo is None or repo.private and req.token not in repo.authorized:
            raise _HubError(404 if req.token else 401, "RepoNotFound", "Repository not found")
        if req.kind == "resolve" and repo.gated and req.token not in repo.authorized:
            if req.token is None:
                raise _HubError(401, "GatedRepo", f"Access to model {req.repo_id} is restricted. "
                                "You must have access to it and be authenticated to access it.")
            raise _HubError(403, "GatedRepo", f"Access to model {req.repo_id} is restricted and "
                            "you are not in the authorized list.")
        return repo

    @staticmethod
    def _commit(repo: _Repo, req: _Request) -> _Commit:
        rev = req.revision or "main"
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo.commits[sha]

    def _file(self, repo: _Repo, commit: _Commit, req: _Request):
        blob = repo.visible(commit).get(req.filename or "")
        if blob is None:
            raise _HubError(404, "EntryNotFound", f"{req.filename} does not exist on "
                            f"{req.revision}", commit=commit.sha)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"',
                            "X-Linked-Size": str(len(blob.data))})
        span = _byte_range(req.range, len(blob.data))
        if span is None:
            return 200, headers, blob.data
        if span == ():
            headers["Content-Range"] = f"bytes */{len(blob.data)}"
            return 416, headers, b""
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{len(blob.data)}"
        return 206, headers, blob.data[start:end + 1]

    def _info(self, req: _Request, commit: _Commit, files: dict[str, _Blob]) -> bytes:
        repo = self._repos[req.repo_id]
        detailed = req.query_flag("blobs")
        siblings = [{"rfilename": name, **(_file_meta(blob) if detailed else {})}
                    for name, blob in sorted(files.items())]
        info = {"_id": _sha1(req.repo_id.encode())[:24], "id": req.repo_id,
                "modelId": req.repo_id, "author": req.repo_id.partition("/")[0],
                "sha": commit.sha, "lastModified": commit.date, "createdAt": _stamp(_EPOCH),
                "private": repo.private, "gated": "auto" if repo.gated else False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "library_name": "transformers", "siblings": siblings,
                "usedStorage": sum(len(b.data) for b in files.values())}
        expand = req.query.get("expand")
        if expand:
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        return json.dumps(info).encode()

    def _tree(self, req: _Request, commit: _Commit,
              files: dict[str, _Blob]) -> tuple[bytes, int | None]:
        """One page of the listing, and the cursor of the next page (None: the last)."""
        base = req.filename.strip("/") if req.filename else ""
        prefix = f"{base}/" if base else ""
        under = {n: b for n, b in files.items() if n.startswith(prefix)}
        if base and not under:
            raise _HubError(404, "EntryNotFound", f"{base} does not exist on {req.revision}",
                            commit=commit.sha)
        recursive = req.query_flag("recursive")
        entries: dict[str, dict] = {}
        for name, blob in under.items():
            parts = name[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                path = prefix + "/".join(parts[:i])
                entries[path] = {"type": "directory", "path": path,
                                 "oid": _sha1(f"tree {commit.sha} {path}".encode())}
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, **_file_meta(blob)}
        page, size = [entries[k] for k in sorted(entries)], self.tree_page_size
        start = int(req.query.get("cursor", ["0"])[0])
        more = start + size < len(page)
        return json.dumps(page[start:start + size]).encode(), start + size if more else None


def _file_meta(blob: _Blob) -> dict:
    meta = {"size": len(blob.data), "oid": blob.oid, "blobId": blob.oid}
    if blob.lfs:
        meta["lfs"] = {"oid": blob.sha256, "sha256": blob.sha256, "size": len(blob.data),
                       "pointerSize": blob.pointer_size}
    return meta


def _byte_range(header: str, total: int) -> tuple[int, int] | tuple[()] | None:
    """``bytes=a-b`` / ``bytes=a-`` -> inclusive (start, end); () when it cannot be satisfied;
    None without a range the stand-in understands (suffix or multiple ones): the whole file."""
    unit, _, spec = header.partition("=")
    first, _, last = spec.partition("-")
    if unit.strip() != "bytes" or not first.strip().isdigit() or "," in spec:
        return None
    start = int(first)
    end = min(int(last), total - 1) if last.strip().isdigit() else total - 1
    return (start, end) if start <= end else ()


def _shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


def _parse(method: str, raw: str, headers) -> _Request:
    """Route the request target as the hub does; a revision arrives %-encoded ("/" -> %2F)."""
    split = urlsplit(raw)
    raw_parts = split.path.split("/")[1:]
    parts = [unquote(p) for p in raw_parts]
    query = parse_qs(split.query)
    auth = headers.get("Authorization") or ""
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    kind, repo_id, revision, filename = "other", None, None, None
    if parts[:2] == ["api", "models"] and len(parts) > 2:
        rest = parts[2:]
        cut = 2 if len(rest) > 1 and rest[1] not in ("revision", "tree") else 1
        repo_id, rest = "/".join(rest[:cut]), rest[cut:]
        if not rest:
            kind = "info"
        elif rest[0] == "revision" and len(rest) == 2:
            kind, revision = "info", rest[1]
        elif rest[0] == "tree" and len(rest) >= 2:
            kind, revision, filename = "tree", rest[1], "/".join(rest[2:])
    elif "resolve" in parts[1:] and len(parts) > parts.index("resolve", 1) + 2:
        i = parts.index("resolve", 1)
        kind, repo_id, revision = "resolve", "/".join(parts[:i]), parts[i + 1]
        filename = "/".join(parts[i + 2:])
    return _Request(method, unquote(split.path), kind, repo_id, revision, filename, query, token,
                    headers.get("Range") or "")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled connections expect
    server_version = "hub-stand-in"

    def setup(self):
        super().setup()
        with self.server.hub._lock:
            self.server.hub._conns.add(self.connection)

    def finish(self):
        with self.server.hub._lock:
            self.server.hub._conns.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # the request log is HubServer.log
        pass

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def _serve(self, method: str) -> None:
        hub: HubServer = self.server.hub
        req = _parse(method, self.path, self.headers)
        failure = hub._take("fail", req)
        if failure is not None:
            status, body = failure.status, json.dumps({"error": "injected fault"}).encode()
            headers = {} if failure.retry_after is None else {
                "Retry-After": str(failure.retry_after)}
        else:
            status, headers, body = hub.answer(req)
        headers = {"Content-Type": "application/json", **headers,
                   "Content-Length": str(len(body))}
        # Logged before the response goes out: a client may act on it before this thread
        # runs again, and a test reading the log then must find the request there.
        record = Served(method, req.path, status, req.repo_id,
                        req.filename if req.kind == "resolve" else None, req.range or None, 0)
        with hub._lock:
            hub.log.append(record)
        self._send(hub, req, record, headers, b"" if method == "HEAD" else body)

    def _send(self, hub: HubServer, req: _Request, record: Served, headers: dict[str, str],
              body: bytes) -> None:
        """Write the response under the drop/stall/throttle faults, counting body bytes."""
        drop, stall = hub._take("drop", req, len(body)), hub._take("stall", req, len(body))
        pacers = [p for key, p in list(hub._pacers.items())
                  if key is None or key == (req.repo_id, req.filename)]
        if stall is not None and stall.after_bytes == 0:
            hub._sleep_until(time.monotonic() + stall.seconds)
            stall = None
        if drop is not None and drop.after_bytes == 0:
            record.status = 0
            return self._hang_up()
        cut = drop.after_bytes if drop is not None else len(body)
        # Unthrottled: CHUNK per write. Throttled: a twentieth of a second's worth, up to
        # CHUNK_PACED, so that a fast throttle costs the stand-in few writes (a real hub's
        # CPU is not the client's; this one shares the client's cores).
        chunk = (min([CHUNK_PACED] + [max(1024, int(p.rate) // 20) for p in pacers])
                 if pacers else CHUNK)
        view = memoryview(body)  # slices without copies
        try:
            self.send_response(record.status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            while record.nbytes < cut:
                sent = record.nbytes
                end = min(sent + chunk, cut)
                if stall is not None and sent < stall.after_bytes < end:
                    end = stall.after_bytes
                for deadline in [p.reserve(end - sent) for p in pacers]:
                    hub._sleep_until(deadline)
                record.nbytes = end  # before the write, for the reason given in _serve
                try:
                    self.wfile.write(view[sent:end])
                except OSError:
                    record.nbytes = sent
                    raise
                if stall is not None and end == stall.after_bytes:
                    hub._sleep_until(time.monotonic() + stall.seconds)
                    stall = None
        except OSError:  # the client hung up (its timeout, or a closed pool)
            self.close_connection = True
            return None
        if drop is not None:
            self._hang_up()
        return None

    def _hang_up(self) -> None:
        """End the connection cleanly (FIN): the client sees a truncated response."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        _shut(self.connection)
