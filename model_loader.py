"""Opening a model of the list, from the Hugging Face hub or a local directory, as a stream.

``open_model(ModelRequest(...))`` resolves ``org/name``, ``org/name@revision`` or a local
directory, downloads only the files the analysis reads (``config.json`` and the safetensors
shards with their index, ``.bin`` only when a repository has no safetensors; for an adapter
``adapter_config.json`` and ``adapter_model.*``), checks every header, and returns a
``LoadedModel`` whose ``iter_tensors()`` yields ``(name, tensor)`` one tensor at a time in
natural name order (see ``checkpoint_io``), merged with the adapter when the row is one
(see ``lora_merge``). No model class is built except for adapter types that only peft can
merge, so models with custom code are read without ``trust_remote_code``.

The hub comes in as a ``HubClient`` (tests pass fakes). ``HF_TOKEN``, ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` act as in every Hugging Face tool; a ``token``
argument overrides ``HF_TOKEN``. Hub failures become the named errors of ``errors.py``, and
a token never appears in their messages.

``config.json`` is fetched and checked before any weight file, so a refused (quantized)
checkpoint costs no weight download. ``open_model(..., cleanup_on_error=True)`` removes the
cache files it downloaded when it fails; after a success, ``cleanup_cache`` does.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from checkpoint_io import (
    CONFIG_FILE,
    CheckpointReader,
    WeightFiles,
    check_not_quantized,
    index_shards,
    read_json,
    select_weight_files,
)
from errors import (
    AdapterBaseError,
    CorruptCheckpointError,
    ESDError,
    GatedModelError,
    InputError,
    ModelNotFoundError,
    NoWeightsError,
    TransientError,
    is_network_error,
)
from hub_cache import remove_cache_files, snapshot_files

if TYPE_CHECKING:  # torch and the merge are imported when tensors are read: the runner and
    import torch  # --dry_run list and resolve models without them

logger = logging.getLogger(__name__)

ADAPTER_RELATIONS = frozenset({"adapter", "lora", "peft"})
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_REVISION = re.compile(r"^[^\s@]+$")

__all__ = [
    "ADAPTER_RELATIONS", "HubClient", "LoadedModel", "ModelRequest", "cleanup_cache",
    "open_model", "parse_model_id", "scrub",
]


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text


def parse_model_id(text: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> ``("org/name", "rev")``; ``org/name`` -> ``("org/name", None)``.

    An existing local directory, or anything shaped like a path, is returned whole (a
    directory name may contain ``@``); a missing directory fails later, in ``open_model``.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = (text or "").strip()
    if not text:
        raise InputError("model id is empty")
    if Path(text).expanduser().is_dir() or _looks_like_path(text.partition("@")[0]):
        return text, None
    repo_id, at, revision = text.partition("@")
    if at and not _REVISION.match(revision):
        raise InputError(f"model id {text!r}: the revision after '@' is empty or malformed")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InputError(f"model id {text!r} is neither a local directory nor a hub id "
                         f"(org/name[@revision]): {exc}") from None
    return repo_id, (revision if at else None)


@dataclass(frozen=True)
class ModelRequest:
    """One row of the model list."""

    model_id: str
    base_model_relation: str = ""
    source_model: str = ""

    @property
    def marked_adapter(self) -> bool:
        return (self.base_model_relation or "").strip().lower() in ADAPTER_RELATIONS


@dataclass(frozen=True)
class _Source:
    """A model's files on disk: a hub snapshot or a local directory."""

    model_id: str                      # id without revision, or the local path as given
    revision: str | None            # resolved commit; None for a local directory
    root: Path
    files: tuple[str, ...]             # every file name the repository holds

    @property
    def label(self) -> str:
        return f"{self.model_id}@{self.revision}" if self.revision else self.model_id


