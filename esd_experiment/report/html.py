"""The report's writer: assembles computed tables and rendered figures into ``index.html`` and
writes ``summary.csv``. It computes and draws nothing.

The page is one self-contained file: figures are embedded as PNG data URIs, the style and the
table-sorting script are inline, nothing is fetched from the network. Links to the CSVs, logs
and eigenvalue files are relative, so the results directory can be moved or served as is.
"""

from __future__ import annotations

import base64
import html
import math
import os
import time
from pathlib import Path
from urllib.parse import quote

from esd_experiment.core.paths import within, write_atomic, write_text_atomic
from esd_experiment.core.results import inert_cell, inert_frame

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;
padding:0 20px 40px;color:#222}
h1{margin:18px 0 4px}h2{margin-top:34px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{margin:22px 0 6px;font-size:15px;word-break:break-all}
nav a{margin-right:14px}.muted{color:#666}.note{color:#8a5a00}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0}
th,td{border-bottom:1px solid #e3e3e3;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f4f4f6;position:sticky;top:0;white-space:normal;vertical-align:bottom}
td.s,th.s{text-align:left;white-space:normal;word-break:break-all;min-width:4em;max-width:380px}
th.s{word-break:normal}td.id{min-width:15em}td.src{min-width:9em}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-order=asc]::after{content:" \\25B2"}
table.sortable th[data-order=desc]::after{content:" \\25BC"}
.wrap{max-height:560px;overflow:auto;border:1px solid #e3e3e3}
img{max-width:100%;height:auto;display:block;margin:6px 0}
section.model{border-top:1px dashed #ccc}
.stats span{margin-right:16px}
"""

# Sorts a table by the clicked column: numbers by data-v (NaN last), text by its content.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("data-order") !== "asc";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("data-order"); });
      th.setAttribute("data-order", asc ? "asc" : "desc");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        if (x.hasAttribute("data-v")) {
          var u = parseFloat(x.getAttribute("data-v")), v = parseFloat(y.getAttribute("data-v"));
          if (isNaN(u) || isNaN(v)) { return isNaN(u) - isNaN(v); }
          return asc ? u - v : v - u;
        }
        return asc ? x.textContent.localeCompare(y.textContent)
                   : y.textContent.localeCompare(x.textContent);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

_TEXT_COLUMNS = {"model_id", "revision", "source_model", "esd_options"}


def write_report(data, images: dict[str, bytes]) -> Path:
    """Write ``summary.csv`` and ``index.html`` into ``data.out_dir``; returns the page."""
    out = Path(data.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = inert_frame(data.summary).rename(columns=inert_cell)  # a user's column too
    write_atomic(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    page = out / "index.html"
    write_text_atomic(page, render(data, images))
    return page


def render(data, images: dict[str, bytes]) -> str:
    """The whole page as text."""
    sections = [
        _header(data), _summary(data), _across(data, images), _pairs(data, images),
        _models(data, images), _failed(data), _skipped(data),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>ESD report: {_e(data.results_dir.name)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(s for s in sections if s)
            + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _href(data, target: Path) -> str:
    return _e(quote(os.path.relpath(target, data.out_dir).replace(os.sep, "/")))


def _file_link(data, path: Path) -> str:
    """A link to a file of the results directory; a link out of it is named, not linked."""
    if not within(path, data.results_dir):
        return _e(path.name)
    return f'<a href="{_href(data, path)}">{_e(path.name)}</a>'


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    encoded = base64.b64encode(images[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{_e(alt)}">'


def _header_name(column: str) -> str:
    """A column name that may wrap after its underscores."""
    return "_<wbr>".join(_e(part) for part in column.split("_"))


def _number(value, digits: int = 3) -> tuple[str, str]:
    """(cell text, data-v) of a number; NaN shows as an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", ""
    if isinstance(value, float):  # data-v as JavaScript's parseFloat reads it (Infinity)
        v = repr(value) if math.isfinite(value) else ("-" if value < 0 else "") + "Infinity"
        return f"{value:.{digits}f}", v
    return str(value), str(value)


def _header(data) -> str:
    n_models, n_failed, n_skipped = len(data.models), len(data.failed), len(data.skipped)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (f"<h1>ESD report</h1><p class=\"muted\">{_e(data.results_dir.resolve())} — "
            f"{n_models} model(s), {len(data.layers)} layer rows, {n_failed} failed model(s), "
            f"{n_skipped} file(s) skipped; generated {_e(when)}</p>"
            "<nav><a href=\"#summary\">Summary</a><a href=\"#across\">Across models</a>"
            "<a href=\"#pairs\">Against the base</a><a href=\"#models\">Models</a>"
            "<a href=\"#failed\">Failed</a><a href=\"#skipped\">Skipped files</a></nav>"
            + _mixed_options(data))


def _mixed_options(data) -> str:
    """A warning when the directory holds results computed with different options."""
    counts = data.summary["esd_options"].value_counts()
    if len(counts) < 2:
        return ""
    groups = "".join(f"<li>{n} model(s): <code>{_e(key)}</code></li>" for key, n in counts.items())
    unpaired = "".join(f"<li>{_e(m)} against {_e(b)}</li>" for m, b in data.unpaired)
    return ("<p class=\"note\"><b>This directory mixes results computed with different "
            "estimator options</b> (an interrupted <code>--overwrite</code>, or results copied "
            "together); each model's options are in the <code>esd_options</code> column, and "
            "a fine-tune is compared with its base only when both used the same options.</p>"
            f"<ul>{groups}</ul>" + (f"<p>Not compared, options differ:</p><ul>{unpaired}</ul>"
                                    if unpaired else ""))


def _summary(data) -> str:
    anchors = {v.model_id: v.anchor for v in data.models}
    head = "".join(f'<th class="s">{_header_name(c)}</th>' if c in _TEXT_COLUMNS
                   else f"<th>{_header_name(c)}</th>" for c in data.summary.columns)
    rows = []
    for record in data.summary.to_dict("records"):
        cells = []
        for c in data.summary.columns:  # SUMMARY_COLUMNS, then custom metrics' means
            value = record[c]
            if c == "model_id":
                cells.append(f'<td class="s id"><a href="#{anchors[value]}">{_e(value)}</a></td>')
            elif c in _TEXT_COLUMNS:
                kind = "s src" if c == "source_model" else "s"
                cells.append(f'<td class="{kind}">{_e(value)}</td>')
            else:
                text, v = _number(value)
                cells.append(f'<td data-v="{v}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<h2 id=\"summary\">Summary</h2><p>One row per model; means over fitted "
            f"(<code>status = ok</code>) layers; <code>over_trained</code> / "
            f"<code>under_trained</code> count fitted layers with alpha &lt; 2 / &gt; 6. Click a "
            f"column to sort. <a href=\"summary.csv\">summary.csv</a></p>"
            f"<div class=\"wrap\"><table class=\"sortable\" id=\"summary-table\"><thead><tr>"
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _across(data, images) -> str:
    return ("<h2 id=\"across\">Across models</h2>"
            + _img(images, "alpha_mean", "distribution of alpha_mean across models")
            + "<p>Each model's alpha by relative depth (mean of the fitted layers in each bin):</p>"
            + _img(images, "depth_map", "alpha by relative depth, one row per model"))


def _pairs(data, images) -> str:
    out = ["<h2 id=\"pairs\">Against the base</h2>"]
    if not data.pairs_total:
        out.append("<p class=\"muted\">No model of these results has its source_model among "
                   "them.</p>")
    for i, (model, base, _) in enumerate(data.pairs):
        out.append(f"<h3>{_e(model)} <span class=\"muted\">against</span> {_e(base)}</h3>"
                   + _img(images, f"pair-{i}", f"alpha of {model} against {base}"))
    if data.pairs_total > len(data.pairs):
        out.append(f"<p class=\"note\">{data.pairs_total - len(data.pairs)} more pair(s) not "
                   f"drawn (--max_figures {data.max_figures}); their delta_alpha_mean is in "
                   "the summary.</p>")
    return "".join(out)


def _models(data, images) -> str:
    stats = data.summary.set_index("model_id")
    out = ["<h2 id=\"models\">Models</h2>"]
    for view in data.models:
        s = stats.loc[view.model_id]
        links = [f'<a href="{_href(data, view.csv)}">{_e(view.csv.name)}</a>']
        if view.log is not None:
            links.append(f'<a href="{_href(data, view.log)}">log</a>')
        eigs = view.csv.with_name(f"{view.csv.stem}.eigs.npz")
        if eigs.is_file():
            links.append(f'<a href="{_href(data, eigs)}">eigenvalues</a>')
        numbers = " ".join(f"<span>{label}: <b>{_number(s[c], 2)[0] or '–'}</b></span>" for
                           label, c in (("layers", "layers"), ("fitted", "fitted"),
                                        ("mean alpha", "alpha_mean"),
                                        ("median alpha", "alpha_median"),
                                        ("alpha < 2", "over_trained"),
                                        ("alpha > 6", "under_trained")))
        out.append(f"<section class=\"model\" id=\"{view.anchor}\"><h3>{_e(view.model_id)}</h3>"
                   f"<p class=\"stats\">{numbers}</p><p>{' · '.join(links)}</p>"
                   f"<p class=\"muted\">options: <code>{_e(s['esd_options'])}</code></p>")
        if view.drawn:
            out.append(_img(images, f"{view.anchor}-alpha", f"alpha by depth of {view.model_id}"))
            name = f"{view.anchor}-esd"
            out.append(_img(images, name, f"ESD of {view.model_id}") if name in images
                       else f"<p class=\"muted\">No ESD plot: {_e(view.esd.note)}.</p>")
        else:
            out.append(f"<p class=\"muted\">Not drawn: the report draws the first "
                       f"{data.max_figures} models (--max_figures).</p>")
        out.append("</section>")
    return "".join(out)


def _failed(data) -> str:
    if not data.failed:
        return "<h2 id=\"failed\">Failed models</h2><p class=\"muted\">None.</p>"
    rows = "".join(
        f"<tr><td class=\"s\">{_e(m)}</td><td class=\"s\">{_e(cause)}</td><td>"
        + (f'<a href="{_href(data, log)}">log</a>' if log is not None else "") + "</td></tr>"
        for m, cause, log in data.failed)
    return (f"<h2 id=\"failed\">Failed models</h2><p>From {_e('failed_models.txt')}:</p>"
            "<table><thead><tr><th class=\"s\">model_id</th><th class=\"s\">cause</th>"
            f"<th>log</th></tr></thead><tbody>{rows}</tbody></table>")


def _skipped(data) -> str:
    if not data.skipped:
        return "<h2 id=\"skipped\">Skipped files</h2><p class=\"muted\">None.</p>"
    rows = "".join(f"<tr><td class=\"s\">{_file_link(data, path)}</td>"
                   f"<td class=\"s\">{_e(why)}</td></tr>" for path, why in data.skipped.items())
    return ("<h2 id=\"skipped\">Skipped files</h2><p>CSV files in the results directory that "
            "are not complete results; they are left out of everything above.</p>"
            "<table><thead><tr><th class=\"s\">file</th><th class=\"s\">why</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
