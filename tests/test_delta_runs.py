"""--delta across reruns of the runner: what a failed delta leaves of its model's own result,
and how the model is counted and recorded."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pandas as pd
import pytest
import torch

from esd_experiment.core.paths import ModelPaths
from tests.loader_fixtures import llama, save_model


def runner(*argv) -> int:
    from esd_experiment.run import cli

    return cli.main([*map(str, argv), "--device", "cpu", "--no-progress"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and a full fine-tune of it, saved as checkpoints."""
    root = tmp_path_factory.mktemp("delta_runs")
    base = llama()
    save_model(base, root / "base")
    with torch.no_grad():
        for param in base.parameters():
            param.add_(0.1 * torch.randn_like(param))
    save_model(base, root / "ft")
    return root


def test_overwrite_keeps_the_result_it_wrote_when_only_the_delta_fails(pair, tmp_path):
    """Under --overwrite --delta a fine-tune whose source cannot be read is recorded failed
    with that cause; the result the run computed for it stays (only an old one is dropped)."""
    models = tmp_path / "models.csv"
    models.write_text("model_id,base_model_relation,source_model\n"
                      f"{pair / 'ft'},,{pair / 'missing'}\n")
    out = tmp_path / "out"
    args = ("--model_list", models, "--output_dir", out, "--delta")
    result = ModelPaths.for_model(out, str(pair / "ft")).csv
    assert runner(*args) == 1
    assert result.is_file() and not (out / "delta" / result.name).exists()
    first = result.stat().st_mtime_ns
    assert runner(*args, "--overwrite") == 1
    failed = (out / "failed_models.txt").read_text()
    assert f"{pair / 'ft'}\t" in failed and "--delta" in failed and "missing" in failed
    assert result.is_file(), "the fine-tune's own result, written by this run, was removed"
    assert result.stat().st_mtime_ns != first  # this run's, not the old one


def test_a_source_listed_at_a_tag_is_read_once_for_its_fine_tune(hub, pair, tmp_path,
                                                                  monkeypatch):
    """A base listed as org/base@v1 and a fine-tune whose source_model is org/base@v1 share
    one job; the worker reads each base tensor once, for the base's result and the delta."""
    from esd_experiment.run import worker as esd_worker
    from tests.test_delta import counted_reads

    hub.add_repo("org/base", pair / "base", tags=["v1"])
    hub.add_repo("org/ft", pair / "ft")
    reads = counted_reads(monkeypatch)
    out = tmp_path / "out"
    assert esd_worker.main(["--model_id", "org/base@v1", "org/ft", "--source_model",
                            "org/base@v1", "--base_model_relation", "", "--output_dir",
                            str(out), "--device", "cpu", "--delta"]) == 0
    base = Counter({name: n for (model, name), n in reads.items()
                    if model.startswith("org/base@")})
    assert base and max(base.values()) == 1, base.most_common(3)
    delta = ModelPaths.for_model(out / "delta", "org/ft").csv
    assert delta.is_file()


def test_limit_cutting_a_group_says_what_it_left_and_a_rerun_finishes_it(pair, tmp_path,
                                                                         caplog):
    """--limit 1 on a base and its fine-tune runs the base alone and says the fine-tune was
    left by --limit; the rerun without it computes the fine-tune and its delta, the base's
    result left as it is."""
    models = tmp_path / "models.csv"
    models.write_text("model_id,base_model_relation,source_model\n"
                      f"{pair / 'base'},,\n{pair / 'ft'},,{pair / 'base'}\n")
    out = tmp_path / "out"
    args = ("--model_list", models, "--output_dir", out, "--delta")
    base, ft = (ModelPaths.for_model(out, str(pair / n)).csv for n in ("base", "ft"))
    with caplog.at_level(logging.INFO):
        assert runner(*args, "--limit", "1") == 0
    assert base.is_file() and not ft.exists()
    said = [r.getMessage() for r in caplog.records if "--limit 1" in r.getMessage()]
    assert said and "1 model" in said[0], [r.getMessage() for r in caplog.records]
    written = base.stat().st_mtime_ns
    assert runner(*args) == 0
    assert ft.is_file() and (out / "delta" / ft.name).is_file()
    assert base.stat().st_mtime_ns == written


