"""esd_report.py: the report's files, its page in a real browser, and refits that equal runs.

The browser test drives Debian's headless Chromium over the DevTools protocol (a local
websocket); it is skipped, with the reason, where Chromium or websocket-client is missing.
Set ESD_REPORT_SCREENSHOT=docs/report.png to keep its screenshot (the README's picture).
"""

import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import save_file

from esd_experiment.core.results import EIGS_OPTIONS_KEY, SUMMARY_COLUMNS, load_results
from esd_experiment.report import cli as esd_report
from esd_experiment.run import worker as esd_worker
from esd_experiment.run.cli import build_parser, estimator_options
from tests.result_fixtures import (
    conv_net,
    good_results,
    llama_like,
    with_bad_files,
    write_model,
)

# summary.csv holds repr-printed floats; pandas' default parser may differ in the last bit.
CSV_FLOAT_RTOL = 1e-15
BROWSER_TIMEOUT_S = 60
# A page is blank when (almost) every pixel has one colour; ours draws text and figures.
MIN_PIXEL_STD = 10.0


def report(*argv):
    return esd_report.main(["report", *map(str, argv), "--jobs", "1"])


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    good_results(out)
    bad = with_bad_files(out)
    return out, bad


@pytest.fixture(scope="module")
def page(results_dir):
    out, _ = results_dir
    assert report(out) == 0
    return out / "report" / "index.html"