@dataclass(frozen=True)
class LoadedModel:
    """An opened model: its identity for the result rows, and its tensors as a stream."""

    model_id: str
    revision: str | None
    source_model: str
    base_revision: str | None
    is_adapter: bool
    checkpoint_bytes: int
    _stream: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False)
    _cache_files: tuple[Path, ...] = field(default=(), repr=False)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors (1-D ones included), natural name order, merged for an adapter."""
        return self._stream()

    def cache_paths(self) -> list[Path]:
        """Hub cache files (snapshot links and blobs) that opening this model downloaded."""
        return list(self._cache_files)


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


def _env_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().lower() not in _FALSE


def _glob_literal(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


class HubClient:
    """The Hugging Face hub through ``huggingface_hub``: list a revision, fetch files.

    ``token=None`` lets huggingface_hub read ``HF_TOKEN`` or its token file; ``cache_dir=None``
    uses ``HF_HUB_CACHE`` / ``HF_HOME``; ``offline=None`` follows ``HF_HUB_OFFLINE`` (read
    now, so a process that sets it after importing huggingface_hub is still offline).
    Offline, or when the hub cannot be reached, revisions resolve through the cache's
    ``refs/<branch>`` and ``snapshots/<commit>`` folders.
    """

    def __init__(self, token: str | None = None, cache_dir: str | None = None,
                 offline: bool | None = None):
        self.token = token
        self.cache_dir = cache_dir
        self.offline = _env_offline() if offline is None else offline

    def list_files(self, repo_id: str, revision: str | None) -> tuple[str, list[str]]:
        """The commit ``revision`` (default: main) resolves to, and the files it holds."""
        if self.offline:
            return self._cached_listing(repo_id, revision)
        from huggingface_hub import HfApi
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            info = HfApi(token=self.token).model_info(repo_id, revision=revision)
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
        return str(info.sha), [s.rfilename for s in info.siblings or ()]

    def _cached_listing(self, repo_id: str, revision: str | None) -> tuple[str, list[str]]:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=self.cache_dir,
                                        local_files_only=True, allow_patterns=[]))
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.is_file())
        return folder.name, files

    def download(self, repo_id: str, commit: str, filenames: list[str],
                 record: Callable[[list[Path]], None]) -> Path:
        """Fetch ``filenames`` of ``commit`` and return the snapshot folder.

        ``record`` is called with the cache files (snapshot links and their blobs) that were
        not there before, also when the download fails part-way, so that they can be removed.
        """
        from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
        from huggingface_hub.file_download import repo_folder_name

        cached = {n for n in filenames if isinstance(
            try_to_load_from_cache(repo_id, n, cache_dir=self.cache_dir, revision=commit), str)}
        folder = (Path(self.cache_dir or constants.HF_HUB_CACHE)
                  / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit)
        try:
            folder = Path(snapshot_download(
                repo_id, revision=commit, cache_dir=self.cache_dir, token=self.token,
                local_files_only=self.offline,
                allow_patterns=[_glob_literal(n) for n in filenames]))
        finally:
            record(snapshot_files(folder, sorted(set(filenames) - cached)))
        return folder


def _hub_error(exc: Exception, label: str, offline: bool, token: str | None) -> Exception:
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
        return ModelNotFoundError(f"{label}: revision not found: {detail}")
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if not offline and is_network_error(exc):
            return TransientError(f"{label}: hub unreachable and not cached: {detail}")
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
        return TransientError(f"{label}: network failure talking to the hub: {detail}")
    return exc


@contextmanager
def _hub_errors(label: str, offline: bool, token: str | None):
    try:
        yield
    except ESDError:
        raise
    except Exception as exc:
        mapped = _hub_error(exc, label, offline, token)
        if mapped is exc:
            raise
        raise mapped from None


class _Opener:
    """Resolves and fetches files for one ``open_model`` call; ``downloaded`` lists every
    cache file the call added, for ``LoadedModel.cache_paths`` or a cleanup after failure."""

    def __init__(self, hub: HubClient, token: str | None):
        self.hub = hub
        self.token = token if token is not None else getattr(hub, "token", None)
        self.downloaded: list[Path] = []

    def locate(self, model_id: str, revision: str | None) -> _Source:
        local = Path(model_id).expanduser()
        if local.is_dir():
            files = tuple(sorted(p.name for p in local.iterdir() if p.is_file()))
            return _Source(model_id, None, local, files)
        if _looks_like_path(model_id):
            raise ModelNotFoundError(f"{model_id}: no such local directory")
        label = model_id if revision is None else f"{model_id}@{revision}"
        with _hub_errors(label, self.hub.offline, self.token):
            commit, files = self.hub.list_files(model_id, revision)
        return _Source(model_id, commit, Path(), tuple(files))

    def fetch(self, source: _Source, names: list[str]) -> _Source:
        """``source`` with ``names`` present on disk (downloaded for a hub model).

        A local directory is used as it is: a file missing there is reported by the reader
        that needs it.
        """
        if source.revision is None:
            return source
        with _hub_errors(source.label, self.hub.offline, self.token):
            root = self.hub.download(source.model_id, source.revision, names,
                                     self.downloaded.extend)
        missing = [n for n in names if not (root / n).is_file()]
        if missing and self.hub.offline:
            raise ModelNotFoundError(
                f"{source.label}: {', '.join(missing)} not in the local hub cache and "
                f"HF_HUB_OFFLINE=1; download the model once while online")
        if missing:
            raise CorruptCheckpointError(
                f"{source.label}: the repository lacks {', '.join(missing)}, named by its "
                f"weight index")
        return _Source(source.model_id, source.revision, root, source.files)

    def checkpoint(self, source: _Source) -> tuple[_Source, CheckpointReader, dict]:
        """Fetch and open the weights of a full model; its ``config.json`` (or {}).

        The config comes first: a quantized checkpoint is refused before any weight file is
        downloaded.
        """
        weights = select_weight_files(source.files, source.label)
        config = {}
        if CONFIG_FILE in source.files:
            source = self.fetch(source, [CONFIG_FILE])
            config = read_json(source.root / CONFIG_FILE, source.label)
        check_not_quantized(config, source.label)
        source = self.fetch(source, list(weights.all))
        if weights.index:
            _, shards = index_shards(source.root / weights.index, source.label)
            source = self.fetch(source, list(shards))
        from weight_forms import WeightFormsReader

        reader = WeightFormsReader(CheckpointReader(source.root, weights, source.label), config,
                                   source.label)
        return source, reader, config


def open_model(request: ModelRequest, *, token: str | None = None,
               cache_dir: str | None = None, trust_remote_code: bool = False,
               hub: HubClient | None = None, cleanup_on_error: bool = False) -> LoadedModel:
    """Resolve, fetch and check one model; stream its tensors with ``iter_tensors()``.

    ``cleanup_on_error``: when opening fails, delete the hub cache files this call downloaded
    (as ``cleanup_cache`` does after a success); files cached before are kept.
    """
    hub = hub if hub is not None else HubClient(token=token, cache_dir=cache_dir)
    opener = _Opener(hub, token)
    try:
        return _open(opener, request, trust_remote_code)
    except BaseException as exc:
        if cleanup_on_error and opener.downloaded:
            try:
                remove_cache_files(opener.downloaded)
            except OSError as cleanup_exc:  # the open failure stays the error reported
                exc.add_note(f"removing its downloaded cache files failed too: {cleanup_exc}")
        raise


def is_adapter_repo(files) -> bool:
    """An adapter holds ``adapter_config.json`` and adapter weights; a full model that carries
    a stray ``adapter_config.json`` (a merged fine-tune, say) is read as the model it is."""
    return ADAPTER_CONFIG in files and any(w in files for w in _ADAPTER_WEIGHTS)


def _open(opener: _Opener, request: ModelRequest, trust_remote_code: bool) -> LoadedModel:
    model_id, revision = parse_model_id(request.model_id)
    source = opener.locate(model_id, revision)
    if request.marked_adapter or is_adapter_repo(source.files):
        return _open_adapter(opener, request, source, trust_remote_code)
    source, reader, _ = opener.checkpoint(source)
    return LoadedModel(request.model_id, source.revision, "", None, False, reader.nbytes,
                       reader.iter_tensors, tuple(opener.downloaded))


def _open_adapter(opener: _Opener, request: ModelRequest, source: _Source,
                  trust_remote_code: bool) -> LoadedModel:
    from lora_merge import (
        CONV1D_MODEL_TYPES,
        LoraSettings,
        MergePlan,
        NeedsPeftMerge,
        merged_with_peft,
        unsupported_variant,
    )

    label = source.label
    if ADAPTER_CONFIG not in source.files:
        raise NoWeightsError(
            f"{label}: marked as an adapter (base_model_relation={request.base_model_relation!r}) "
            f"but holds no {ADAPTER_CONFIG}; found: {', '.join(source.files[:20]) or 'no files'}")
    weights = next((w for w in _ADAPTER_WEIGHTS if w in source.files), None)
    if weights is None:
        raise NoWeightsError(f"{label}: adapter holds {ADAPTER_CONFIG} but no "
                             f"{' or '.join(_ADAPTER_WEIGHTS)}")
    extra = [CONFIG_FILE] if CONFIG_FILE in source.files else []
    source = opener.fetch(source, [ADAPTER_CONFIG] + extra)
    adapter_config = read_json(source.root / ADAPTER_CONFIG, label)
    base_source = _resolve_base(opener, request, source, adapter_config)
    try:
        base_source, base_reader, base_config = opener.checkpoint(base_source)
    except ESDError as exc:  # same class, with the adapter named first
        raise type(exc)(f"{label}: its base model cannot be read: {exc}") from None
    source = opener.fetch(source, [weights])  # after the base passed its checks
    variant = unsupported_variant(adapter_config)
    stream = None
    if variant is None:
        adapter_reader = CheckpointReader(
            source.root, WeightFiles(weights.rpartition(".")[2], None, (weights,)), label)
        try:
            plan = MergePlan(base_reader, adapter_reader,
                             LoraSettings.from_config(adapter_config, label), model_id=label,
                             base_id=base_source.label, base_config=base_config,
                             conv1d=base_config.get("model_type") in CONV1D_MODEL_TYPES,
                             task_type=str(adapter_config.get("task_type") or ""))
            stream = plan.iter_tensors
        except NeedsPeftMerge as reason:
            variant = str(reason)
    if stream is None:
        logger.info("%s: %s adapter; merging with peft on a float32 copy of %s", label, variant,
                    base_source.label)
        base_source = _fetch_remote_code(opener, base_source, base_config, trust_remote_code)
        stream = partial(merged_with_peft, base_source.root, source.root, adapter_config,
                         base_config, model_id=label, variant=variant,
                         trust_remote_code=trust_remote_code)
    return LoadedModel(request.model_id, source.revision, base_source.model_id,
                       base_source.revision, True, base_reader.nbytes, stream,
                       tuple(opener.downloaded))


def _fetch_remote_code(opener: _Opener, base: _Source, config: dict,
                       trust_remote_code: bool) -> _Source:
    """The base's ``*.py`` files, which transformers needs to build a custom-code model."""
    if not (trust_remote_code and config.get("auto_map")):
        return base
    code = [f for f in base.files if f.endswith(".py") and "/" not in f]
    return opener.fetch(base, code)


