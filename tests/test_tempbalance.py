"""TempBalance callers: its spellings of the fit options, and its use of the result."""

import numpy as np
import pandas as pd
import pytest
import torch

from esd_experiment.core.errors import InputError
from esd_experiment.estimator.net_esd import PL_FITTING, net_esd_estimator


class SmallNet(torch.nn.Module):
    """Conv2d and Linear layers, as in TempBalance's CIFAR networks."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3)
        self.fc1 = torch.nn.Linear(128, 64)
        self.fc2 = torch.nn.Linear(64, 10)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SmallNet()


def fit_columns(df):
    return df[["longname", "alpha", "xmin", "D", "num_pl_spikes", "status"]]


def test_fix_fingers_none_is_the_full_scan(net):
    pd.testing.assert_frame_equal(fit_columns(net_esd_estimator(net, fix_fingers=None)),
                                  fit_columns(net_esd_estimator(net, fix_fingers="DKS")))
    assert (net_esd_estimator(net, fix_fingers=None).fix_fingers == "DKS").all()


@pytest.mark.parametrize("pl_fitting", sorted(PL_FITTING))
def test_pl_fitting_names_the_same_fits(net, pl_fitting):
    ours = PL_FITTING[pl_fitting]
    got = net_esd_estimator(net, pl_fitting=pl_fitting)
    pd.testing.assert_frame_equal(fit_columns(got),
                                  fit_columns(net_esd_estimator(net, fix_fingers=ours)))
    assert (got.fix_fingers == ours).all()


def test_pl_fitting_that_is_unknown_or_contradicts_fix_fingers_is_refused(net):
    with pytest.raises(InputError, match="pl_fitting='mle'"):
        net_esd_estimator(net, pl_fitting="mle")
    with pytest.raises(InputError, match="different fits"):
        net_esd_estimator(net, fix_fingers="xmin_peak", pl_fitting="goodness-of-fit")
    agreeing = net_esd_estimator(net, fix_fingers="xmin_peak", pl_fitting="fix-finger")
    assert (agreeing.fix_fingers == "xmin_peak").all()


def test_tempbalance_use_of_the_result(net):
    """TempBalance's build_optimizer_param_group, step by step, on our result."""
    # Its positional call: net, EVALS_THRESH, bins, fix_fingers, xmin_pos, conv_norm, filter_zeros
    metrics = net_esd_estimator(net, 0.00001, 100, None, 2, 0.5, False, eigs=True)
    layer_stats = pd.DataFrame({key: metrics[key] for key in metrics if key != "eigs"})
    assert "eigs" not in layer_stats and len(metrics["eigs"]) == len(layer_stats)
    assert all(isinstance(e, np.ndarray) and e.ndim == 1 for e in metrics["eigs"])
    modules = [n for n, m in net.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert list(metrics["longname"]) == modules == ["conv1", "conv2", "fc1", "fc2"]
    # remove_first_layer / remove_last_layer, with the index reset it relies on
    layer_stats = layer_stats.drop(labels=0, axis=0)
    layer_stats.index = list(range(len(layer_stats["alpha"])))
    layer_stats = layer_stats.drop(labels=len(layer_stats) - 1, axis=0)
    scores = np.array(layer_stats["alpha"])
    assert np.isfinite(scores).all() and (scores > 1).all()
    # tb_linear_map: learning rates interpolated between the extreme alphas
    layer_stats["scheduled_lr"] = np.interp(scores, [scores.min(), scores.max()], [0.05, 0.15])
    names = list(layer_stats["longname"])
    lrs = {name: layer_stats[layer_stats["longname"] == name]["scheduled_lr"].item()
           for name, _ in net.named_modules() if name in names}
    assert set(lrs) == {"conv2", "fc1"}
    assert all(0.05 <= lr <= 0.15 for lr in lrs.values())
    assert np.allclose(metrics["alphahat"], metrics["alpha"] * np.log10(metrics["spectral_norm"]))
