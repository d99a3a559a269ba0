"""Whole runs against the hub stand-in, as a user runs them on a list of hub ids: a base and
its adapters sharing one download, an unreachable hub, a hung download, the preflight, and
tokens kept out of every message."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.loader_fixtures import llama, save_adapter, save_model, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "run_esd_experiment.py"
CLI_TIMEOUT_S = 300     # a loaded 2-core CI machine starts each worker in a few seconds
OUTAGE_BOUND_S = 90     # three failed jobs and a stop, with worker start-ups, on a slow machine
TOKEN = "hf_" + "Zq9" * 12


def run_cli(hub, *argv, env_extra=None, timeout=CLI_TIMEOUT_S):
    env = {**hub.env(hub.cache), **(env_extra or {})}
    return subprocess.run([sys.executable, str(RUNNER), *map(str, argv), "--device", "cpu",
                           "--retry_backoff", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def run_with_the_hub_down(hub, *argv):
    """``run_cli`` with the hub stand-in down: the process and its seconds."""
    hub.down()
    started = time.monotonic()
    proc = run_cli(hub, *argv)
    return proc, time.monotonic() - started


def write_list(path: Path, rows) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model_id", "base_model_relation", "source_model"])
        writer.writerows(rows)
    return path


def shard_bytes(hub, repo_id: str) -> int:
    """Bytes of whole-file downloads of a repo's safetensors shards."""
    return sum(s.nbytes for s in hub.log if s.method == "GET" and s.repo_id == repo_id
               and s.range is None and (s.filename or "").endswith(".safetensors"))


@pytest.fixture
def base_and_adapters(hub, tmp_path):
    base = llama()
    folder = save_model(base, tmp_path / "base", max_shard_size="60KB")
    hub.add_repo("org/base", folder)
    for i in range(6):
        adapter = save_adapter(base, tmp_path / f"adapter{i}", "org/base", seed=i + 1, r=4,
                               target_modules=["q_proj", "v_proj"])
        hub.add_repo(f"org/adapter{i}", adapter)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return size


def test_adapters_share_one_download_of_their_base(hub, tmp_path, base_and_adapters):
    models = write_list(tmp_path / "models.csv", [("org/base", "", "")] + [
        (f"org/adapter{i}", "lora", "org/base" if i % 2 else "") for i in range(6)])
    out = tmp_path / "out"
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--cleanup_cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 to run" in proc.stderr and "1 job(s)" in proc.stderr
    assert len(list(out.glob("*.csv"))) == 7
    assert shard_bytes(hub, "org/base") == base_and_adapters, "the base is fetched once"
    assert not list(hub.cache.glob("models--*")), "--cleanup_cache left nothing behind"
    adapters = pd.concat(pd.read_csv(p) for p in out.glob("org--adapter*.csv"))
    assert set(adapters.source_model) == {"org/base"} and (adapters.status == "ok").all()


def test_an_unreachable_hub_stops_the_run_without_failing_the_models(hub, tmp_path):
    for i in range(6):
        hub.add_repo(f"org/m{i}", write_safetensors(tmp_path / f"m{i}",
                                                    {"w.weight": __import__("torch").ones(4, 4)}))
    models = write_list(tmp_path / "models.csv", [(f"org/m{i}", "", "") for i in range(6)])
    out = tmp_path / "out"
    proc, took = run_with_the_hub_down(hub, "--model_list", models, "--output_dir", out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the hub cannot be reached" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert took < OUTAGE_BOUND_S
    failed = out / "failed_models.txt"
    assert not failed.exists() or not failed.read_text().strip()
    hub.up()
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--skip_failed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("*.csv"))) == 6, "a rerun picks every model up"


