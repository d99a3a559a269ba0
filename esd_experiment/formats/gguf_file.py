"""GGUF checkpoints (llama.cpp) read tensor by tensor, dequantized to float32 as they stream.

Entry points:

- ``GGUFCheckpoint(paths, model_id)``: a ``checkpoint_io.TensorReader`` over one GGUF file or
  the parts of a split one (``model-00001-of-00003.gguf``, ... in part order). Every header
  is parsed when it is built, so a truncated file, an unknown or undequantizable GGML type,
  or a missing split part fails there, naming the file, the tensor and the cause.
- ``select_gguf_files(files, gguf_file, model_id)``: the repository files of the GGUF model a
  list row asks for (``gguf_file``: a file name, one part of a split set, or a quantization
  tag such as ``Q4_K_M``; empty when the repository holds one GGUF model).
- ``local_gguf_paths(path, model_id)``: a local ``.gguf`` path, with its sibling parts when
  it is one part of a split set; ``is_gguf_path(text)`` tells such a ``model_id`` apart.

Tensors: quantized types are dequantized by the ``gguf`` package (``gguf.quants.dequantize``,
every type it implements: Q4_0..Q8_0, the K-quants, IQ types, TQ, MXFP4...) in row chunks into
one float32 tensor; F32/F16/BF16/F64 are returned in their own dtype, integer tensors as
integers. ``storage`` is the GGML type name (``Q4_K``, ``F16``). 1-D tensors (norms) are
streamed too; the estimator skips them.

Shapes: GGUF lists dimensions fastest first (``ne0`` is the row length); they are reversed
here, so a weight is ``(out, in)`` as in the Hugging Face checkpoint.

Names: when transformers knows the GGUF architecture, each GGUF name is mapped to the Hugging
Face name the ``gguf`` package's tensor-name map gives for it (``blk.0.attn_q.weight`` ->
``model.layers.0.self_attn.q_proj.weight``), so a GGUF quantization lines up with its original
layer by layer; the HF names come from the architecture's transformers model built on the meta
device (no weights). A tensor the map leaves out inside a block (3-D expert stacks, which
transformers splits or fuses on loading) goes under its block's HF name
(``model.layers.3.ffn_up_exps.weight``). Otherwise the GGUF names are kept. Names are ordered
file by file (split parts in order, so a loader can fetch and delete them one at a time),
naturally within a file.

3-D tensors: a GGUF stores experts (``blk.N.ffn_{gate,up,down}_exps``) and per-head matrices
(deepseek2's ``attn_k_b``/``attn_v_b``) as (count, rows, columns), never a convolution; each
matrix is its own tensor here, ``<name>[i]``, read from its own bytes.

Damaged headers are refused, naming the tensor: as llama.cpp requires, each tensor's data must
start where the one before it ends, padded to ``general.alignment`` (a power of two), so
dimensions or offsets that disagree never read a tensor as another shape or over another's
bytes.

Matrices llama.cpp's converter stores in another layout than the Hugging Face checkpoint
(llama's permuted ``attn_q``/``attn_k`` rows, Bloom's regrouped ``attn_qkv``, GPT-2's transposed
``Conv1D`` weights) are read back in the Hugging Face layout, as transformers loads them:
formats/gguf_layouts.py.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from esd_experiment.core.errors import (
    CorruptCheckpointError,
    InputError,
    ModelNotFoundError,
    NoWeightsError,
    UnsupportedFormatError,
)
from esd_experiment.formats.checkpoint import natural_key, stream_tensors
from esd_experiment.formats.gguf_layouts import relayouts
from esd_experiment.formats.gguf_names import hf_names

if TYPE_CHECKING:  # torch is imported when a tensor is read, so listing types stays light
    import torch

logger = logging.getLogger(__name__)

CHUNK_ELEMS = 1 << 20      # dequantized entries per read: 4 MiB of float32
MAX_DIMS = 4               # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32     # GGUF_DEFAULT_ALIGNMENT, when general.alignment is absent
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
# Metadata value types (GGUFValueType): struct formats of the scalars.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Unquantized GGML types, returned in their own dtype.
_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
          "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}
@dataclass(frozen=True)
class _TensorInfo:
    gguf_name: str
    path: Path
    qtype: str              # GGML type name
    shape: tuple[int, ...]  # torch order (reversed ne)
    start: int              # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class _Header:
    path: Path
    metadata: dict          # scalar metadata values (arrays are skipped)
    tensors: list[_TensorInfo]
    spans: dict[str, tuple[int, int, int]]  # metadata key -> its bytes (start, end), type


class _Cursor:
    """Reads little-endian GGUF header fields from a memory map; a short read is a truncation."""

    def __init__(self, data: mmap.mmap, path: Path, model_id: str):
        self.data, self.pos, self.path, self.model_id = data, 0, path, model_id

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise CorruptCheckpointError(
                f"{self.model_id}: {self.path.name} is truncated: its header ends inside "
                f"{what} (byte {self.pos}, file size {len(self.data)}); download it again")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str):
        """A metadata value; arrays are skipped (None), which also skips tokenizer vocabularies."""
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise CorruptCheckpointError(f"{self.model_id}: {self.path.name}: metadata {what} "
                                         f"has unknown value type {vtype}; the header is damaged")
        item, count = self.scalar("<I", what), self.scalar("<Q", what)
        if item in _SCALAR:
            self.need(count * struct.calcsize(_SCALAR[item]), what)
            self.pos += count * struct.calcsize(_SCALAR[item])
        elif item == _STRING:  # a vocabulary: stepped over, not decoded
            for _ in range(count):
                self.need(8, what)
                self.pos += 8 + struct.unpack_from("<Q", self.data, self.pos)[0]
            self.need(0, what)
        else:
            for _ in range(count):
                self.value(item, what)
        return None


def _read_header(path: Path, model_id: str) -> _Header:
    if not path.is_file():
        raise CorruptCheckpointError(f"{model_id}: GGUF file {path.name} is missing")
    size = path.stat().st_size
    if size < 24:
        raise CorruptCheckpointError(f"{model_id}: {path.name} holds {size} bytes; not a GGUF "
                                     f"file (truncated or empty)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cur = _Cursor(data, path, model_id)
        if data[:4] != b"GGUF":
            raise CorruptCheckpointError(f"{model_id}: {path.name} does not start with GGUF "
                                         f"(found {bytes(data[:4])!r}); not a GGUF file")
        cur.pos = 4
        version = cur.scalar("<I", "the version")
        if version not in (2, 3):
            raise UnsupportedFormatError(
                f"{model_id}: {path.name} is GGUF version {version} (or big-endian); versions "
                f"2 and 3, little-endian, are read")
        n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the key count")
        metadata, spans = {}, {}
        for i in range(n_kv):
            start = cur.pos
            key = cur.string(f"metadata key {i}")
            vtype = cur.scalar("<I", key)
            metadata[key] = cur.value(vtype, key)
            spans[key] = (start, cur.pos, vtype)
        raw = []
        for i in range(n_tensors):
            name = cur.string(f"tensor info {i}")
            n_dims = cur.scalar("<I", name)
            if not 1 <= n_dims <= MAX_DIMS:
                raise CorruptCheckpointError(f"{model_id}: {path.name}: tensor {name} has "
                                             f"{n_dims} dimensions; the header is damaged")
            dims = [cur.scalar("<Q", name) for _ in range(n_dims)]
            raw.append((name, dims, cur.scalar("<I", name), cur.scalar("<Q", name)))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CorruptCheckpointError(f"{model_id}: {path.name}: general.alignment is "
                                         f"{alignment!r}, not a power of two; the header is "
                                         f"damaged")
        data_start = math.ceil(cur.pos / alignment) * alignment
    tensors = [_tensor_info(path, data_start, *item, model_id) for item in raw]
    _check_layout(path, size, tensors, [item[3] for item in raw], alignment, model_id)
    return _Header(path, {k: v for k, v in metadata.items() if v is not None}, tensors,
                   spans)


def _config_gguf(header: _Header) -> bytes:
    """A GGUF file of ``header``'s metadata and tensor names alone, from which transformers'
    ``load_gguf_checkpoint`` makes the same config as from the file itself (gguf_names.py).

    The tokenizer's arrays (vocabulary, merges, scores: hundreds of thousands of strings) are
    left out; the config reads only the tokenizer's scalar token ids, and the vocabulary's
    length, which is kept as ``<arch>.vocab_size`` where the file has none, as transformers
    would take it. Each tensor is one float32 with its own 4 bytes of data."""
    with open(header.path, "rb") as fh:
        raw = fh.read(max(end for _, end, _ in header.spans.values()) if header.spans else 24)
    kept = [raw[a:b] for key, (a, b, vtype) in header.spans.items()
            if not (vtype == _ARRAY and key.startswith("tokenizer."))]
    vocab = f"{header.metadata.get('general.architecture', '')}.vocab_size"
    if vocab not in header.spans and "tokenizer.ggml.tokens" in header.spans:
        start = header.spans["tokenizer.ggml.tokens"][0]
        count = struct.unpack_from("<Q", raw, start + 8 + len("tokenizer.ggml.tokens") + 8)[0]
        kept.append(_string(vocab) + struct.pack("<IQ", 10, count))  # 10: uint64
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    infos = b"".join(_string(t.gguf_name) + struct.pack("<IQIQ", 1, 1, 0, i * alignment)
                     for i, t in enumerate(header.tensors))  # 1 dimension of 1, F32
    head = raw[:8] + struct.pack("<QQ", len(header.tensors), len(kept)) + b"".join(kept) + infos
    return head + bytes(-len(head) % alignment + len(header.tensors) * alignment)


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _check_layout(path: Path, size: int, tensors: list[_TensorInfo], offsets: list[int],
                  alignment: int, model_id: str) -> None:
    """The data of each tensor starts where the one before it ends, padded to the alignment,
    as llama.cpp requires (gguf_init_from_file): otherwise the dimensions or offsets of the
    header disagree and a tensor would be read over another's bytes or as another shape. Data
    past the end of the file is a truncation."""
    end, before = 0, None
    for info, offset in zip(tensors, offsets, strict=True):
        where = (f"{model_id}: {path.name}: tensor {info.gguf_name} starts at byte {offset} of "
                 f"the data")
        if offset % alignment:
            raise CorruptCheckpointError(f"{where}, not a multiple of the alignment "
                                         f"({alignment}); the header is damaged")
        if offset != end:
            after = "the data starts at byte 0" if before is None else \
                f"the tensor before it ({before.gguf_name}, {before.qtype} " \
                f"{'x'.join(map(str, before.shape))}) ends at byte {end}"
            raise CorruptCheckpointError(f"{where}, but {after}; its dimensions or offsets "
                                         f"are damaged")
        end, before = offset + math.ceil(info.nbytes / alignment) * alignment, info
        if info.start + info.nbytes > size:
            raise CorruptCheckpointError(
                f"{model_id}: {path.name} is truncated: tensor {info.gguf_name} ({info.qtype}) "
                f"needs bytes {info.start}..{info.start + info.nbytes} but the file has {size}; "
                f"download it again")


def _tensor_info(path: Path, data_start: int, name: str, dims: list[int],
                 type_id: int, offset: int, model_id: str) -> _TensorInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    version = _gguf_version()

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise UnsupportedFormatError(
            f"{model_id}: {path.name}: tensor {name} has GGML type {type_id}, unknown to gguf "
            f"{version}; upgrade the gguf package or pick another quantization") from None
    if qtype.name not in _PLAIN and not _can_dequantize(qtype):
        raise UnsupportedFormatError(
            f"{model_id}: {path.name}: tensor {name} is {qtype.name}, which gguf {version} "
            f"cannot dequantize; pick another quantization of this model")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if math.prod(dims) >= 1 << 63:
        raise CorruptCheckpointError(f"{model_id}: {path.name}: tensor {name} has dimensions "
                                     f"{tuple(dims)}, past the 2**63 values ggml can hold; the "
                                     f"header is damaged")
    if dims[0] % block:
        raise CorruptCheckpointError(f"{model_id}: {path.name}: tensor {name} has rows of "
                                     f"{dims[0]} values, not a multiple of {qtype.name}'s "
                                     f"block of {block}")
    nbytes = math.prod(dims[1:]) * (dims[0] // block) * type_size
    return _TensorInfo(name, path, qtype.name, tuple(reversed(dims)), data_start + offset,
                       nbytes)


@cache
def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(version unknown)"


@cache
def _can_dequantize(qtype) -> bool:
    """Whether the installed gguf package implements this type's dequantization."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def readable_types() -> list[str]:
    """The GGML type names read: plain types, and every type gguf can dequantize."""
    from gguf import GGMLQuantizationType

    return [t.name for t in GGMLQuantizationType if t.name in _PLAIN or _can_dequantize(t)]