def test_a_new_metric_on_saved_eigenvalues_reloads_no_model_and_fills_the_delta(pair,
                                                                                 tmp_path,
                                                                                 caplog):
    """With --save_eigs, a rerun that only adds a metric computes it from the saved
    eigenvalues for the results and the deltas alike: no job runs."""
    import numpy as np
    import pandas as pd

    models = tmp_path / "models.csv"
    models.write_text("model_id,base_model_relation,source_model\n"
                      f"{pair / 'base'},,\n{pair / 'ft'},,{pair / 'base'}\n")
    (tmp_path / "top.py").write_text(
        "def top(evals):\n    return {'top': float(evals[-1])}\n")
    out = tmp_path / "out"
    args = ("--model_list", models, "--output_dir", out, "--delta", "--save_eigs")
    assert runner(*args) == 0
    with caplog.at_level(logging.INFO):
        assert runner(*args, "--metric", f"{tmp_path / 'top.py'}:top", "--overwrite") == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "0 to run, 2 computed from saved eigenvalues" in said, said
    delta = out / "delta" / ModelPaths.for_model(out, str(pair / "ft")).csv.name
    frame = pd.read_csv(delta)
    saved = np.load(delta.with_name(delta.stem + ".eigs.npz"))
    fitted = frame[frame["longname"].isin(saved.files)]
    assert len(fitted) >= 14
    for name, top in zip(fitted["longname"], fitted["top"], strict=True):
        assert top == saved[name].max(), name  # the same float64 value, written and read back


def test_a_rerun_solves_only_the_delta_of_a_model_whose_result_is_current(pair, tmp_path,
                                                                          monkeypatch):
    """A fine-tune whose delta failed after its own result was written: the rerun's job (the
    runner passes --keep_current) writes the delta and solves none of the fine-tune's own
    layers again; a job told to recompute (--overwrite: no --keep_current) solves them."""
    from esd_experiment.run import worker as esd_worker

    out = tmp_path / "out"
    argv = ["--model_id", str(pair / "ft"), "--output_dir", str(out), "--device", "cpu",
            "--delta"]
    assert esd_worker.main([*argv, "--keep_current", "--source_model", str(pair / "missing")]
                           ) != esd_worker.EXIT_OK
    result = ModelPaths.for_model(out, str(pair / "ft")).csv
    written = result.read_bytes()
    own = []
    solve = esd_worker.layer_results
    monkeypatch.setattr(esd_worker, "layer_results",
                        lambda item, *rest: own.append(item[0]) or solve(item, *rest))
    assert esd_worker.main([*argv, "--keep_current", "--source_model", str(pair / "base")]
                           ) == esd_worker.EXIT_OK
    assert (out / "delta" / result.name).is_file() and result.read_bytes() == written
    assert own == []
    # A kept result removed while the job runs: the model is to be run again, not lost.
    (out / "delta" / result.name).unlink()
    analyse = esd_worker.analyse
    monkeypatch.setattr(esd_worker, "analyse",
                        lambda *a: (analyse(*a), result.unlink()) and None)
    assert esd_worker.main([*argv, "--keep_current", "--source_model", str(pair / "base")]
                           ) == esd_worker.EXIT_TRANSIENT
    record = json.loads(ModelPaths.for_model(out, str(pair / "ft")).failure.read_text())
    assert record["transient"] and "changed while the job ran" in record["message"]
    monkeypatch.setattr(esd_worker, "analyse", analyse)
    assert esd_worker.main([*argv, "--source_model", str(pair / "base")]) == esd_worker.EXIT_OK
    assert len(own) > 10  # the control: its own layers, solved when the result is redone


def test_a_fine_tune_sharded_by_blocks_holds_two_shards_in_its_sources_pass(hub, tmp_path,
                                                                           monkeypatch):
    """Under --cleanup_cache a fine-tune whose shards differ from its source's (one shard per
    block, against a source in one file that safetensors orders by name: lm_head first) is
    read in the source's pass, its shards fetched in the order the pass takes them, each held
    from the first tensor the pass takes from it to the last, its norms read beside their
    file's last paired tensor (docs/hub.md): never more than two of its shards on disk at
    once, the delta complete, and the cache empty afterwards."""
    from esd_experiment.formats import stream
    from esd_experiment.run import worker as esd_worker
    from tests.loader_fixtures import write_sharded

    base, ft = llama(num_hidden_layers=4), llama(seed=1, num_hidden_layers=4)
    save_model(base, tmp_path / "base")
    values = {n: v.detach() for n, v in ft.state_dict().items()}
    shards: dict[str, dict] = {}
    for name, value in values.items():
        block = name.split(".")[2] if name.startswith("model.layers.") else (
            "0" if "embed" in name else "3")  # the embedding with block 0, the head with 3
        shards.setdefault(f"model-{int(block) + 1:05d}-of-00004.safetensors", {})[name] = value
    write_sharded(tmp_path / "ft", shards, ft.config.to_dict())
    hub.add_repo("org/base", tmp_path / "base")
    hub.add_repo("org/ft", tmp_path / "ft")
    monkeypatch.setattr("esd_experiment.loader.opener.AHEAD_MEMORY_BYTES", 0)  # all on disk
    held: dict[frozenset, int] = {}  # the most files on disk at once, by checkpoint
    start = stream.ShardFetcher._start_locked

    def counted_start(self, file):
        future = start(self, file)
        key = frozenset(self.order)
        held[key] = max(held.get(key, 0), len(self._held_on_disk()))
        return future

    monkeypatch.setattr(stream.ShardFetcher, "_start_locked", counted_start)
    out = tmp_path / "out"
    assert esd_worker.main(["--model_id", "org/base", "org/ft", "--source_model", "org/base",
                            "--base_model_relation", "", "--output_dir", str(out),
                            "--device", "cpu", "--delta", "--cleanup_cache"]) == 0
    ft_held = held[frozenset(shards)]
    assert ft_held <= stream.MAX_HELD, held
    delta = pd.read_csv(ModelPaths.for_model(out / "delta", "org/ft").csv)
    assert len(delta) == len([n for n, v in values.items() if v.dim() == 2])
    assert (delta["status"] == "ok").all()
    assert not list(hub.cache.glob("models--*/blobs/*")), "--cleanup_cache left shards behind"


