"""``from esd_experiment import analyze``: the rows the CLI writes, for every kind of source.

The oracle of each test is the CLI itself, run as a user runs it (a subprocess on a model
list), on the checkpoint a module or adapter is saved as: ``analyze`` must give its CSV's
rows, columns and numbers.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel

from esd_experiment import analyze
from esd_experiment.core.errors import InputError
from esd_experiment.core.results import INTEGER_COLUMNS, STRING_COLUMNS, read_results_file
from esd_experiment.estimator.net_esd import net_esd_estimator
from tests.loader_fixtures import gpt2, llama, save_adapter, save_model
from tests.test_gguf import llama_as_gguf

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300
# A CSV holds each float as repr() writes it; pandas' reader may round the last digit.
CSV_ROUND_TRIP_RTOL = 1e-12


def write_list(path: Path, rows) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model_id", "base_model_relation", "source_model", "gguf_file"])
        writer.writerows(rows)
    return path


def cli_result(tmp_path: Path, row, *flags, env=None, delta: bool = False) -> pd.DataFrame:
    """The CSV the runner writes for the single model of ``row`` (a list row); with
    ``delta``, its ``delta/`` file (the run given ``--delta``)."""
    out = tmp_path / "cli_out"
    listed = write_list(tmp_path / "list.csv", [row])
    proc = subprocess.run([sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
                           str(listed), "--output_dir", str(out), "--device", "cpu",
                           "--no-progress", *flags], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (csv_path,) = [p for p in (out / "delta" if delta else out).glob("*.csv")]
    return read_results_file(csv_path)


def assert_same_rows(ours: pd.DataFrame, cli: pd.DataFrame, skip=()) -> None:
    assert list(ours.columns) == list(cli.columns)
    assert len(ours) == len(cli)
    for column in ours.columns:
        if column in skip:
            continue
        a, b = ours[column], cli[column]
        if column in STRING_COLUMNS:
            assert a.fillna("").astype(str).tolist() == b.fillna("").astype(str).tolist(), column
        elif column in INTEGER_COLUMNS:
            assert a.astype("Int64").tolist() == b.astype("Int64").tolist(), column
        else:
            np.testing.assert_allclose(a.astype(float), b.astype(float),
                                       rtol=CSV_ROUND_TRIP_RTOL, atol=0, err_msg=column)


def top_ratio(evals):
    return {"top_ratio": float(evals[-1] / evals.sum())}


def test_a_local_directory_gives_the_cli_csv(tmp_path):
    folder = save_model(llama(), tmp_path / "base")
    ours = analyze(str(folder), fix_fingers="DKS", mp_fit=True, metrics=[top_ratio])
    metric_file = tmp_path / "top.py"
    metric_file.write_text("def top_ratio(evals):\n"
                           "    return {'top_ratio': float(evals[-1] / evals.sum())}\n")
    cli = cli_result(tmp_path, [str(folder), "", "", ""], "--fix_fingers", "DKS", "--mp_fit",
                     "--metric", f"{metric_file}:top_ratio")
    # the metric is recorded under the name of where it came from: a function here, a file there
    assert_same_rows(ours, cli, skip=("esd_options",))
    assert "top_ratio" in ours.columns and "sigma_mp" in ours.columns
    assert ours["esd_options"].str.contains("fix_fingers=DKS").all()


def test_a_hub_id_at_a_revision_gives_the_cli_csv(hub, tmp_path):
    hub.add_repo("org/model", save_model(llama(seed=2), tmp_path / "m"), branches=("main", "v1"))
    ours = analyze("org/model@v1", cache_dir=str(hub.cache))
    cli = cli_result(tmp_path, ["org/model@v1", "", "", ""], "--cache_dir", str(hub.cache),
                     env=hub.env(hub.cache))
    assert_same_rows(ours, cli)
    assert ours["revision"].str.fullmatch(r"[0-9a-f]{40}").all()


def test_a_gguf_file_gives_the_cli_csv(tmp_path):
    _, gguf = llama_as_gguf(tmp_path)
    assert_same_rows(analyze(gguf), cli_result(tmp_path, [str(gguf), "", "", ""]))


def mixtral_layers(layers: int):
    """A Mixtral as transformers 5 holds it (fused expert stacks), which it saves per expert."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, num_local_experts=3)).eval()


def mixtral():
    return mixtral_layers(1)


@pytest.mark.parametrize("build", [llama, gpt2, mixtral],
                         ids=["llama", "gpt2-tied-head", "mixtral-fused-experts"])
