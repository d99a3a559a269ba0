"""Reading weight checkpoints tensor by tensor, without building a model.

Which files of a model directory hold its weights (``select_weight_files``) and
``CheckpointReader``: the tensor names, shapes and dtypes of a set of safetensors or ``.bin``
files, read from their headers when the reader is built, and then one tensor at a time on
request.

Every checkpoint format is read through the same interface, ``TensorReader``: this module's
``CheckpointReader``, ``quantized.DequantizingReader`` (GPTQ, AWQ, FP8, bitsandbytes,
compressed-tensors, wrapped around a ``CheckpointReader``) and ``gguf_reader.GGUFCheckpoint``.

Order: tensor names are yielded in natural order (``layers.2`` before ``layers.10``) across
all shards, whatever shard holds them. Peak memory is one tensor: safetensors files are read
with ``safe_open(...).get_tensor`` and ``.bin`` files are memory-mapped
(``torch.load(mmap=True, weights_only=True)``); only pre-1.6 non-zip ``.bin`` files, which
cannot be mapped, are read whole.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from safetensors import SafetensorError, safe_open

from esd_experiment.core.dtypes import DTYPE_SIZES, SAFETENSORS_DTYPES
from esd_experiment.core.errors import (
    CorruptCheckpointError,
    NoWeightsError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:  # torch is imported where tensors are read, so listing files stays light
    import torch

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Root-level .bin files that trainers leave beside the weights and that are not weights.
_NOT_WEIGHTS_BIN = re.compile(r"^(training_args|optimizer|scheduler|scaler|rng_state.*)\.bin$")
_DIGITS = re.compile(r"(\d+)")
# The floating dtypes of the analysis (net_esd.FLOAT_DTYPES), by the names
# ``CheckpointReader.dtype`` reports.
FLOAT_DTYPE_NAMES = frozenset({"float16", "bfloat16", "float32", "float64"})
# What torch's weights-only unpickler says when a pickle names a class or function other than
# tensors and plain containers; it refuses the file before anything in it runs.
_UNSAFE_PICKLE = re.compile(r"GLOBAL|Can only (build|create|append|extend)|must be imported "
                            r"to load|for dict|persistent_load|persistent id")


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``layers.2`` before ``layers.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in _DIGITS.split(name) if part)


@dataclass(frozen=True)
class WeightFiles:
    """The files of one checkpoint: ``kind`` is ``safetensors`` or ``bin``."""

    kind: str
    index: str | None
    shards: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return ((self.index,) if self.index else ()) + self.shards


def select_weight_files(files: Sequence[str], model_id: str) -> WeightFiles:
    """Choose the weight files among a repository's root-level file names.

    safetensors win over ``.bin``; an index (``model.safetensors.index.json``) wins over
    loose files, so a repository that also holds ``consolidated.safetensors`` is read once.
    The index's shard list is read later, from the index itself (``index_shards``).
    """
    root = sorted(f for f in files if "/" not in f)
    for kind, index, single, suffix in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE,
                                         ".safetensors"), ("bin", BIN_INDEX, BIN_SINGLE, ".bin")):
        if index in root:
            return WeightFiles(kind, index, ())
        if single in root:
            return WeightFiles(kind, None, (single,))
        other_index = [f for f in root if f.endswith(f"{suffix}.index.json")]
        if len(other_index) == 1:
            return WeightFiles(kind, other_index[0], ())
        loose = [f for f in root if f.endswith(suffix) and not _NOT_WEIGHTS_BIN.match(f)
                 and not f.startswith("adapter_model")]
        if loose:
            return WeightFiles(kind, None, tuple(loose))
    shown = ", ".join(root[:20]) or "no files"
    raise NoWeightsError(
        f"{model_id}: no safetensors or PyTorch .bin weights at the top level of the repository "
        f"(found: {shown}); TensorFlow, Flax and ONNX weights are not read (GGUF files are, "
        f"with --gguf_file or the gguf_file list column naming one)")


def read_json(path: Path, model_id: str) -> dict:
    """A JSON object from ``path``; a broken file is a ``CorruptCheckpointError`` naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{model_id}: cannot read {Path(path).name}: {exc}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{model_id}: {Path(path).name} is not a JSON object")
    return data


