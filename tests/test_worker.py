"""The worker on tiny real models built by the demo: rows, adapters, eigenvalues, failures."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from esd_experiment.core.results import (
    EIGS_LAYERS_KEY,
    EIGS_OPTIONS_KEY,
    RESULT_COLUMNS,
    eigs_options,
)
from esd_experiment.estimator.net_esd import ESDConfig, iter_layer_results
from esd_experiment.report import cli as esd_report
from esd_experiment.run import worker as esd_worker
from esd_experiment.run.demo import build_demo_zoo
from esd_experiment.run.devices import parallel_layer_results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    build_demo_zoo(root)
    return root


def run_worker(*argv):
    return esd_worker.main([*map(str, argv), "--device", "cpu"])


def test_worker_writes_one_row_per_matrix(zoo, tmp_path):
    assert run_worker("--model_id", zoo / "tiny-llama", "--output_dir", tmp_path) == 0
    (csv,) = tmp_path.glob("*.csv")
    df = pd.read_csv(csv, keep_default_na=False)
    assert tuple(df.columns) == RESULT_COLUMNS
    # 2 layers x (4 attention + 3 MLP) + embed_tokens + lm_head; norms are 1-D and skipped
    assert len(df) == 2 * 7 + 2
    assert df.layer_id.tolist() == list(range(len(df)))
    assert set(df.layer_type) == {"linear", "embedding", "lm_head"}
    assert (df.status == "ok").all()
    assert (df.model_id == str(zoo / "tiny-llama")).all()
    assert (df.revision == "").all() and (df.source_model == "").all()
    # rows follow the model's depth: embedding, blocks 0..n, then the head
    assert df.longname.iloc[0] == "model.embed_tokens" and df.longname.iloc[-1] == "lm_head"
    blocks = df.block.replace("", -1).astype(int).tolist()
    assert blocks[1:-1] == sorted(blocks[1:-1]) and blocks[0] == blocks[-1] == -1
    assert df.longname.iloc[1] == "model.layers.0.self_attn.q_proj"
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("*.failure.json"))


def test_threads_flag_reaches_torch_and_blas_without_importing_torch_first(zoo, tmp_path):
    """``--threads N`` holds for torch and the eigensolver's BLAS, while torch's import (about
    a second) is left to overlap the first downloads rather than precede them."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.pop(var, None)
        from esd_experiment.run import worker as esd_worker
        from esd_experiment.estimator import lapack as esd_lapack
        from esd_experiment.estimator.options import ESDConfig
        seen = {{}}
        real = esd_worker.run_job
        def run_job(config, stage):
            seen["torch before the job"] = "torch" in sys.modules
            return real(config, stage)
        esd_worker.run_job = run_job
        code = esd_worker.main(["--model_id", {str(zoo / "tiny-llama")!r}, "--output_dir",
                                {str(tmp_path)!r}, "--device", "cpu", "--threads", "1"])
        import torch
        print(code, seen["torch before the job"], torch.get_num_threads(),
              esd_lapack.blas_threads())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "False", "1", "1"]


