"""LoRA adapters of a base whose vocabulary was resized for new tokens: peft saves the resized
embedding and head in the adapter (``modules_to_save``, or ``save_embedding_layers`` when the
embedding carries a LoRA), and its merge_and_unload() of the resized base is the oracle."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from esd_experiment import analyze
from esd_experiment.loader.opener import ModelRequest, open_model
from tests.loader_fixtures import VOCAB, gpt2, llama, save_adapter, save_model
from tests.test_lora_merge import MERGE_TOLERANCE

NEW_VOCAB = VOCAB + 6  # six added tokens

CASES = {  # base model, LoRA settings
    "modules_to_save": (llama, dict(target_modules=["q_proj"],
                                    modules_to_save=["embed_tokens", "lm_head"])),
    "embedding_lora": (llama, dict(target_modules=["q_proj", "embed_tokens"],
                                   modules_to_save=["lm_head"])),
    # tied: peft saves the head beside the embedding (save_embedding_layers), one tensor
    "tied_modules_to_save": (partial(llama, tie_word_embeddings=True),
                             dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "gpt2_embedding_lora": (gpt2, dict(target_modules=["c_attn", "wte"],
                                       save_embedding_layers=True)),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_adapter_of_a_resized_vocabulary_merges_as_peft_merges_it(tmp_path, case):
    make, settings = CASES[case]
    base = make()
    base_dir = save_model(base, tmp_path / "base")
    resized = make()
    resized.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
    adapter = save_adapter(resized, tmp_path / "adapter", str(base_dir), r=4, lora_alpha=8,
                           **settings)
    oracle = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    oracle.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
    merged = PeftModel.from_pretrained(oracle, str(adapter)).merge_and_unload().state_dict()
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    tied = {"lm_head.weight"} if base.config.tie_word_embeddings else set()
    assert set(ours) <= set(merged) and set(merged) - set(ours) <= tied  # a tied head: one tensor
    name = next(n for n in ours if n.endswith(("embed_tokens.weight", "wte.weight")))
    assert ours[name].shape == (NEW_VOCAB, base.config.hidden_size)
    for name, value in ours.items():
        ref = merged[name]
        if name == "lm_head.weight" and len(value) == VOCAB:  # a head the adapter does not
            ref = ref[:VOCAB]  # save: the rows the resize adds are random, the others the base's
        assert value.shape == ref.shape, name
        diff = (value.float() - ref.float()).abs().max().item()
        assert diff <= MERGE_TOLERANCE, (name, diff)
    # the delta view: the layers of equal shape; the resized ones have no row (as a full
    # fine-tune's), and every LoRA'd layer of equal shape has its s·B·A
    rows = analyze(str(adapter), delta=True, device="cpu").set_index("longname")
    assert "model.embed_tokens" not in rows.index and "transformer.wte" not in rows.index
    if case == "tied_modules_to_save":  # the head kept as it was beside the trained embedding
        assert rows.loc["lm_head", "norm"] == 0
    else:  # resized, or the embedding itself (GPT-2's head is its wte, saved twice by peft)
        assert "lm_head" not in rows.index
    lora = [n for n in rows.index if n.endswith(("q_proj", "c_attn"))]
    assert lora and (rows.loc[lora, "matrix_rank"] == 4).all()


@pytest.mark.parametrize("resized", ["no", "new_tokens", "first_new_token_saved"])
def test_trainable_tokens_merge_as_peft_merges_them(tmp_path, resized):
    """peft's other way to train added tokens: ``trainable_token_indices``, the embedding rows
    of those tokens saved alone (``token_adapter.trainable_tokens_delta``), merged by peft;
    the rows' count is not the vocabulary's (where peft saves the resized embedding too,
    ``token_adapter.base_layer``, its rows are)."""
    base = llama()
    base_dir = save_model(base, tmp_path / "base")
    model, tokens, save = llama(), [1, 2, 3], "auto"
    if resized != "no":
        model.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
        tokens = list(range(VOCAB, NEW_VOCAB))
    if resized == "first_new_token_saved":  # a vocabulary padded past the tokens trained
        tokens, save = [VOCAB], True
    adapter = save_adapter(model, tmp_path / "adapter", str(base_dir), r=4, lora_alpha=8,
                           save_embedding_layers=save, target_modules=["q_proj"],
                           trainable_token_indices={"embed_tokens": tokens})
    oracle = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if resized != "no":
        oracle.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
    merged = PeftModel.from_pretrained(oracle, str(adapter)).merge_and_unload().state_dict()
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    assert ours["model.embed_tokens.weight"].shape == merged["model.embed_tokens.weight"].shape
    for name, value in ours.items():
        ref = merged[name]
        if name == "lm_head.weight" and resized == "new_tokens":  # not saved: the base's rows, then zeros
            assert not value[VOCAB:].any()  # (where peft's resized base has random ones)
            ref, value = ref[:VOCAB], value[:VOCAB]
        diff = (value.float() - ref.float()).abs().max().item()
        assert diff <= MERGE_TOLERANCE, (name, diff)