def test_a_base_of_adapters_that_is_a_fine_tune_is_read_for_both_under_cleanup(hub, tmp_path):
    """A list row that is a fine-tune of S (its source_model) and the base of adapters: under
    --delta --cleanup_cache its job reads it in S's pass (for its result and delta) and as the
    adapters' base; the shards the first read releases are not gone for the second. Every
    result and delta is written, and the cache is empty afterwards."""
    from esd_experiment.run import worker as esd_worker
    from tests.loader_fixtures import save_adapter

    source, base = llama(), llama(seed=1)
    hub.add_repo("org/S", save_model(source, tmp_path / "S"))
    hub.add_repo("org/B", save_model(base, tmp_path / "B", max_shard_size="60KB"))
    hub.add_repo("org/A", save_adapter(base, tmp_path / "A", "org/B", r=4,
                                       target_modules=["q_proj"]))
    out = tmp_path / "out"
    code = esd_worker.main(["--model_id", "org/B", "org/A", "--source_model", "org/B",
                            "--base_model_relation", "adapter", "--base_source_model", "org/S",
                            "--output_dir", str(out), "--device", "cpu", "--delta",
                            "--cleanup_cache"])
    assert code == esd_worker.EXIT_OK, [p.read_text() for p in out.rglob("*.failed*")]
    for folder, model in ((out, "org/B"), (out, "org/A"), (out / "delta", "org/B")):
        rows = pd.read_csv(ModelPaths.for_model(folder, model).csv)
        assert (rows["status"] == "ok").all() and len(rows) > 10, (folder, model)
    update = pd.read_csv(ModelPaths.for_model(out / "delta", "org/A").csv).set_index("longname")
    q_proj = update.index.str.endswith("q_proj")
    assert q_proj.any() and (update.loc[q_proj, "norm"] > 0).all()
    assert (update.loc[~q_proj, "norm"] == 0).all(), "the layers the adapter leaves alone"
    assert not list(hub.cache.glob("models--*/blobs/*")), "--cleanup_cache left files behind"


def test_a_fine_tune_sharing_only_norms_with_its_source_fails_with_that_cause(pair, tmp_path):
    """Every weight matrix of another shape than the source's (the norms alike): the model
    fails with the delta's own cause, its result kept."""
    other = save_model(llama(seed=6, head_dim=16, intermediate_size=96, vocab_size=100),
                       tmp_path / "other")
    models = tmp_path / "models.csv"
    models.write_text(f"model_id,base_model_relation,source_model\n{other},,{pair / 'base'}\n")
    out = tmp_path / "out"
    assert runner("--model_list", models, "--output_dir", out, "--delta") == 1
    failed = (out / "failed_models.txt").read_text()
    assert "--delta: no weight of it has a tensor of the same name and shape" in failed, failed
    assert ModelPaths.for_model(out, str(other)).csv.is_file()


