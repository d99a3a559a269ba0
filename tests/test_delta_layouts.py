"""The delta view over checkpoints whose layout differs from their source's: each fine-tune
tensor is read once for its result and its delta, whichever source tensors it pairs with."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.loader_fixtures import llama, save_model, write_safetensors
from tests.test_delta import fused_mixtral


def counted_reads(monkeypatch) -> Counter:
    from esd_experiment.formats.checkpoint import CheckpointReader

    reads: Counter = Counter()
    real_get = CheckpointReader.get

    def counting_get(self, name):
        reads[(self.model_id, name)] += 1
        return real_get(self, name)

    monkeypatch.setattr(CheckpointReader, "get", counting_get)
    return reads


@pytest.mark.parametrize("layout", ["tied_source", "per_expert_fine_tune"])
def test_each_fine_tune_tensor_is_read_once_when_one_source_tensor_serves_several(
        tmp_path, monkeypatch, layout):
    """One source tensor paired with several fine-tune tensors (the embedding of a tied source
    with the fine-tune's embedding and lm_head; a fused expert stack with each expert's
    matrices): the fine-tune's tensors are read once each, for its result and its delta (a
    second read would find a shard that --cleanup_cache deleted after the first)."""
    from esd_experiment.run import worker as esd_worker
    from tests.zoo_published import build

    if layout == "tied_source":
        save_model(llama(tie_word_embeddings=True), tmp_path / "source")
        save_model(llama(seed=1), tmp_path / "ft")
    else:
        published, per_expert = build("mixtral", tmp_path)
        write_safetensors(tmp_path / "source", fused_mixtral(published.values),
                          published.config)
        (tmp_path / "ft").symlink_to(per_expert)
    reads = counted_reads(monkeypatch)
    ft = str(tmp_path / "ft")
    assert esd_worker.main([*map(str, ["--model_id", ft, "--source_model", tmp_path / "source",
                                       "--output_dir", tmp_path / "out", "--device", "cpu",
                                       "--delta"])]) == 0
    mine = {name: n for (model, name), n in reads.items() if model == ft}
    assert mine and max(mine.values()) == 1, Counter(mine).most_common(3)
