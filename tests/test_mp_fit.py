"""--mp_fit: WeightWatcher's Marchenko-Pastur fit columns, against WeightWatcher itself."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from result_fixtures import llama_like
from safetensors.torch import save_file

from esd_experiment.core.results import RESULT_COLUMNS
from esd_experiment.estimator.net_esd import net_esd_estimator
from esd_experiment.report import cli as esd_report
from esd_experiment.run import worker as esd_worker

ww = pytest.importorskip("weightwatcher")

PARITY_RTOL = 1e-6  # the bar for columns shared with WeightWatcher
MP_COLUMNS = ("bulk_max", "bulk_min", "mp_softrank", "num_spikes", "sigma_mp", "W_scale")


def spiked_net(shapes):
    """Linear layers (out, in) = ``shapes`` of noise plus a few rank-one spikes."""
    gen = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(*[torch.nn.Linear(m, n) for n, m in shapes])
    with torch.no_grad():
        for layer, (n, m) in zip(net, shapes, strict=True):
            noise = torch.randn(n, m, generator=gen, dtype=torch.float64) / np.sqrt(m)
            spikes = torch.randn(n, 3, generator=gen, dtype=torch.float64) @ torch.randn(
                3, m, generator=gen, dtype=torch.float64) * 0.3
            layer.weight.copy_(noise + spikes)
    return net


def test_mp_fit_columns_match_weightwatcher():
    net = spiked_net([(200, 80), (64, 160), (120, 120), (300, 50)])
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    theirs = ww.WeightWatcher(model=net).analyze(mp_fit=True).set_index("longname")
    ours = net_esd_estimator(net, mp_fit=True).set_index("longname")
    assert sorted(theirs.index) == sorted(ours.index)
    assert list(ours.columns[-len(MP_COLUMNS):]) == list(MP_COLUMNS)
    for col in MP_COLUMNS:
        np.testing.assert_allclose(ours[col].to_numpy(float),
                                   theirs.loc[ours.index, col].to_numpy(float),
                                   rtol=PARITY_RTOL, atol=0, err_msg=col)
    assert ours[list(MP_COLUMNS)].notna().all().all() and (ours["num_spikes"] >= 3).all()


def test_mp_fit_columns_match_weightwatcher_on_convolutions_and_embeddings():
    """Pooled kernel slices (Conv2d, N > M and N = M), an embedding and a GPT-2 style
    Conv1D-shaped matrix with N < M: every MP column, W_scale included, as WeightWatcher's."""
    gen = torch.Generator().manual_seed(4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(300, 48)
            self.conv = torch.nn.Conv2d(24, 40, 3)
            self.square = torch.nn.Conv2d(32, 32, 3)
            self.wide = torch.nn.Linear(160, 48)

    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    theirs = ww.WeightWatcher(model=net).analyze(mp_fit=True).set_index("longname")
    ours = net_esd_estimator(net, mp_fit=True).set_index("longname")
    assert sorted(theirs.index) == sorted(ours.index) == ["conv", "emb", "square", "wide"]
    for col in MP_COLUMNS:
        np.testing.assert_allclose(ours[col].to_numpy(float),
                                   theirs.loc[ours.index, col].to_numpy(float),
                                   rtol=PARITY_RTOL, atol=0, err_msg=col)


def test_mp_fit_flag_in_a_run_and_from_saved_eigenvalues(tmp_path):
    root, direct, plain, refit = (tmp_path / d for d in ("ckpt", "direct", "plain", "refit"))
    root.mkdir()
    save_file({k: v.contiguous() for k, v in llama_like(4, blocks=1).items()},
              str(root / "model.safetensors"))
    run = ["--model_id", str(root), "--device", "cpu", "--save_eigs", "--output_dir"]
    assert esd_worker.main([*run, str(direct), "--mp_fit"]) == esd_worker.EXIT_OK
    assert esd_worker.main([*run, str(plain)]) == esd_worker.EXIT_OK
    (csv,) = direct.glob("*.csv")
    frame = pd.read_csv(csv, keep_default_na=False)
    assert tuple(frame.columns) == RESULT_COLUMNS + MP_COLUMNS
    assert frame["esd_options"].iat[0].endswith(";metrics=mp_fit")
    assert esd_report.main(["refit", str(plain), "--output_dir", str(refit), "--mp_fit"]) == 0
    assert (refit / csv.name).read_bytes() == csv.read_bytes()


@pytest.mark.parametrize("weight", ["too_small", "nonfinite"])
def test_a_model_without_eigenvalues_has_the_views_columns_as_nan(weight):
    """The columns --mp_fit and --randomize add are in every result, NaN where a layer has no
    eigenvalues, even when no layer of the model has any."""
    from esd_experiment.estimator.randomize import RANDOM_COLUMNS

    net = torch.nn.Module()
    net.x = torch.nn.Linear(9, 40) if weight == "too_small" else torch.nn.Linear(100, 200)
    with torch.no_grad():
        net.x.weight[0, 0] = float("nan") if weight == "nonfinite" else 1.0
    frame = net_esd_estimator(net, mp_fit=True, randomize=True)
    assert frame.status.tolist() == [weight]
    columns = [*MP_COLUMNS, *RANDOM_COLUMNS]
    assert list(frame.columns[-len(columns):]) == columns
    assert frame[columns].isna().all().all()
