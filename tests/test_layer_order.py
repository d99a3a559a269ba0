"""Depth order of layer names: real save_pretrained checkpoints of tiny models built here,
ranked with their config (meta-device instance) and by the name rule alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from esd_experiment.core import layer_order
from esd_experiment.core.layer_order import block_index, depth_order, in_depth_order, model_order
from esd_experiment.core.naming import is_weight_name, longname_of


def _tiny(name):
    """A tiny model of one family, with fixed seeds (transformers classes, no hub)."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32,
                                                  num_key_value_heads=1,
                                                  tie_word_embeddings=False, **small))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64,
                                                n_positions=32))
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(
            hidden_size=16, intermediate_size=32, max_position_embeddings=32, **small))
    if name == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=16, d_ff=32, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2,
            vocab_size=64))
    if name == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(
            hidden_size=16, intermediate_size=32, num_key_value_heads=1, num_local_experts=3,
            num_experts_per_tok=2, **small))
    if name == "resnet":
        return tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], num_labels=3))
    raise ValueError(name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (checkpoint layer names in file order, config.json, the built model)."""
    out = {}
    for family in ("llama", "gpt2", "bert", "t5", "mixtral", "resnet"):
        model = _tiny(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        with safe_open(str(path / "model.safetensors"), "pt") as fh:
            names = [longname_of(k) for k in fh.keys()
                     if is_weight_name(k) and len(fh.get_slice(k).get_shape()) >= 2]
        config = json.loads((path / "config.json").read_text())
        out[family] = (names, config, model)
    return out


def model_sequence(model, names):
    """The checkpoint's layer names in the order the model defines its parameters."""
    wanted = set(names)
    return [n for n in (longname_of(p) for p, _ in model.named_parameters(remove_duplicate=False))
            if n in wanted]


def ordered(names, config=None):
    ranks = depth_order(names, config)
    assert sorted(ranks.values()) == list(range(len(set(names))))
    return sorted(names, key=ranks.__getitem__)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5", "resnet"])
def test_checkpoint_names_follow_the_model_with_config_and_by_name(saved, family):
    names, config, model = saved[family]
    expected = model_sequence(model, names)
    assert sorted(expected) == sorted(names)  # every checkpoint layer is a model parameter
    assert names != expected                  # the checkpoint itself is not in depth order
    assert ordered(names, config) == expected
    assert ordered(names) == expected         # the name rule agrees on these families


def test_llama_embeddings_first_then_blocks_then_head(saved):
    names, config, _ = saved["llama"]
    seq = ordered(names, config)
    assert seq[0] == "model.embed_tokens" and seq[-1] == "lm_head"
    blocks = [int(n.split(".")[2]) for n in seq[1:-1]]
    assert blocks == sorted(blocks) and set(blocks) == {0, 1}
    assert seq[1:8] == [f"model.layers.0.{p}" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_t5_encoder_before_decoder_and_shared_first(saved):
    names, config, _ = saved["t5"]
    for seq in (ordered(names, config), ordered(names)):
        assert seq[0] == "shared"  # lm_head is tied to it, so not saved
        sides = [n.split(".")[0] for n in seq[1:]]
        assert sides == sorted(sides, key=["encoder", "decoder"].index)
        decoder0 = [n for n in seq if n.startswith("decoder.block.0.")]
        assert decoder0.index("decoder.block.0.layer.1.EncDecAttention.q") < \
            decoder0.index("decoder.block.0.layer.2.DenseReluDense.wi")


def test_bert_pooler_and_classifier_last(saved):
    names, config, _ = saved["bert"]
    seq = ordered(names, config)
    assert seq[0] == "bert.embeddings.word_embeddings"
    assert seq[-2:] == ["bert.pooler.dense", "classifier"]


def test_resnet_classifier_is_last_not_first(saved):
    names, config, _ = saved["resnet"]
    assert names[0] == "classifier.1"  # checkpoint order puts the head first
    seq = ordered(names, config)
    assert seq[0] == "resnet.embedder.embedder.convolution" and seq[-1] == "classifier.1"
    assert block_index("classifier.1") is None


def test_mixtral_legacy_expert_names_take_the_place_of_the_fused_parameters(saved):
    names, config, _ = saved["mixtral"]
    assert any(".block_sparse_moe.experts.0.w1" in n for n in names)  # saved in legacy form
    seq = ordered(names, config)
    assert seq[0] == "model.embed_tokens" and seq[-1] == "lm_head"
    layer0 = [n.removeprefix("model.layers.0.") for n in seq if n.startswith("model.layers.0.")]
    assert layer0[:5] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj", "block_sparse_moe.gate"]
    experts = layer0[5:]
    # gate_up_proj (w1 and w3 of every expert) comes before down_proj (w2), as in the model
    assert [e.rsplit(".", 1)[1] for e in experts] == ["w1", "w3"] * 3 + ["w2"] * 3
    assert seq.index("model.layers.0.block_sparse_moe.experts.2.w2") < \
        seq.index("model.layers.1.self_attn.q_proj")
    by_rule = ordered(names)  # the rule keeps each expert's matrices together
    assert by_rule.index("model.layers.0.block_sparse_moe.gate") < \
        by_rule.index("model.layers.0.block_sparse_moe.experts.0.w1") < \
        by_rule.index("model.layers.1.self_attn.q_proj")


def test_fused_expert_rows_and_packed_weights(saved):
    _, config, _ = saved["mixtral"]
    names = ["lm_head", "model.layers.1.self_attn.q_proj", "model.embed_tokens"]
    names += [f"model.layers.0.mlp.experts.{p}[{e}]" for p in ("down_proj", "gate_up_proj")
              for e in (2, 0, 1)]
    names += ["model.layers.0.self_attn.q_proj.qweight", "model.layers.0.mlp.gate"]
    seq = ordered(names, config)
    assert seq == [
        "model.embed_tokens",
        # no parameter of that name: where the weight of its module, q_proj, would be
        "model.layers.0.self_attn.q_proj.qweight",
        "model.layers.0.mlp.gate",
        *[f"model.layers.0.mlp.experts.gate_up_proj[{e}]" for e in range(3)],
        *[f"model.layers.0.mlp.experts.down_proj[{e}]" for e in range(3)],
        "model.layers.1.self_attn.q_proj", "lm_head",
    ]


def test_checkpoint_of_the_base_class_matches_the_head_class(saved):
    """A checkpoint saved from LlamaModel lacks the ``model.`` prefix LlamaForCausalLM has."""
    names, config, model = saved["llama"]
    bare = [n.removeprefix("model.") for n in names if n != "lm_head"]
    expected = [n.removeprefix("model.") for n in model_sequence(model, names) if n != "lm_head"]
    assert ordered(bare, config) == expected


def test_unknown_or_remote_code_architecture_falls_back_to_the_rule(saved, monkeypatch):
    names, config, model = saved["llama"]
    remote = {**config, "architectures": ["MyRemoteCausalLM"],
              "auto_map": {"AutoModelForCausalLM": "modeling_x.MyRemoteCausalLM"}}
    assert model_order(remote) is None
    assert model_order({**config, "architectures": ["LlamaForCausalLM"], "hidden_size": "x"}) \
        is None  # cannot be built from this config
    assert model_order(None) is None and model_order({}) is None
    assert ordered(names, remote) == model_sequence(model, names)


def test_names_the_config_does_not_describe_use_the_rule(saved):
    """A config of another family matches none of these names: the rule orders them."""
    names, _, model = saved["gpt2"]
    _, llama_config, _ = saved["llama"]
    assert ordered(names, llama_config) == model_sequence(model, names)


def test_name_rule_on_a_torchvision_style_resnet():
    names = ["fc", "layer2.0.downsample.0", "layer10.0.conv1", "layer1.1.conv2", "conv1",
             "layer1.0.conv1", "layer2.0.conv1", "layer1.1.conv1", "layer1.0.conv2"]
    assert ordered(names) == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1",
                              "layer1.1.conv2", "layer2.0.conv1", "layer2.0.downsample.0",
                              "layer10.0.conv1", "fc"]
    assert [block_index(n) for n in ("conv1", "layer2.0.conv1", "fc")] == [None, 0, None]


def test_name_rule_on_the_models_researchers_define():
    """TempBalance's CIFAR ResNet names its classifier ``linear``; a LeNet's layers are all
    outside blocks, where ``fc1`` is no block's feed-forward layer and names compare as such."""
    resnet = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1",
              "layer2.0.shortcut.0", "linear"]
    assert ordered(sorted(resnet)) == resnet
    lenet = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert ordered(list(reversed(lenet))) == lenet


