"""The time to open a GGUF checkpoint, which maps its tensor names to Hugging Face names, by
the model's depth: ``GGUFCheckpoint`` against the two transformers functions it builds on,
called as they are, in one process.

For each depth it writes a llama GGUF (gguf's GGUFWriter) whose metadata declares that many
blocks, with a tokenizer of --vocab tokens and twice as many merges (Llama 3: 128256 and
280147) and two small tensors (the costs are set by the depth and the tokenizer, not the
sizes), then times, --repeats times each, minima printed:

  open        GGUFCheckpoint([path]): header, config, the meta model, the name map
  config      transformers' load_gguf_checkpoint(path, return_tensors=False) alone, which
              parses every field of the file with gguf's reader, the tokenizer's included
  name map    transformers' get_gguf_hf_weights_map on the same meta model, which builds
              gguf's TensorNameMap at every module it walks

Usage: python benchmarks/bench_gguf_names.py [--depths 22,32,80] [--vocab 128256]
       [--repeats 2]
Writes only in a temporary folder; prints a Markdown table. Exit code 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_llama_gguf(path: Path, depth: int, vocab: int) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    for key, value in {"block_count": depth, "context_length": 64, "embedding_length": 32,
                       "feed_forward_length": 64, "head_count": 4, "head_count_kv": 2,
                       "layer_norm_rms_eps": 1e-6, "vocab_size": 96}.items():
        getattr(writer, f"add_{key}")(value)
    if vocab:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"token{i}" for i in range(vocab)])
        writer.add_token_types([1] * vocab)
        writer.add_token_merges([f"a{i} b{i}" for i in range(2 * vocab)])
    w = np.ones((32, 32), np.float32)
    writer.add_tensor("token_embd.weight", w)
    writer.add_tensor(f"blk.{depth - 1}.attn_q.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="22,32,80")
    p.add_argument("--vocab", type=int, default=128256, help="tokens (0: no tokenizer)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import (
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from esd_experiment.formats.gguf_file import GGUFCheckpoint

    print(f"tokenizer: {args.vocab} tokens, {2 * args.vocab} merges")
    print("| blocks | open s | config alone s | name map alone s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for depth in map(int, args.depths.split(",")):
            path = write_llama_gguf(Path(tmp) / f"deep{depth}.gguf", depth, args.vocab)
            opened = best_of(args.repeats, lambda p=path: GGUFCheckpoint([p], "bench"))
            config_s = best_of(args.repeats, lambda p=path: load_gguf_checkpoint(str(p)))
            config = transformers.LlamaConfig(num_hidden_layers=depth, hidden_size=32,
                                              intermediate_size=64, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=96)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
            alone = best_of(args.repeats, lambda m=model: get_gguf_hf_weights_map(
                m, TensorProcessor(config={})))
            print(f"| {depth} | {opened:.2f} | {config_s:.2f} | {alone:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
