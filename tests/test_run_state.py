"""Resume check, failure log and run lock."""

import subprocess
import sys
import textwrap

import pytest

from esd_experiment.core.errors import InputError
from esd_experiment.core.results import is_current
from esd_experiment.estimator.net_esd import ESDConfig
from esd_experiment.run.state import FailureLog, RunLock, read_failure_cause

COLUMNS = ("model_id", "esd_options")


def test_is_current_needs_current_header_and_options(tmp_path):
    csv = tmp_path / "m.csv"
    assert not is_current(csv, "opts-a", COLUMNS)
    csv.write_text("model_id,esd_options\nm,opts-a\n")
    assert is_current(csv, "opts-a", COLUMNS)
    assert not is_current(csv, "opts-b", COLUMNS), "other estimator options are not done"
    csv.write_text("model_id,esd_options_old\nm,opts-a\n")
    assert not is_current(csv, "opts-a", COLUMNS), "a result of another schema is recomputed"
    csv.write_text("model_id,esd_options\n")
    assert not is_current(csv, "opts-a", COLUMNS), "a header alone is no result"


def test_options_key_names_every_option_in_order():
    key = ESDConfig(fix_fingers="DKS", evals_thresh=1e-6).options_key
    assert key == ("fix_fingers=DKS;xmin_pos=2;bins=100;evals_thresh=1e-06;filter_zeros=False;"
                   "conv_norm=0.5;min_evals=10;precision=float64")
    assert ESDConfig(precision="float32").options_key != ESDConfig().options_key


def test_failure_log_roundtrip_and_clear(tmp_path):
    log = FailureLog(tmp_path)
    log.record("org/a", "NoWeightsError: org/a:\n no weights")
    log.record("org/b", "boom")
    again = FailureLog(tmp_path)
    assert again.cause("org/a") == "NoWeightsError: org/a: no weights", "causes are one line"
    assert "org/b" in again and len(again) == 2
    again.clear("org/a")
    assert (tmp_path / "failed_models.txt").read_text() == "org/b\tboom\n"


def test_failure_log_not_created_without_failures(tmp_path):
    FailureLog(tmp_path).clear("org/a")
    assert not (tmp_path / "failed_models.txt").exists()


def test_read_failure_cause(tmp_path):
    record = tmp_path / "m.failure.json"
    assert read_failure_cause(record) is None
    record.write_text('{"error": "ModelNotFoundError", "message": "org/x: not found"}')
    assert read_failure_cause(record) == "ModelNotFoundError: org/x: not found"
    record.write_text("{garbage")
    assert read_failure_cause(record) is None


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(InputError, match=r"in use by another run \(pid \d+ on "):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass


def test_lock_of_a_killed_run_is_not_stuck(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[1])!r})
        from esd_experiment.run.state import RunLock
        RunLock({str(tmp_path)!r}).__enter__()
        os._exit(0)  # dies holding the lock, as a crashed run would
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / ".esd_run.lock").exists()
    with RunLock(tmp_path):
        pass


OPTIONS = ESDConfig().options_record  # every option, as the runner records them


def test_options_are_recorded_and_other_options_refused(tmp_path):
    from esd_experiment.run.state import check_options

    check_options(tmp_path, OPTIONS, overwrite=False)
    check_options(tmp_path, OPTIONS, overwrite=False)  # same options: fine
    other = {**OPTIONS, "fix_fingers": "DKS"}
    with pytest.raises(InputError, match=r"fix_fingers: 'xmin_mid' -> 'DKS'.*--overwrite"):
        check_options(tmp_path, other, overwrite=False)
    check_options(tmp_path, other, overwrite=True)
    with pytest.raises(InputError, match="'DKS' -> 'xmin_mid'"):
        check_options(tmp_path, OPTIONS, overwrite=False)


@pytest.mark.parametrize("where", ["", "delta"])
def test_results_without_the_options_record_are_held_to_their_own_options(tmp_path, where):
    """Results copied without ``.esd_options.json``, or written by esd_worker.py alone (which
    records none), keep the options their rows name: other options are refused, not mixed in."""
    import torch

    from esd_experiment.run.state import check_options
    from tests.result_fixtures import write_model

    write_model(tmp_path / where, "org/m", {"w.weight": torch.randn(16, 12)},
                config=ESDConfig(fix_fingers="DKS"))
    dks = {**OPTIONS, "fix_fingers": "DKS"}
    with pytest.raises(InputError, match=r"m\.csv: fix_fingers: 'DKS' -> 'xmin_mid'"):
        check_options(tmp_path, OPTIONS, overwrite=False)
    assert not (tmp_path / ".esd_options.json").exists()
    mine = tmp_path / where / "compare_alpha.csv"  # a user's own table: not a result
    mine.write_text(f"model_id,mean_alpha_note,esd_options\norg/m,3.1,{ESDConfig().options_key}\n")
    check_options(tmp_path, dks, overwrite=False)  # the results' own options: recorded
    assert (tmp_path / ".esd_options.json").is_file()
    with pytest.raises(InputError, match="'DKS' -> 'xmin_mid'"):
        check_options(tmp_path, OPTIONS, overwrite=False)


def test_unusable_output_directory_is_an_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match=f"output directory {blocker} cannot be used"):
        with RunLock(blocker):
            pass


@pytest.mark.parametrize("prefix", [b"\xef\xbb\xbf", b""])
def test_a_hand_edited_failure_file_is_read_as_its_lines_say(tmp_path, prefix):
    """A BOM (Notepad's) or a byte that is not UTF-8 in failed_models.txt: the lines are still
    the models they name (a BOM made the first one another id, never cleared; a Latin-1 byte
    stopped the run with a UnicodeDecodeError)."""
    from esd_experiment.report.cli import read_failed

    (tmp_path / "failed_models.txt").write_bytes(
        prefix + b"org/a\tOSError: disk hiccup\r\norg/b\tcaf\xe9 closed\n")
    failures = FailureLog(tmp_path)
    assert "org/a" in failures and "org/b" in failures
    failures.clear("org/a")
    assert (tmp_path / "failed_models.txt").read_text(encoding="utf-8").startswith("org/b\t")
    (tmp_path / "failed_models.txt").write_bytes(prefix + b"org/a\tOSError\n")
    assert [key for key, *_ in read_failed(tmp_path, tmp_path / "logs")] == ["org/a"]