def test_name_rule_on_gguf_names():
    """llama.cpp's names (a GGUF of an architecture transformers cannot map): embeddings first,
    the head (``output``) last, a block in its computation order, experts one row each."""
    block = ["attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b[0]", "attn_k_b[1]",
             "attn_v_b[0]", "attn_output", "ffn_gate_inp", "ffn_gate_exps[0]", "ffn_gate_exps[1]",
             "ffn_up_exps[0]", "ffn_down_exps[0]", "ffn_gate_shexp", "ffn_up_shexp",
             "ffn_down_shexp"]
    dense = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    want = (["token_embd"] + [f"blk.0.{n}" for n in dense] + [f"blk.1.{n}" for n in block]
            + ["output"])
    assert ordered(list(reversed(want))) == want
    assert ordered(sorted(want)) == want
    assert [block_index(n) for n in ("token_embd", "blk.1.ffn_up_exps[0]", "output")] == \
        [None, 1, None]


def test_name_rule_on_a_head_called_output():
    """InternLM2's layout: ``output`` is its head, ``attention`` then ``feed_forward``."""
    block = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
             "feed_forward.w2"]
    want = (["model.tok_embeddings"] + [f"model.layers.{i}.{n}" for i in (0, 1) for n in block]
            + ["output"])
    assert ordered(sorted(want)) == want


