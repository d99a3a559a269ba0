"""Peak anonymous memory of analysing a ~2 GB bf16 Llama checkpoint: streaming vs transformers.

Usage: python benchmarks/bench_memory.py [--workdir DIR] [--layers 22] [--keep]

Writes a synthetic Llama-shaped checkpoint (TinyLlama-1.1B shapes by default: hidden 2048,
MLP 5632, 4 KV heads, vocab 32000; random bf16 weights; config.json + 500 MB safetensors
shards with their index) under --workdir (default: a temporary directory, deleted unless
--keep). Then runs, each in its own subprocess while this process samples the child's
RssAnon from /proc/<pid>/status every 20 ms:

  imports       import torch, transformers and the project modules; nothing else (the floor)
  ours          model_loader.open_model(...).iter_tensors() -> net_esd.iter_layer_results
                with the default ESDConfig()
  transformers  AutoModelForCausalLM.from_pretrained(dir) (what the peers do), then the
                same estimator over model.named_parameters(). transformers 5 loads in the
                checkpoint's dtype and leaves the weights memory-mapped: file-backed pages,
                counted in VmRSS but not in RssAnon
  transformers-fp32  the same with dtype=torch.float32: transformers 4's default, and what
                WeightWatcher needs (numpy has no bfloat16)

and prints peak RssAnon, peak / checkpoint size and wall time per child. Exit code: 0 when
every child succeeded, 1 when one failed (its output is printed), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from child_memory import run_sampled  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.02           # RssAnon sampling period
SHARD_BYTES = 500 << 20   # safetensors shard size of the synthetic checkpoint
CHILDREN = ("imports", "ours", "transformers", "transformers-fp32")
TARGET_RATIO = 0.3        # ours: peak RssAnon at most this fraction of the checkpoint size
# TinyLlama-1.1B shapes: 22 layers of these give a 2.2 GB bf16 checkpoint.
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False)


@dataclass(frozen=True)
class Run:
    child: str
    peak_anon: int      # bytes
    peak_rss: int       # bytes: anonymous + file-backed (mapped checkpoint pages) + shmem
    wall_s: float
    detail: str


def layer_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, f = LLAMA["hidden_size"], LLAMA["intermediate_size"]
    kv = h // LLAMA["num_attention_heads"] * LLAMA["num_key_value_heads"]
    shapes = [("model.embed_tokens.weight", (LLAMA["vocab_size"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (LLAMA["vocab_size"], h))]


def write_checkpoint(folder: Path, layers: int) -> int:
    """The synthetic checkpoint; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = layer_shapes(layers)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if size + nbytes > SHARD_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, gen = {}, torch.Generator().manual_seed(0)
    for i, group in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
                   for name, shape in group}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(LLAMA, architectures=["LlamaForCausalLM"], model_type="llama",
                  num_hidden_layers=layers, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(child: str, checkpoint: Path) -> Run:
    """Run one child, sampling its memory; raises RuntimeError with its output on failure."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, str(checkpoint)]
    peak_anon, peak_rss, wall, output = run_sampled(cmd, ROOT, SAMPLE_S)
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    return Run(child, peak_anon, peak_rss, wall, lines[-1].removeprefix("RESULT ") if lines else "")


def child_main(child: str, checkpoint: Path) -> None:
    import torch
    import transformers

    from esd_experiment.estimator.net_esd import ESDConfig, iter_layer_results
    from esd_experiment.loader.opener import ModelRequest, open_model

    if child == "imports":
        print(f"RESULT torch {torch.__version__}, transformers {transformers.__version__}")
        return
    if child == "ours":
        stream = open_model(ModelRequest(str(checkpoint))).iter_tensors()
    else:
        dtype = torch.float32 if child == "transformers-fp32" else "auto"
        model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
        dtype = next(model.parameters()).dtype
        stream = ((n, p.detach()) for n, p in model.named_parameters())
    rows = [r.row for r in iter_layer_results(stream, ESDConfig())]
    ok = sum(r["status"] == "ok" for r in rows)
    extra = f", model dtype {dtype}" if child != "ours" else ""
    print(f"RESULT {len(rows)} layers analysed ({ok} ok){extra}")


def print_table(runs: list[Run], size: int) -> bool:
    print(f"\ncheckpoint: {size / 2**30:.2f} GiB bf16 safetensors; "
          f"peak RssAnon sampled every {SAMPLE_S * 1000:.0f} ms\n")
    print(f"{'run':<17} {'peak RssAnon':>13} {'/ checkpoint':>13} {'peak VmRSS':>11} "
          f"{'wall s':>8}  detail")
    for run in runs:
        print(f"{run.child:<17} {run.peak_anon / 2**20:>9.0f} MiB {run.peak_anon / size:>13.3f} "
              f"{run.peak_rss / 2**20:>7.0f} MiB {run.wall_s:>8.1f}  {run.detail}")
    ours = next(r for r in runs if r.child == "ours")
    met = ours.peak_anon <= TARGET_RATIO * size
    print(f"\nours <= {TARGET_RATIO} x checkpoint: {'yes' if met else 'NO'}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the synthetic checkpoint is written (default: temp dir)")
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: 2.2 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        child_main(args.child[0], Path(args.child[1]))
        return 0
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    checkpoint = workdir / "synthetic-llama"
    try:
        size = write_checkpoint(checkpoint, args.layers)
        runs = [measure(kind, checkpoint) for kind in CHILDREN]
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(checkpoint, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    print_table(runs, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
