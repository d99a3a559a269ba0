"""Dequantization cost next to the eigensolve, and peak memory, for a 1B-shaped Q4_K GGUF.

Usage: python benchmarks/bench_dequant.py [--workdir DIR] [--layers 22] [--keep] [--repeats 3]

Writes a Llama GGUF with TinyLlama-1.1B shapes (hidden 2048, MLP 5632, 4 KV heads, vocab
32000; --layers decoder layers, 22 by default) under --workdir (default: a temporary
directory, deleted unless --keep): every matrix Q4_K, norms F32, and a 32000-token vocabulary
in the metadata, as real files carry. The gguf package cannot quantize K-quants, so the Q4_K
blocks are random bytes with finite fp16 scales; dequantization does the same work whatever
the values. Then runs, each in its own subprocess while this process samples the child's
RssAnon and VmRSS from /proc/<pid>/status every 20 ms:

  imports   import torch, gguf, transformers and the project modules; nothing else (the floor)
  open      build gguf_reader.GGUFCheckpoint over the file (headers, and the Hugging Face name
            map, which builds transformers' model of the architecture on the meta device)
  dequant   the same, then every tensor read with get() (dequantized to float32) and dropped:
            its excess over "open" is the memory of dequantization alone
  eigen     the same stream, and for each matrix the float64 Gram + eigvalsh of the estimator
            (net_esd.gram_eigenvalues): seconds spent dequantizing vs in the eigensolve

and prints each child's peak RssAnon, its excess over the previous child against the largest
dequantized tensor (float32), and the eigen child's timings. Last, in one more child, the
other formats' dequantization (esd_experiment/formats/dequantize.py: GPTQ 4- and 3-bit, AWQ, FP8 block scales,
bitsandbytes nf4, compressed-tensors int4) of one MLP-shaped (5632 x 2048) matrix from random
stored data, next to the float64 Gram + eigvalsh of that shape (median of --repeats runs).
Exit code: 0 when every child succeeded, 1 when one failed (its output is printed), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from child_memory import run_sampled  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.02        # RSS sampling period
CHILDREN = ("imports", "open", "dequant", "eigen")
HIDDEN, MLP, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000  # TinyLlama-1.1B
TARGET_EXCESS = 1.25   # dequant - open: peak RssAnon <= this x the largest float32 tensor
EIGEN = "float64 Gram + eigvalsh"


@dataclass(frozen=True)
class Run:
    child: str
    peak_anon: int
    peak_rss: int
    wall_s: float
    detail: dict


def matrices(layers: int) -> list[tuple[str, tuple[int, int]]]:
    """GGUF names and (out, in) shapes, in llama.cpp's tensor order."""
    kv = HIDDEN // HEADS * KV_HEADS
    out = [("token_embd.weight", (VOCAB, HIDDEN))]
    for b in range(layers):
        out += [(f"blk.{b}.attn_q.weight", (HIDDEN, HIDDEN)),
                (f"blk.{b}.attn_k.weight", (kv, HIDDEN)), (f"blk.{b}.attn_v.weight", (kv, HIDDEN)),
                (f"blk.{b}.attn_output.weight", (HIDDEN, HIDDEN)),
                (f"blk.{b}.ffn_gate.weight", (MLP, HIDDEN)),
                (f"blk.{b}.ffn_up.weight", (MLP, HIDDEN)),
                (f"blk.{b}.ffn_down.weight", (HIDDEN, MLP))]
    return out + [("output.weight", (VOCAB, HIDDEN))]