class Page(HTMLParser):
    """The parts of index.html the tests look at."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.links, self.ids, self.scripts_src, self.text = [], [], set(), [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append((a.get("src", ""), a.get("alt", "")))
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag in ("script", "link") and (a.get("src") or a.get("rel") == "stylesheet"):
            self.scripts_src.append(a.get("src") or a.get("href"))

    def handle_data(self, data):
        self.text.append(data)


def test_summary_csv_is_the_summary_of_the_results(results_dir, page):
    out, _ = results_dir
    written = pd.read_csv(page.parent / "summary.csv", keep_default_na=False,
                          na_values={"alpha_mean": [""], "delta_alpha_mean": [""]})
    with pytest.warns(UserWarning):  # the fixture's foreign and truncated files
        expected = load_results(out, summary=True)
    assert tuple(written.columns) == SUMMARY_COLUMNS
    assert list(written.model_id) == list(expected.model_id)
    for column in ("alpha_mean", "alpha_median", "delta_alpha_mean", "entropy_mean"):
        np.testing.assert_allclose(written[column], expected[column], rtol=CSV_FLOAT_RTOL)
    assert list(written.over_trained) == list(expected.over_trained)


def test_page_is_self_contained_and_its_links_resolve(results_dir, page):
    html = page.read_text()
    parsed = Page(html)
    assert parsed.scripts_src == []  # inline style and script only
    assert "http://" not in html and "https://" not in html
    assert parsed.images and all(src.startswith("data:image/png;base64,")
                                 for src, _ in parsed.images)
    for href in parsed.links:
        if href.startswith("#"):
            assert href[1:] in parsed.ids, href
        else:
            assert (page.parent / unquote(href)).is_file(), href
    linked = {Path(unquote(h)).name for h in parsed.links if not h.startswith("#")}
    assert {"org--base.csv", "org--base.log", "org--base.eigs.npz", "org--broken.log",
            "summary.csv", "models.csv", "org--cut.csv"} <= linked


def test_page_shows_every_model_failure_and_skipped_file(results_dir, page):
    _, bad = results_dir
    parsed = Page(page.read_text())
    text = " ".join(parsed.text)
    for model_id in ("org/base", "org/fine-tune", "org/convnet", "org/no-eigs"):
        assert model_id in text
    assert "CorruptCheckpointError: model.safetensors is truncated" in text
    for name, why in bad.items():
        assert name in text and why in text
    alts = [alt for _, alt in parsed.images]
    assert "alpha of org/fine-tune against org/base" in alts
    assert sum(alt.startswith("alpha by depth of ") for alt in alts) == 4
    assert {alt for alt in alts if alt.startswith("ESD of ")} == {
        "ESD of org/base", "ESD of org/fine-tune", "ESD of org/convnet"}
    assert "no eigenvalues saved" in text  # org/no-eigs


def test_figures_are_capped(results_dir, tmp_path):
    out, _ = results_dir
    assert report(out, "--out", tmp_path / "r", "--max_figures", "1") == 0
    parsed = Page((tmp_path / "r" / "index.html").read_text())
    alts = [alt for _, alt in parsed.images]
    assert sum(alt.startswith("alpha by depth of ") for alt in alts) == 1
    assert " ".join(parsed.text).count("Not drawn") == 3


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "holds no result CSV"),
    (lambda d: (d / "prices.csv").write_text("date,price\n1,2\n"), "no readable result CSV"),
    (lambda d: shutil.rmtree(d), "does not exist"),
])
def test_empty_foreign_or_missing_directory_exits_2(tmp_path, capsys, setup, message):
    setup(tmp_path)
    assert report(tmp_path) == esd_report.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("esd_report: error:") and message in err


def test_out_equal_to_the_results_directory_exits_2(results_dir, capsys):
    out, _ = results_dir
    assert report(out, "--out", out) == esd_report.EXIT_BAD_INPUT
    assert "is the results directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Refit.

def run_worker(checkpoint: Path, out: Path, *options) -> None:
    code = esd_worker.main(["--model_id", str(checkpoint), "--output_dir", str(out),
                            "--device", "cpu", "--save_eigs", *options])
    assert code == esd_worker.EXIT_OK


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    out = []
    for name, tensors in (("llama", llama_like(5)), ("convnet", conv_net(6))):
        (root / name).mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(root / name / "model.safetensors"))
        out.append(root / name)
    return out


@pytest.mark.parametrize("options", [
    ["--fix_fingers", "DKS"],
    ["--fix_fingers", "xmin_peak", "--bins", "50", "--filter_zeros", "--evals_thresh", "1e-3"],
    ["--xmin_pos", "3"],
])
def test_refit_equals_a_run_with_the_new_options(checkpoints, tmp_path, options):
    default, direct, refit = tmp_path / "default", tmp_path / "direct", tmp_path / "refit"
    for checkpoint in checkpoints:
        run_worker(checkpoint, default)
        run_worker(checkpoint, direct, *options)
    assert esd_report.main(["refit", str(default), "--output_dir", str(refit), *options]) == 0
    names = sorted(p.name for p in direct.glob("*.csv"))
    assert names == sorted(p.name for p in refit.glob("*.csv")) and len(names) == 2
    for name in names:
        assert (refit / name).read_bytes() == (direct / name).read_bytes(), name
        stem = name.removesuffix(".csv")
        with np.load(direct / f"{stem}.eigs.npz") as a, np.load(refit / f"{stem}.eigs.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            assert str(a[EIGS_OPTIONS_KEY]) == str(b[EIGS_OPTIONS_KEY])
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
        assert (refit / "logs" / f"{stem}.log").is_file()
    runner_args = build_parser().parse_args(["--output_dir", "x", *options])
    assert json.loads((refit / ".esd_options.json").read_text()) == estimator_options(runner_args)
    differs = [n for n in names if (default / n).read_bytes() != (refit / n).read_bytes()]
    assert differs == names  # the options changed the numbers


def test_refit_lists_and_skips_models_without_eigenvalues(results_dir, tmp_path, capsys):
    out, _ = results_dir
    code = esd_report.main(["refit", str(out), "--output_dir", str(tmp_path),
                            "--fix_fingers", "DKS"])
    assert code == esd_report.EXIT_SOME_SKIPPED
    err = capsys.readouterr().err
    assert "skipped org/no-eigs: no saved eigenvalues" in err
    assert "not read models.csv: not a result CSV" in err
    refit = load_results(tmp_path)
    assert set(refit.model_id) == {"org/base", "org/fine-tune", "org/convnet"}
    assert (refit.fix_fingers == "DKS").all()
    assert refit.esd_options.str.startswith("fix_fingers=DKS;").all()


def test_refit_names_a_users_own_csv_but_exits_0_as_the_report_does(tmp_path, capsys):
    import torch

    from tests.result_fixtures import write_model

    out = tmp_path / "results"
    write_model(out, "org/m", {"layer.weight": torch.randn(16, 12)}, save_eigs=True)
    (out / "my_notes.csv").write_text("model,note\norg/m,looks fine\n")
    code = esd_report.main(["refit", str(out), "--output_dir", str(tmp_path / "new"),
                            "--fix_fingers", "DKS"])
    err = capsys.readouterr().err
    assert code == esd_report.EXIT_OK, err  # every model was refit
    assert "my_notes.csv: not a result CSV" in err and "skipped" not in err
    assert esd_report.main(["report", str(out)]) == esd_report.EXIT_OK
    # a model's result emptied (a copy onto a full disk), its eigenvalues beside it: a model
    # is missing from the refit
    cut = write_model(out, "org/cut", {"layer.weight": torch.randn(16, 12)}, save_eigs=True)
    cut.csv.write_bytes(b"")
    code = esd_report.main(["refit", str(out), "--output_dir", str(tmp_path / "new2"),
                            "--fix_fingers", "DKS"])
    assert code == esd_report.EXIT_SOME_SKIPPED
    assert f"skipped {cut.csv.name}" in capsys.readouterr().err


def test_refit_of_results_without_any_eigenvalues_says_so_in_one_short_line(tmp_path, capsys):
    import torch

    from tests.result_fixtures import write_model

    out, models = tmp_path / "results", 30
    gen = torch.Generator().manual_seed(0)
    for i in range(models):
        write_model(out, f"org/m{i}", {"layer.weight": torch.randn(16, 12, generator=gen)},
                    save_eigs=False)
    code = esd_report.main(["refit", str(out), "--output_dir", str(tmp_path / "new")])
    assert code == esd_report.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.count("--save_eigs") == 1, err
    assert f"{models} models" in err and "no saved eigenvalues" in err, err
    assert len(err) < 300, err  # a line, not one clause per model


def test_refit_refuses_its_own_directory_and_other_options(results_dir, tmp_path, capsys):
    out, _ = results_dir
    assert esd_report.main(["refit", str(out), "--output_dir", str(out)]) == 2
    assert "is RESULTS_DIR" in capsys.readouterr().err
    new = tmp_path / "new"
    assert esd_report.main(["refit", str(out), "--output_dir", str(new), "--fix_fingers",
                            "DKS"]) == esd_report.EXIT_SOME_SKIPPED
    assert esd_report.main(["refit", str(out), "--output_dir", str(new), "--fix_fingers",
                            "xmin_peak"]) == esd_report.EXIT_BAD_INPUT
    assert "other estimator options" in capsys.readouterr().err
    assert esd_report.main(["refit", str(out), "--output_dir", str(new), "--fix_fingers",
                            "xmin_peak", "--overwrite"]) == esd_report.EXIT_SOME_SKIPPED
    assert (load_results(new).fix_fingers == "xmin_peak").all()
    for result in new.glob("*.*"):  # a directory left without results takes other options
        if result.name != ".esd_options.json":
            result.unlink()
    assert esd_report.main(["refit", str(out), "--output_dir", str(new), "--fix_fingers",
                            "DKS"]) == esd_report.EXIT_SOME_SKIPPED


# ---------------------------------------------------------------------------------------------
# Two GGUF files of one repository: two list entries, so two results everywhere.

@pytest.fixture(scope="module")
def two_gguf_results(tmp_path_factory):
    """The worker's results of two GGUF files (F32, F16) of one local repository, and a
    failed_models.txt line for a third file of it, with its log."""
    import torch

    from esd_experiment.core.paths import model_paths
    from tests.result_fixtures import heavy_tailed
    from tests.test_gguf import T, write_gguf

    root = tmp_path_factory.mktemp("gguf")
    repo = root / "repo"
    repo.mkdir()
    w = heavy_tailed(48, 32, torch.Generator().manual_seed(8)).numpy()
    write_gguf(repo / "tiny.F32.gguf", {"blk.0.ffn_up.weight": (w, T.F32)})
    write_gguf(repo / "tiny.F16.gguf", {"blk.0.ffn_up.weight": (w.astype(np.float16), T.F16)})
    out = root / "out"
    for tag in ("F32", "F16"):
        run_worker(repo, out, "--gguf_file", tag)
    failed = model_paths(out, str(repo), out / "logs", "Q4_0").log
    failed.parent.mkdir(parents=True, exist_ok=True)
    failed.write_text("the Q4_0 attempt\n")
    (out / "failed_models.txt").write_text(f"{repo}#Q4_0\tno such GGUF file\n")
    # The list entry's key, as failed_models.txt and the README name it: org/name#<gguf_file>
    return out, {f"{repo}#F32": "F32", f"{repo}#F16": "F16"}, (f"{repo}#Q4_0", failed)


def test_two_gguf_files_of_one_repository_are_two_results(two_gguf_results, tmp_path):
    out, storage, (failed_key, failed_log) = two_gguf_results
    layers = load_results(out)
    assert not layers.attrs["skipped"]
    assert layers.groupby("model_id")["storage"].first().to_dict() == storage
    summary = load_results(out, summary=True)
    assert sorted(summary.model_id) == sorted(storage) and (summary.fitted == 1).all()

    # --output_dir, refit's and the runner's name for it, is report's --out too
    assert report(out, "--output_dir", tmp_path / "page") == 0
    assert sorted(pd.read_csv(tmp_path / "page" / "summary.csv").model_id) == sorted(storage)
    parsed = Page((tmp_path / "page" / "index.html").read_text())
    text = " ".join(parsed.text)
    assert all(key in text for key in storage) and failed_key in text
    assert any(unquote(href).endswith(failed_log.name) for href in parsed.links), \
        "the failed GGUF file's log is linked under its own key"

    new = tmp_path / "refit"
    assert esd_report.main(["refit", str(out), "--output_dir", str(new),
                            "--fix_fingers", "DKS"]) == 0
    assert sorted(p.name for p in new.glob("*.csv")) == sorted(p.name for p in out.glob("*.csv"))
    assert load_results(new).groupby("model_id")["storage"].first().to_dict() == storage


def test_refit_without_any_saved_eigenvalues_exits_2(tmp_path, capsys):
    from tests.result_fixtures import write_model

    write_model(tmp_path / "r", "org/a", llama_like(7), save_eigs=False)
    assert esd_report.main(["refit", str(tmp_path / "r"), "--output_dir",
                            str(tmp_path / "n")]) == esd_report.EXIT_BAD_INPUT
    assert "no model in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The page in a real browser.

def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser")
                 if shutil.which(n)), None)


class DevTools:
    """A headless Chromium and one page, driven over the DevTools protocol."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1")

    def __init__(self, binary: str, profile: Path):
        import websocket

        self.events: list[dict] = []
        self._id = 0
        self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={profile}",
                                      "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=open(profile / "chromium.log", "w"))
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            assert self.proc.poll() is None, (profile / "chromium.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]  # the port, then the browser's path
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}",
                                              suppress_origin=True, timeout=BROWSER_TIMEOUT_S)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def page(self, method: str, **params) -> dict:
        return self.call(method, self.session, **params)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(json.loads(self.ws.recv()))

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:300])
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in (
                    "error", "assert"):
                out.append(json.dumps(p.get("args", []))[:300])
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"].get("text", "")[:300])
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close")
        finally:
            self.ws.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _evaluate(browser: DevTools, expression: str):
    result = browser.page("Runtime.evaluate", expression=expression, returnByValue=True,
                          awaitPromise=True)
    assert "exceptionDetails" not in result, result
    return result["result"]["value"]


