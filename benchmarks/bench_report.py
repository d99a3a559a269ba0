"""Benchmark the report at scale, and the cost of ordering layers by a model's config.

Writes into --workdir (default: a temporary directory, removed afterwards) a synthetic results
directory: --models result CSVs of --layers rows each (results.RESULT_COLUMNS, values of the
kinds real runs give: statuses, NaN metrics of unfitted rows, one fine-tune per --pair_every
models with its base among the results), ``.eigs.npz`` files for the first --eigs_models
models, a failed_models.txt, and one foreign and one truncated CSV. Then times, each as a whole
separate process (python start-up and imports included):

  load      results.load_results(DIR): every CSV read, checked and typed
  report    python esd_report.py report DIR (read, summary, figures, index.html)
  meta      layer_order.depth_order on the checkpoint names of a Llama-2-7B config: the first
            call in a fresh process with an empty disk cache of depth orders (transformers
            import and meta instance), a repeat in that process (its memory cache cleared),
            and the first call in another fresh process once the disk cache holds the config

Prints median wall seconds of --repeats runs. Usage:
  python benchmarks/bench_report.py [--models 500] [--layers 300] [--repeats 3] [--workdir DIR]
Exit code: 0 when every run succeeded, 1 when one failed (its output is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
EVALS_PER_LAYER = 256


def synthetic_results(out: Path, models: int, layers: int, pair_every: int,
                      eigs_models: int) -> None:
    """A results directory with the schema, value kinds and files of a real run."""
    import numpy as np
    import pandas as pd

    from esd_experiment.core.paths import ModelPaths
    from esd_experiment.core.results import EIGS_OPTIONS_KEY, RESULT_COLUMNS
    from esd_experiment.estimator.options import ESDConfig

    rng = np.random.default_rng(0)
    options = ESDConfig().options_key
    out.mkdir(parents=True, exist_ok=True)
    names = [f"model.layers.{i // 7}.{p}" for i, p in
             zip(range(layers - 2), ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                     "mlp.down_proj"] * layers, strict=False)]
    names = ["model.embed_tokens", *names, "lm_head"]
    for m in range(models):
        model_id = f"org{m % 17}/model-{m:04d}"
        source = f"org{(m - 1) % 17}/model-{m - 1:04d}" if m % pair_every == 1 else ""
        alpha = rng.lognormal(1.1, 0.35, layers)
        status = np.where(rng.random(layers) < 0.02, "fit_failed", "ok")
        frame = pd.DataFrame({
            "model_id": model_id, "revision": "", "source_model": source,
            "layer_id": range(layers), "longname": names,
            "block": [int(n.split(".")[2]) if ".layers." in n else None for n in names],
            "layer_type": ["embedding"] + ["linear"] * (layers - 2) + ["lm_head"],
            "storage": "bfloat16", "N": 11008, "M": 4096, "Q": 11008 / 4096, "num_evals": 4096,
            "alpha": np.where(status == "ok", alpha, np.nan),
            "xmin": rng.random(layers), "xmax": rng.random(layers) * 50, "D": rng.random(layers) / 10,
            "sigma": rng.random(layers) / 10, "num_pl_spikes": rng.integers(50, 2000, layers),
            "spectral_norm": rng.random(layers) * 50, "log_spectral_norm": rng.random(layers),
            "norm": rng.random(layers) * 1e3, "log_norm": rng.random(layers) * 3,
            "stable_rank": rng.random(layers) * 100, "alpha_weighted": rng.random(layers) * 5,
            "log_alpha_norm": rng.random(layers) * 5, "matrix_rank": 4096,
            "entropy": rng.random(layers),
            "warning": np.where(alpha < 2, "over-trained", np.where(alpha > 6, "under-trained", "")),
            "fix_fingers": "xmin_mid", "status": status, "esd_options": options,
        }, columns=list(RESULT_COLUMNS))
        paths = ModelPaths.for_model(out, model_id)
        frame.to_csv(paths.csv, index=False)
        if m < eigs_models:
            eigs = {n: np.sort(rng.pareto(2.5, EVALS_PER_LAYER)) + 1e-3 for n in names}
            np.savez_compressed(paths.eigs, **eigs, **{EIGS_OPTIONS_KEY: np.array(options)})
        paths.log.parent.mkdir(exist_ok=True)
        paths.log.write_text(f"analysed {model_id}\n")
    (out / "failed_models.txt").write_text("org/broken\tCorruptCheckpointError: truncated\n")
    (out / "models.csv").write_text("model_id,base_model_relation,source_model\nx,,\n")
    text = ModelPaths.for_model(out, "org0/model-0000").csv.read_text()
    (out / "org--truncated.csv").write_text(text[: len(text) // 2])


def timed(argv: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout


META_SCRIPT = f"""
import json, time
t0 = time.perf_counter()
from esd_experiment.core import layer_order
config = json.loads({json.dumps(json.dumps(LLAMA_7B))})
names = ["lm_head", "model.embed_tokens"] + [f"model.layers.{{i}}.{{p}}" for i in range(32)
         for p in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                   "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")]
ranks = layer_order.depth_order(names, config)
t1 = time.perf_counter()
assert layer_order.model_order(config) is not None and min(ranks, key=ranks.get) == "model.embed_tokens"
layer_order._model_order.cache_clear()
t2 = time.perf_counter()
layer_order.depth_order(names, config)
t3 = time.perf_counter()
print(json.dumps({{"first": t1 - t0, "repeat": t3 - t2}}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=500)
    p.add_argument("--layers", type=int, default=300)
    p.add_argument("--pair_every", type=int, default=5, help="one fine-tune per this many models")
    p.add_argument("--eigs_models", type=int, default=60, help="models with saved eigenvalues")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        results = work / "results"
        start = time.perf_counter()
        synthetic_results(results, args.models, args.layers, args.pair_every, args.eigs_models)
        print(f"wrote {args.models} x {args.layers} results in {time.perf_counter() - start:.1f} s")
        load = [sys.executable, "-c", "import sys, warnings; warnings.simplefilter('ignore'); "
                f"sys.path.insert(0, {str(ROOT)!r}); from esd_experiment.core import results; "
                f"print(len(results.load_results({str(results)!r})))"]
        report = [sys.executable, str(ROOT / "esd_report.py"), "report", str(results)]
        meta = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                + META_SCRIPT]
        times: dict[str, list[float]] = {"load": [], "report": [], "meta_first": [],
                                         "meta_repeat": [], "meta_disk": []}
        try:
            for r in range(args.repeats):
                times["load"].append(timed(load)[0])
                times["report"].append(timed(report)[0])
                order_cache = {"ESD_CACHE_DIR": str(work / f"esd-cache-{r}")}  # empty
                out = json.loads(timed(meta, order_cache)[1])
                times["meta_first"].append(out["first"])
                times["meta_repeat"].append(out["repeat"])
                times["meta_disk"].append(json.loads(timed(meta, order_cache)[1])["first"])
        except RuntimeError as exc:
            print(exc)
            return 1
        page = results / "report" / "index.html"
        print(f"index.html: {page.stat().st_size / 2**20:.1f} MiB")
        for name, values in times.items():
            print(f"{name:12s} median {statistics.median(values):7.3f} s   runs "
                  + " ".join(f"{v:.3f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