def index_shards(index_path: Path, model_id: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """The ``weight_map`` of a sharded checkpoint's index and its shard file names."""
    weight_map = read_json(index_path, model_id).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(
            f"{model_id}: {index_path.name} has no weight_map; the index is damaged")
    shards = tuple(sorted(set(weight_map.values()), key=natural_key))
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise CorruptCheckpointError(
                f"{model_id}: {index_path.name} names an invalid shard file {shard!r}")
    return weight_map, shards


class TensorReader(Protocol):
    """What every checkpoint reader offers; the loader and the estimator use nothing else.

    ``names``: logical tensor names in natural order (a quantized module appears once, as
    ``<module>.weight``). ``dtype(name)`` is the torch dtype name of what ``get`` returns
    (``float32`` for dequantized weights); ``storage(name)`` the stored format (``bfloat16``,
    ``Q4_K``, ``gptq-4bit-g128``, ``float8_e4m3fn+block128``...). ``files_of(name)``: the
    checkpoint files (names, as in ``files``) the tensor's parts live in, so a loader can fetch
    and delete shards in order (``tensor_stream.read_order``). ``get`` holds one tensor (its
    dequantized copy) in memory, never the model. ``iter_tensors`` yields
    ``(name, tensor, storage)`` (``stream_tensors``).
    """

    names: tuple[str, ...]
    files: tuple[str, ...]  # the checkpoint's file names, in reading order

    @property
    def nbytes(self) -> int: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...
    def storage(self, name: str) -> str: ...
    def files_of(self, name: str) -> tuple[str, ...]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def iter_tensors(self) -> Iterator[tuple]: ...
    def close(self) -> None: ...


def stream_tensors(reader: TensorReader) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(name, tensor, storage)`` of every tensor of ``reader``, in its ``names`` order, one
    in memory at a time; the reader is closed at the end (the ``iter_tensors`` of every
    reader)."""
    try:
        for name in reader.names:
            yield name, reader.get(name), reader.storage(name)
    finally:
        reader.close()


class _SafetensorsFile:
    def __init__(self, path: Path, model_id: str):
        self.path, self.model_id = path, model_id
        self.aliases: dict[str, str] = {}  # safetensors cannot store one tensor twice
        try:
            self._handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise _corrupt(model_id, path, exc) from None

    def meta(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {}
        for name in self._handle.keys():
            tensor_slice = self._handle.get_slice(name)
            dtype = str(tensor_slice.get_dtype())
            out[name] = (tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES.get(dtype, dtype))
        return out

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise _corrupt(self.model_id, self.path, exc, name) from None

    def close(self) -> None:
        self._handle = None


class _TorchFile:
    def __init__(self, path: Path, model_id: str):
        self.path, self.model_id = path, model_id
        import torch

        mmap = zipfile.is_zipfile(path)
        if not mmap:
            logger.warning("%s: %s is a legacy (non-zip) PyTorch file; it is read whole",
                           model_id, path.name)
        try:
            state = torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refused_pickle(model_id, path, exc) from None
        except Exception as exc:  # torch raises many types for damaged pickles and zips
            raise _corrupt(model_id, path, exc) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CorruptCheckpointError(
                f"{model_id}: {path.name} holds a {type(state).__name__}, not a state dict")
        self._state, self.aliases = _unique_tensors(state)

    def meta(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for name, t in self._state.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]

    def close(self) -> None:
        self._state = {}


def _unique_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a .bin state dict, each storage view once (tied weights saved twice), and
    the names left out as aliases: ``{tied name: name kept}``.

    The first name in the file's order is kept: models register the embedding before the
    ``lm_head`` tied to it, so the embedding keeps its own name.
    """
    import torch

    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()))
        if tensor.numel() and view in seen:
            logger.info("%s shares its storage with %s; read once", name, seen[view])
            aliases[name] = seen[view]
            continue
        seen[view] = name
        out[name] = tensor
    return out, aliases


