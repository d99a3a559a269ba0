"""Reading results back: load_results' dtypes and checks, the per-model summary, no torch."""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from esd_experiment.core import results
from esd_experiment.core.errors import InputError
from esd_experiment.core.results import (
    INTEGER_COLUMNS,
    OPTION_NAMES,
    RESULT_COLUMNS,
    SUMMARY_COLUMNS,
    load_results,
    parse_options_key,
    read_results,
    summarize,
)
from esd_experiment.estimator.options import ESDConfig
from tests.result_fixtures import ROOT_FOR_SUBPROCESS, copy_results, good_results

# Means recomputed here from the same float64 values in another summation order.
MEAN_RTOL = 1e-12


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return out, good_results(out)


def test_every_csv_as_one_typed_frame(good):
    out, paths = good
    layers = load_results(out)
    assert tuple(layers.columns) == RESULT_COLUMNS
    assert set(layers.model_id) == set(paths)
    assert len(layers) == sum(len(pd.read_csv(p.csv)) for p in paths.values())
    for column in INTEGER_COLUMNS:
        assert layers[column].dtype == "Int64", column
    assert pd.api.types.is_string_dtype(layers["warning"])
    assert set(layers.warning) <= {"", "over-trained", "under-trained"}  # never NaN
    assert (layers.revision == "").all()
    assert layers.alpha.dtype == "float64"
    # an embedding has no block; a zero matrix's log norm is -inf, read back as a number
    assert layers.loc[layers.longname == "lm_head", "block"].isna().all()
    assert layers.loc[layers.longname.str.startswith("model.layers.1."), "block"].eq(1).all()
    zero = layers[layers.longname == "model.layers.0.self_attn.rotary"]
    assert (zero.status == "fit_failed").all() and (zero.log_spectral_norm == -np.inf).all()
    direct = pd.read_csv(paths["org/base"].csv)
    mine = layers[layers.model_id == "org/base"].reset_index(drop=True)
    np.testing.assert_array_equal(mine.alpha.to_numpy(), direct.alpha.to_numpy())


def test_summary_one_row_per_model(good):
    out, _ = good
    layers = load_results(out)
    summary = load_results(out, summary=True)
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    assert sorted(summary.model_id) == sorted(set(layers.model_id))
    row = summary.set_index("model_id").loc["org/base"]
    ok = layers[(layers.model_id == "org/base") & (layers.status == "ok")]
    assert row.layers == (layers.model_id == "org/base").sum()
    assert row.fitted == len(ok) < row.layers  # the zero and the tiny layer are not fitted
    assert row.alpha_mean == pytest.approx(ok.alpha.mean(), rel=MEAN_RTOL)
    assert row.alpha_median == pytest.approx(ok.alpha.median(), rel=MEAN_RTOL)
    for column in ("alpha_weighted", "log_spectral_norm", "log_norm", "stable_rank", "entropy"):
        assert row[f"{column}_mean"] == pytest.approx(ok[column].mean(), rel=MEAN_RTOL)
    assert row.over_trained == (ok.alpha < 2).sum()
    assert row.under_trained == (ok.alpha > 6).sum()
    assert row.over_trained + row.under_trained > 0  # the fixture spans the thresholds


def test_delta_alpha_mean_is_against_the_source_in_the_same_results(good):
    out, _ = good
    summary = load_results(out, summary=True).set_index("model_id")
    tuned = summary.loc["org/fine-tune"]
    assert tuned.source_model == "org/base"
    assert tuned.delta_alpha_mean == pytest.approx(
        tuned.alpha_mean - summary.loc["org/base", "alpha_mean"], rel=MEAN_RTOL)
    assert tuned.delta_alpha_mean != 0
    assert math.isnan(summary.loc["org/base", "delta_alpha_mean"])


def test_model_without_fitted_layers_counts_zero():
    layers = pd.DataFrame({c: [] for c in RESULT_COLUMNS})
    layers = pd.concat([layers, pd.DataFrame([{
        "model_id": "m", "revision": "", "source_model": "absent", "longname": "x",
        "status": "too_small", "alpha": np.nan}])], ignore_index=True)
    row = summarize(layers).iloc[0]
    assert (row.layers, row.fitted, row.over_trained, row.under_trained) == (1, 0, 0, 0)
    assert math.isnan(row.alpha_mean) and math.isnan(row.delta_alpha_mean)


def test_missing_empty_and_foreign_directories_are_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(InputError, match="holds no result CSV"):
        load_results(tmp_path)
    (tmp_path / "prices.csv").write_text("date,price\n2024-01-01,3\n")
    with pytest.raises(InputError, match=r"no readable result CSV \(prices.csv: not a result"):
        load_results(tmp_path)


