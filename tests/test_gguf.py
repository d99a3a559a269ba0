"""GGUF files read by gguf_reader: every type the gguf package dequantizes, names, split files,
llama.cpp's Q/K permutation, file choice and bad input.

Oracle: the gguf package itself. Files are written by its GGUFWriter; types it can quantize are
quantized by gguf.quants.quantize, the others (K-quants, IQ types) are random blocks whose
scale fields decode to finite numbers; every tensor is read back with gguf's own GGUFReader and
dequantized with gguf.quants.dequantize, and the ESD rows over our reader must equal the rows
over those arrays.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from esd_experiment.core.errors import CorruptCheckpointError, InputError, UnsupportedFormatError
from esd_experiment.formats.checkpoint import CheckpointReader, select_weight_files
from esd_experiment.formats.gguf_file import (
    GGUFCheckpoint,
    gguf_models,
    is_gguf_path,
    local_gguf_paths,
    select_gguf_files,
)
from esd_experiment.formats.stream import read_order
from tests.loader_fixtures import gpt2, llama
from tests.test_quantized import assert_rows_close, esd_rows

# Rows over our reader and over gguf's own dequantization see the same float32 numbers, so
# they agree to the last bit; 1e-5 is the project's bound for one float32 rounding per weight.
ESD_RTOL = 1e-5
# The Q/K permutation reorders the rows summed into the Gram matrix: float64 round-off only.
PERMUTED_RTOL = 1e-9
T = GGMLQuantizationType
PLAIN = {T.F32: np.float32, T.F16: np.float16}
ROWS = 16  # rows per test matrix: 16 eigenvalues, above the estimator's min_evals of 10


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks of ``qtype`` that gguf dequantizes to finite numbers: random bytes, with each
    block that decodes to NaN/Inf (a scale field hit an fp16 Inf/NaN pattern) drawn again."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for _ in range(200):
        with np.errstate(invalid="ignore", over="ignore"):  # the NaN/Inf blocks being replaced
            bad = ~np.isfinite(dequantize(raw, qtype)).all(axis=-1)
        if not bad.any():
            return raw.reshape(rows, cols // block * size)
        raw[bad] = rng.integers(0, 256, size=(int(bad.sum()), size), dtype=np.uint8)
    raise AssertionError(f"no finite {qtype.name} blocks drawn")


def dequantizable_types() -> list[T]:
    out = []
    for qtype in T:
        if qtype in PLAIN or qtype == T.BF16:
            out.append(qtype)
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        out.append(qtype)
    return out


def stored(qtype: T, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``values`` as ``qtype`` data: quantized by gguf where it can, random blocks elsewhere."""
    if qtype in PLAIN:
        return values.astype(PLAIN[qtype])
    try:
        return quantize(values, qtype)
    except NotImplementedError:
        return random_blocks(qtype, values.shape[0], values.shape[1], rng)


