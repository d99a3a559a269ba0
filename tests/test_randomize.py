"""--randomize: WeightWatcher's randomized-ESD columns, against WeightWatcher itself.

Given one and the same shuffle, every column must equal WeightWatcher's; with each tool's own
shuffle, the randomized spectra must have the same distribution.
"""

import argparse
import functools
import logging
import threading
from collections import Counter

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
from esd_experiment.estimator import net_esd
from esd_experiment.estimator.metrics import randomize_metric
from esd_experiment.estimator.net_esd import (
    SHUFFLE_THREADS,
    device_sort,
    layer_eigenvalues,
    net_esd_estimator,
    shuffled_eigenvalues,
    split_layers,
    torch_sort,
)
from esd_experiment.estimator.options import (
    ESDConfig,
    add_esd_arguments,
    esd_argv,
    esd_config_from_args,
    metrics_of,
)
from esd_experiment.estimator.randomize import (
    RANDOM_COLUMNS,
    WordBuffers,
    layer_rng,
    randomized_columns,
    shuffled_bits,
    sort_shuffle,
)
from esd_experiment.report import cli as esd_report
from esd_experiment.run import worker as esd_worker
from esd_experiment.run.delta import LayerDelta, delta_layer_results
from esd_experiment.run.plan import result_done

ww = pytest.importorskip("weightwatcher")

PARITY_RTOL = 1e-6  # the bar for columns shared with WeightWatcher
# Our shuffled matrices are solved in float32 (net_esd.SHUFFLED_PRECISION), WeightWatcher's in
# float64: given the same shuffle, the columns differ by up to 5e-6 relative (measured).
SHUFFLED_SOLVE_RTOL = 5e-5
# Two-sample Kolmogorov-Smirnov statistic between our shuffled spectra and WeightWatcher's,
# three shuffles of a 300 x 120 matrix each (360 eigenvalues a side): measured 0.014-0.017;
# the 1e-3 critical value for independent samples of this size is 0.145, and the unshuffled
# spectrum sits at 0.86.
KS_TOL = 0.1
SHUFFLE_SEED = 11  # the one permutation both tools get in the parity test
# Chi-square tests of the shuffle's uniformity: a uniform shuffle fails one with this
# probability; the biased shuffles they guard against give p-values below 1e-30.
UNIFORM_P_MIN = 1e-4


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


# float64 entries are shuffled by Generator.shuffle, 2- and 4-byte ones by sorting random keys.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_our_shuffled_spectrum_has_weightwatchers_distribution(dtype):
    rng = np.random.default_rng(1)
    n, m = 300, 120
    w = rng.standard_t(3, size=(n, m)) / np.sqrt(m) + rng.standard_normal(
        (n, 4)) @ rng.standard_normal((4, m)) * 0.2
    w[:, :10] *= 4.0  # a few loud columns: structure the shuffle spreads out
    stored = torch.from_numpy(w).to(dtype)
    w = stored.double().numpy()  # the values as stored, for WeightWatcher
    (layer,) = split_layers("w.weight", stored, "linear", 0.5)
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
    # refit takes no --seed: the refusal names the option, not a seed the directory lacks
    assert "--randomize" in err and "needs the weights" in err and "seed=0" not in err
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


def permutation_counts(trials: int, shuffle) -> Counter:
    return Counter(tuple(shuffle(np.random.default_rng(t))) for t in range(trials))