def test_a_module_gives_the_cli_rows_of_its_checkpoint(tmp_path, build):
    module = build()
    folder = save_model(module, tmp_path / "saved")
    ours = analyze(module, model_id=str(folder))
    assert_same_rows(ours, cli_result(tmp_path, [str(folder), "", "", ""]))


@pytest.mark.parametrize("build", [lambda: llama(seed=4), mixtral],
                         ids=["llama", "mixtral-fused-experts"])
def test_a_peft_model_is_analysed_merged_as_the_cli_merges_its_adapter(tmp_path, build):
    """The rows of the CLI on the adapter's files, whatever names the module holds its
    weights under (transformers 5's Mixtral: fused expert stacks, saved per expert)."""
    base = build()
    base_dir = save_model(base, tmp_path / "base")
    targets = ["q_proj", "v_proj"] + (["down_proj"] if "llama" in type(base).__name__.lower()
                                      else [])
    adapter_dir = save_adapter(base, tmp_path / "adapter", str(base_dir), seed=5, r=4,
                               target_modules=targets)
    peft_model = PeftModel.from_pretrained(build(), str(adapter_dir))
    ours = analyze(peft_model, model_id=str(adapter_dir), source_model=str(base_dir))
    cli = cli_result(tmp_path, [str(adapter_dir), "adapter", str(base_dir), ""])
    assert_same_rows(ours, cli)
    plain = analyze(build(), model_id=str(adapter_dir), source_model=str(base_dir))
    changed = ours["alpha"].fillna(-1).to_numpy() != plain["alpha"].fillna(-1).to_numpy()
    assert set(ours["longname"][changed].str.rsplit(".", n=1).str[-1]) == set(targets)


def test_a_module_read_as_saved_holds_one_blocks_split_copies_at_a_time():
    """A Mixtral module's fused gate_up stacks are split into each expert's w1 and w3 (copies)
    one block at a time as they are read: the first block's copies are freed once the second
    block is read, so reading a module never holds a second copy of all its experts."""
    import gc
    import weakref

    from esd_experiment.formats.tensor_dict import TensorDictReader, module_tensors

    module = mixtral_layers(2)
    saved = module_tensors(module)
    reader = TensorDictReader(saved)
    first = [n for n in reader.names if n.startswith("model.layers.0.") and ".w1." in n]
    assert len(first) == 3 and all(reader.shape(n) == (48, 32) for n in first)
    stack = module.model.layers[0].mlp.experts.gate_up_proj
    for e, name in enumerate(first):  # each expert's w1: its rows of the stack
        assert torch.equal(reader.get(name), stack[e, :48])
    copies = [weakref.ref(saved[n]) for n in first]
    assert all(ref() is not None for ref in copies)  # held while block 0 is read
    reader.get("model.layers.1.block_sparse_moe.experts.0.w1.weight")
    gc.collect()
    assert all(ref() is None for ref in copies)


def test_a_delta_against_a_base_gives_the_cli_delta_file(tmp_path):
    base, fine_tune = llama(seed=6), llama(seed=6)
    with torch.no_grad():
        for name, param in fine_tune.named_parameters():
            if "mlp" in name:
                param.add_(0.05 * torch.randn_like(param))
    base_dir, ft_dir = save_model(base, tmp_path / "base"), save_model(fine_tune, tmp_path / "ft")
    cli = cli_result(tmp_path, [str(ft_dir), "", str(base_dir), ""], "--delta", delta=True)
    from_modules = analyze(fine_tune, base=base, model_id=str(ft_dir),
                           source_model=str(base_dir))
    assert_same_rows(from_modules, cli)
    assert_same_rows(analyze(str(ft_dir), base=str(base_dir)), cli)
    unchanged = ~cli["longname"].str.contains("mlp")
    assert (cli["spectral_norm"][unchanged] == 0).all()  # W - W_base is zero there
    assert (cli["spectral_norm"][~unchanged] > 0).all()


def test_an_adapters_delta_is_its_own_update_as_the_cli_writes_it(tmp_path):
    base = llama(seed=4)
    base_dir = save_model(base, tmp_path / "base")
    adapter_dir = save_adapter(base, tmp_path / "adapter", str(base_dir), seed=5, r=4,
                               target_modules=["q_proj", "v_proj"])
    peft_model = PeftModel.from_pretrained(llama(seed=4), str(adapter_dir))
    ours = analyze(peft_model, delta=True, model_id=str(adapter_dir),
                   source_model=str(base_dir))
    cli = cli_result(tmp_path, [str(adapter_dir), "adapter", str(base_dir), ""], "--delta",
                     delta=True)
    assert_same_rows(ours, cli)
    lora = ours["longname"].str.endswith(("q_proj", "v_proj"))
    assert (ours["matrix_rank"][lora] == 4).all()


