"""LoRA adapters of a base whose vocabulary was resized for new tokens: peft saves the resized
embedding and head in the adapter (``modules_to_save``, or ``save_embedding_layers`` when the
embedding carries a LoRA), and its merge_and_unload() of the resized base is the oracle."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from esd_experiment import analyze
from esd_experiment.loader.opener import ModelRequest, open_model
from tests.loader_fixtures import VOCAB, llama, save_adapter, save_model
from tests.test_lora_merge import MERGE_TOLERANCE

NEW_VOCAB = VOCAB + 6  # six added tokens

CASES = {
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "embedding_lora": dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_adapter_of_a_resized_vocabulary_merges_as_peft_merges_it(tmp_path, case):
    base = llama()
    base_dir = save_model(base, tmp_path / "base")
    resized = llama()
    resized.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
    adapter = save_adapter(resized, tmp_path / "adapter", str(base_dir), r=4, lora_alpha=8,
                           **CASES[case])
    oracle = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    oracle.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
    merged = PeftModel.from_pretrained(oracle, str(adapter)).merge_and_unload().state_dict()
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    assert set(ours) == set(base.state_dict())
    assert ours["model.embed_tokens.weight"].shape == (NEW_VOCAB, base.config.hidden_size)
    for name, value in ours.items():
        diff = (value.float() - merged[name].float()).abs().max().item()
        assert diff <= MERGE_TOLERANCE, (name, diff)
    # the delta view: the layers of equal shape; the resized ones have no row (as a full
    # fine-tune's), and every LoRA'd layer of equal shape has its s·B·A
    rows = analyze(str(adapter), delta=True, device="cpu").set_index("longname")
    assert "model.embed_tokens" not in rows.index and "lm_head" not in rows.index
    assert (rows.loc[[n for n in rows.index if n.endswith("q_proj")], "matrix_rank"] == 4).all()