def test_an_unreachable_hub_is_asked_for_one_adapters_base_not_every_ones(hub, tmp_path):
    """Adapters listed without their base: the runner looks each base up before the run;
    with the hub down the first lookup says so and the others are not tried (each waited
    for the client's retries, minutes for a long list, before the outage rule could act)."""
    models = write_list(tmp_path / "models.csv", [(f"org/adapter{i}", "lora", "")
                                                  for i in range(8)])
    out = tmp_path / "out"
    proc, took = run_with_the_hub_down(hub, "--model_list", models, "--output_dir", out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("the hub could not be reached") == 1, proc.stderr[-3000:]
    assert "the hub cannot be reached" in proc.stderr
    assert took < OUTAGE_BOUND_S


def test_with_the_hub_down_an_adapters_cached_config_still_names_its_base(hub, tmp_path,
                                                                         caplog):
    """Once one lookup found the hub down, the others read the cache alone: an adapter whose
    adapter_config.json is cached still joins its base's job (the base read once)."""
    from types import SimpleNamespace

    from esd_experiment.hub.client import hub_json
    from esd_experiment.run.cli import adapter_config_reader

    base = llama()
    for i in range(2):
        hub.add_repo(f"org/ad{i}", save_adapter(base, tmp_path / f"ad{i}", "org/base", r=4,
                                                target_modules=["q_proj"]))
    assert hub_json("org/ad1", "adapter_config.json")["base_model_name_or_path"] == "org/base"
    hub.down()
    read = adapter_config_reader(SimpleNamespace(cache_dir=None, cleanup_cache=False))
    assert read("org/ad0") is None
    assert read("org/ad1")["base_model_name_or_path"] == "org/base"
    assert caplog.text.count("the hub could not be reached") == 1


def test_ctrl_c_while_the_bases_are_looked_up_says_so_without_a_traceback(hub, tmp_path):
    models = write_list(tmp_path / "models.csv", [("org/adapter0", "lora", "")])
    hub.down()  # the lookup waits for the client's retries
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), "--model_list", str(models), "--output_dir",
         str(tmp_path / "out"), "--device", "cpu", "--no-progress"],
        stderr=subprocess.PIPE, text=True, env=hub.env(hub.cache))
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not (tmp_path / "out" / "logs").is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # into the lookup
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err, err[-3000:]