def _base_candidates(source: _Source, adapter_config: dict) -> list[tuple[str, str]]:
    """(where it came from, model id with optional @revision), in the order they are tried."""
    out = []
    name = adapter_config.get("base_model_name_or_path")
    if isinstance(name, str) and name.strip():
        rev = adapter_config.get("revision")
        has_rev = "@" in name or Path(name).expanduser().is_dir()
        out.append(("adapter_config.json base_model_name_or_path",
                    f"{name.strip()}@{rev}" if rev and not has_rev else name.strip()))
    if CONFIG_FILE in source.files:
        config = read_json(source.root / CONFIG_FILE, source.label)
        for key in ("base_model_name_or_path", "_name_or_path"):
            value = config.get(key)
            if isinstance(value, str) and value.strip():
                out.append((f"config.json {key}", value.strip()))
    return out


def _resolve_base(opener: _Opener, request: ModelRequest, source: _Source,
                  adapter_config: dict) -> _Source:
    """The adapter's base: ``source_model`` if given (authoritative), else the first
    candidate named by the adapter's own files that exists."""
    label = source.label
    if request.source_model.strip():
        candidates = [("source_model", request.source_model.strip())]
    else:
        candidates = _base_candidates(source, adapter_config)
    tried = []
    for origin, text in candidates:
        try:
            base_id, base_rev = parse_model_id(text)
            base = opener.locate(base_id, base_rev)
        except (InputError, ModelNotFoundError) as exc:
            tried.append(f"{origin} {text!r}: {exc}")
            continue
        if ADAPTER_CONFIG in base.files:
            raise AdapterBaseError(f"{label}: base {base.label} ({origin}) is itself an adapter; "
                                   f"adapters of adapters are not merged")
        return base
    what = "; ".join(tried) or ("nothing: no source_model, no base_model_name_or_path in "
                                f"{ADAPTER_CONFIG}, no config.json naming a base")
    raise AdapterBaseError(f"{label}: cannot determine the adapter's base model. Tried {what}. "
                           f"Set source_model in the model list")


def cleanup_cache(model: LoadedModel) -> None:
    """Delete the hub cache files that opening ``model`` (and its base) downloaded.

    Files that were already cached stay; a blob still linked from another snapshot stays;
    local model directories are never touched. Empty snapshot folders are removed, and the
    repository's cache folder too once it holds no snapshot.
    """
    remove_cache_files(model.cache_paths())
