"""``Results/report.html``: one self-contained evaluation report that opens offline.

Everything is inline: CSS in a ``<style>`` element, every figure a base64 ``data:image/png`` URI;
no scripts, no external links. Built from the same :class:`~bonefrac.evaluation.model_card.
ReportInputs` and tables as ``MODEL_CARD.md``, so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import re
from datetime import UTC, datetime
from pathlib import Path

from bonefrac import DISCLAIMER, __version__
from bonefrac.evaluation.model_card import (
    ReportInputs,
    Table,
    calibration_table,
    detection_notes,
    detection_table,
    explanation,
    fmt,
    limitations,
    localisation_notes,
    localisation_table,
    member_table,
    metric_table,
    num,
    operating_points,
    subgroup_table,
)
from bonefrac.utils import write_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# figure file name (without .png, "_ensemble" stripped) -> (section, caption)
FIGURES = {
    "confusion_matrix": ("metrics", "Confusion matrix at the default threshold"),
    "roc_curve": ("metrics", "ROC curve (members and fused ensemble where present); the "
                             "triangle marks the default operating point"),
    "reliability_diagram": ("calibration", "Reliability diagram before and after temperature "
                                           "scaling (15 bins)"),
    "threshold_robustness": ("threshold", "Sensitivity, specificity, PPV and NPV against the "
                                          "threshold; dashed lines mark the operating points"),
}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1150px;padding:1rem 1.5rem;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}
.disclaimer{background:#fde8e8;border:3px solid #b00020;color:#7a0015;font-weight:700;
padding:.8rem 1rem;border-radius:6px;font-size:1.05rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f2f4f7}tr:nth-child(even) td{background:#fafafa}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top;max-width:48%}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.82rem;color:#444}
pre{background:#f6f8fa;padding:.7rem;overflow-x:auto;font-size:.82rem;white-space:pre-wrap}
.muted{color:#555;font-size:.9rem}.warn{color:#8a4b00}
code{background:#f2f2f2;padding:0 .2rem}
"""


def _sentence(text: str) -> str:
    """``text`` with its first letter upper-cased (``str.capitalize`` lowers the rest)."""
    return text[:1].upper() + text[1:]


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _inline_md(text: str) -> str:
    """Escape, then render `code` and **bold** spans (the only Markdown our files use)."""
    s = _e(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def html_table(table: Table) -> str:
    head, rows = table
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def markdown_to_html(md: str) -> str:
    """The subset of Markdown that ``comparison.md`` uses: headings, pipe tables, paragraphs."""
    out, table, para = [], [], []

    def flush():
        if para:
            out.append(f"<p>{_inline_md(' '.join(para))}</p>")
            para.clear()
        if table:
            rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table
                    if not re.fullmatch(r"\|?[\s:|-]+\|?", r.strip())]
            if rows:
                out.append(html_table((rows[0], rows[1:])))
            table.clear()

    for line in md.splitlines():
        if line.lstrip().startswith("|"):
            if para:
                flush()
            table.append(line)
            continue
        if table:
            flush()
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = min(6, len(line) - len(line.lstrip("#")) + 2)
            out.append(f"<h{level}>{_inline_md(line.lstrip('#').strip())}</h{level}>")
        else:
            para.append(line.strip())
    flush()
    return "\n".join(out)


