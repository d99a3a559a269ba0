"""--randomize: WeightWatcher's randomized-ESD columns, against WeightWatcher itself.

Given one and the same shuffle, every column must equal WeightWatcher's; with each tool's own
shuffle, the randomized spectra must have the same distribution.
"""

import argparse
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from result_fixtures import llama_like
from safetensors.torch import save_file
from scipy import stats
from test_mp_fit import spiked_net

from esd_experiment.core.paths import ModelPaths
from esd_experiment.core.results import RESULT_COLUMNS
from esd_experiment.estimator.metrics import randomize_metric
from esd_experiment.estimator.net_esd import (
    layer_eigenvalues,
    net_esd_estimator,
    shuffled_eigenvalues,
    split_layers,
)
from esd_experiment.estimator.options import (
    ESDConfig,
    add_esd_arguments,
    esd_argv,
    esd_config_from_args,
    metrics_of,
)
from esd_experiment.estimator.randomize import RANDOM_COLUMNS, randomized_columns
from esd_experiment.report import cli as esd_report
from esd_experiment.run import worker as esd_worker
from esd_experiment.run.plan import result_done

ww = pytest.importorskip("weightwatcher")

PARITY_RTOL = 1e-6  # the bar for columns shared with WeightWatcher
# Two-sample Kolmogorov-Smirnov statistic between our shuffled spectra and WeightWatcher's,
# three shuffles of a 300 x 120 matrix each (360 eigenvalues a side): measured 0.014-0.017;
# the 1e-3 critical value for independent samples of this size is 0.145, and the unshuffled
# spectrum sits at 0.86.
KS_TOL = 0.1
SHUFFLE_SEED = 11  # the one permutation both tools get in the parity test


@pytest.fixture(autouse=True)
def quiet_weightwatcher():
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)


def fixed_shuffle(flat: np.ndarray) -> None:
    """One permutation for every call on arrays of one size (in place, as np.random.shuffle)."""
    np.random.default_rng(SHUFFLE_SEED).shuffle(flat)


def oracle_evals(w: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.svd(w, compute_uv=False) ** 2)


def test_randomized_columns_match_weightwatcher_given_the_same_shuffle(monkeypatch):
    # (64, 160): fewer than 100 eigenvalues, where WeightWatcher pools five shuffles.
    shapes = [(200, 80), (64, 160), (120, 120)]
    net = spiked_net(shapes)
    monkeypatch.setattr(np.random, "shuffle", fixed_shuffle)  # the oracle's shuffle, not ours
    theirs = ww.WeightWatcher(model=net).analyze(randomize=True).set_index("longname")
    monkeypatch.undo()
    for (name, module), (n, m) in zip(net.named_children(), shapes, strict=True):
        w = module.weight.detach().double().numpy()
        flat = w.flatten()
        fixed_shuffle(flat)
        shuffled = oracle_evals(flat.reshape(w.shape))
        ours = randomized_columns(oracle_evals(w), max(n, m), min(n, m),
                                  lambda seed, r, ev=shuffled: ev, seed=0)
        for col in RANDOM_COLUMNS:
            np.testing.assert_allclose(ours[col], float(theirs.loc[name, col]),
                                       rtol=PARITY_RTOL, atol=1e-12, err_msg=f"{name} {col}")


def test_our_shuffled_spectrum_has_weightwatchers_distribution():
    rng = np.random.default_rng(1)
    n, m = 300, 120
    w = rng.standard_t(3, size=(n, m)) / np.sqrt(m) + rng.standard_normal(
        (n, 4)) @ rng.standard_normal((4, m)) * 0.2
    w[:, :10] *= 4.0  # a few loud columns: structure the shuffle spreads out
    (layer,) = split_layers("w.weight", torch.from_numpy(w), "linear", 0.5)
    config = ESDConfig()
    ours = np.concatenate([shuffled_eigenvalues(layer, config, seed, 0) for seed in range(3)])
    theirs = []
    for seed in range(3):
        np.random.seed(seed)
        theirs.append(ww.WeightWatcher().random_eigenvalues([w.copy()], m, 1))
    theirs = np.concatenate(theirs)
    assert stats.ks_2samp(ours, theirs).statistic < KS_TOL
    plain = np.tile(layer_eigenvalues(layer, config).numpy(), 3)
    assert stats.ks_2samp(plain, theirs).statistic > 5 * KS_TOL  # the test can tell