def _refused_pickle(model_id: str, path: Path,
                    exc: pickle.UnpicklingError) -> UnsupportedFormatError | CorruptCheckpointError:
    """The error for a ``.bin`` that torch's weights-only unpickler refused.

    torch wraps the unpickler's reason in advice to retry with ``weights_only=False``, which
    would run whatever the file holds; only the reason (the exception torch raised it from)
    is quoted.
    """
    inner = exc.__context__ if isinstance(exc.__context__, pickle.UnpicklingError) else None
    reason = " ".join(str(inner).split()) if inner is not None else ""
    if reason.startswith("Unsupported global"):  # drop torch's allowlisting advice
        reason = reason.partition(" was not an allowed global")[0]
    if _UNSAFE_PICKLE.search(reason if inner is not None else str(exc)):
        return UnsupportedFormatError(
            f"{model_id}: {path.name} holds pickled objects other than tensors; refused for "
            f"safety (the file was not executed){f': {reason[:200]}' if reason else ''}. "
            f"Analyse a revision with safetensors weights, or convert this file to safetensors "
            f"where its source is trusted")
    return _corrupt(model_id, path, exc,
                    detail=reason or "not a pickle the weights-only loader can read")


def _corrupt(model_id: str, path: Path, exc: BaseException, tensor: str | None = None,
             detail: str | None = None) -> CorruptCheckpointError:
    what = f"tensor {tensor!r} of {path.name}" if tensor else path.name
    size = path.stat().st_size if path.exists() else 0
    if detail is None:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[0] if lines else type(exc).__name__
    detail = detail[:300]
    cached = "snapshots" in path.parts and any(p.startswith("models--") for p in path.parts)
    advice = ("delete it from the cache and download it again" if cached else
              "the local directory needs a complete copy of it")
    return CorruptCheckpointError(
        f"{model_id}: cannot read {what} ({size} bytes): {detail}. The file is truncated or "
        f"damaged; {advice}")


