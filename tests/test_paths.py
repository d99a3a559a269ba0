"""Output file names: readable, injective, always inside the output directory."""

from pathlib import Path

import pytest

from esd_experiment.core.paths import (
    ModelPaths,
    is_own_file,
    model_paths,
    model_stem,
    write_atomic,
    write_text_atomic,
)


@pytest.mark.parametrize("model_id, revision, stem", [
    ("meta-llama/Llama-2-7b-hf", None, "meta-llama--Llama-2-7b-hf"),
    ("gpt2", None, "gpt2"),
    ("org/name", "main", "org--name@main"),
    ("org/name", "0123abcd" * 5, "org--name@" + "0123abcd" * 5),
])
def test_hub_ids_get_readable_stems(model_id, revision, stem):
    assert model_stem(model_id, revision) == stem


@pytest.mark.parametrize("model_id, revision", [
    ("../../etc/passwd", None), ("/abs/path/model", None), ("org/name", "feature/x"),
    ("org/../name", None), ("a/b/c", None), ("..", None), ("name with spaces", None),
    ("org/name", "../../x"), ("~user/x", None), ("x" * 400, None), ("-rf", None),
    ("/a/b/.hidden", None),
])
def test_unusual_ids_stay_one_path_component(tmp_path, model_id, revision):
    stem = model_stem(model_id, revision)
    assert "/" not in stem and "\0" not in stem and stem not in {".", ".."}
    assert not stem.startswith(("-", ".")), "no name reads as an option or a hidden file"
    assert "~" in stem, "non-hub ids carry a hash so they cannot collide with hub ids"
    assert len(stem.encode()) < 200
    paths = ModelPaths.for_model(tmp_path, model_id, revision)
    for p in (paths.csv, paths.eigs, paths.log, paths.failure):
        assert p.resolve().is_relative_to(tmp_path.resolve())


def test_stems_are_injective_across_confusable_ids():
    ids = [("org/name", None), ("org--name", None), ("org/name", "main"), ("org/name@main", None),
           ("/tmp/org/name", None), ("/tmp/org_name", None), ("/tmp/org name", None),
           ("org/Name", None), ("org/name", ""), ("org/name ", None)]
    stems = {model_stem(m, r) for m, r in ids}
    # ("org/name", "") and ("org/name ", None) denote the same model as ("org/name", None)
    assert len(stems) == len(ids) - 2


def test_empty_id_is_refused():
    with pytest.raises(ValueError, match="empty"):
        model_stem("  ")


def test_write_atomic_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.csv"
    write_text_atomic(target, "old\n")

    def broken(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"], "no temporary file is left behind"


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    import os

    old = os.umask(0o022)
    os.umask(old)
    target = tmp_path / "result.csv"
    write_text_atomic(target, "x\n")
    assert target.stat().st_mode & 0o777 == 0o666 & ~old


@pytest.mark.parametrize("model_id, gguf_file", [
    ("org/name", ""), ("org/name@v1.0", ""), ("org/name", "model-Q4_K_M.gguf"),
    ("org/name", "m Q4.gguf"), ("org/name@main", "model-Q8_0.gguf"), ("/data/x y/model", ""),
    ("/data/" + "n" * 150 + "/model", ""),
])
def test_the_runner_s_own_result_file_is_told_from_a_copy(model_id, gguf_file):
    """``is_own_file`` with a result's model_id (the list entry's key, ``id#gguf_file`` for a
    GGUF file of a repository): the runner's file name is its own, a copy's is not."""
    key = f"{model_id}#{gguf_file}" if gguf_file else model_id
    own = model_paths(Path("out"), model_id, gguf_file=gguf_file).csv
    assert is_own_file(own, key)
    assert not is_own_file(own.with_name(f"{own.stem} copy.csv"), key)