def test_name_rule_puts_attention_before_the_mlp_of_encoder_layers():
    """Whisper/BART layers hold fc1/fc2 beside self_attn; DBRX's attention is norm_attn_norm."""
    names = ["model.encoder.layers.0.fc2", "model.encoder.layers.0.fc1",
             "model.encoder.layers.0.self_attn.q_proj", "transformer.blocks.0.ffn.router.layer",
             "transformer.blocks.0.norm_attn_norm.attn.Wqkv"]
    assert ordered(names) == [names[2], names[1], names[0], names[4], names[3]]


@pytest.mark.parametrize("name, block", [
    ("visual.merger.mlp.0", None), ("visual.merger.mlp.2", None), ("model.mm_projector.0", None),
    ("mm_projector.2", None), ("mlp1.1", None), ("mlp1.3", None), ("upsampler.0", None),
    ("multi_modal_projector.linear_1", None), ("visual.blocks.3.attn.qkv", 3),
    ("model.layers.2.mlp.experts.gate_up_proj[1]", 2), ("encoder.block.1.layer.0.SelfAttention.q", 1),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1", 0), ("resblocks.0.convs1.0", 0),
])
def test_only_repeated_blocks_have_a_block_number(name, block):
    """A Sequential's list index outside the repeated blocks (a projector's ``mlp.0``) is no
    block: a block holds modules of its own."""
    assert block_index(name) == block


def test_blocks_compare_as_numbers():
    names = [f"model.layers.{i}.mlp.up_proj" for i in (10, 2, 1, 0)]
    assert ordered(names) == [f"model.layers.{i}.mlp.up_proj" for i in (0, 1, 2, 10)]


def test_in_depth_order_renumbers_without_touching_its_input(saved):
    names, config, model = saved["llama"]
    rows = [{"layer_id": i, "longname": n, "alpha": float(i)} for i, n in enumerate(names)]
    before = [dict(r) for r in rows]
    out = in_depth_order(rows, config)
    assert rows == before
    assert [r["layer_id"] for r in out] == list(range(len(rows)))
    assert [r["longname"] for r in out] == model_sequence(model, names)
    assert {r["longname"]: r["alpha"] for r in out} == {r["longname"]: r["alpha"] for r in rows}