def write_gguf(path: Path, tensors: dict, arch: str = "llama", metadata: dict | None = None,
               split_max_tensors: int = 0) -> Path:
    """A GGUF file (or split set) written by gguf's own GGUFWriter; ``tensors``: name ->
    (array, qtype); quantized arrays are raw blocks."""
    writer = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    for key, value in (metadata or {}).items():
        getattr(writer, f"add_{key}")(value)
    for name, (data, qtype) in tensors.items():
        if qtype in PLAIN or qtype == T.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def library_arrays(paths: list[Path]) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF name -> (gguf's own dequantization, type name), read with gguf's GGUFReader."""
    out = {}
    for path in paths:
        for t in GGUFReader(path).tensors:
            out[t.name] = (np.array(dequantize(t.data, t.tensor_type)), t.tensor_type.name)
    return out


LLAMA_META = {"block_count": 2, "context_length": 64, "embedding_length": 32,
              "feed_forward_length": 64, "head_count": 4, "head_count_kv": 2,
              "layer_norm_rms_eps": 1e-6, "vocab_size": 96}


# --- every type --------------------------------------------------------------------------

def test_every_dequantizable_type_matches_gguf(tmp_path):
    rng = np.random.default_rng(0)
    types = dequantizable_types()
    assert {T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K, T.IQ4_XS, T.BF16} <= set(types)
    tensors = {}
    for qtype in types:
        cols = 256 if GGML_QUANT_SIZES[qtype][0] <= 256 else GGML_QUANT_SIZES[qtype][0]
        values = rng.standard_normal((ROWS, cols)).astype(np.float32)
        tensors[f"t.{qtype.name.lower()}.weight"] = (stored(qtype, values, rng), qtype)
    path = write_gguf(tmp_path / "all.gguf", tensors, arch="madeup")
    reader = GGUFCheckpoint([path], "all-types")
    ref = library_arrays([path])
    assert set(reader.names) == set(ref)  # unknown architecture: GGUF names kept
    for name in reader.names:
        array, qtype = ref[name]
        got = reader.get(name)
        assert reader.storage(name) == qtype
        assert tuple(got.shape) == array.shape == reader.shape(name)
        assert str(got.dtype).removeprefix("torch.") == reader.dtype(name)
        assert np.array_equal(got.float().numpy(), array.astype(np.float32)), name
    ours = esd_rows(reader.iter_tensors())
    lib = esd_rows((n, torch.from_numpy(ref[n][0]), ref[n][1]) for n in reader.names)
    assert len(ours) == len(types) and {r["status"] for r in ours} == {"ok"}
    assert_rows_close(ours, lib, ESD_RTOL)
    assert sorted(r["storage"] for r in ours) == sorted(t.name for t in types)


def test_large_tensor_is_dequantized_in_chunks(tmp_path, monkeypatch):
    """Chunk boundaries (rows not a multiple of the chunk) leave no seam."""
    from esd_experiment.formats import gguf_file as gguf_reader

    monkeypatch.setattr(gguf_reader, "CHUNK_ELEMS", 3 * 256)
    rng = np.random.default_rng(1)
    raw = random_blocks(T.Q4_K, 10, 512, rng)
    path = write_gguf(tmp_path / "m.gguf", {"w.weight": (raw, T.Q4_K)}, arch="madeup")
    got = GGUFCheckpoint([path], "m").get("w.weight")
    assert np.array_equal(got.numpy(), dequantize(raw, T.Q4_K))


# --- names, order, permutation --------------------------------------------------------------

def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


GGUF_OF_HF = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_as_gguf(tmp_path: Path, split_max_tensors: int = 0) -> tuple[Path, Path]:
    """A tiny HF llama saved as safetensors, and converted to F32 GGUF as llama.cpp does
    (Q/K rows permuted); returns (HF directory, first GGUF file)."""
    model = llama(seed=3)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tensors = {}
    for name, param in model.state_dict().items():
        w = param.numpy()
        short = name.removeprefix("model.").removesuffix(".weight")
        if short.startswith("layers."):
            _, bid, rest = short.split(".", 2)
            gguf = f"blk.{bid}.{GGUF_OF_HF[rest]}.weight"
            if rest in ("self_attn.q_proj", "self_attn.k_proj"):
                w = llama_permute(w, 4, 4 if rest.endswith("q_proj") else 2)
        else:
            gguf = f"{GGUF_OF_HF[short]}.weight"
        tensors[gguf] = (np.ascontiguousarray(w), T.F32)
    name = "tiny-00001-of-00003.gguf" if split_max_tensors else "tiny.gguf"
    write_gguf(tmp_path / "tiny.gguf", tensors, metadata=LLAMA_META,
               split_max_tensors=split_max_tensors)
    return hf_dir, tmp_path / name


GGUF_OF_GPT2 = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm",
                "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GPT2_META = {"block_count": 2, "context_length": 64, "embedding_length": 32,
             "feed_forward_length": 128, "head_count": 4, "layer_norm_eps": 1e-5,
             "vocab_size": 96}


def gpt2_as_gguf(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny HF GPT-2 saved as safetensors, and converted to F32 GGUF as llama.cpp does (its
    Conv1D weights transposed to (out, in), the head tied); returns (HF directory, GGUF)."""
    def relayout(rest, kind, w):
        return w.T if kind == "weight" and rest.startswith(("attn.c_", "mlp.c_")) else w

    return hf_as_gguf(gpt2(seed=3), tmp_path, GGUF_OF_GPT2, "gpt2", GPT2_META, relayout)


def hf_as_gguf(model, tmp_path: Path, names: dict, arch: str, metadata: dict,
               relayout) -> tuple[Path, Path]:
    """``model`` (GPT-2 or Bloom naming) saved as safetensors, and converted to F32 GGUF: each
    tensor but the tied head renamed by ``names`` (a block's under ``blk.N``), a block's array
    passed through ``relayout(rest, kind, w)``; returns (HF directory, GGUF)."""
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tensors = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        stem, _, kind = name.removeprefix("transformer.").rpartition(".")
        w = param.numpy()
        if stem.startswith("h."):
            _, bid, rest = stem.split(".", 2)
            gguf, w = f"blk.{bid}.{names[rest]}.{kind}", relayout(rest, kind, w)
        else:
            gguf = f"{names[stem]}.{kind}"
        tensors[gguf] = (np.ascontiguousarray(w), T.F32)
    write_gguf(tmp_path / "tiny.gguf", tensors, arch=arch, metadata=metadata)
    return hf_dir, tmp_path / "tiny.gguf"


GGUF_OF_BLOOM = {"word_embeddings": "token_embd", "word_embeddings_layernorm": "token_embd_norm",
                 "ln_f": "output_norm", "input_layernorm": "attn_norm",
                 "self_attention.query_key_value": "attn_qkv",
                 "self_attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
BLOOM_META = {"block_count": 2, "context_length": 64, "embedding_length": 32,
              "feed_forward_length": 128, "head_count": 4, "layer_norm_eps": 1e-5,
              "vocab_size": 96}


def bloom_as_gguf(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny HF Bloom saved as safetensors, and converted to F32 GGUF as llama.cpp does (each
    fused query_key_value, stored head by head as (q, k, v), regrouped as all q, all k, all v:
    ``BloomModel.modify_tensors``); returns (HF directory, GGUF)."""
    from transformers import BloomConfig, BloomForCausalLM

    def relayout(rest, kind, w):
        if rest != "self_attention.query_key_value":
            return w
        heads = w.reshape(4, 3, 8, *w.shape[1:])  # (head, q/k/v, head_dim, ...)
        return np.concatenate([heads[:, i].reshape(32, *w.shape[1:]) for i in range(3)])

    torch.manual_seed(3)
    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=96))
    return hf_as_gguf(model, tmp_path, GGUF_OF_BLOOM, "bloom", BLOOM_META, relayout)


def test_a_bloom_gguf_reads_its_fused_qkv_in_the_original_layout(tmp_path):
    """llama.cpp regroups Bloom's per-head query_key_value rows; they read back as the
    original's, and as transformers' own GGUF loader gives them."""
    from transformers import AutoModelForCausalLM

    hf_dir, gguf = bloom_as_gguf(tmp_path)
    reader = GGUFCheckpoint([gguf], "tiny-gguf")
    original = CheckpointReader(hf_dir, select_weight_files(
        [p.name for p in hf_dir.iterdir()], "hf"), "hf")
    library = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).state_dict()
    qkv = [n for n in reader.names if n.endswith("query_key_value.weight")]
    assert len(qkv) == 2 and set(reader.names) <= set(original.names)
    for name in reader.names:
        assert torch.equal(reader.get(name), original.get(name)), name
    for name in qkv:
        assert torch.equal(reader.get(name), library[name]), name


def test_names_are_huggingface_and_rows_match_the_original(tmp_path):
    hf_dir, gguf = llama_as_gguf(tmp_path)
    reader = GGUFCheckpoint([gguf], "tiny-gguf")
    original = CheckpointReader(hf_dir, select_weight_files(
        [p.name for p in hf_dir.iterdir()], "hf"), "hf")
    assert reader.names == original.names
    assert reader.gguf_name("model.layers.1.self_attn.q_proj.weight") == "blk.1.attn_q.weight"
    assert all(reader.storage(n) == "F32" for n in reader.names)
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.1.self_attn.k_proj.weight"
    for name in (q, k):  # rows the converter permuted read back in the original's order
        assert torch.equal(reader.get(name), original.get(name)), name
    ours, ref = esd_rows(reader.iter_tensors()), esd_rows(original.iter_tensors())
    assert len(ours) == 16
    for a in (ours, ref):
        for row in a:
            row.pop("storage")
    assert_rows_close(ours, ref, PERMUTED_RTOL)


def test_a_gpt2_gguf_reads_its_conv1d_weights_in_the_original_layout(tmp_path):
    """llama.cpp transposes GPT-2's Conv1D weights; they read back as the original's."""
    hf_dir, gguf = gpt2_as_gguf(tmp_path)
    reader = GGUFCheckpoint([gguf], "tiny-gguf")
    original = CheckpointReader(hf_dir, select_weight_files(
        [p.name for p in hf_dir.iterdir()], "hf"), "hf")
    assert set(reader.names) <= set(original.names) and len(reader.names) == 28
    for name in reader.names:
        assert reader.shape(name) == tuple(original.shape(name)), name
        assert torch.equal(reader.get(name), original.get(name)), name


def test_a_deep_models_names_are_mapped_with_one_tensor_name_map(tmp_path, monkeypatch):
    # transformers' get_gguf_hf_weights_map asks gguf for a TensorNameMap at every module of
    # the model it walks; each is as large as the model is deep, so an 80-layer GGUF took
    # 48 s to name. One map per checkpoint gives the same names.
    import gguf.tensor_mapping

    built = []
    real_init = gguf.tensor_mapping.TensorNameMap.__init__
    monkeypatch.setattr(gguf.tensor_mapping.TensorNameMap, "__init__",
                        lambda self, *a: built.append(a) or real_init(self, *a))
    w = np.ones((32, 32), np.float32)
    path = write_gguf(tmp_path / "deep.gguf",
                      {"blk.79.attn_q.weight": (w, T.F32), "token_embd.weight": (w, T.F32)},
                      metadata={**LLAMA_META, "block_count": 80})
    reader = GGUFCheckpoint([path], "deep-gguf")
    assert set(reader.names) == {"model.layers.79.self_attn.q_proj.weight",
                                 "model.embed_tokens.weight"}
    assert len(built) == 1, f"{len(built)} TensorNameMaps built for one checkpoint"
    import gguf

    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map  # put back


@pytest.mark.parametrize("vocab_size_key", [False, True])
def test_the_config_is_read_without_the_tokenizers_arrays(tmp_path, vocab_size_key):
    # gguf's reader parses a vocabulary and its merges string by string (15 s for Llama 3's
    # 128256 tokens); the config transformers makes from the header copy without them must be
    # the one it makes from the file itself, the vocabulary's size included.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from esd_experiment.formats.gguf_file import _config_gguf, _read_header

    tokens = 3000
    writer = GGUFWriter(tmp_path / "tok.gguf", "llama")
    meta = {k: v for k, v in LLAMA_META.items() if vocab_size_key or k != "vocab_size"}
    for key, value in {**meta, "name": "tiny"}.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(tokens)])
    writer.add_token_types([1] * tokens)
    writer.add_token_merges([f"a{i} b{i}" for i in range(2 * tokens)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_rope_dimension_sections([8, 4, 4, 0])  # an array outside the tokenizer
    w = np.ones((32, 32), np.float32)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "output.weight"):
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    slim = tmp_path / "slim.gguf"
    slim.write_bytes(_config_gguf(_read_header(tmp_path / "tok.gguf", "tok")))
    expected = load_gguf_checkpoint(str(tmp_path / "tok.gguf"), return_tensors=False)
    got = load_gguf_checkpoint(str(slim), return_tensors=False)
    assert got["config"] == expected["config"]
    assert expected["config"]["vocab_size"] == (96 if vocab_size_key else tokens)
    assert expected["config"]["bos_token_id"] == 1 and not got["tokenizer"].get("tokens")
    assert GGUFReader(slim).tensors[1].name == "blk.0.attn_q.weight"
    assert slim.stat().st_size < (tmp_path / "tok.gguf").stat().st_size / 10


def test_split_gguf_reads_all_parts_in_order(tmp_path):
    _, first = llama_as_gguf(tmp_path, split_max_tensors=8)
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf")
    assert files == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    paths = local_gguf_paths(tmp_path / files[1], "tiny")
    assert [p.name for p in paths] == files
    reader = GGUFCheckpoint(paths, "tiny", file_names=[f"repo/{f}" for f in files])
    assert len(reader.names) == 21 and reader.files == tuple(f"repo/{f}" for f in files)
    owner = [reader.files_of(n)[0] for n in reader.names]
    assert owner == sorted(owner, key=reader.files.index)  # file by file
    assert read_order(reader) == list(reader.names)  # the loader's order: each part once
    assert "lm_head.weight" in reader.names  # names mapped across parts, untied head kept
    whole, _ = llama_as_gguf(tmp_path / "whole")
    single = GGUFCheckpoint([tmp_path / "whole" / "tiny.gguf"], "tiny")
    for name in reader.names:
        assert torch.equal(reader.get(name), single.get(name))
    with pytest.raises(CorruptCheckpointError,
                       match="tiny-00003-of-00003.gguf is part 3 of 3.*read as part 2"):
        GGUFCheckpoint([paths[0], paths[2], paths[1]], "tiny")
    with pytest.raises(CorruptCheckpointError, match="part 1 of 3.*give all parts"):
        GGUFCheckpoint([paths[0]], "tiny")


# --- choosing files -------------------------------------------------------------------------

REPO = ["README.md", "model.Q4_K_M.gguf", "model.Q4_K_S.gguf", "model.Q8_0.gguf",
        "mmproj-model-f16.gguf", "big/model.Q6_K-00001-of-00002.gguf",
        "big/model.Q6_K-00002-of-00002.gguf"]


@pytest.mark.parametrize("wanted, expected", [
    ("model.Q8_0.gguf", ("model.Q8_0.gguf",)),
    ("q4_k_m", ("model.Q4_K_M.gguf",)),
    ("big/model.Q6_K-00002-of-00002.gguf", ("big/model.Q6_K-00001-of-00002.gguf",
                                            "big/model.Q6_K-00002-of-00002.gguf")),
    ("Q6_K", ("big/model.Q6_K-00001-of-00002.gguf", "big/model.Q6_K-00002-of-00002.gguf")),
])
def test_select_gguf_files(wanted, expected):
    assert select_gguf_files(REPO, wanted, "org/m-GGUF") == expected


def test_select_gguf_files_refuses_ambiguity_and_gaps():
    with pytest.raises(InputError, match="org/m.*Q4_K.*matches 2.*gguf_file"):
        select_gguf_files(REPO, "Q4_K", "org/m")
    with pytest.raises(InputError, match="holds 4 GGUF models"):
        select_gguf_files(REPO, "", "org/m")
    assert select_gguf_files(["a.gguf", "mmproj-a.gguf"], None, "org/m") == ("a.gguf",)
    with pytest.raises(CorruptCheckpointError, match="lacks big/model.Q6_K-00002-of-00002"):
        select_gguf_files(REPO[:-1], "Q6_K", "org/m")
    assert is_gguf_path("/data/x.Q4_K_M.GGUF") and not is_gguf_path("org/model")
    assert list(gguf_models(REPO)) == ["big/model.Q6_K-*-of-00002.gguf", "model.Q4_K_M.gguf",
                                      "model.Q4_K_S.gguf", "model.Q8_0.gguf"]


# --- bad input ------------------------------------------------------------------------------

def one_tensor_file(tmp_path: Path, qtype: T = T.Q8_0) -> Path:
    rng = np.random.default_rng(2)
    data = stored(qtype, rng.standard_normal((ROWS, 256)).astype(np.float32), rng)
    return write_gguf(tmp_path / "one.gguf", {"blk.0.ffn_up.weight": (data, qtype)},
                      arch="madeup")


def set_type(path: Path, name: str, type_id: int) -> None:
    """Overwrite the GGML type of tensor ``name`` in the header (after name, n_dims, dims)."""
    raw = bytearray(path.read_bytes())
    at = raw.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(raw))


def test_truncated_gguf_names_the_tensor(tmp_path):
    path = one_tensor_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError,
                       match=r"one.gguf is truncated: tensor blk.0.ffn_up.weight \(Q8_0\)"):
        GGUFCheckpoint([path], "org/m")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptCheckpointError, match="truncated: its header ends inside"):
        GGUFCheckpoint([path], "org/m")
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CorruptCheckpointError, match="does not start with GGUF"):
        GGUFCheckpoint([path], "org/m")


def test_unknown_or_undequantizable_type_names_the_tensor(tmp_path):
    path = one_tensor_file(tmp_path)
    set_type(path, "blk.0.ffn_up.weight", 99)
    with pytest.raises(UnsupportedFormatError,
                       match="org/m: one.gguf: tensor blk.0.ffn_up.weight has GGML type 99"):
        GGUFCheckpoint([path], "org/m")
    set_type(path, "blk.0.ffn_up.weight", int(T.Q8_K))
    with pytest.raises(UnsupportedFormatError, match="blk.0.ffn_up.weight is Q8_K.*cannot"):
        GGUFCheckpoint([path], "org/m")


def test_missing_local_file(tmp_path):
    from esd_experiment.core.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        local_gguf_paths(tmp_path / "x.gguf", "x")


def two_tensor_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    tensors = {f"blk.0.ffn_{n}.weight": (stored(T.Q8_0, rng.standard_normal(
        (ROWS, 256)).astype(np.float32), rng), T.Q8_0) for n in ("up", "down")}
    return write_gguf(tmp_path / "two.gguf", tensors, arch="madeup")


def set_info(path: Path, name: str, *, offset: int | None = None,
             dims: tuple[int, ...] | None = None) -> None:
    """Overwrite tensor ``name``'s data offset or dimensions (same count) in the header."""
    raw = bytearray(path.read_bytes())
    at = raw.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    if dims is not None:
        struct.pack_into(f"<{n_dims}Q", raw, at + 4, *dims)
    if offset is not None:
        struct.pack_into("<Q", raw, at + 4 + 8 * n_dims + 4, offset)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, cause", [
    (dict(offset=0), r"blk.0.ffn_down.weight starts at byte 0 of the data, but the tensor "
                     r"before it \(blk.0.ffn_up.weight, Q8_0 16x256\) ends at byte 4352"),
    (dict(offset=4352 + 32), r"blk.0.ffn_down.weight starts at byte 4384 of the data, but"),
    (dict(offset=4352 + 5), r"blk.0.ffn_down.weight starts at byte 4357.*not a multiple of "
                            r"the alignment \(32\)"),
])
def test_inconsistent_offsets_are_refused(tmp_path, damage, cause):
    """llama.cpp reads a tensor's data only where the tensors before it end (each padded to
    general.alignment); a header that says otherwise is refused, naming the tensor."""
    path = two_tensor_file(tmp_path)
    GGUFCheckpoint([path], "org/m")  # the undamaged file reads
    set_info(path, "blk.0.ffn_down.weight", **damage)
    with pytest.raises(CorruptCheckpointError, match=f"org/m: two.gguf: tensor {cause}"):
        GGUFCheckpoint([path], "org/m")


def test_inconsistent_dimensions_are_refused(tmp_path):
    """Dimensions that do not fit the data (a smaller shape read over another's bytes, or a
    size past 2**63) are refused, naming the tensor."""
    path = two_tensor_file(tmp_path)
    set_info(path, "blk.0.ffn_up.weight", dims=(256, ROWS // 2))
    with pytest.raises(CorruptCheckpointError, match=r"blk.0.ffn_down.weight starts at byte "
                                                     r"4352 .* ends at byte 2176"):
        GGUFCheckpoint([path], "org/m")
    set_info(path, "blk.0.ffn_up.weight", dims=(256, 1 << 62))
    with pytest.raises(CorruptCheckpointError, match=r"blk.0.ffn_up.weight has dimensions "
                                                     r"\(256, 4611686018427387904\)"):
        GGUFCheckpoint([path], "org/m")