def test_the_seed_makes_the_result_reproducible():
    net = spiked_net([(200, 80), (64, 160)])
    first = net_esd_estimator(net, randomize=True, seed=5)
    again = net_esd_estimator(net, randomize=True, seed=5)
    other = net_esd_estimator(net, randomize=True, seed=6)
    plain = net_esd_estimator(net)
    assert list(first.columns[-len(RANDOM_COLUMNS):]) == list(RANDOM_COLUMNS)
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first["max_rand_eval"], other["max_rand_eval"])
    # The unshuffled columns are those of a run without --randomize.
    pd.testing.assert_frame_equal(first[plain.columns], plain)
    # rand_W_scale = sqrt(n / sum(evals)) does not depend on the shuffle.
    np.testing.assert_allclose(first["rand_W_scale"], other["rand_W_scale"], rtol=PARITY_RTOL)


def test_randomize_in_a_run_is_recorded_and_another_seed_is_not_done(tmp_path, capsys):
    root, out, refit = (tmp_path / d for d in ("ckpt", "out", "refit"))
    root.mkdir()
    save_file({k: v.contiguous() for k, v in llama_like(4, blocks=1).items()},
              str(root / "model.safetensors"))
    argv = ["--model_id", str(root), "--device", "cpu", "--save_eigs", "--output_dir", str(out)]
    assert esd_worker.main([*argv, "--randomize", "--seed", "7"]) == esd_worker.EXIT_OK
    (csv,) = out.glob("*.csv")
    frame = pd.read_csv(csv, keep_default_na=False)
    assert tuple(frame.columns) == RESULT_COLUMNS + RANDOM_COLUMNS
    key = frame["esd_options"].iat[0]
    assert key.endswith(";metrics=randomize(seed=7)")
    assert frame.loc[frame["status"] == "ok", list(RANDOM_COLUMNS)].notna().all().all()
    paths = ModelPaths(out, out / "logs", csv.stem)
    assert result_done(paths, key, save_eigs=True)
    for config in (ESDConfig(metrics=(randomize_metric(8),)), ESDConfig()):
        assert not result_done(paths, config.options_key, save_eigs=True)
    # Saved eigenvalues cannot give a shuffled spectrum: refit says so and writes nothing.
    capsys.readouterr()
    assert esd_report.main(["refit", str(out), "--output_dir", str(refit), "--randomize"]) == 2
    err = capsys.readouterr().err
    assert "randomize(seed=0)" in err and "needs the weights" in err
    assert not refit.exists() or not list(refit.glob("*.csv"))
    assert esd_worker.main([*argv, "--randomize", "--seed", "-1"]) == 2


def test_the_runner_forwards_randomize_and_its_seed_to_its_workers():
    parser = argparse.ArgumentParser()
    add_esd_arguments(parser)
    args = parser.parse_args(["--mp_fit", "--randomize", "--seed", "3"])
    forwarded = parser.parse_args(esd_argv(args))
    assert [m.name for m in metrics_of(forwarded)] == ["mp_fit", "randomize(seed=3)"]
    assert esd_config_from_args(args, "cpu").options_record["metrics"] == [
        "mp_fit", "randomize(seed=3)"]
    # Without --randomize the seed changes nothing: plain results stay done.
    plain = esd_config_from_args(parser.parse_args(["--seed", "9"]), "cpu")
    assert plain.options_key == ESDConfig().options_key