def test_adapter_row_records_base_and_differs_from_base(zoo, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    assert run_worker("--model_id", zoo / "tiny-llama", "--output_dir", base_dir) == 0
    assert run_worker("--model_id", zoo / "tiny-llama-lora", "--base_model_relation", "adapter",
                      "--source_model", zoo / "tiny-llama", "--output_dir", adapter_dir) == 0
    base = pd.read_csv(next(base_dir.glob("*.csv"))).set_index("longname")
    merged = pd.read_csv(next(adapter_dir.glob("*.csv"))).set_index("longname")
    assert (merged.source_model == str(zoo / "tiny-llama")).all()
    changed = merged.index[merged.norm != base.norm.loc[merged.index]]
    assert sorted(changed) == sorted(n for n in base.index if n.endswith(("q_proj", "v_proj")))


def test_save_eigs_matches_rows(zoo, tmp_path):
    assert run_worker("--model_id", zoo / "tiny-gpt2", "--output_dir", tmp_path, "--save_eigs") == 0
    df = pd.read_csv(next(tmp_path.glob("*.csv")))
    with np.load(next(tmp_path.glob("*.eigs.npz"))) as eigs:
        assert set(eigs.files) == set(df.longname[df.status == "ok"]) | {EIGS_OPTIONS_KEY,
                                                                        EIGS_LAYERS_KEY}
        assert list(eigs[EIGS_LAYERS_KEY]) == list(df.longname)
        assert str(eigs[EIGS_OPTIONS_KEY]) == df.esd_options[0] == ESDConfig().options_key
        for _, row in df[df.status == "ok"].iterrows():
            evals = eigs[row.longname]
            assert len(evals) == row.num_evals
            assert evals.max() == pytest.approx(row.spectral_norm, rel=1e-12)


def test_missing_model_fails_with_record(tmp_path):
    missing = tmp_path / "no-such-model"
    missing.mkdir()
    code = run_worker("--model_id", missing, "--output_dir", tmp_path / "out")
    assert code == esd_worker.EXIT_FAILED
    (record,) = (tmp_path / "out" / "logs").glob("*.failure.json")
    failure = json.loads(record.read_text())
    assert failure["transient"] is False
    assert str(missing) in failure["message"]
    assert not list((tmp_path / "out").glob("*.csv"))


def test_failure_keeps_earlier_result(zoo, tmp_path):
    """A model that broke after an earlier success keeps its complete earlier CSV."""
    model = tmp_path / "model"
    shutil.copytree(zoo / "tiny-gpt2", model)
    out = tmp_path / "out"
    assert run_worker("--model_id", model, "--output_dir", out) == 0
    (csv,) = out.glob("*.csv")
    before = csv.read_bytes()
    (model / "model.safetensors").write_bytes(b"garbage, not a safetensors file")
    assert run_worker("--model_id", model, "--output_dir", out) == esd_worker.EXIT_FAILED
    assert csv.read_bytes() == before


def test_parallel_layers_match_serial(tmp_path):
    """The multi-device path returns the serial rows, in order, with the same layer ids."""
    g = torch.Generator().manual_seed(0)
    tensors = [(f"layers.{i}.w.weight", torch.randn(40 + i, 30, generator=g)) for i in range(7)]
    tensors.insert(3, ("experts.weight", torch.randn(3, 20, 16, generator=g)))
    tensors.insert(5, ("norm.weight", torch.ones(30)))
    config = ESDConfig()
    serial = [r.row for r in iter_layer_results(iter(tensors), config)]
    parallel = [r.row for r in parallel_layer_results(iter(tensors), config,
                                                                 ["cpu", "cpu", "cpu"])]
    assert pd.DataFrame(parallel).equals(pd.DataFrame(serial))


def test_parallel_layers_propagate_errors():
    def stream():
        yield "a.weight", torch.randn(20, 20)
        raise RuntimeError("shard vanished")

    with pytest.raises(RuntimeError, match="shard vanished"):
        list(parallel_layer_results(stream(), ESDConfig(), ["cpu", "cpu"]))


def test_parallel_esd_failure_exits_cleanly_without_abort(tmp_path):
    """A failing layer ends the analysis; threads still inside torch are joined first, so the
    process exits with its own code instead of being aborted (SIGABRT reads as transient)."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from esd_experiment.estimator.options import ESDConfig
        from esd_experiment.run.devices import parallel_layer_results
        big = torch.randn(1500, 800)
        stream = [("a.weight", big), ("b.weight", "not a tensor"), ("c.weight", big),
                  ("d.weight", big), ("e.weight", big)]
        try:
            list(parallel_layer_results(stream, ESDConfig(), ["cpu", "cpu"]))
        except TypeError:
            sys.exit(3)
    """))
    for _ in range(2):  # the abort depended on timing; it showed every time before the fix
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 3, proc.stderr[-500:]