def read_header(path: Path, model_id: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor: (shape, dtype)}`` of one local weight file (safetensors or ``.bin``)."""
    opened = _open_file(Path(path), model_id)
    try:
        return opened.meta()
    finally:
        opened.close()


def _open_file(path: Path, model_id: str):
    if not path.is_file():
        raise CorruptCheckpointError(f"{model_id}: weight file {path.name} is missing")
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path, model_id)
    return _TorchFile(path, model_id)


# A checkpoint file's header: tensor name -> (shape, dtype name as torch spells it).
Header = dict[str, tuple[tuple[int, ...], str]]


def local_headers(root: Path, files: WeightFiles, model_id: str
                  ) -> tuple[dict[str, Header], dict[str, str], dict[str, str]]:
    """The headers of a checkpoint on disk, by shard file name in reading order; the index's
    weight map (empty without an index); the ``.bin`` aliases (tied names stored once).

    Every safetensors header is parsed and every ``.bin`` mapped, so a damaged or truncated
    file fails here with ``CorruptCheckpointError``.
    """
    weight_map: dict[str, str] = {}
    shards = files.shards
    if files.index:
        weight_map, shards = index_shards(Path(root) / files.index, model_id)
    headers: dict[str, Header] = {}
    aliases: dict[str, str] = {}
    for shard in shards:
        opened = _open_file(Path(root) / shard, model_id)
        try:
            headers[shard] = opened.meta()
            aliases.update(opened.aliases)
        finally:
            opened.close()
    return headers, weight_map, aliases


class CheckpointReader:
    """Names, shapes and dtypes of a checkpoint's tensors, and each tensor on request.

    The headers are known before any tensor is read: parsed from the files on disk
    (``CheckpointReader(root, files, model_id)``) or given (``from_headers``: read from the hub
    with range requests, so a sharded model can be fetched one shard at a time). An index naming
    tensors its shards lack fails here with ``CorruptCheckpointError``. ``get`` asks ``fetch``
    for a shard's path the first time one of its tensors is read, and keeps one file open at a
    time. ``read_order`` lists the names shard by shard (within a shard, in the order of
    their bytes when the hub's header gave it, else in natural order), the order that reads
    each file once.
    """

    def __init__(self, root: Path, files: WeightFiles, model_id: str):
        root = Path(root)
        headers, weight_map, aliases = local_headers(root, files, model_id)
        self._setup(headers, lambda shard: root / shard, model_id, weight_map, aliases)

    @classmethod
    def from_headers(cls, headers: Mapping[str, Header], fetch: Callable[[str], Path],
                     model_id: str, weight_map: Mapping[str, str] | None = None,
                     sizes: Mapping[str, int] | None = None,
                     spans: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
                     read_growing: Callable[..., bytearray | memoryview | None] | None = None,
                     copy: bool = False) -> CheckpointReader:
        """A reader of shards not yet on disk: ``headers`` by shard file name in reading order,
        ``fetch(shard)`` returns the shard's local path (downloading it first), ``sizes`` the
        shards' byte sizes.

        With ``spans`` (``{shard: {tensor: (begin, end)}}``, offsets in the safetensors data)
        and ``read_growing(shard, begin, end, note)`` (bytes of a shard while it downloads, or
        None; ``note=False`` for the reads of a header, which say nothing of the download's pace),
        a tensor is read as soon as its own bytes are in, not once its whole shard is.

        ``copy``: each tensor is copied out of its file rather than mapped from it, for files
        deleted once read (--cleanup_cache): a mapped tensor still being analysed would keep
        a deleted shard's disk space until it is freed."""
        reader = cls.__new__(cls)
        reader._setup(dict(headers), fetch, model_id, dict(weight_map or {}), {}, sizes)
        reader._spans = {k: dict(v) for k, v in (spans or {}).items()}
        reader._read_growing = read_growing
        reader._copy = copy
        return reader

    def _setup(self, headers: dict[str, Header], fetch: Callable[[str], Path], model_id: str,
               weight_map: dict[str, str], aliases: dict[str, str],
               sizes: Mapping[str, int] | None = None) -> None:
        self.model_id = model_id
        self.files = tuple(headers)               # shard file names, in reading order
        self.aliases = aliases                    # tied names a .bin stores once: {alias: kept}
        self._fetch = fetch
        self._sizes = dict(sizes) if sizes is not None else None
        self._where: dict[str, str] = {}
        self._meta: Header = {}
        holders: dict[str, list[str]] = {}
        for shard, header in headers.items():
            for name, info in header.items():
                holders.setdefault(name, []).append(shard)
                if name not in self._meta or weight_map.get(name) == shard:
                    self._meta[name] = info
        for name, shards in holders.items():
            self._where[name] = self._shard_of(name, shards, weight_map)
        missing = sorted(set(weight_map) - set(self._where) - set(aliases), key=natural_key)
        if missing:
            raise CorruptCheckpointError(
                f"{model_id}: the index names {len(missing)} tensor(s) that its shards do not "
                f"hold: {', '.join(missing[:5])}; a shard is damaged or from another revision")
        if not self._where:
            raise NoWeightsError(f"{model_id}: the weight files hold no tensors")
        self.names = tuple(sorted(self._where, key=natural_key))
        self._open: tuple[str, Any] | None = None
        self._spans: dict[str, dict[str, tuple[int, int]]] = {}
        self._read_growing: Callable[..., bytearray | memoryview | None] | None = None
        self._data_start: dict[str, int] = {}
        self._copy = False

    def _shard_of(self, name: str, shards: list[str], weight_map: Mapping[str, str]) -> str:
        """The shard a tensor is read from: a tensor stored in several is read from the one
        the index's ``weight_map`` names, as transformers loads it (no index, or none of
        them: an error)."""
        if len(shards) == 1:
            return shards[0]
        if weight_map.get(name) in shards:
            return weight_map[name]
        raise CorruptCheckpointError(
            f"{self.model_id}: tensor {name!r} is stored {len(shards)} times, in "
            f"{', '.join(shards)}, and no index names one of them to read")

    @property
    def nbytes(self) -> int:
        """The checkpoint's size in bytes: what reading it means reading."""
        if self._sizes is not None:
            return sum(self._sizes.get(f, 0) for f in self.files)
        return sum(self._fetch(f).stat().st_size for f in self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        return self._meta[name][1]

    def storage(self, name: str) -> str:
        """The stored format of ``name`` (the result's ``storage`` column): its dtype name."""
        return self._meta[name][1]

    def files_of(self, name: str) -> tuple[str, ...]:
        """The checkpoint files (shard names) that ``name`` is read from."""
        return (self._where[name],)

    def get(self, name: str) -> torch.Tensor:
        shard = self._where[name]
        if self._open is not None and self._open[0] != shard:
            self.close()  # one file open at a time: a released shard's space is freed
        tensor = None
        if self._open is None and self._read_growing is not None:
            tensor = self._get_span(shard, name, self._read_growing)
            if tensor is None and self._copy:  # whole now: its span read from the file
                tensor = self._get_span(shard, name, self._read_file)
        if tensor is None:
            if self._open is None:
                self._open = (shard, _open_file(self._fetch(shard), self.model_id))
            tensor = self._open[1].get(name)
            if self._copy:
                tensor = tensor.clone()
        if tuple(tensor.shape) != self.shape(name):
            raise CorruptCheckpointError(
                f"{self.model_id}: tensor {name!r} of {shard} has shape "
                f"{tuple(tensor.shape)}, its header says {self.shape(name)}")
        return tensor

    def data_offset(self, name: str) -> int | None:
        """Where ``name``'s bytes begin in its shard's data, when the header read from the hub
        gave it (None for a file read from disk)."""
        span = self._spans.get(self._where[name], {}).get(name)
        return None if span is None else span[0]

    def read_through_spans(self) -> set[str]:
        """The shards whose every tensor ``get`` reads by its span (``_get_span``), never
        from the file as a whole: those a fetcher may hold in memory instead of on disk."""
        if self._read_growing is None:
            return set()
        out = set()
        for shard in self.files:
            spans = self._spans.get(shard, {})
            names = [n for n, where in self._where.items() if where == shard]
            if names and all(self._span_fits(spans.get(n), n) for n in names):
                out.add(shard)
        return out

    def _span_fits(self, span: tuple[int, int] | None, name: str) -> bool:
        """Whether ``span`` holds exactly ``name``'s bytes, in a dtype read as it is stored
        (without importing torch: a fetcher asks while the worker is still importing it)."""
        size = DTYPE_SIZES.get(self.dtype(name))
        if span is None or size is None or sys.byteorder != "little":
            return False
        numel = math.prod(self.shape(name))
        return numel > 0 and span[1] - span[0] == numel * size

    def _get_span(self, shard: str, name: str,
                  read: Callable[..., bytearray | memoryview | None]) -> torch.Tensor | None:
        """``name`` made of the bytes of its span, as ``read(shard, begin, end, note)`` gives
        them (``read_growing``: while the shard downloads, or from memory; ``_read_file``:
        from the whole file, into memory of its own); None when ``read`` gives none, or for a
        span or dtype this cannot read, or a data offset that disagrees with the file."""
        import torch

        span = self._spans.get(shard, {}).get(name)
        dtype = _torch_dtype(self.dtype(name))
        if dtype is None or not self._span_fits(span, name):
            return None
        start = self._data_start.get(shard)
        if start is None:
            prefix = read(shard, 0, 8, False)  # the header's length, then the header
            if prefix is None:
                return None
            start = 8 + int.from_bytes(prefix, "little")
            total = (self._sizes or {}).get(shard, 0)
            if total and total - start != max(end for _, end in self._spans[shard].values()):
                return None  # the header read from the hub does not describe this file
            self._data_start[shard] = start
        data = read(shard, start + span[0], start + span[1])
        if data is None:
            return None
        return torch.frombuffer(data, dtype=dtype).reshape(self.shape(name))

    def _read_file(self, shard: str, begin: int, end: int, note: bool = True) -> bytearray:
        """Bytes ``[begin, end)`` of the whole shard on disk: one copy, where mapping the file
        and copying the tensor out of it would fault every page in first."""
        with open(self._fetch(shard), "rb", buffering=0) as fh:
            data = read_range(fh, begin, end - begin)
        if data is None:
            raise CorruptCheckpointError(f"{self.model_id}: {shard} ends before byte {end} "
                                         f"that its header places a tensor at")
        return data

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        return stream_tensors(self)


def read_range(fh, begin: int, size: int) -> bytearray | None:
    """``size`` bytes of the unbuffered binary file ``fh`` from ``begin``, in a buffer of their
    own; None when the file ends first."""
    data = bytearray(size)
    view, done = memoryview(data), 0
    fh.seek(begin)
    while done < size:
        n = fh.readinto(view[done:])
        if not n:
            return None
        done += n
    return data


@functools.cache
def _torch_dtype(name: str):
    """torch's dtype of a header's dtype name (as torch spells it), or None."""
    import torch

    dtype = getattr(torch, name, None) if name in SAFETENSORS_DTYPES.values() else None
    return dtype if isinstance(dtype, torch.dtype) else None