def test_config_builds_once_per_distinct_config(saved):
    names, config, _ = saved["bert"]
    layer_order._model_order.cache_clear()
    depth_order(names, config)
    depth_order(names, dict(config))
    assert layer_order._model_order.cache_info().misses == 1


# ---------------------------------------------------------------------------------------------
# The disk cache: each worker is a new process, so what one learned from the class is read by
# the next without importing transformers.

ORDER_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from esd_experiment.core import layer_order
names, config = json.load(sys.stdin)
ranks = layer_order.depth_order(names, config)
print(json.dumps({"order": sorted(names, key=ranks.__getitem__),
                  "transformers": "transformers" in sys.modules}))
"""


def order_in_new_process(names, config, cache_dir):
    """(names in depth order, whether transformers was imported), from a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", ORDER_SCRIPT, str(Path(__file__).parents[1])],
                          input=json.dumps([names, config]), capture_output=True, text=True,
                          env={**os.environ, "ESD_CACHE_DIR": str(cache_dir)}, check=True)
    out = json.loads(proc.stdout)
    return out["order"], out["transformers"]


@pytest.mark.parametrize("family", ["llama", "mixtral"])  # renames nothing / legacy experts
def test_cached_order_is_the_built_one_without_importing_transformers(saved, family, tmp_path):
    names, config, model = saved[family]
    expected = ordered(names, config)
    if family == "llama":
        assert expected == model_sequence(model, names)
    first, imported = order_in_new_process(names, config, tmp_path)
    assert first == expected and imported
    assert len(list((tmp_path / "layer-order").glob("*.json"))) == 1
    second, imported = order_in_new_process(names, config, tmp_path)
    assert second == expected and not imported


def test_names_the_cached_renamings_lack_build_the_class_and_are_added(saved, tmp_path):
    names, config, _ = saved["mixtral"]
    layer0 = [n for n in names if ".layers.1." not in n]
    assert len(layer0) < len(names)
    expected = ordered(names, config)
    assert order_in_new_process(layer0, config, tmp_path) == (ordered(layer0, config), True)
    # layer 1's expert names need renamings the file lacks: the class is built again
    assert order_in_new_process(names, config, tmp_path) == (expected, True)
    assert order_in_new_process(names, config, tmp_path) == (expected, False)
    assert order_in_new_process(layer0, config, tmp_path) == (ordered(layer0, config), False)


def test_unbuildable_class_is_cached_and_ordered_by_the_rule(saved, tmp_path):
    names, config, model = saved["llama"]
    remote = {**config, "architectures": ["MyRemoteCausalLM"]}
    expected = model_sequence(model, names)  # the name rule's order (see the test above)
    assert order_in_new_process(names, remote, tmp_path) == (expected, True)
    assert order_in_new_process(names, remote, tmp_path) == (expected, False)


def test_damaged_or_unwritable_cache_is_ignored(saved, tmp_path):
    names, config, model = saved["llama"]
    expected = model_sequence(model, names)
    order_in_new_process(names, config, tmp_path)
    (entry,) = (tmp_path / "layer-order").glob("*.json")
    entry.write_text('{"format": 1, "parameters": [')
    assert order_in_new_process(names, config, tmp_path) == (expected, True)
    assert json.loads(entry.read_text())["parameters"]  # rewritten whole
    entry.write_text(json.dumps({"format": 1, "parameters": 5, "renames": None}))
    assert order_in_new_process(names, config, tmp_path) == (expected, True)
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the cache folder would have to be inside a regular file
    assert order_in_new_process(names, config, blocked) == (expected, True)


def test_cache_key_holds_the_config_and_the_transformers_version(saved, monkeypatch):
    _, config, _ = saved["llama"]
    text = layer_order._config_json(config)
    path = layer_order._cache_path(text)
    assert path.parent == Path(os.environ["ESD_CACHE_DIR"]) / "layer-order"
    assert layer_order._cache_path(layer_order._config_json({**config, "num_hidden_layers": 3})) \
        != path
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda p: "0.0.1" if p == "transformers" else real(p))
    layer_order._versions.cache_clear()
    try:
        assert layer_order._cache_path(text) != path
    finally:
        layer_order._versions.cache_clear()
