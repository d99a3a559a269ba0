"""--delta across reruns of the runner: what a failed delta leaves of its model's own result,
and how the model is counted and recorded."""

from __future__ import annotations

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
