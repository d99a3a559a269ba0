"""LoRA adapters of a task model (sequence classification) over a base published without its
head: the head peft saves, and the layers the task model adds at random. peft's
merge_and_unload() of the task model built from the base is the oracle."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)

from esd_experiment import analyze
from esd_experiment.loader.opener import ModelRequest, open_model
from tests.loader_fixtures import save_adapter, save_model
from tests.test_lora_merge import MERGE_TOLERANCE


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def merged_by_peft(task_class, base_dir, adapter) -> dict:
    torch.manual_seed(5)  # the head's layers the base lacks: at random, as peft builds them
    model = task_class.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_a_roberta_classifier_head_saved_by_peft_is_part_of_the_merged_model(tmp_path):
    """peft saves RoBERTa's ``classifier`` head (``modules_to_save``, the default of SEQ_CLS) as
    ``classifier.dense`` and ``classifier.out_proj``: the modules inside the one saved."""
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=40, num_labels=3, pad_token_id=1)
    base_dir = save_model(RobertaForMaskedLM(config), tmp_path / "roberta")  # as published
    task = RobertaForSequenceClassification.from_pretrained(str(base_dir))
    adapter = save_adapter(task, tmp_path / "lora", str(base_dir), r=4, lora_alpha=8,
                           task_type="SEQ_CLS", target_modules=["query", "value"])
    merged = merged_by_peft(RobertaForSequenceClassification, base_dir, adapter)
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    head = ["classifier.dense.weight", "classifier.out_proj.weight"]
    assert set(head) <= set(ours)
    for name, value in ours.items():
        ref = merged[name if name in merged else f"roberta.{name}"]
        diff = (value.float() - ref.float()).abs().max().item()
        assert diff <= MERGE_TOLERANCE, (name, diff)


def test_a_lora_on_a_layer_the_task_model_adds_at_random_is_left_out_with_a_warning(
        tmp_path, caplog):
    """DeBERTa-v3 is published without the classifier's pooler; ``all-linear`` puts a LoRA on
    it, whose merged value depends on a random start. That layer is left out with one
    warning, and every other layer is merged as peft merges it (the model is not lost)."""
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=32, num_labels=2, pooler_hidden_size=16)
    base_dir = save_model(DebertaV2Model(config), tmp_path / "deberta")
    task = DebertaV2ForSequenceClassification.from_pretrained(str(base_dir))
    adapter = save_adapter(task, tmp_path / "lora", str(base_dir), r=4, lora_alpha=8,
                           task_type="SEQ_CLS", target_modules="all-linear")
    merged = merged_by_peft(DebertaV2ForSequenceClassification, base_dir, adapter)
    with caplog.at_level("WARNING"):
        ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    assert "pooler.dense" in caplog.text and "initialised at random" in caplog.text
    assert not any(n.startswith("pooler.") for n in ours)
    for name, value in ours.items():
        ref = merged[name if name in merged else f"deberta.{name}"]
        diff = (value.float() - ref.float()).abs().max().item()
        assert diff <= MERGE_TOLERANCE, (name, diff)
    rows = analyze(str(adapter), delta=True, device="cpu")
    assert (rows.loc[rows.longname.str.endswith("query_proj"), "matrix_rank"] == 4).all()


def test_peft_s_own_merge_leaves_out_the_layers_the_task_model_adds_at_random(tmp_path, caplog):
    """A DoRA adapter (merged by peft itself) of a 3-label BERT classifier over a base
    published as ``BertForMaskedLM`` (no pooler): the classifier's pooler starts at random in
    every run, so it is left out with one warning, and the rows are the same from run to run."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    base_dir = save_model(BertForMaskedLM(config), tmp_path / "bert")
    task = BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=3)
    adapter = save_adapter(task, tmp_path / "dora", str(base_dir), r=4, lora_alpha=8,
                           use_dora=True, task_type="SEQ_CLS", target_modules=["query", "value"])
    runs = []
    for _ in range(2):
        with caplog.at_level("WARNING"):
            runs.append(dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors()))
    assert "bert.pooler.dense.weight" not in runs[0] and "initialised at random" in caplog.text
    assert runs[0]["classifier.weight"].shape == (3, 16)  # saved whole by the adapter, for
    # its three labels (the model is built with them, as its trainer built it): determined
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_a_classifier_adapter_of_a_tied_base_saving_the_embedding_has_no_lm_head(tmp_path):
    """A SEQ_CLS adapter that trains a copy of a tied embedding: peft's classifier has no
    ``lm_head`` to keep the original under."""
    from transformers import LlamaForSequenceClassification

    from tests.loader_fixtures import llama

    base_dir = save_model(llama(tie_word_embeddings=True), tmp_path / "llama")
    task = LlamaForSequenceClassification.from_pretrained(str(base_dir), num_labels=2)
    task.config.pad_token_id = 0
    adapter = save_adapter(task, tmp_path / "lora", str(base_dir), r=4, lora_alpha=8,
                           task_type="SEQ_CLS", target_modules=["q_proj"],
                           modules_to_save=["embed_tokens"])
    merged = merged_by_peft(LlamaForSequenceClassification, base_dir, adapter)
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    assert "lm_head.weight" not in ours and set(ours) == set(merged)
    for name, value in ours.items():
        diff = (value.float() - merged[name].float()).abs().max().item()
        assert diff <= MERGE_TOLERANCE, (name, diff)


def test_peft_s_own_merge_of_a_causal_lm_adapter_over_a_bare_base_loads_every_tensor(tmp_path):
    """A DoRA adapter (no task type) of a causal LM whose base is saved as the bare
    ``LlamaModel``: built as the base's class, none of the adapter's ``model.layers`` keys
    would load (peft only warns) and the merged model would be the base; it is built as the
    causal LM instead, as the adapter's trainer built it."""
    from transformers import AutoModelForCausalLM

    from tests.loader_fixtures import llama

    base_dir = save_model(llama().model, tmp_path / "bare")  # LlamaModel: layers.N...
    causal = AutoModelForCausalLM.from_pretrained(str(base_dir))
    adapter = save_adapter(causal, tmp_path / "dora", str(base_dir), r=4, lora_alpha=8,
                           use_dora=True, target_modules=["q_proj"])
    merged = merged_by_peft(AutoModelForCausalLM, base_dir, adapter)
    ours = dict(open_model(ModelRequest(str(adapter), "adapter")).iter_tensors())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], causal.state_dict()[name])
    diff = (ours[name].float() - merged[name].float()).abs().max().item()
    assert diff <= MERGE_TOLERANCE, diff
    assert "lm_head.weight" not in ours  # the bare base has none: at random, left out