def test_one_job_analyses_a_base_and_its_adapters_in_one_pass(zoo, tmp_path):
    """A base and its adapters in one job: each gets its own CSV, equal to a run of its own,
    and a broken adapter fails alone."""
    broken = tmp_path / "broken-adapter"
    shutil.copytree(zoo / "tiny-llama-lora", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 32)
    together, alone = tmp_path / "together", tmp_path / "alone"
    code = run_worker("--model_id", zoo / "tiny-llama", zoo / "tiny-llama-lora", broken,
                      "--source_model", zoo / "tiny-llama", "--base_model_relation", "adapter",
                      "--output_dir", together)
    assert code == esd_worker.EXIT_FAILED
    for model in ("tiny-llama", "tiny-llama-lora"):
        extra = () if model == "tiny-llama" else ("--source_model", zoo / "tiny-llama")
        assert run_worker("--model_id", zoo / model, *extra, "--output_dir", alone) == 0
    for csv in alone.glob("*.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(csv), pd.read_csv(together / csv.name))
    (record,) = (together / "logs").glob("*.failure.json")
    assert "broken-adapter" in record.name and "CorruptCheckpointError" in record.read_text()
    assert len(list(together.glob("*.csv"))) == 2


def test_a_fine_tune_records_the_source_model_the_list_gives(zoo, tmp_path):
    assert run_worker("--model_id", zoo / "tiny-gpt2", "--source_model", "openai/gpt2",
                      "--output_dir", tmp_path) == 0
    df = pd.read_csv(next(tmp_path.glob("*.csv")))
    assert (df.source_model == "openai/gpt2").all()


# Layers named after np.savez_compressed's own parameters (``file``, ``allow_pickle``).
SAVEZ_NAMES = ("file.weight", "allow_pickle.weight", "layers.0.weight")


def test_save_eigs_keeps_layers_named_like_numpys_parameters(tmp_path):
    from tests.loader_fixtures import write_safetensors

    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(24, 16, generator=gen, dtype=torch.float64)
               for name in SAVEZ_NAMES}
    model = write_safetensors(tmp_path / "odd-names", weights)
    out = tmp_path / "out"
    assert run_worker("--model_id", model, "--output_dir", out, "--save_eigs") == 0
    df = pd.read_csv(next(out.glob("*.csv")), keep_default_na=False)
    with np.load(next(out.glob("*.eigs.npz")), allow_pickle=False) as eigs:
        assert set(eigs.files) == set(df.longname) | {EIGS_OPTIONS_KEY, EIGS_LAYERS_KEY}
        for row in df.itertuples():  # numpy's own eigenvalues of W^T W are the oracle
            w = weights[f"{row.longname}.weight"].numpy()
            np.testing.assert_allclose(np.sort(eigs[row.longname]),
                                       np.linalg.eigvalsh(w.T @ w), rtol=EIGS_RTOL)
    # The project's own readers: the resume check, and a refit from the saved eigenvalues
    # equal to a run with the new options.
    assert eigs_options(next(out.glob("*.eigs.npz"))) == df.esd_options[0]
    refit, direct = tmp_path / "refit", tmp_path / "direct"
    assert esd_report.main(["refit", str(out), "--output_dir", str(refit),
                            "--xmin_pos", "3"]) == 0
    assert run_worker("--model_id", model, "--output_dir", direct, "--save_eigs",
                      "--xmin_pos", "3") == 0
    (csv,) = direct.glob("*.csv")
    assert (refit / csv.name).read_bytes() == csv.read_bytes()


# float64 eigenvalues of a 24x16 matrix by two LAPACK routes agree to ~1e-13 relative.
EIGS_RTOL = 1e-9


def test_a_model_whose_result_cannot_be_written_fails_alone(zoo, tmp_path):
    from esd_experiment.core.paths import model_paths

    out = tmp_path / "out"
    base, adapter = (model_paths(out, str(zoo / m)) for m in ("tiny-llama", "tiny-llama-lora"))
    base.eigs.mkdir(parents=True)  # a directory where the base's eigenvalues go
    code = run_worker("--model_id", zoo / "tiny-llama", zoo / "tiny-llama-lora",
                      "--source_model", zoo / "tiny-llama", "--base_model_relation", "adapter",
                      "--output_dir", out, "--save_eigs")
    assert code == esd_worker.EXIT_FAILED
    assert list(out.glob("*.csv")) == [adapter.csv] and adapter.eigs.is_file()
    assert not adapter.failure.exists() and base.failure.is_file()
    assert base.eigs.name in base.failure.read_text()


def test_on_devices_hands_over_any_exception_of_a_layer():
    """An exception that is no ``Exception`` (SystemExit, KeyboardInterrupt raised by code the
    estimator calls) comes back with its item like any other: the consumer waited forever."""
    import threading

    from esd_experiment.run.devices import on_devices

    def solve(item, device):
        if item == 1:
            raise KeyboardInterrupt("from a layer")
        return item * 10

    got = []
    thread = threading.Thread(target=lambda: got.extend(on_devices(solve, range(3), ["cpu"])),
                              daemon=True)
    thread.start()
    thread.join(timeout=30)  # seconds: the three items take milliseconds
    assert not thread.is_alive(), "on_devices waits for an item that never comes"
    assert [item for item, _ in got] == [0, 1, 2]
    assert got[0][1] == 0 and got[2][1] == 20 and isinstance(got[1][1], KeyboardInterrupt)