@pytest.mark.parametrize("spelled", ["", "/"])
def test_a_model_listed_as_its_own_source_is_analysed_without_a_delta(pair, tmp_path, spelled,
                                                                      caplog):
    """A row naming the model itself as its source_model: the model is analysed as one without a source, said once; it has no delta (all zeros).
    It failed without its own result."""
    models = tmp_path / "models.csv"
    models.write_text("model_id,base_model_relation,source_model\n"
                      f"{pair / 'ft'},,{pair / 'ft'}{spelled}\n{pair / 'base'},,\n")
    out = tmp_path / "out"
    assert runner("--model_list", models, "--output_dir", out, "--delta") == 0
    result = ModelPaths.for_model(out, str(pair / "ft")).csv
    assert result.is_file() and not (out / "delta" / result.name).exists()
    assert (pd.read_csv(result, keep_default_na=False)["source_model"] == "").all()
    assert f"{pair / 'ft'} names itself as its source_model" in caplog.text
    assert ModelPaths.for_model(out, str(pair / "base")).csv.is_file()
    assert runner("--model_list", models, "--output_dir", out, "--delta") == 0  # done


def test_an_adapter_naming_itself_as_its_source_fails_with_that_cause(pair, tmp_path):
    """An adapter cannot be its own base: under --delta its row fails with that cause, however
    the path is spelled; the other rows run."""
    from tests.loader_fixtures import save_adapter

    lora = save_adapter(llama(), tmp_path / "lora", str(pair / "base"), r=4,
                        target_modules=["q_proj"])
    models = tmp_path / "models.csv"
    models.write_text("model_id,base_model_relation,source_model\n"
                      f"{lora},adapter,{lora}/\n{pair / 'base'},,\n")
    out = tmp_path / "out"
    assert runner("--model_list", models, "--output_dir", out, "--delta") == 1
    failed = (out / "failed_models.txt").read_text()
    assert failed == f"{lora}\t--delta: its source_model is the model itself\n", failed
    assert ModelPaths.for_model(out, str(pair / "base")).csv.is_file()


def test_an_adapter_known_by_its_files_alone_fails_with_its_deltas_cause(pair, tmp_path):
    """A list row that neither marks an adapter nor names its base: its adapter_config.json
    makes it one, and under --delta a delta that fails (DoRA's, which is not s·B·A) fails the
    model with its cause though its own result is written."""
    from tests.loader_fixtures import save_adapter

    base = llama()
    lora = save_adapter(base, tmp_path / "lora", str(pair / "base"), r=4,
                        target_modules=["q_proj"])
    dora = save_adapter(base, tmp_path / "dora", str(pair / "base"), r=4,
                        target_modules=["q_proj"], use_dora=True)
    models = tmp_path / "models.csv"
    models.write_text(f"model_id,base_model_relation,source_model\n{lora},,\n{dora},,\n")
    out = tmp_path / "out"
    args = ("--model_list", models, "--output_dir", out, "--delta")
    assert runner(*args) == 1
    (line,) = (out / "failed_models.txt").read_text().splitlines()
    assert line.startswith(f"{dora}\t") and "merged by peft" in line, line
    assert (out / "delta" / ModelPaths.for_model(out, str(lora)).csv.name).is_file()
    # The rerun holds the failed one to its delta (it fails again, still recorded); the
    # other, done with its delta, is not run again.
    lora_result = ModelPaths.for_model(out, str(lora)).csv
    before = lora_result.stat().st_mtime_ns
    assert runner(*args) == 1
    (line,) = (out / "failed_models.txt").read_text().splitlines()
    assert line.startswith(f"{dora}\t") and "merged by peft" in line, line
    assert lora_result.stat().st_mtime_ns == before


def test_a_source_cleared_from_the_list_leaves_no_delta_due(pair, tmp_path):
    """A result computed when the row named a source records it; once the row no longer
    does, --delta asks for no delta of it (the row, not the old result, says)."""
    models = tmp_path / "models.csv"
    out = tmp_path / "out"
    models.write_text(f"model_id,base_model_relation,source_model\n{pair / 'ft'},,{pair / 'base'}\n")
    assert runner("--model_list", models, "--output_dir", out) == 0
    models.write_text(f"model_id,base_model_relation,source_model\n{pair / 'ft'},,\n")
    assert runner("--model_list", models, "--output_dir", out, "--delta") == 0


def test_a_source_that_is_an_adapter_naming_no_base_is_said_to_be_an_adapter(pair, tmp_path):
    from tests.loader_fixtures import save_adapter

    adapter = save_adapter(llama(), tmp_path / "lora", None, r=4, target_modules=["q_proj"])
    models = tmp_path / "models.csv"
    models.write_text(f"model_id,base_model_relation,source_model\n{pair / 'ft'},,{adapter}\n")
    out = tmp_path / "out"
    assert runner("--model_list", models, "--output_dir", out, "--delta") == 1
    failed = (out / "failed_models.txt").read_text()
    assert f"its source model {adapter} is an adapter, not a full model" in failed, failed