def test_the_sort_shuffle_is_uniform_when_random_keys_tie():
    """Two-bit keys make ties the rule: entries that share a key must still come out in random
    order, not in the order of their bits."""
    values = np.array([3, 0, 2, 1], dtype=np.uint32)
    counts = permutation_counts(4800, lambda rng: sort_shuffle(values, rng, key_bits=2))
    assert len(counts) == 24
    assert stats.chisquare(list(counts.values())).pvalue > UNIFORM_P_MIN
    twice = np.array([5, 5, 9, 1, 1, 1], dtype=np.uint16)
    for seed in range(50):  # a permutation: the same entries, duplicates included
        out = sort_shuffle(twice, np.random.default_rng(seed), key_bits=1)
        assert out.dtype == twice.dtype and sorted(out) == sorted(twice)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_shuffled_bits_is_a_uniform_permutation_of_the_entries(dtype):
    w = torch.randn(37, 23, generator=torch.Generator().manual_seed(0)).to(dtype)
    raw = w.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]).numpy()
    out = shuffled_bits(raw, layer_rng(0, "x", 0))
    assert out.shape == raw.shape and out.dtype == raw.dtype
    np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(raw, axis=None))
    assert (out != raw).mean() > 0.9
    np.testing.assert_array_equal(out, shuffled_bits(raw, layer_rng(0, "x", 0)))
    # Where the first of ten entries lands: every place equally often.
    first = raw.reshape(-1)[:10]
    places = Counter(int(np.flatnonzero(shuffled_bits(first, layer_rng(s, "x", 0))
                                        == first[0])[0]) for s in range(2000))
    assert len(places) == 10 and stats.chisquare(list(places.values())).pvalue > UNIFORM_P_MIN


def test_a_device_sort_gives_the_same_shuffle_as_numpys():
    """The GPU's sort (torch's, on int64) must order the words as NumPy's does (uint64), so
    that a seed's shuffle does not depend on the device: checked through torch on the CPU,
    with words whose top bit is set and whose keys tie."""
    raw = torch.randn(300, 70, generator=torch.Generator().manual_seed(2)).numpy().view(np.int32)
    assert device_sort(torch.device("cpu")) is None
    assert device_sort(torch.device("meta")).func is torch_sort
    on_cpu = functools.partial(torch_sort, device=torch.device("cpu"))
    np.testing.assert_array_equal(shuffled_bits(raw, layer_rng(3, "x", 0), on_cpu),
                                  shuffled_bits(raw, layer_rng(3, "x", 0)))
    values = raw.reshape(-1)[:64].view(np.uint32)
    np.testing.assert_array_equal(sort_shuffle(values, layer_rng(3, "y", 0), key_bits=3,
                                               sort_words=on_cpu),
                                  sort_shuffle(values, layer_rng(3, "y", 0), key_bits=3))