def png_data_uri(path: Path) -> str | None:
    """``data:image/png;base64,...`` of a PNG file, or None if it is not a readable PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(PNG_MAGIC):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_key(path: Path) -> str:
    return path.stem.removesuffix("_ensemble")


def _figures(paths: list[Path], warnings: list[str]) -> str:
    out = []
    for p in paths:
        uri = png_data_uri(p)
        if uri is None:
            warnings.append(f"{p}: not a readable PNG, left out")
            continue
        caption = FIGURES.get(_figure_key(p), (None, p.stem.replace("_", " ")))[1]
        out.append(f'<figure><img src="{uri}" alt="{_e(caption)}">'
                   f"<figcaption>{_e(caption)} <span class='muted'>({_e(p.name)})</span>"
                   "</figcaption></figure>")
    return "\n".join(out)


def _miss_gallery(misses: list[tuple[Path, str]], warnings: list[str]) -> str:
    """The worst localisation misses as inline figures, each with its own caption."""
    out = []
    for p, caption in misses:
        uri = png_data_uri(p)
        if uri is None:
            warnings.append(f"{p}: not a readable PNG, left out")
            continue
        out.append(f'<figure><img src="{uri}" alt="{_e(caption)}">'
                   f"<figcaption>{_e(caption)}</figcaption></figure>")
    return "\n".join(out)


def _localisation(inp: ReportInputs, warnings: list[str]) -> list[str]:
    """The Localisation section, or nothing when ``metrics.json`` has no "localisation"."""
    table = localisation_table(inp)
    if table is None:
        return []
    out = ["<h2>Localisation</h2>",
           "<ul>" + "".join(f"<li>{_inline_md(x)}</li>" for x in localisation_notes(inp))
           + "</ul>", html_table(table)]
    if inp.localisation_misses:
        out += ["<h3>Worst misses</h3>",
                "<p class='muted'>The pointing-game misses whose peak lies farthest from a "
                "box: each image in its own frame (a letterbox model's black bars cropped "
                "off) with its heat map, the fracture boxes in green, the predicted box in "
                "yellow and the peak as a red cross.</p>",
                _miss_gallery(inp.localisation_misses, warnings)]
    return out


# The terms the report uses, explained once near its top.
GLOSSARY = (
    ("Sensitivity", "of the fractured images, the share the model calls fractured (1 - "
                    "sensitivity: the share of fractures it misses)."),
    ("Specificity", "of the non-fractured images, the share the model calls non-fractured (1 - "
                    "specificity: the share of normal images it flags as fractured)."),
    ("PPV / NPV", "of the images called fractured (non-fractured), the share that are; both "
                  "depend on how common fractures are in the data."),
    ("ROC-AUC", "the chance that a random fractured image gets a higher P(fractured) than a "
                "random non-fractured one (0.5: guessing, 1: perfect), whatever the threshold."),
    ("95% CI", "the range the value would plausibly fall in on another sample of this size; "
               "wide ranges mean few images."),
    ("Threshold, operating point", "a P(fractured) at or above the threshold is called "
                                   "fractured; each operating point is a threshold chosen on "
                                   "the validation split for a goal (e.g. sensitivity >= 0.95)."),
    ("ECE", "expected calibration error: how far, on average, the stated probabilities are from "
            "the observed share of fractures (0.05: about 5 percentage points off)."),
    ("Brier score, NLL", "the mean squared error and the negative log-likelihood of the "
                         "probabilities: lower is better; they reward being right and sure."),
    ("Pointing game", "the share of fractured images whose heat-map peak falls inside (or "
                      "near) a marked fracture box."),
)


def plain_summary(inp: ReportInputs) -> list[str]:
    """The report's first paragraph in plain words: at each operating point, about how many
    in 100 fractures the model misses and how many in 100 normal images it flags, on the
    evaluated data; how well its probabilities are calibrated; where its heat map points."""
    m = inp.metrics
    data = f"the {m.get('split')} split ({m['metrics'].get('n')} images)"
    if "external" in str(m.get("split_source")):
        data = f"this external data set ({m['metrics'].get('n')} images)"
    points = []
    for label, _, mm in operating_points(inp):
        se, sp = (num((mm.get(k) or {}).get("value")) for k in ("sensitivity", "specificity"))
        if se is not None and sp is not None:
            points.append(f"at the {label.split(' (')[0]} point (threshold "
                          f"{fmt(mm.get('threshold'), 3)}) it misses about "
                          f"{round(100 * (1 - se))} in 100 fractures and flags about "
                          f"{round(100 * (1 - sp))} in 100 normal images as fractured")
    out = [f"On {data}, " + "; ".join(points) + "."] if points else []
    ece = num(((m.get("calibration") or {}).get("after") or {}).get("ece_15"))
    if ece is not None:
        out.append(f"Its probabilities are off by about {round(100 * ece)} percentage points "
                   "on average (ECE).")
    pg = num(((m.get("localisation") or {}).get("pointing_game") or {}).get("value"))
    if pg is not None:
        out.append(f"Its heat-map peak lies on a marked fracture in about {round(100 * pg)} of "
                   "100 fractured images (pointing game): a hint where to look, not proof.")
    return out


def _summary_html(inp: ReportInputs) -> list[str]:
    """The plain-language summary and the glossary, for the top of the report."""
    return ["<h2>Summary</h2>", "<p>" + " ".join(_e(x) for x in plain_summary(inp)) + "</p>",
            "<details open><summary>Terms used in this report</summary><dl>"
            + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in GLOSSARY)
            + "</dl></details>"]


def render_html(inp: ReportInputs) -> tuple[str, list[str]]:
    """The report as one HTML string, and warnings (figures that could not be embedded)."""
    m, meta = inp.metrics, inp.meta
    warnings: list[str] = []
    by_section: dict[str, list[Path]] = {}
    for p in inp.pngs:
        key = _figure_key(p)
        section = FIGURES[key][0] if key in FIGURES else (
            "training" if key.endswith(("accuracy", "loss")) else "other")
        by_section.setdefault(section, []).append(p)
    title = f"Evaluation report: {meta.get('model_id', inp.model_dir.name)}"
    mm = m["metrics"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="disclaimer">{_e(DISCLAIMER)}</p>',
        *_summary_html(inp),
        "<table><tbody>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in [
            ("model folder", inp.model_dir),
            ("kind", "training run (one member)" if inp.is_run else
             f"ensemble of {len(meta.get('members', []))} members"),
            ("evaluated data", f"{m.get('data')} - split {m.get('split')} "
                               f"({m.get('split_source')})"),
            ("images", f"{mm.get('n')} ({mm.get('n_positive')} fractured, "
                       f"{mm.get('n_negative')} non-fractured); "
                       f"{len(m.get('skipped') or [])} unreadable skipped"),
            ("default threshold", f"{fmt(mm.get('threshold'), 4)} on the fused, calibrated "
                                  f"P(fractured); policy {meta.get('threshold_policy', 'n/a')}"
                                  + ("; RE-FIT ON THESE DATA (optimistic)"
                                     if m.get("threshold_refit_on_this_data") else
                                     "; chosen on validation")),
            ("generated", f"{datetime.now(UTC).isoformat(timespec='seconds')} by bonefrac "
                          f"{__version__}"),
        ]) + "</tbody></table>",
        "<h2>Metrics with 95% confidence intervals</h2>",
        "<p class='muted'>Cells: value [95% CI] k/n. Wilson score intervals for proportions; "
        "stratified bootstrap (2000 resamples) for F1 and ROC-AUC. Operating points:</p><ul>"
        + "".join(f"<li><strong>{_e(lbl)}</strong>: {_e(desc)}</li>"
                  for lbl, desc, _ in operating_points(inp)) + "</ul>",
        html_table(metric_table(inp)),
        _figures(by_section.get("metrics", []), warnings),
        "<h2>Calibration</h2>",
        "<p class='muted'>Temperature scaling, one T per member fitted on the validation split "
        "(NLL), applied before fusion. Before -&gt; after:</p>",
        html_table(calibration_table(inp)),
        _figures(by_section.get("calibration", []), warnings),
        "<h2>Decision threshold</h2>",
        f"<pre>{_e(inp.threshold_note or 'threshold note not found')}</pre>",
        _figures(by_section.get("threshold", []), warnings),
        "<h2>Members</h2>", html_table(member_table(inp)),
    ]
    if inp.comparison_md:
        parts += ["<h2>Comparison</h2>", markdown_to_html(inp.comparison_md)]
    parts += _localisation(inp, warnings)
    dt = detection_table(inp)
    if dt:
        gallery = [(inp.results_dir / g["png"], f"{g['kind']}: {g['file']} (best score "
                    f"{g['top_score']:.2f})")
                   for g in inp.metrics["detection"].get("gallery", [])
                   if (inp.results_dir / g["png"]).is_file()]
        parts += ["<h2>Detection</h2>", "<ul>" + "".join(
            f"<li>{_inline_md(x)}</li>" for x in detection_notes(inp)) + "</ul>",
            html_table(dt)]
        if gallery:
            parts += ["<h3>Missed and false boxes</h3>",
                      "<p class='muted'>Each image at its own size: the fracture boxes in "
                      "green, the detections at or above the box threshold in yellow with "
                      "their scores.</p>", _miss_gallery(gallery, warnings)]
    sg = subgroup_table(inp)
    parts.append("<h2>Subgroups</h2>")
    parts += ([f"<p>{_e(sg[1])}</p>", html_table(sg[0])] if sg else
              ["<p class='muted'>Not evaluated (<code>bonefrac evaluate --subgroup "
               "COLUMN</code>).</p>"])
    if inp.heatmaps:  # from `bonefrac predict --explain --out Results/<name>`
        parts += ["<h2>Heat maps</h2>",
                  f"<p class='muted'>{_e(_sentence(explanation(inp.meta)))} A hint of where "
                  "the model looked, not proof of where a fracture is.</p>",
                  _figures(inp.heatmaps, warnings)]
    if by_section.get("training"):
        parts += ["<h2>Training curves</h2>", _figures(by_section["training"], warnings)]
    if by_section.get("other"):
        parts += ["<h2>Other figures</h2>", _figures(by_section["other"], warnings)]
    parts += ["<h2>Known limitations</h2>",
              "<ul>" + "".join(f"<li>{_inline_md(x)}</li>" for x in limitations(inp)) + "</ul>"]
    if m.get("skipped"):
        parts += ["<h2>Skipped files</h2>", "<ul>" + "".join(
            f"<li>{_e(s.get('file'))}: {_e(s.get('reason'))}</li>" for s in m["skipped"])
            + "</ul>"]
    if warnings:
        parts += ["<h2>Report warnings</h2>",
                  "<ul>" + "".join(f"<li class='warn'>{_e(w)}</li>" for w in warnings) + "</ul>"]
    parts += [f'<p class="disclaimer">{_e(DISCLAIMER)}</p>', "</body>", "</html>", ""]
    return "\n".join(parts), warnings


def write_html_report(inp: ReportInputs, path: str | Path | None = None) -> tuple[Path, list[str]]:
    """Write ``report.html`` (default: in the results folder); return its path and warnings."""
    path = Path(path) if path else inp.results_dir / "report.html"
    text, warnings = render_html(inp)
    write_text(path, text)
    return path, warnings