def test_a_hung_download_times_out_naming_its_stage(hub, tmp_path):
    folder = write_safetensors(tmp_path / "big", {
        "w.weight": __import__("torch").randn(300, 300)})  # larger than a header read
    hub.add_repo("org/slow", folder)
    hub.stall(60, filename="model.safetensors", after_bytes=200_000)
    models = write_list(tmp_path / "models.csv", [("org/slow", "", "")])
    out = tmp_path / "out"
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--model_timeout", "8",
                   "--max_retries", "0", env_extra={"HF_HUB_DOWNLOAD_TIMEOUT": "300"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    cause = (out / "failed_models.txt").read_text()
    assert cause.startswith("org/slow\ttimeout after 8 s in download"), cause


def test_dry_run_resolves_everything_and_downloads_no_weights(hub, tmp_path):
    torch = __import__("torch")
    base = llama()
    hub.add_repo("org/base", save_model(base, tmp_path / "base", max_shard_size="60KB"))
    hub.add_repo("org/adapter", save_adapter(base, tmp_path / "adapter", "org/base", r=4,
                                             target_modules=["q_proj"]))
    hub.add_repo("org/gated", write_safetensors(tmp_path / "g", {"w.weight": torch.ones(2, 2)}),
                 gated=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("nothing here")
    hub.add_repo("org/empty", empty)
    hub.add_repo("org/quant", write_safetensors(
        tmp_path / "q", {"w.qweight": torch.zeros(2, 2, dtype=torch.int32)},
        {"quantization_config": {"quant_method": "no-such-method"}}))
    models = write_list(tmp_path / "models.csv", [
        ("org/base", "", ""), ("org/adapter", "lora", ""), ("org/gated", "", ""),
        ("org/missing", "", ""), ("org/base@no-such-branch", "", ""), ("org/empty", "", ""),
        ("org/quant", "", "")])
    out = tmp_path / "out"
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--dry_run",
                   env_extra={"HF_TOKEN": TOKEN})
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = pd.read_csv(out / "preflight" / "preflight.csv",
                       keep_default_na=False).set_index("model_id")
    assert rows.status.to_dict() == {
        "org/base": "ok", "org/adapter": "ok", "org/gated": "gated", "org/missing": "not_found",
        "org/base@no-such-branch": "revision_not_found", "org/empty": "no_weights",
        "org/quant": "unsupported"}
    assert rows.loc["org/adapter", "kind"] == "adapter"
    assert rows.loc["org/adapter", "source_model"].startswith("org/base@")
    assert rows.loc["org/adapter", "base_bytes"] == rows.loc["org/base", "weight_bytes"] > 0
    assert rows.loc["org/base", "format"] == "safetensors"
    assert rows.loc["org/quant", "format"] == "quantized:no-such-method"
    assert "2 of 7 models ok" in proc.stdout and "to download" in proc.stdout
    assert "formats read:" in proc.stdout and "gptq" in proc.stdout, "a refusal lists the formats"
    assert shard_bytes(hub, "org/base") == 0 and not list(out.glob("*.csv")), \
        "no weight downloaded, no model analysed"
    assert TOKEN not in proc.stdout + proc.stderr + (out / "preflight/preflight.csv").read_text()


def test_dry_run_under_delta_counts_each_fine_tune_s_source(hub, tmp_path):
    """Under --delta a fine-tune is streamed beside its source: the dry run checks the source
    (refusing the row, naming it, when it cannot be read), counts its bytes as the row's
    base_bytes, and the disk --cleanup_cache needs is that of one pass: the source's two
    largest shards and those of each fine-tune of it in the pass."""
    base_dir = save_model(llama(), tmp_path / "base", max_shard_size="60KB")
    ft_dir = save_model(llama(seed=1), tmp_path / "ft", max_shard_size="60KB")
    hub.add_repo("org/base", base_dir)
    hub.add_repo("org/ft", ft_dir)
    models = write_list(tmp_path / "models.csv", [("org/ft", "", "org/base"),
                                                  ("org/ft2", "", "org/missing"),
                                                  ("org/ft3", "", "org/base")])
    hub.add_repo("org/ft2", ft_dir)
    hub.add_repo("org/ft3", ft_dir)

    def shards(folder):
        return sorted(p.stat().st_size for p in folder.glob("*.safetensors"))

    two = {d: sum(shards(d)[-2:]) for d in (base_dir, ft_dir)}
    margin = 10 * 2**20  # preflight.SMALL_FILES_MARGIN, the small files beside the shards
    for flags, source_bytes, disk in (((), 0, two[ft_dir]),
                                      (("--delta",), sum(shards(base_dir)),
                                       two[base_dir] + 2 * two[ft_dir])):
        out = tmp_path / f"out{len(flags)}"
        proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--dry_run", *flags)
        rows = pd.read_csv(out / "preflight" / "preflight.csv",
                           keep_default_na=False).set_index("model_id")
        assert rows.loc["org/ft", "status"] == "ok"
        assert rows.loc["org/ft", "base_bytes"] == source_bytes
        assert f"with --cleanup_cache {(disk + margin) / 2**20:.1f} MiB" in proc.stdout, \
            proc.stdout
        if flags:
            assert proc.returncode == 1, proc.stderr[-3000:]
            assert rows.loc["org/ft2", "status"] == "no_base"
            detail = rows.loc["org/ft2", "detail"]
            assert "--delta: its source model cannot be read: org/missing" in detail, detail
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_bytes(hub, "org/base") == 0, "no weight downloaded"


def test_dry_run_counts_no_disk_for_what_is_read_where_it_lies(hub, tmp_path):
    """A local model and an adapter's local base are read in place: the dry run's disk
    figures count only what is downloaded (the hub adapter's own file)."""
    base = llama()
    base_dir = save_model(base, tmp_path / "base", max_shard_size="60KB")
    adapter_dir = save_adapter(base, tmp_path / "adapter", str(base_dir), r=4,
                               target_modules=["q_proj"])
    hub.add_repo("org/adapter", adapter_dir)
    models = write_list(tmp_path / "models.csv", [("org/adapter", "lora", str(base_dir)),
                                                  (str(base_dir), "", "")])
    out = tmp_path / "out"
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--dry_run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.read_csv(out / "preflight" / "preflight.csv", keep_default_na=False)
    assert rows.status.tolist() == ["ok", "ok"] and rows.base_bytes[0] > 0
    assert list(rows.columns) == [  # docs/hub.md's list
        "model_id", "revision", "kind", "source_model", "format", "weight_bytes",
        "base_bytes", "largest_shard_bytes", "status", "detail"]
    adapter = (adapter_dir / "adapter_model.safetensors").stat().st_size
    margin = 10 * 2**20  # preflight.SMALL_FILES_MARGIN
    assert f"disk for the largest model: {adapter / 2**10:.1f} KiB" in proc.stdout, proc.stdout
    assert f"with --cleanup_cache {(adapter + margin) / 2**20:.1f} MiB" in proc.stdout, \
        proc.stdout


def test_tokens_never_reach_a_log_or_a_result(hub, tmp_path):
    torch = __import__("torch")
    hub.add_repo("org/gated", write_safetensors(tmp_path / "g", {"w.weight": torch.ones(2, 2)}),
                 gated=True)
    models = write_list(tmp_path / "models.csv", [("org/gated", "", "")])
    out = tmp_path / "out"
    proc = run_cli(hub, "--model_list", models, "--output_dir", out,
                   env_extra={"HF_TOKEN": TOKEN})
    assert proc.returncode == 1
    assert "access refused" in (out / "failed_models.txt").read_text()
    written = [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()]
    assert not any(TOKEN in text for text in written + [proc.stdout, proc.stderr])


def test_a_partly_cached_model_is_an_outage_not_a_failure_when_the_hub_goes_down(hub, tmp_path):
    """A dry run caches config.json and the weight index; with the hub down, the cache lists
    only those, and the weights it lacks are a network failure (offline: "not in the local
    cache"), never "no weights" or "lacks model-00001-of-…" recorded for good."""
    torch = __import__("torch")
    names = ("org/single", "org/sharded", "org/other")
    for name in names[::2]:
        hub.add_repo(name, write_safetensors(tmp_path / name, {"w.weight": torch.ones(4, 4)},
                                             {"model_type": "llama"}))
    hub.add_repo("org/sharded", save_model(llama(), tmp_path / "sharded", max_shard_size="60KB"))
    models = write_list(tmp_path / "models.csv", [(name, "", "") for name in names])
    out = tmp_path / "out"
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--dry_run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(hub.cache.glob("models--org--sharded/snapshots/*/model.safetensors.index.json"))
    hub.down()
    proc = run_cli(hub, "--model_list", models, "--output_dir", out)
    failed = out / "failed_models.txt"
    causes = failed.read_text() if failed.exists() else ""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the hub cannot be reached" in proc.stderr, proc.stderr[-3000:]
    assert not causes.strip(), causes
    offline = tmp_path / "offline"
    proc = run_cli(hub, "--model_list", models, "--output_dir", offline,
                   env_extra={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    causes = dict(line.split("\t", 1) for line in
                  (offline / "failed_models.txt").read_text().splitlines())
    assert set(causes) == set(names), causes
    for cause in causes.values():
        assert "HF_HUB_OFFLINE=1" in cause and "not in the local hub cache" in cause, cause
        assert "no safetensors" not in cause and "lacks" not in cause, cause
    hub.up()
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--skip_failed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.glob("org--*.csv")} == {
        "org--single.csv", "org--sharded.csv", "org--other.csv"}


def test_overwrite_whose_recompute_fails_keeps_no_stale_result(hub, tmp_path):
    """--overwrite of a model whose new revision is damaged: the model is failed (its cause
    recorded), the run exits 1, and the old numbers are gone rather than passing for new."""
    torch = __import__("torch")
    hub.add_repo("org/m", write_safetensors(tmp_path / "good", {"w.weight": torch.randn(8, 8)}))
    models = write_list(tmp_path / "models.csv", [("org/m", "", "")])
    out = tmp_path / "out"
    assert run_cli(hub, "--model_list", models, "--output_dir", out).returncode == 0
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text('{"model_type": "llama"}')
    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    hub.add_repo("org/m", damaged)
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--overwrite")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "done 0" in proc.stderr and "failed 1" in proc.stderr
    assert (out / "failed_models.txt").read_text().startswith("org/m\t")
    assert not (out / "org--m.csv").exists(), "the old result does not pass for this run's"


def small_disk(path: Path, pages: int) -> Path:
    """A tmpfs of ``pages`` 4 KiB pages at ``path`` (root only), unmounted by the caller."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small disk of its own needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * PAGE}", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    return path


PAGE = 4096  # tmpfs counts a file's space in pages


def test_a_full_disk_stops_the_run_and_a_rerun_completes_it(hub, tmp_path):
    """The results' disk fills up mid-list: the run stops with one line naming it, exit 1,
    nothing recorded as failed; once space is freed, the same command completes the list."""
    torch = __import__("torch")
    for i in range(3):
        hub.add_repo(f"org/m{i}", write_safetensors(tmp_path / f"m{i}",
                                                    {"w.weight": torch.randn(8, 8)}))
    models = write_list(tmp_path / "models.csv", [(f"org/m{i}", "", "") for i in range(3)])
    out = small_disk(tmp_path / "disk", 16)
    try:
        # Room for the run lock, the options and one small result: the second one fills it.
        (out / "filler").write_bytes(b"\0" * (13 * PAGE))
        argv = ("--model_list", models, "--output_dir", out, "--log_dir", tmp_path / "logs")
        proc = run_cli(hub, *argv)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert f"the disk holding {out}" in proc.stderr and "is full" in proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not (out / "failed_models.txt").exists(), "a full disk fails no model"
        assert [p.name for p in out.glob("*.csv")] == ["org--m0.csv"]
        (out / "filler").unlink()
        proc = run_cli(hub, *argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(p.name for p in out.glob("*.csv")) == [f"org--m{i}.csv" for i in range(3)]
    finally:
        subprocess.run(["umount", str(out)], check=False)


def test_an_unreachable_base_fails_its_group_and_the_list_goes_on(hub, tmp_path):
    """Every download of a base's weights is cut: the base and its three adapters are one job
    failing on the network, not an outage. It is retried, then its four models are recorded
    failed with that cause, and the other model of the list is analysed."""
    torch = __import__("torch")
    base = llama()
    folder = save_model(base, tmp_path / "base")
    hub.add_repo("org/base", folder)
    for i in range(3):
        hub.add_repo(f"org/lora{i}", save_adapter(base, tmp_path / f"lora{i}", "org/base",
                                                  seed=i + 1, r=4, target_modules=["q_proj"]))
    hub.add_repo("org/other", write_safetensors(tmp_path / "other",
                                                {"w.weight": torch.randn(8, 8)}))
    hub.drop(0, times=10_000, repo_id="org/base", filename="model.safetensors")
    models = write_list(tmp_path / "models.csv", [("org/base", "", "")] + [
        (f"org/lora{i}", "lora", "org/base") for i in range(3)] + [("org/other", "", "")])
    out = tmp_path / "out"
    proc = run_cli(hub, "--model_list", models, "--output_dir", out, "--max_retries", "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "cannot be reached" not in proc.stderr
    causes = dict(line.split("\t", 1) for line in
                  (out / "failed_models.txt").read_text().splitlines())
    assert sorted(causes) == ["org/base", "org/lora0", "org/lora1", "org/lora2"]
    assert all("network" in cause.lower() for cause in causes.values()), causes
    assert [p.name for p in out.glob("*.csv")] == ["org--other.csv"]
