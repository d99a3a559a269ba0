"""Every file name the project writes comes from here.

``model_stem`` maps a model id (and optional revision) to a file-name stem that is readable
(``meta-llama/Llama-2-7b-hf`` -> ``meta-llama--Llama-2-7b-hf``), injective, and a single path
component, so no output can land outside ``--output_dir`` whatever the id contains.
``ModelPaths`` owns the files of one model; ``write_atomic`` is the only way they are written.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from esd_experiment.core.errors import ESDError
from esd_experiment.core.ids import parse_model_id

# Hub ids: "name" or "org/name" with [A-Za-z0-9._-]; the hub forbids "--" and ".." in names,
# so "org--name" can be mapped back to exactly one id.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}(?:/{_HUB_PART})?$")
_SAFE_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# Keep stems well under the 255-byte file-name limit, leaving room for suffixes.
_MAX_READABLE = 120

FAILED_MODELS_FILE = "failed_models.txt"
LOCK_FILE = ".esd_run.lock"
OPTIONS_FILE = ".esd_options.json"  # the estimator options the directory's results used
SLURM_STATE = "slurm/submissions.json"  # a Slurm run's record of its jobs (backends/slurm.py)
# --dry_run's rows, in a folder of their own: the top level of --output_dir holds no CSV but
# the results, so a script reading its *.csv reads results only.
PREFLIGHT_FILE = "preflight/preflight.csv"
OLD_PREFLIGHT_FILE = "preflight.csv"  # where earlier versions wrote it: still not a result


def _is_plain(part: str, pattern: re.Pattern) -> bool:
    return bool(pattern.match(part)) and "--" not in part and ".." not in part and "~" not in part


def model_stem(model_id: str, revision: str | None = None, variant: str = "") -> str:
    """File-name stem for one model: ``org--name``, ``org--name@rev``, and with a ``variant``
    (one GGUF file of a repository of several) ``org--name+model-Q4_K_M.gguf``.

    Ids that are not plain hub ids (local paths, odd characters, very long names) get a
    sanitised readable prefix plus ``~`` and a hash of the exact input; neither ``~`` nor
    ``+`` occurs in a plain id, so two different inputs never share a stem.
    """
    model_id = model_id.strip()
    if not model_id:
        raise ValueError("model id is empty")
    rev = (revision or "").strip()
    variant = variant.strip()
    if _is_plain(model_id, _HUB_ID) and (not rev or _is_plain(rev, _SAFE_REVISION)) and (
            not variant or _is_plain(variant, _SAFE_REVISION)):
        stem = model_id.replace("/", "--") + (f"@{rev}" if rev else "") + (
            f"+{variant}" if variant else "")
        if len(stem) <= _MAX_READABLE:
            return stem
    # The last two path components are the readable part of a local path; a leading "-" or
    # "." would make the file look like an option or a hidden file.
    parts = [p for p in model_id.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    readable = _UNSAFE_CHARS.sub("_", "--".join(parts[-2:]))[-_MAX_READABLE:].lstrip("-._")
    key = f"{model_id}\0{rev}" + (f"\0{variant}" if variant else "")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{readable or 'model'}~{digest}"


@dataclass(frozen=True)
class ModelPaths:
    """The files of one model under one run's output and log directories."""

    output_dir: Path
    log_dir: Path
    stem: str

    @classmethod
    def for_model(
        cls, output_dir: Path, model_id: str, revision: str | None = None,
        log_dir: Path | None = None, variant: str = "",
    ) -> ModelPaths:
        output_dir = Path(output_dir)
        return cls(output_dir, Path(log_dir) if log_dir is not None else output_dir / "logs",
                   model_stem(model_id, revision, variant))

    @property
    def csv(self) -> Path:
        return self.output_dir / f"{self.stem}.csv"

    @property
    def eigs(self) -> Path:
        return self.output_dir / f"{self.stem}.eigs.npz"

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.stem}.log"

    @property
    def failure(self) -> Path:
        """JSON record a worker leaves when it fails: the runner turns it into a report line."""
        return self.log_dir / f"{self.stem}.failure.json"


def model_paths(output_dir: Path, model_id: str, log_dir: Path | None = None,
                gguf_file: str = "") -> ModelPaths:
    """The files of a list entry: named from its id, the revision written in it and, for one
    GGUF file of a repository, that file."""

    repo_id, revision = parse_model_id(model_id)
    return ModelPaths.for_model(output_dir, repo_id, revision, log_dir=log_dir,
                                variant=gguf_file)


def is_own_file(csv_path: Path, key: str) -> bool:
    """Whether ``csv_path`` bears the name the runner gives the result of ``key`` (a result's
    ``model_id``: its list entry's key, ``org/name#<gguf_file>`` for one GGUF file of a
    repository), as no user's copy of it does."""
    model_id, _, gguf_file = key.rpartition("#")
    for name, gguf in [(key, "")] + ([(model_id, gguf_file)] if model_id else []):
        try:
            if Path(csv_path).name == model_paths(Path("."), name, gguf_file=gguf).csv.name:
                return True
        except (ValueError, ESDError):  # not an id that names a file: the other spelling
            continue
    return False


def model_key(model_id: str) -> str:
    """What makes two spellings of one model id the same model: a local path's trailing
    ``/``, ``./`` and ``a/../`` segments do not count (``./models/base/`` is ``models/base``),
    and a directory that exists is its real path (its absolute path, a link to it); a hub id
    (``org/name``, ``org/name@rev``) is its own key. Used to run a model listed twice once,
    and to match an adapter's ``source_model`` to a listed base and a result's
    ``source_model`` to its base's result."""
    text = (model_id or "").strip()
    if not text:
        return ""
    path = os.path.normpath(os.path.expanduser(text))
    return os.path.realpath(path) if os.path.exists(path) else path


def within(path: Path, root: Path) -> bool:
    """True when ``path``, links followed, lies inside ``root``: a file of a shared directory
    that links elsewhere (a token, another user's file) is never read through it."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a loop of links
        return False


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which is not safe once threads run.
_FILE_MODE = 0o666 & ~_current_umask()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A final file that exists is therefore always complete; on error the temporary is removed
    and any earlier ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; results are shared like any file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