def q4k_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K data with finite scales: 144-byte blocks of 256 values, fp16 d and dmin first."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scales = rng.uniform(1e-4, 1e-3, size=(raw.shape[0], 2)).astype(np.float16)
    raw[:, :4] = scales.view(np.uint8)
    return raw.reshape(rows, cols // block * size)


def write_gguf(path: Path, layers: int) -> int:
    """The synthetic Q4_K file; returns its size in bytes."""
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"tok{i}" for i in range(VOCAB)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([1] * VOCAB)
    for name, (rows, cols) in matrices(layers):
        data = q4k_blocks(rows, cols, rng)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType.Q4_K)
    norms = ["output_norm.weight"] + [f"blk.{b}.{n}.weight" for b in range(layers)
                                      for n in ("attn_norm", "ffn_norm")]
    for name in norms:
        writer.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.stat().st_size


def measure(child: str, gguf: Path) -> Run:
    """Run one child, sampling its memory; raises RuntimeError with its output on failure."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, str(gguf)]
    peak_anon, peak_rss, wall, output = run_sampled(cmd, ROOT, SAMPLE_S)
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    return Run(child, peak_anon, peak_rss, wall, json.loads(lines[-1].removeprefix("RESULT ")) if lines else {})


def child_main(child: str, gguf: Path) -> None:
    import torch
    import transformers  # noqa: F401  (the name map imports it: part of the floor)

    from esd_experiment.estimator.net_esd import gram_eigenvalues
    from esd_experiment.formats.gguf_file import GGUFCheckpoint

    if child == "imports":
        print("RESULT {}")
        return
    if child.startswith("formats"):
        formats_main(int(child.partition(":")[2] or 1))
        return
    start = time.perf_counter()
    reader = GGUFCheckpoint([gguf], "bench")
    result = {"open_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
              "hf_names": reader.names[0] != reader.gguf_name(reader.names[0])}
    deq = eig = 0.0
    largest = count = 0
    for name in reader.names if child != "open" else ():
        start = time.perf_counter()
        w = reader.get(name)
        deq += time.perf_counter() - start
        if w.ndim < 2:
            continue
        count += 1
        largest = max(largest, w.numel() * w.element_size())
        if child == "eigen":
            start = time.perf_counter()
            gram_eigenvalues(w, torch.device("cpu"), torch.float64, 1 << 19)
            eig += time.perf_counter() - start
        del w
    reader.close()
    result.update(dequant_s=deq, eigen_s=eig, matrices=count, largest_bytes=largest)
    print("RESULT " + json.dumps(result))


def stored_formats() -> dict:
    """Random stored data of every torch-dequantized format for one (MLP, HIDDEN) matrix."""
    import torch

    from esd_experiment.formats.dequantize import (
        Grid,
        dequantize_awq,
        dequantize_bnb4,
        dequantize_gptq,
        dequantize_packed,
        dequantize_scaled,
    )

    g = torch.Generator().manual_seed(0)
    out_f, in_f, group = MLP, HIDDEN, 128

    def words(*shape):
        return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=g)

    scales = torch.rand(in_f // group, out_f, generator=g).half()
    g_idx = torch.arange(in_f) // group
    fp8 = torch.randn(out_f, in_f, generator=g).to(torch.float8_e4m3fn)
    block_scale = torch.rand(out_f // 128, in_f // 128, generator=g)
    nibbles = torch.randint(0, 256, (out_f * in_f // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(out_f * in_f // 64, generator=g)
    gptq4 = (words(in_f // 8, out_f), words(in_f // group, out_f // 8))
    gptq3 = (words(in_f * 3 // 32, out_f), words(in_f // group, out_f * 3 // 32))
    awq = (words(in_f, out_f // 8), words(in_f // group, out_f // 8))
    packed = words(out_f, in_f // 8)
    qmap = torch.rand(16, generator=g)
    return {
        "gptq-4bit-g128": lambda: dequantize_gptq(*gptq4, scales, g_idx, 4),
        "gptq-3bit-g128": lambda: dequantize_gptq(*gptq3, scales, g_idx, 3),
        "awq-4bit-g128": lambda: dequantize_awq(*awq, scales, group),
        "float8_e4m3fn+block128": lambda: dequantize_scaled(fp8, block_scale,
                                                            Grid("block", (128, 128))),
        "bnb-nf4-b64": lambda: dequantize_bnb4(nibbles, absmax, qmap, 64, (out_f, in_f)),
        "int4+g128 (compressed-tensors)": lambda: dequantize_packed(
            packed, 4, (out_f, in_f), scales.T.float(), Grid("group", (group,))),
    }


def formats_main(repeats: int) -> None:
    """Each repeat times every format and the eigensolve in turn, so load hits them alike."""
    import statistics

    import torch

    from esd_experiment.estimator.net_esd import gram_eigenvalues

    runs = stored_formats()
    times: dict[str, list[float]] = {label: [] for label in [*runs, EIGEN]}
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            w = run()
            times[label].append(time.perf_counter() - start)
        start = time.perf_counter()
        gram_eigenvalues(w, torch.device("cpu"), torch.float64, 1 << 19)
        times[EIGEN].append(time.perf_counter() - start)
    print("RESULT " + json.dumps({k: statistics.median(v) for k, v in times.items()}))


def print_formats(detail: dict) -> None:
    eig = detail[EIGEN]
    print(f"\none {MLP} x {HIDDEN} matrix, median seconds:\n")
    print(f"{'stored as':<32} {'dequantize s':>12} {'/ eigensolve':>13}")
    for label, seconds in detail.items():
        print(f"{label:<32} {seconds:>12.3f} {seconds / eig:>13.3f}")


def print_table(runs: list[Run], size: int) -> bool:
    largest = next(r for r in runs if r.child == "dequant").detail["largest_bytes"]
    print(f"\nfile: {size / 2**20:.0f} MiB Q4_K GGUF; largest dequantized tensor "
          f"{largest / 2**20:.0f} MiB (float32); RSS sampled every {SAMPLE_S * 1000:.0f} ms\n")
    print(f"{'run':<8} {'peak RssAnon':>13} {'- previous':>11} {'/ largest':>10} "
          f"{'peak VmRSS':>11} {'wall s':>7}")
    previous = runs[0].peak_anon
    for run in runs:
        excess = run.peak_anon - previous
        print(f"{run.child:<8} {run.peak_anon / 2**20:>9.0f} MiB {excess / 2**20:>7.0f} MiB "
              f"{excess / largest:>10.2f} {run.peak_rss / 2**20:>7.0f} MiB {run.wall_s:>7.1f}")
        previous = run.peak_anon
    eigen = next(r for r in runs if r.child == "eigen").detail
    print(f"\neigen child ({eigen['threads']} torch threads): {eigen['matrices']} matrices; "
          f"open (headers + HF name map: {eigen['hf_names']}) {eigen['open_s']:.2f} s; "
          f"dequantize {eigen['dequant_s']:.2f} s; float64 Gram + eigvalsh "
          f"{eigen['eigen_s']:.2f} s; dequantize / eigensolve = "
          f"{eigen['dequant_s'] / eigen['eigen_s']:.3f}")
    opened, dequant = (next(r for r in runs if r.child == c) for c in ("open", "dequant"))
    met = dequant.peak_anon - opened.peak_anon <= TARGET_EXCESS * largest
    print(f"dequant - open <= {TARGET_EXCESS} x largest tensor: {'yes' if met else 'NO'}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the synthetic GGUF is written (default: temp dir)")
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: TinyLlama)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic GGUF")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per format in the per-format timing (median reported)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "GGUF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        child_main(args.child[0], Path(args.child[1]))
        return 0
    if args.layers < 1 or args.repeats < 1:
        parser.error("--layers and --repeats must be at least 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dequant-"))
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = workdir / "synthetic-llama-Q4_K.gguf"
    try:
        size = write_gguf(gguf, args.layers)
        runs = [measure(kind, gguf) for kind in CHILDREN]
        formats = measure(f"formats:{args.repeats}", gguf)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            gguf.unlink(missing_ok=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    print_table(runs, size)
    print_formats(formats.detail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