def _damage(out, base_csv):
    """Files a results directory may hold besides good results -> the reason they get."""
    text = base_csv.read_text()
    header, first, *rest = text.splitlines(keepends=True)
    fields = first.split(",")
    cases = {
        "cut-mid-line.csv": (text[: len(text) // 2], "truncated: its last line is incomplete"),
        "short-row.csv": (header + first + ",".join(fields[:5]) + "\n",
                          "truncated: line 3 has fewer fields"),
        "long-row.csv": (header + first.rstrip("\n") + ",extra\n", "cannot be parsed"),
        "text-in-number.csv": (header + first.replace(fields[12], "abc", 1),
                               "column alpha holds text, not a number"),
        "bad-status.csv": (header + first.replace(",ok,", ",done,"), "a status that is not"),
        "header-only.csv": (header, "holds a header but no rows"),
        "old-schema.csv": ("model_id,layer_id,longname,alpha\nm,0,x,2.5\n",
                           "another schema version (missing columns: revision"),
        "prices.csv": ("date,price\n2024-01-01,3\n", "not a result CSV (its first line is not"),
        "zz-copy.csv": (text, "a second result of 'org/base'"),
    }
    for name, (content, _) in cases.items():
        (out / name).write_text(content)
    return {name: why for name, (_, why) in cases.items()}


@pytest.mark.parametrize("copy", ["a-backup.csv", "org--base copy.csv", "org--base.bak.csv"])
def test_a_users_copy_of_a_result_is_not_read_in_place_of_the_result(good, tmp_path, copy):
    """A copy of a result under another name (a file manager's "copy", a backup) holds the
    same model_id: the file the runner names for the model is read, wherever the copy sorts,
    and the copy is named as skipped."""
    src, paths = good
    out = copy_results(src, tmp_path / "r")
    own = paths["org/base"].csv.name
    older = pd.read_csv(out / own, keep_default_na=False)
    older["alpha"] = older["alpha"].replace("", "nan").astype(float) + 1.0
    older.to_csv(out / copy, index=False)
    with pytest.warns(UserWarning, match="second result"):
        layers = load_results(out)
    read = layers[layers.model_id == "org/base"]["alpha"].to_numpy(dtype=float)
    want = pd.read_csv(out / own)["alpha"].to_numpy(dtype=float)
    np.testing.assert_array_equal(read, want)
    assert "second result of 'org/base'" in layers.attrs["skipped"][str(out / copy)]


def test_damaged_and_foreign_files_are_named_and_skipped(good, tmp_path):
    src, paths = good
    out = copy_results(src, tmp_path / "r")
    expected = _damage(out, paths["org/base"].csv)
    with pytest.warns(UserWarning, match=r"9 file\(s\) in .* skipped"):
        layers = load_results(out)
    assert set(layers.model_id) == set(paths)  # every good result is still read
    skipped = {name.rsplit("/", 1)[-1]: why for name, why in layers.attrs["skipped"].items()}
    assert set(skipped) == set(expected)
    for name, why in expected.items():
        assert why in skipped[name], (name, skipped[name])
    loaded = read_results(out)
    assert {p.name for p in loaded.skipped} == set(expected)
    assert loaded.files["org/base"] == out / paths["org/base"].csv.name  # not its copy


def test_parse_options_key_round_trip():
    key = ESDConfig(fix_fingers="DKS", evals_thresh=1e-6).options_key
    parsed = parse_options_key(key)
    assert tuple(parsed) == OPTION_NAMES
    assert parsed["fix_fingers"] == "DKS" and float(parsed["evals_thresh"]) == 1e-6
    with pytest.raises(InputError, match="not of this version's form"):
        parse_options_key("fix_fingers=DKS")


def test_results_and_load_results_import_no_torch(good):
    out, _ = good
    code = ("import sys; from esd_experiment.core import results; df = results.load_results(sys.argv[1], summary=True); "
            "assert len(df) == 4, df; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT_FOR_SUBPROCESS,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert "torch" not in results.__dict__


def test_stack_names_the_repeated_blocks(good):
    """Rows inside repeated blocks name their stack; embeddings and heads have none."""
    out, _ = good
    layers = load_results(out)
    assert "stack" in RESULT_COLUMNS and RESULT_COLUMNS[-1] == "esd_options"
    inside = layers.longname.str.startswith("model.layers.")
    assert (layers.loc[inside, "stack"] == "model.layers").all()
    assert (layers.loc[~inside & layers.block.isna(), "stack"] == "").all()


@pytest.mark.parametrize("index", [False, True])
def test_result_of_the_schema_before_stack_still_loads(good, tmp_path, index):
    """A CSV written before the stack column (all other columns in their order; saved again
    with pandas' index, or not) is read, its stack empty; the resume check computes it
    again."""
    out, paths = good
    old_dir = copy_results(out, tmp_path / "old")
    legacy = tuple(c for c in RESULT_COLUMNS if c != "stack")
    for path in old_dir.glob("*.csv"):
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
        frame[list(legacy)].to_csv(path, index=index)
    new, old = load_results(out), load_results(old_dir)
    assert tuple(old.columns) == RESULT_COLUMNS and (old["stack"] == "").all()
    pd.testing.assert_frame_equal(old.drop(columns="stack"), new.drop(columns="stack"))
    first = sorted(old_dir.glob("*.csv"))[0]
    assert not results.is_current(first, new.esd_options.iloc[0])


def test_a_column_numeric_in_some_models_keeps_their_means(good, tmp_path):
    """A user's column of numbers in most results and text in one ('n/a' typed in a
    spreadsheet): each model whose values are numbers keeps its mean; it was dropped from
    every model's summary, since the column as a whole is no number."""
    out, paths = good
    out = copy_results(out, tmp_path / "copy")
    scores = {}
    for model_id, p in paths.items():
        csv = out / p.csv.name
        frame = pd.read_csv(csv, keep_default_na=False)
        values = np.arange(len(frame), dtype=float) + len(scores)
        frame["score"] = ["n/a"] * len(frame) if not scores else values
        frame["label"] = "text"  # a column of text alone: no mean at all
        scores[model_id] = math.nan if not scores else values.mean()
        frame.to_csv(csv, index=False)
    summary = load_results(out, summary=True).set_index("model_id")
    assert "label_mean" not in summary.columns
    for model_id, expected in scores.items():
        got = summary.loc[model_id, "score_mean"]
        assert (math.isnan(got) if math.isnan(expected)
                else got == pytest.approx(expected, rel=MEAN_RTOL)), model_id