@pytest.mark.parametrize("factors", [False, True], ids=["fine-tune", "adapter"])
def test_a_deltas_randomized_columns_shuffle_the_delta(factors):
    """Under --delta the shuffled matrix is ΔW, not the fine-tune: rand_W_scale = sqrt(M / ‖ΔW‖²)
    whatever the shuffle (numpy on the formed ΔW), and max_rand_eval is that of ΔW shuffled."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 150, generator=gen), torch.randn(120, 3, generator=gen)
    base = 5 * torch.randn(120, 150, generator=gen)
    dw = (b.double() @ a.double()).numpy()
    delta = (LayerDelta((120, 150), torch.float32, factors=(a, b, 1.0, False)) if factors
             else LayerDelta((120, 150), torch.float32, pair=(base + b @ a, base)))
    config = ESDConfig(metrics=(randomize_metric(0),))
    (result,) = delta_layer_results("l.weight", delta, config)
    assert result.row["status"] == "ok"
    np.testing.assert_allclose(result.row["rand_W_scale"], np.sqrt(120 / (dw ** 2).sum()),
                               rtol=1e-5)  # float32 sums of the pair's difference
    shuffled = np.random.default_rng(1).permutation(dw.reshape(-1)).reshape(dw.shape)
    assert result.row["max_rand_eval"] < 2 * oracle_evals(shuffled)[-1]
    assert result.row["max_rand_eval"] < oracle_evals(dw)[-1] / 2  # the shuffle spread it


def test_the_shuffle_started_ahead_is_the_one_made_in_turn():
    """A layer's first shuffle is made on a background thread while its own eigenvalues are
    computed: the row holds what the same shuffle made afterwards gives."""
    net = spiked_net([(300, 120)])
    row = net_esd_estimator(net, randomize=True, seed=5).iloc[0]
    (layer,) = split_layers("0.weight", net[0].weight.detach(), "linear", 0.5)
    assert row["longname"] == layer.longname
    assert row["max_rand_eval"] == shuffled_eigenvalues(layer, ESDConfig(), 5, 0)[-1]
    assert row["max_rand_eval"] != shuffled_eigenvalues(layer, ESDConfig(), 5, 1)[-1]


def test_a_device_without_the_memory_for_the_sort_leaves_it_to_numpy(monkeypatch):
    words = layer_rng(0, "w", 0).bit_generator.random_raw(1000)
    expected = np.sort(words)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(net_esd.torch, "sort", no_memory)
    np.testing.assert_array_equal(torch_sort(words.copy(), torch.device("cpu")), expected)


def test_a_shuffle_started_ahead_for_a_nonfinite_layer_is_dropped(monkeypatch):
    """The layer's own eigenvalues say it is not finite: its shuffle, still queued behind
    busy shuffle threads, never runs (nothing holds the layer's tensor after its row)."""
    made = []
    monkeypatch.setattr(net_esd, "shuffled_mats", lambda *args: made.append(args))
    release = threading.Event()
    busy = [net_esd._shuffler().submit(release.wait) for _ in range(SHUFFLE_THREADS)]
    w = torch.randn(150, 120)
    w[3, 4] = float("nan")
    try:
        (layer,) = split_layers("0.weight", w, "linear", 0.5)
        result = net_esd.analyse_layer(layer, 0, ESDConfig(metrics=(randomize_metric(0),)))
    finally:
        release.set()
    for each in busy:
        each.result()
    net_esd._shuffler().submit(lambda: None).result()  # the queue has drained
    assert result.row["status"] == "nonfinite" and made == []


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_reused_word_buffer_changes_no_shuffle(dtype):
    """A buffer handed out again holds an earlier shuffle's words: every bit of them is
    overwritten (over more than one draw of random words), so the shuffle is the one a new
    buffer gives, and it lies in that buffer."""
    raw = np.random.default_rng(4).standard_normal((600, 500)).astype(dtype)
    dirty = np.full(raw.size + 99, np.iinfo(np.uint64).max, dtype=np.uint64)
    out = shuffled_bits(raw, layer_rng(2, "x", 0), words=dirty)
    assert np.shares_memory(out, dirty)
    np.testing.assert_array_equal(out, shuffled_bits(raw, layer_rng(2, "x", 0)))


def test_word_buffers_keep_the_largest_given_back_within_a_scope():
    words = WordBuffers()
    outside = words.take(10)
    words.give(outside)
    assert words.take(10) is not outside  # outside any scope nothing is kept
    with words.reused():
        small, large = words.take(10), words.take(1000)
        with words.reused():  # a layer's own scope inside a job's
            words.give(small)
            words.give(large)
        assert words.take(500) is large  # the larger is kept, and serves a smaller shuffle
        assert words.take(500) is not large  # handed out once: none is kept meanwhile
        words.give(large)
        bigger = words.take(2000)  # the one kept is too small: a new one
        assert bigger.size == 2000
        words.give(bigger)
    assert words.take(5) is not bigger  # freed when the outermost scope ended


def test_a_shuffles_buffer_is_kept_only_once_its_matrices_are_solved(monkeypatch):
    """Another shuffle may write in a buffer given back: never before the matrices lying in
    it are solved."""
    words = WordBuffers()
    monkeypatch.setattr(net_esd, "WORDS", words)
    (layer,) = split_layers("0.weight", torch.randn(150, 120), "linear", 0.5)
    with words.reused():
        shuffled = net_esd.shuffled_mats(layer, ESDConfig(), 0, 0)
        (buffer,) = shuffled[1]
        assert words.take(layer.N * layer.M) is not buffer  # still to be solved
        evals = shuffled_eigenvalues(layer, ESDConfig(), 0, 0, shuffled=shuffled)
        assert words.take(layer.N * layer.M) is buffer
    np.testing.assert_array_equal(evals, shuffled_eigenvalues(layer, ESDConfig(), 0, 0))


def test_layers_reuse_one_word_buffer_and_a_job_releases_it(monkeypatch):
    """Each layer's shuffle writes its words in the buffer the layer before gave back (no
    fresh memory to fault in), with the rows of new buffers; the job (here analyze()) ends
    holding none."""
    from esd_experiment import analyze

    words = WordBuffers()
    monkeypatch.setattr(net_esd, "WORDS", words)
    monkeypatch.setattr(esd_worker, "WORDS", words)
    taken, given = [], []
    take, give = words.take, words.give
    monkeypatch.setattr(words, "take", lambda size: taken.append(take(size)) or taken[-1])
    monkeypatch.setattr(words, "give", lambda buffer: given.append(buffer) or give(buffer))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(120, 130), torch.nn.Linear(130, 120))
    reused = analyze(net, randomize=True, seed=3)
    assert len(taken) == 2 and taken[1] is taken[0]
    assert [id(b) for b in given] == [id(b) for b in taken]  # each given back once solved
    assert words.take(1) is not taken[0]  # released when the job ended
    net_esd_estimator(net, randomize=True, seed=3)
    assert len(given) == 4 and words.take(1) is not given[-1]  # nor kept after this door
    monkeypatch.setattr(words, "give", lambda buffer: None)  # every shuffle in a new buffer
    fresh = analyze(net, randomize=True, seed=3)
    pd.testing.assert_frame_equal(reused[list(RANDOM_COLUMNS)], fresh[list(RANDOM_COLUMNS)])