class _LeNet(torch.nn.Module):
    """A model of the kind researchers define themselves: no config, no names the name rule
    knows the order of."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 16, 5), torch.nn.Conv2d(16, 32, 5)
        self.input, self.hidden = torch.nn.Linear(800, 120), torch.nn.Linear(120, 84)
        self.fc1, self.linear = torch.nn.Linear(84, 64), torch.nn.Linear(64, 10)


def test_a_module_without_a_config_keeps_its_own_layer_order():
    """layer_id follows the module's own definition order, as net_esd_estimator's rows do
    (the name rule put the classifier ``linear`` and ``fc1`` before the convolutions)."""
    module = _LeNet()
    defined = [n.removesuffix(".weight") for n, p in module.named_parameters() if p.dim() > 1]
    df = analyze(module)
    assert df["longname"].tolist() == defined
    assert df["layer_id"].tolist() == list(range(len(defined)))
    assert net_esd_estimator(module)["longname"].tolist() == defined


def test_a_delta_without_a_source_is_refused():
    with pytest.raises(InputError, match="no source model"):
        analyze(torch.nn.Sequential(torch.nn.Linear(40, 30)), delta=True)


def test_net_esd_estimator_refuses_an_unmerged_peft_model(tmp_path):
    base = llama(seed=4)
    adapter_dir = save_adapter(base, tmp_path / "adapter", None, r=4, target_modules=["q_proj"])
    peft_model = PeftModel.from_pretrained(llama(seed=4), str(adapter_dir))
    with pytest.raises(InputError, match="merge_and_unload"):
        net_esd_estimator(peft_model)


def test_options_take_the_cli_names_and_unknown_ones_are_refused():
    module = torch.nn.Sequential(torch.nn.Linear(40, 30))
    with pytest.raises(TypeError, match="fix_finger"):
        analyze(module, fix_finger="DKS")
    with pytest.raises(InputError, match="fix_fingers"):
        analyze(module, fix_fingers="nope")
    df = analyze(module, fix_fingers="xmin_peak", bins=50)
    assert df["fix_fingers"].tolist() == ["xmin_peak"]
    assert df["model_id"].tolist() == ["Sequential"]
    # Values of another type than the flag's are refused, naming the option: "False" would
    # be taken as true, "10" compared with numbers, 1.5 used as an index.
    for wrong in ({"filter_zeros": "False"}, {"min_evals": "10"}, {"evals_thresh": "1e-5"},
                  {"xmin_pos": 1.5}, {"fix_fingers": 1}, {"mp_fit": 1}):
        (name,) = wrong
        with pytest.raises(TypeError, match=f"{name}="):
            analyze(module, **wrong)
    with pytest.raises(TypeError, match="metrics takes a list"):
        analyze(module, metrics=len)
    # The CLI's flags for files and GPUs do nothing here: refused, saying where they work
    with pytest.raises(TypeError, match="takes no save_eigs.*net_esd_estimator"):
        analyze(module, save_eigs=True)
    with pytest.raises(TypeError, match="takes no parallel_esd"):
        analyze(module, parallel_esd=True)
    # A number of the right kind from NumPy is that number; an int where a float is due too.
    df = analyze(module, xmin_pos=np.int64(3), evals_thresh=0, filter_zeros=np.bool_(False),
                 device=torch.device("cpu"))
    assert "xmin_pos=3;" in df["esd_options"].iat[0]
    assert "evals_thresh=0.0;" in df["esd_options"].iat[0]
    assert "filter_zeros=False;" in df["esd_options"].iat[0]


def test_importing_the_package_loads_neither_torch_nor_pandas():
    code = ("import sys, esd_experiment; "
            "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_peft_models_delta_against_another_base_is_refused_in_one_line():
    """A PeftModel's delta is its adapter's update on its own base (s·B·A); a base= that is
    another module would be left unused, the rows not its difference: refused, saying so. Its
    own base is taken, and gives the rows of delta=True."""
    from peft import LoraConfig, get_peft_model

    base = llama(seed=4)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"],
                                                 init_lora_weights=False))
    with pytest.raises(InputError) as refused:
        analyze(peft_model, base=llama(seed=5), model_id="org/lora")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("analyze(): org/lora")
    assert "PeftModel" in message and "merge_and_unload" in message
    own = analyze(peft_model, base=base, model_id="org/lora")
    pd.testing.assert_frame_equal(own, analyze(peft_model, delta=True, model_id="org/lora"))
