"""What names a model: list-row requests, ``org/name@revision`` ids, and the files a model's
repository or directory holds. The vocabulary every layer shares; imports only the errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from esd_experiment.core.errors import InputError

ADAPTER_RELATIONS = frozenset({"adapter", "lora", "peft"})
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_REVISION = re.compile(r"^[^\s@]+$")


def looks_like_path(text: str) -> bool:
    """An id read as a local path: it starts with ``/``, ``./``, ``../`` or ``~``, holds a
    backslash or more than one ``/``, or its first part is a directory here (``models/x``
    when ``./models`` exists). Relative paths start from the current directory."""
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text:
        return True
    head, slash, _ = text.partition("/")
    return bool(slash and head) and Path(head).is_dir()


def parse_model_id(text: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> ``("org/name", "rev")``; ``org/name`` -> ``("org/name", None)``.

    An existing local directory, or anything shaped like a path, is returned whole (a
    directory name may contain ``@``); a missing directory fails later, in ``open_model``.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = (text or "").strip()
    if not text:
        raise InputError("model id is empty")
    local = Path(text).expanduser()
    if local.is_dir() or (local.is_file() and text.lower().endswith(".gguf")) \
            or looks_like_path(text.partition("@")[0]):
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
    gguf_file: str = ""  # one GGUF model of a repository holding several

    @property
    def marked_adapter(self) -> bool:
        return (self.base_model_relation or "").strip().lower() in ADAPTER_RELATIONS


def is_gguf_repo(files) -> bool:
    """A repository (or local file) of GGUF weights and no safetensors or .bin weights."""
    names = [f.lower() for f in files]
    return any(n.endswith(".gguf") for n in names) and not any(
        n.endswith((".safetensors", ".bin")) for n in names)


def is_adapter_repo(files) -> bool:
    """An adapter holds ``adapter_config.json`` and adapter weights; a full model that carries
    a stray ``adapter_config.json`` (a merged fine-tune, say) is read as the model it is."""
    return ADAPTER_CONFIG in files and any(w in files for w in ADAPTER_WEIGHTS)


@dataclass(frozen=True)
class Source:
    """A model's files: a hub revision (``revision`` is its commit) or a local directory."""

    model_id: str                  # id without revision, or the local path as given
    revision: str | None           # resolved commit; None for a local directory
    root: Path                     # local directory, or the cache's snapshot folder
    files: tuple[str, ...]         # every file name the repository holds
    sizes: dict[str, int] = field(default_factory=dict, compare=False)
    etags: dict[str, str] = field(default_factory=dict, compare=False)  # hub blob names
    partial: bool = False          # listed from the cache: ``files`` are those cached

    @property
    def label(self) -> str:
        return f"{self.model_id}@{self.revision}" if self.revision else self.model_id

    @property
    def on_hub(self) -> bool:
        return self.revision is not None