def _check_split(headers: list[_Header], model_id: str) -> None:
    """Split parts carry ``split.no`` (from 0) and ``split.count``; all must be here, in order."""
    for i, header in enumerate(headers):
        count = header.metadata.get("split.count", 1)
        part = header.metadata.get("split.no", 0)
        if count != len(headers) or part != i:
            raise CorruptCheckpointError(
                f"{model_id}: {header.path.name} is part {part + 1} of {count} of a split GGUF, "
                f"read as part {i + 1} of {len(headers)}; give all parts, in order")


def _slices(info: _TensorInfo, name: str) -> list[tuple[str, _TensorInfo]]:
    """A 3-D tensor as its matrices, ``name[i]`` each: a GGUF stores experts (ffn_*_exps)
    and per-head matrices (deepseek2's attn_k_b/attn_v_b) as (count, rows, columns), never a
    convolution. Each is read on its own from its own bytes. Other tensors are kept whole."""
    if len(info.shape) != 3:
        return [(name, info)]
    count, step = info.shape[0], info.nbytes // max(info.shape[0], 1)
    return [(f"{name}[{i}]", _TensorInfo(f"{info.gguf_name}[{i}]", info.path, info.qtype,
                                         info.shape[1:], info.start + i * step, step))
            for i in range(count)]


