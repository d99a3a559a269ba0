"""Quantized checkpoints through the whole tool: the worker on a GPTQ directory and on a
local GGUF file, and the runner on a hub repository of several GGUF files picked by the
``gguf_file`` column (the hub stand-in)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from esd_experiment.estimator.net_esd import iter_layer_results
from esd_experiment.estimator.options import ESDConfig
from esd_experiment.formats.gguf_file import GGUFCheckpoint
from esd_experiment.run import worker as esd_worker
from tests.test_gguf import T, llama_as_gguf, write_gguf
from tests.test_quantized import GPTQ4, gptq_tensors, open_reader, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300
# The worker and the reader run the same float64 arithmetic on the same dequantized floats;
# only the order of summation in a CSV round trip may differ.
ROW_RTOL = 1e-12


def run_worker(*argv) -> int:
    return esd_worker.main([*map(str, argv), "--device", "cpu"])


def test_worker_analyses_a_gptq_checkpoint_as_its_dequantized_weights(tmp_path):
    folder = save_checkpoint(tmp_path / "gptq", gptq_tensors(np.random.default_rng(0)), GPTQ4)
    assert run_worker("--model_id", folder, "--output_dir", tmp_path / "out") == 0
    row = pd.read_csv(next((tmp_path / "out").glob("*.csv"))).iloc[0]
    assert row.longname == "model.layers.0.mlp.up_proj" and row.status == "ok"
    assert row.storage == "gptq-4bit-g32"
    (expected,) = [r.row for r in iter_layer_results(open_reader(folder).iter_tensors(),
                                                     ESDConfig())]
    assert np.isclose(row.alpha, expected["alpha"], rtol=ROW_RTOL)
    assert np.isclose(row.spectral_norm, expected["spectral_norm"], rtol=ROW_RTOL)


def test_worker_reads_a_local_gguf_file_under_hugging_face_names(tmp_path):
    _, gguf = llama_as_gguf(tmp_path)
    assert run_worker("--model_id", gguf, "--output_dir", tmp_path / "out") == 0
    df = pd.read_csv(next((tmp_path / "out").glob("*.csv")))
    assert len(df) == 16 and (df.status == "ok").all() and set(df.storage) == {"F32"}
    assert df.longname.iloc[0] == "model.embed_tokens" and df.longname.iloc[-1] == "lm_head"
    reader = GGUFCheckpoint([gguf], "tiny")
    assert set(df.longname) == {n.removesuffix(".weight") for n in reader.names
                                if len(reader.shape(n)) == 2}


def gguf_repo(folder: Path) -> Path:
    """A repository with the same tiny weights quantized two ways."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    folder.mkdir(parents=True)
    for qtype in (T.Q8_0, T.Q4_0):
        write_gguf(folder / f"tiny.{qtype.name}.gguf", {"blk.0.ffn_up.weight": (w, qtype)})
    (folder / "README.md").write_text("two quantizations")
    return folder


def test_runner_picks_each_gguf_file_of_a_hub_repository(hub, tmp_path):
    hub.add_repo("org/tiny-GGUF", gguf_repo(tmp_path / "repo"))
    models = tmp_path / "models.csv"
    with open(models, "w", newline="") as fh:
        csv.writer(fh).writerows([["model_id", "gguf_file"], ["org/tiny-GGUF", "Q8_0"],
                                  ["org/tiny-GGUF", "tiny.Q4_0.gguf"]])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
                           str(models), "--output_dir", str(out), "--device", "cpu",
                           "--no-progress"], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=hub.env(hub.cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {p.name: pd.read_csv(p) for p in out.glob("*.csv")}
    assert sorted(results) == ["org--tiny-GGUF+Q8_0.csv", "org--tiny-GGUF+tiny.Q4_0.gguf.csv"]
    assert set(results["org--tiny-GGUF+Q8_0.csv"].storage) == {"Q8_0"}
    assert set(results["org--tiny-GGUF+tiny.Q4_0.gguf.csv"].storage) == {"Q4_0"}
    gets = {s.filename for s in hub.log if s.method == "GET" and s.range is None
            and (s.filename or "").endswith(".gguf")}
    assert gets == {"tiny.Q8_0.gguf", "tiny.Q4_0.gguf"}, "each file fetched for its own row"