def test_a_refit_without_randomize_says_it_leaves_the_randomized_columns_out(tmp_path, caplog):
    root, out, refit = (tmp_path / d for d in ("ckpt", "out", "refit"))
    root.mkdir()
    save_file({k: v.contiguous() for k, v in llama_like(4, blocks=1).items()},
              str(root / "model.safetensors"))
    assert esd_worker.main(["--model_id", str(root), "--device", "cpu", "--save_eigs",
                            "--output_dir", str(out), "--mp_fit", "--randomize", "--seed", "7"]
                           ) == esd_worker.EXIT_OK
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert esd_report.main(["refit", str(out), "--output_dir", str(refit),
                                "--fix_fingers", "DKS", "--mp_fit"]) == 0
    (csv,) = refit.glob("*.csv")
    frame = pd.read_csv(csv, keep_default_na=False)
    assert not set(RANDOM_COLUMNS) & set(frame.columns)  # they need the weights: not kept
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("randomize(seed=7)" in m and "needs the weights" in m for m in said), said
    assert not any("mp_fit" in m for m in said), said  # asked again: nothing left out
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # no metric asked: both are named
        assert esd_report.main(["refit", str(out), "--output_dir", str(tmp_path / "plain")]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("randomize(seed=7)" in m for m in said), said
    assert any("mp_fit" in m and "not asked again" in m for m in said), said


def test_a_zero_matrix_gives_weightwatchers_randomized_columns_or_nan_for_its_fit():
    net = torch.nn.Sequential(torch.nn.Linear(100, 120, bias=False),
                              torch.nn.Linear(50, 60, bias=False))
    for layer in net:
        torch.nn.init.zeros_(layer.weight)
    theirs = ww.WeightWatcher(model=net).analyze(randomize=True)
    ours = net_esd_estimator(net, randomize=True)
    same = ["max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist"]  # 0 or NaN in both
    np.testing.assert_array_equal(ours[same].to_numpy(float), theirs[same].to_numpy(float))
    fit = [c for c in RANDOM_COLUMNS if c not in same]
    assert (theirs[fit].to_numpy(float) == -1).all()  # WeightWatcher's "the fit did not run"
    assert ours[fit].isna().all().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_run_given_weightwatchers_shuffle_gives_its_columns_for_convolutions(monkeypatch,
                                                                              dtype):
    """End to end, through the estimator's own slicing, scaling and pooling: Conv2d layers
    (3 x 3 kernel slices, each shuffled; five shuffles pooled where the layer has fewer than
    100 eigenvalues in all: 8 x 9 = 72, not 16 x 9 = 144 nor 110 x 9), Linear, Embedding and
    GPT-2 Conv1D layers, with every matrix shuffled by the one fixed permutation."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.Conv2d(110, 120, 3),
                              torch.nn.Linear(120, 200), torch.nn.Embedding(300, 40),
                              Conv1D(150, 120), torch.nn.Conv2d(16, 32, 3)).to(dtype)
    torch.nn.init.normal_(net[4].weight)  # GPT-2's Conv1D: (in, out), transposed
    with torch.no_grad():  # heavy tails: the shuffled slices keep spikes, which pooling counts
        heavy = np.random.default_rng(0).standard_t(1.5, size=net[5].weight.shape)
        net[5].weight.copy_(torch.from_numpy(heavy))
    same_columns_as_weightwatcher_given_one_shuffle(net, monkeypatch)


def same_columns_as_weightwatcher_given_one_shuffle(net, monkeypatch) -> None:
    """Our randomized columns of ``net`` equal WeightWatcher's, both tools' every matrix
    shuffled by the one fixed permutation."""
    def fixed_bits(raw, rng, sort_words=None, words=None):
        flat = raw.reshape(-1).copy()
        fixed_shuffle(flat)
        return flat.reshape(raw.shape)

    monkeypatch.setattr(np.random, "shuffle", fixed_shuffle)
    theirs = ww.WeightWatcher(model=net).analyze(randomize=True)
    monkeypatch.undo()
    monkeypatch.setattr(net_esd, "shuffled_bits", fixed_bits)
    ours = net_esd_estimator(net, randomize=True)
    for col in RANDOM_COLUMNS:
        a, b = ours[col].to_numpy(float), theirs[col].to_numpy(float)
        if col == "ww_maxdist":  # a difference of eigenvalues: it errs as the larger does
            assert (abs(a - b) <= SHUFFLED_SOLVE_RTOL * theirs["max_rand_eval"]).all(), (a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=SHUFFLED_SOLVE_RTOL, atol=0, err_msg=col)


def test_a_numpy_integer_seed_is_the_same_seed():
    net = spiked_net([(120, 100)])
    ours = net_esd_estimator(net, randomize=True, seed=np.int64(3))
    pd.testing.assert_frame_equal(ours, net_esd_estimator(net, randomize=True, seed=3))
    assert randomize_metric(np.uint8(3)).name == "randomize(seed=3)"


def test_a_block_fp8_layer_shuffles_its_dequantized_matrix(tmp_path):
    """Block-FP8 weights and a 3-D FP8 expert stack, one row per expert: the shuffled matrix
    is the dequantized one (transformers' dequantization as the oracle), so every randomized
    column equals that of the dequantized weights given as float32."""
    from test_quantized import fp8, open_reader, save_checkpoint
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    rng = np.random.default_rng(3)
    block = [64, 128]
    w, experts = fp8(rng, 200, 300), fp8(rng, 3, 96, 160)
    s = torch.from_numpy(rng.uniform(1e-4, 1e-3, size=(4, 3)).astype(np.float32))
    se = torch.from_numpy(rng.uniform(1e-4, 1e-3, size=(3, 2, 2)).astype(np.float32))
    names = ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.experts.gate_up_proj")
    tensors = {names[0]: w, f"{names[0]}_scale_inv": s, names[1]: experts,
               f"{names[1]}_scale_inv": se}
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": block}
    reader = open_reader(save_checkpoint(tmp_path / "fp8", tensors, quant))
    oracle = {n: _dequantize_fp8_weight(q, sc, block, torch.float32)
              for n, q, sc in ((names[0], w, s), (names[1], experts, se))}
    config = ESDConfig(metrics=(randomize_metric(2),))
    ours = [r.row for r in net_esd.iter_layer_results(reader.iter_tensors(), config)]
    ref = [r.row for r in net_esd.iter_layer_results(
        ((n, oracle[n], reader.storage(n)) for n in reader.names), config)]
    assert len(ours) == 4 and [r["status"] for r in ours] == ["ok"] * 4
    for a, b in zip(ours, ref, strict=True):
        assert a["longname"] == b["longname"]
        assert [a[c] for c in RANDOM_COLUMNS] == [b[c] for c in RANDOM_COLUMNS], a["longname"]


@pytest.mark.parametrize("scale", [1e-21, 1e20])
def test_the_float32_solve_of_a_shuffle_holds_weights_of_any_magnitude(monkeypatch, scale):
    """Entries whose squares leave float32's range (a Gram that overflows, or products that
    underflow) still give WeightWatcher's columns given the same shuffle."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(120, 300))
    with torch.no_grad():
        net[0].weight.mul_(scale)
    same_columns_as_weightwatcher_given_one_shuffle(net, monkeypatch)