def test_report_renders_in_headless_chromium(page):
    binary = _chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    pytest.importorskip("websocket", reason="websocket-client (requirements-dev.txt) is missing")
    from matplotlib.image import imread

    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(binary, Path(profile))
        try:
            for domain in ("Page", "Runtime", "Log"):
                browser.page(f"{domain}.enable")
            browser.page("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                         deviceScaleFactor=1, mobile=False)
            browser.page("Page.navigate", url=page.as_uri())
            browser.wait_for("Page.loadEventFired")
            images = _evaluate(browser, "Array.from(document.images).map("
                                        "i => [i.alt, i.complete, i.naturalWidth])")
            text_length = _evaluate(browser, "document.body.innerText.length")
            # Sorting: a click on alpha_mean orders the rows by it, NaN (none here) last.
            order = _evaluate(browser, """(() => {
                const table = document.getElementById('summary-table');
                const col = Array.from(table.tHead.rows[0].cells)
                    .findIndex(th => th.textContent === 'alpha_mean');
                table.tHead.rows[0].cells[col].click();
                return Array.from(table.tBodies[0].rows)
                    .map(r => parseFloat(r.cells[col].getAttribute('data-v')));
            })()""")
            shot = base64.b64decode(browser.page("Page.captureScreenshot", format="png")["data"])
            errors = browser.errors()
        finally:
            browser.close()
    assert errors == []
    assert len(images) >= 10
    broken = [alt for alt, complete, width in images if not (complete and width > 0)]
    assert broken == []
    assert text_length > 1000
    assert order == sorted(order) and len(order) == 4
    pixels = imread(io.BytesIO(shot))
    assert pixels.shape[:2] == (900, 1280)
    assert float(pixels[..., :3].std()) * 255 > MIN_PIXEL_STD  # not one flat colour
    target = os.environ.get("ESD_REPORT_SCREENSHOT")
    if target:
        Path(target).write_bytes(shot)


def test_summary_sorts_infinite_means_as_numbers_in_headless_chromium(tmp_path):
    """A custom column whose mean is +inf or -inf (a condition number, a log of 0) sorts as a
    number in the page, before and after the finite ones, not as missing."""
    binary = _chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    pytest.importorskip("websocket", reason="websocket-client (requirements-dev.txt) is missing")
    for i, value in enumerate([np.inf, 1.0, -np.inf, np.nan]):
        paths = write_model(tmp_path, f"org/m{i}", llama_like(i, blocks=1), save_eigs=False)
        frame = pd.read_csv(paths.csv, keep_default_na=False)
        frame["cond"] = value
        frame.to_csv(paths.csv, index=False)
    assert report(tmp_path) == esd_report.EXIT_OK
    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(binary, Path(profile))
        try:
            browser.page("Page.enable")
            browser.page("Page.navigate", url=(tmp_path / "report" / "index.html").as_uri())
            browser.wait_for("Page.loadEventFired")
            order = _evaluate(browser, """(() => {
                const table = document.getElementById('summary-table');
                const col = Array.from(table.tHead.rows[0].cells)
                    .findIndex(th => th.textContent === 'cond_mean');
                table.tHead.rows[0].cells[col].click();
                return Array.from(table.tBodies[0].rows).map(r => r.cells[0].textContent);
            })()""")
        finally:
            browser.close()
    assert order == ["org/m2", "org/m1", "org/m0", "org/m3"]  # -inf, 1, inf, then none