class GGUFCheckpoint:
    """The tensors of one GGUF model (a file, or the parts of a split one in order)."""

    def __init__(self, paths: Sequence[Path], model_id: str,
                 file_names: Sequence[str] | None = None):
        """``paths``: the local files, split parts in order; ``file_names``: what ``files`` and
        ``files_of`` call them (a hub loader passes the repository's file names), by default
        the paths' base names."""
        self.model_id = model_id
        self._paths = tuple(Path(p) for p in paths)
        if not self._paths:
            raise NoWeightsError(f"{model_id}: no GGUF file given")
        self.files = tuple(file_names) if file_names is not None else \
            tuple(p.name for p in self._paths)
        if len(self.files) != len(self._paths):
            raise InputError(f"{model_id}: {len(self.files)} file names for "
                             f"{len(self._paths)} GGUF files")
        self._name_of = dict(zip(self._paths, self.files, strict=True))
        headers = [_read_header(p, model_id) for p in self._paths]
        _check_split(headers, model_id)
        self.metadata = headers[0].metadata
        self.architecture = str(self.metadata.get("general.architecture", ""))
        gguf_names = [t.gguf_name for h in headers for t in h.tensors]
        if len(set(gguf_names)) != len(gguf_names):
            dup = sorted({n for n in gguf_names if gguf_names.count(n) > 1})
            raise CorruptCheckpointError(f"{model_id}: GGUF tensor(s) stored twice: "
                                         f"{', '.join(dup[:5])}")
        if not gguf_names:
            raise NoWeightsError(f"{model_id}: the GGUF file(s) hold no tensors")
        hf = hf_names(_config_gguf(headers[0]), headers[0].metadata.get(
            "general.architecture", ""), set(gguf_names), model_id)
        self._info: dict[str, _TensorInfo] = {}
        names: list[str] = []
        for header in headers:
            here = dict(item for t in header.tensors
                        for item in _slices(t, hf.get(t.gguf_name, t.gguf_name)))
            self._info.update(here)
            names += sorted(here, key=natural_key)
        self.names = tuple(names)
        self._layouts = relayouts(self.architecture, self.metadata, {
            n: (info.gguf_name, info.shape) for n, info in self._info.items()})
        self._open: tuple[Path, object] | None = None

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self._paths)

    def shape(self, name: str) -> tuple[int, ...]:
        layout = self._layouts.get(name)
        shape = self._info[name].shape
        return layout.shape(shape) if layout is not None else shape

    def dtype(self, name: str) -> str:
        return _PLAIN.get(self._info[name].qtype, "float32")

    def storage(self, name: str) -> str:
        return self._info[name].qtype

    def files_of(self, name: str) -> tuple[str, ...]:
        return (self._name_of[self._info[name].path],)

    def gguf_name(self, name: str) -> str:
        """The tensor's name in the file (``blk.0.ffn_up_exps.weight[2]`` for one matrix of a
        3-D tensor)."""
        return self._info[name].gguf_name

    def _handle(self, path: Path):
        if self._open is None or self._open[0] != path:
            self.close()
            self._open = (path, open(path, "rb"))  # noqa: SIM115 (kept open across get calls)
        return self._open[1]

    def _read_into(self, info: _TensorInfo, buf: np.ndarray, offset: int) -> None:
        fh = self._handle(info.path)
        fh.seek(info.start + offset)
        got = fh.readinto(buf)
        if got != buf.nbytes:
            raise CorruptCheckpointError(
                f"{self.model_id}: {info.path.name}: tensor {info.gguf_name} ends after "
                f"{offset + got} of {info.nbytes} bytes; the file changed or is truncated")

    def get(self, name: str) -> torch.Tensor:
        """The tensor: plain types in their own dtype, quantized ones dequantized to float32."""
        import torch

        info = self._info[name]
        plain = _PLAIN.get(info.qtype)
        if plain is None:
            out = self._dequantized(info)
        else:
            # numpy has no bfloat16: its bytes are read as int16 and viewed
            raw = torch.empty(info.shape, dtype=torch.int16 if plain == "bfloat16" else
                              getattr(torch, plain))
            self._read_into(info, raw.numpy().reshape(-1).view(np.uint8), 0)
            out = raw.view(torch.bfloat16) if plain == "bfloat16" else raw
        layout = self._layouts.get(name)
        return layout.apply(out) if layout is not None else out

    def _dequantized(self, info: _TensorInfo) -> torch.Tensor:
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType[info.qtype]
        cols = info.shape[-1]
        rows = math.prod(info.shape[:-1])
        row_bytes = info.nbytes // rows if rows else 0
        out = torch.empty((rows, cols), dtype=torch.float32)
        view = out.numpy()
        step = max(1, CHUNK_ELEMS // max(cols, 1))
        buf = np.empty(min(step, rows) * row_bytes, dtype=np.uint8)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            chunk = buf[:n * row_bytes]
            self._read_into(info, chunk, r0 * row_bytes)
            view[r0:r0 + n] = dequantize(chunk.reshape(n, row_bytes), qtype)
        return out.reshape(info.shape)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        return stream_tensors(self)


# ---------------------------------------------------------------------------------------------
# Choosing the files.

def is_gguf_path(text: str) -> bool:
    """True for a ``model_id`` that is a ``.gguf`` file path."""
    return text.strip().lower().endswith(".gguf")


def gguf_models(files: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The GGUF models among a repository's files: key -> its files in part order. A split
    set is keyed ``<stem>-*-of-<total>.gguf``; vision projectors (``mmproj*``) are left out."""
    models: dict[str, list[tuple[int, str]]] = {}
    for f in files:
        base = PurePosixPath(f).name
        if not base.lower().endswith(".gguf") or base.lower().startswith("mmproj"):
            continue
        m = _SPLIT.match(f)
        key = f"{m['stem']}-*-of-{m['total']}.gguf" if m else f
        models.setdefault(key, []).append((int(m["part"]) if m else 1, f))
    return {k: tuple(f for _, f in sorted(v)) for k, v in sorted(models.items())}


def select_gguf_files(files: Sequence[str], gguf_file: str | None,
                      model_id: str) -> tuple[str, ...]:
    """The files of the GGUF model ``gguf_file`` names (file, split part or tag such as
    ``Q4_K_M``, matched case-insensitively in the file name), all parts of a split set in
    order; with no ``gguf_file``, the repository's only GGUF model."""
    models = gguf_models(files)
    if not models:
        raise NoWeightsError(f"{model_id}: no .gguf file in the repository")
    wanted = (gguf_file or "").strip()
    if wanted:
        chosen = [k for k, parts in models.items() if wanted == k or wanted in parts]
        if not chosen:
            chosen = [k for k in models if wanted.lower() in PurePosixPath(k).name.lower()]
    else:
        chosen = list(models)
    if len(chosen) != 1:
        listed = ", ".join(list(chosen or models)[:12])
        why = (f"gguf_file={wanted!r} matches {'none' if not chosen else len(chosen)} of its "
               f"GGUF models" if wanted else f"the repository holds {len(models)} GGUF models")
        raise InputError(f"{model_id}: {why} ({listed}); name one file in the gguf_file "
                         f"column (--gguf_file)")
    parts = models[chosen[0]]
    m = _SPLIT.match(parts[0])
    if m:
        total = int(m["total"])
        expected = [f"{m['stem']}-{i:05d}-of-{m['total']}.gguf" for i in range(1, total + 1)]
        missing = [e for e in expected if e not in parts]
        if missing:
            raise CorruptCheckpointError(f"{model_id}: split GGUF {chosen[0]} lacks "
                                         f"{', '.join(missing[:5])}")
        return tuple(expected)
    return parts


def local_gguf_paths(path: Path, model_id: str) -> list[Path]:
    """A local ``.gguf`` file as a list of paths: all parts, in order, for a split part."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"{model_id}: no such GGUF file")
    if not _SPLIT.match(path.name):
        return [path]
    siblings = [p.name for p in path.parent.iterdir() if p.is_file()]
    return [path.parent / n for n in select_gguf_files(siblings, path.name, model_id)]
