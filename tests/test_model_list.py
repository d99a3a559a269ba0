"""The model list and the jobs made from it: a base and its adapters share one job."""

from __future__ import annotations

import pytest

from esd_experiment.core.errors import InputError
from esd_experiment.run.model_list import JobSpec, ListEntry, group_jobs, read_model_list


def test_model_list_keeps_first_row_of_a_duplicate_id(tmp_path, caplog):
    path = tmp_path / "list.csv"
    path.write_text("model_id,base_model_relation,source_model\n"
                    "org/a,,\norg/b,lora,org/base\norg/a,,\norg/b,lora,org/other\n")
    entries = read_model_list(path)
    assert entries == [ListEntry("org/a"), ListEntry("org/b", "lora", "org/base")]
    assert "org/b is listed twice with other columns" in caplog.text


def test_one_directory_listed_under_two_spellings_runs_once(tmp_path, caplog, monkeypatch):
    """A trailing '/', './' or a relative path beside the absolute one name one model: the
    first row runs, once (two rows made two jobs and two results of one model)."""
    model = tmp_path / "zoo dir" / "tiny"
    model.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "list.csv"
    path.write_text(f"model_id\n{model}\n{model}/\n./zoo dir/tiny\nzoo dir/../zoo dir/tiny/\n"
                    "org/a\n")
    assert read_model_list(path) == [ListEntry(str(model)), ListEntry("org/a")]
    assert f"{model}/ names the model of {model}" in caplog.text


def test_a_row_without_a_model_id_is_named_not_dropped_silently(tmp_path, caplog):
    path = tmp_path / "list.csv"
    path.write_text("model_id,base_model_relation,source_model\norg/a,,\n,adapter,org/llama\n")
    assert read_model_list(path) == [ListEntry("org/a")]
    assert "line 3: skipped, it has no model_id: 'adapter,org/llama'" in caplog.text


def test_model_list_that_is_not_utf8_is_an_input_error(tmp_path):
    path = tmp_path / "list.csv"
    path.write_bytes(b"\xff\xfemodel_id\norg/a\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_model_list(path)


def test_ids_with_control_characters_are_skipped(tmp_path, caplog):
    path = tmp_path / "list.csv"
    path.write_text('model_id\n"multi\nline/x"\n"tab\there/x"\norg/ok\n')
    assert read_model_list(path) == [ListEntry("org/ok")]
    assert caplog.text.count("control characters") == 2


def test_gguf_file_column(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("model_id,gguf_file\norg/q-gguf,model-Q4_K_M.gguf\n")
    assert read_model_list(path) == [ListEntry("org/q-gguf", gguf_file="model-Q4_K_M.gguf")]



def test_two_gguf_files_of_one_repository_are_two_jobs_named_by_their_entries():
    entries = [ListEntry("org/q-GGUF", gguf_file="Q8_0"),
               ListEntry("org/q-GGUF", gguf_file="Q4_0")]
    jobs = group_jobs(entries, max_group=8, read_adapter_config=no_config)
    assert [job.name for job in jobs] == ["org/q-GGUF#Q8_0", "org/q-GGUF#Q4_0"]

def no_config(model_id):
    return None


def ids(jobs):
    return [[e.model_id for e in job.entries] for job in jobs]


def test_an_adapter_naming_another_spelling_of_its_listed_base_joins_its_job(tmp_path,
                                                                           monkeypatch):
    """The base listed by its absolute path, the adapter naming it relative (or through a
    link): one job, the base read once."""
    base = tmp_path / "zoo" / "base"
    base.mkdir(parents=True)
    (tmp_path / "zoo" / "link").symlink_to(base)
    monkeypatch.chdir(tmp_path)
    entries = [ListEntry(str(base)), ListEntry("zoo/lora", "lora", "zoo/base/"),
               ListEntry("zoo/lora2", "lora", "zoo/link")]
    jobs = group_jobs(entries, max_group=8, read_adapter_config=no_config)
    assert ids(jobs) == [[str(base), "zoo/lora", "zoo/lora2"]]


def test_a_base_and_its_adapters_make_one_job_base_first():
    entries = [ListEntry("org/a1", "lora", "org/base"), ListEntry("org/other"),
               ListEntry("org/base"), ListEntry("org/a2", "adapter", "org/base"),
               ListEntry("org/c1", "peft", "org/base2")]
    jobs = group_jobs(entries, max_group=8, read_adapter_config=no_config)
    assert ids(jobs) == [["org/base", "org/a1", "org/a2"], ["org/other"], ["org/c1"]]
    assert jobs[0].base == "org/base" and jobs[2].base == "org/base2"
    assert jobs[1] == JobSpec((ListEntry("org/other"),))


def test_large_groups_are_split_and_the_base_goes_first():
    entries = [ListEntry("org/base")] + [ListEntry(f"org/a{i}", "lora", "org/base")
                                        for i in range(5)]
    jobs = group_jobs(entries, max_group=2, read_adapter_config=no_config)
    assert ids(jobs) == [["org/base", "org/a0"], ["org/a1", "org/a2"], ["org/a3", "org/a4"]]
    assert {job.base for job in jobs} == {"org/base"}


def test_adapter_base_read_from_its_adapter_config():
    configs = {"org/a1": {"base_model_name_or_path": "org/base"},
               "org/a2": {"base_model_name_or_path": "org/base", "revision": "v2"}}
    entries = [ListEntry("org/base"), ListEntry("org/a1", "lora"), ListEntry("org/a2", "lora"),
               ListEntry("org/unknown", "lora")]
    jobs = group_jobs(entries, max_group=8, read_adapter_config=configs.get)
    assert ids(jobs) == [["org/base", "org/a1"], ["org/a2"], ["org/unknown"]]
    assert jobs[1].base == "org/base@v2" and jobs[2].base == ""


def test_unmarked_rows_are_never_grouped():
    entries = [ListEntry("org/base"), ListEntry("org/ft", "", "org/base")]
    assert ids(group_jobs(entries, 8, no_config)) == [["org/base"], ["org/ft"]]


def test_a_gguf_entry_of_a_base_runs_alone_with_its_own_row():
    """One GGUF file of a repository is its own model, not the base its adapters merge into:
    it keeps its job (and its gguf_file) to itself."""
    gguf = ListEntry("org/base", gguf_file="base-Q4_K_M.gguf")
    entries = [gguf, ListEntry("org/a1", "lora", "org/base"), ListEntry("org/base")]
    jobs = group_jobs(entries, max_group=8, read_adapter_config=no_config)
    assert [job.entries for job in jobs] == [
        (gguf,), (ListEntry("org/base"), ListEntry("org/a1", "lora", "org/base"))]
    assert jobs[0].base == "" and jobs[1].base == "org/base"
