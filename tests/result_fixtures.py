"""Results directories for the report tests, written by the real estimator and the worker's
writer from tensors made here (no model loading, no transformers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from esd_experiment.core.paths import FAILED_MODELS_FILE, ModelPaths
from esd_experiment.estimator.net_esd import iter_layer_results
from esd_experiment.estimator.options import ESDConfig
from esd_experiment.run.worker import write_results

HIDDEN = 24
VOCAB = 64
ROOT_FOR_SUBPROCESS = Path(__file__).resolve().parents[1]  # where `import esd_experiment` works


def heavy_tailed(rows: int, cols: int, gen: torch.Generator, tail: float = 1.5) -> torch.Tensor:
    """A Gaussian matrix with Pareto column scales: spectra with a power-law tail."""
    scales = (torch.rand(cols, generator=gen, dtype=torch.float64) + 1e-3) ** (-1 / tail)
    return (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * scales).float()


def llama_like(seed: int, blocks: int = 2) -> dict[str, torch.Tensor]:
    """Checkpoint-style tensors of a small decoder, in checkpoint (name) order; a zero matrix
    gives a fit_failed row with -inf log norms, a 3x3 one a too_small row."""
    gen = torch.Generator().manual_seed(seed)
    out = {"lm_head.weight": heavy_tailed(VOCAB, HIDDEN, gen),
           "model.embed_tokens.weight": heavy_tailed(VOCAB, HIDDEN, gen, tail=3.0)}
    for b in range(blocks):
        p = f"model.layers.{b}"
        out[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN)
        out[f"{p}.mlp.down_proj.weight"] = heavy_tailed(HIDDEN, 2 * HIDDEN, gen)
        out[f"{p}.mlp.up_proj.weight"] = heavy_tailed(2 * HIDDEN, HIDDEN, gen, tail=2.5)
        for proj in ("k_proj", "o_proj", "q_proj", "v_proj"):
            out[f"{p}.self_attn.{proj}.weight"] = heavy_tailed(HIDDEN, HIDDEN, gen)
    out["model.layers.0.self_attn.rotary.weight"] = torch.zeros(HIDDEN, HIDDEN)
    out["model.layers.1.tiny.weight"] = torch.ones(3, 3)
    return out


def fine_tuned(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The base with its q_proj and v_proj changed by a low-rank update (a merged LoRA)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(base)
    for name, w in base.items():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            a = torch.randn(w.shape[0], 4, generator=gen)
            b = torch.randn(4, w.shape[1], generator=gen)
            out[name] = w + 0.5 * a @ b
    return out


def conv_net(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"classifier.1.weight": heavy_tailed(10, 32, gen),
            "resnet.embedder.convolution.weight": torch.randn(16, 3, 3, 3, generator=gen),
            "resnet.encoder.stages.0.layers.0.convolution.weight":
                torch.randn(32, 16, 3, 3, generator=gen)}


def write_model(out_dir: Path, model_id: str, tensors: dict[str, torch.Tensor],
                source_model: str = "", config: ESDConfig | None = None,
                save_eigs: bool = True) -> ModelPaths:
    """One model's result as the worker writes it (CSV, eigenvalues, a log)."""
    config = config or ESDConfig(keep_evals=save_eigs)
    paths = ModelPaths.for_model(Path(out_dir), model_id)
    model_cols = {"model_id": model_id, "revision": "", "source_model": source_model,
                  "esd_options": config.options_key}
    rows, eigs = [], {}
    for result in iter_layer_results(tensors.items(), config):
        rows.append({**model_cols, **result.row})
        if result.evals is not None:
            eigs[result.row["longname"]] = result.evals
    write_results(paths, rows, eigs if save_eigs else None, config.options_key)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    paths.log.write_text(f"{model_id}: {len(rows)} rows\n")
    return paths


def good_results(out_dir: Path) -> dict[str, ModelPaths]:
    """Four complete results: a base, its fine-tune, a convolutional net, a model without
    saved eigenvalues."""
    base = llama_like(0)
    return {
        "org/base": write_model(out_dir, "org/base", base),
        "org/fine-tune": write_model(out_dir, "org/fine-tune", fine_tuned(base, 1),
                                     source_model="org/base"),
        "org/convnet": write_model(out_dir, "org/convnet", conv_net(2)),
        "org/no-eigs": write_model(out_dir, "org/no-eigs", llama_like(3), save_eigs=False),
    }


def with_bad_files(out_dir: Path) -> dict[str, str]:
    """Add a failed model (with its log), a foreign CSV and a truncated copy of a result;
    returns {file name: what the report must say about it}."""
    out_dir = Path(out_dir)
    broken = ModelPaths.for_model(out_dir, "org/broken")
    (out_dir / FAILED_MODELS_FILE).write_text(
        "org/broken\tCorruptCheckpointError: model.safetensors is truncated\n")
    broken.log.write_text("Traceback: model.safetensors is truncated\n")
    (out_dir / "models.csv").write_text("model_id,base_model_relation,source_model\norg/a,,\n")
    text = ModelPaths.for_model(out_dir, "org/base").csv.read_text()
    (out_dir / "org--cut.csv").write_text(text[: len(text) // 2])
    return {"models.csv": "not a result CSV", "org--cut.csv": "truncated"}


def copy_results(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
