"""``bonefrac report``: one self-contained HTML file and a model card whose numbers are the
ones in ``Results/metrics.json``."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from bonefrac import DISCLAIMER
from bonefrac.cli.main import main
from bonefrac.evaluation.model_card import SECTIONS
from bonefrac.evaluation.report import METRIC_ROWS

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class StrictChecker(HTMLParser):
    """Records structural errors (unbalanced tags), external references and image sources."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "iframe", "object", "embed", "base"):
            self.errors.append(f"forbidden <{tag}>")
        for key in ("href", "src", "srcset", "action", "poster"):
            if key in a and not str(a[key]).startswith(("data:", "#")):
                self.errors.append(f"external reference {key}={a[key][:60]!r}")
        if "style" in a and "url(" in a["style"]:
            self.errors.append("url() in inline style")
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture
def ens_copy(tiny_ensemble, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_ensemble, tmp_path / "ens"))


def _check_html(path: Path) -> StrictChecker:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    p = StrictChecker()
    p.feed(text)
    p.close()
    assert not p.errors, p.errors[:5]
    assert p.stack == [], f"unclosed tags {p.stack}"
    assert "url(" not in text and "@import" not in text  # CSS pulls nothing in either
    for src in p.imgs:
        m = re.fullmatch(r"data:image/png;base64,([A-Za-z0-9+/=]+)", src)
        assert m, src[:60]
        im = Image.open(io.BytesIO(base64.b64decode(m.group(1), validate=True)))
        im.load()
        assert im.format == "PNG" and min(im.size) > 50
    return p


def _cell_numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+|\d+(?=/)|(?<=/)\d+", cell)]


def _md_table_after(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {header_start}"))
    rows = []
    for ln in lines[i:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return [rows[0]] + rows[2:]


def _expected(entry: dict) -> list[float] | None:
    """value, CI low, CI high (3 decimals as printed), then k, n for proportions."""
    v = entry.get("value")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    out = [round(v, 3), *(round(x, 3) for x in entry["ci95"])]
    return out + [entry["k"], entry["n"]] if "k" in entry else out


def test_report_on_ensemble(ens_copy, capsys):
    assert main(["report", str(ens_copy)]) == 0
    html_path = ens_copy / "Results" / "report.html"
    assert str(html_path) in capsys.readouterr().out
    p = _check_html(html_path)
    pngs = sorted((ens_copy / "Results").glob("*.png"))
    assert len(pngs) >= 5 and len(p.imgs) == len(pngs)  # every figure embedded, none dropped
    text = " ".join(p.text)
    assert text.count(DISCLAIMER) >= 2
    for needle in ("ECE (15 bins)", "triage", "confirmation", "Baseline vs members vs ensemble",
                   "Decision threshold for"):
        assert needle in text, needle

    metrics = json.loads((ens_copy / "Results" / "metrics.json").read_text())
    meta = json.loads((ens_copy / "ensemble_meta.json").read_text())
    assert not (ens_copy / "MODEL_CARD.md").exists()  # never into the model folder unasked
    card = (ens_copy / "Results" / "MODEL_CARD.md").read_text()
    headings = re.findall(r"^## (.+)$", card, flags=re.M)
    assert headings == list(SECTIONS)
    assert card.count(DISCLAIMER) >= 2
    oos = card.split("## Out-of-scope use")[1].split("##")[0]
    assert "clinical decision" in oos.lower()
    for m in meta["members"]:
        assert m["config"]["backbone_weights"] in card and "ImageNet" in card
    assert "CC BY 4.0" in card  # tests/data's ATTRIBUTION.md states the licence

    # The quantitative table: every metric at the default threshold and both operating points.
    table = _md_table_after(card, "metric |")
    cols = [metrics["metrics"]] + [op["metrics"] for op in metrics["operating_points"].values()]
    assert len(table[0]) == 1 + len(cols) == 4
    assert f"t={metrics['threshold']:.4f}" in table[0][1]
    for (key, label), row in zip(METRIC_ROWS, table[1:], strict=False):
        assert row[0] == label
        for cell, col in zip(row[1:], cols, strict=True):
            exp = _expected(col[key])
            if exp is None:
                assert cell == "n/a"
            else:
                assert _cell_numbers(cell) == pytest.approx(exp, abs=1.1e-3), (key, cell)
    counts = table[len(METRIC_ROWS) + 1]
    assert counts[1] == "{tp} / {fp} / {tn} / {fn}".format(**metrics["metrics"]["counts"])

    # Calibration before -> after on validation (meta) and on the evaluated split (metrics).
    cal = _md_table_after(card, "data | ECE")
    val, ev = meta["validation"], metrics["calibration"]
    for row, before, after in ((cal[1], val["calibration_before"], val["calibration_after"]),
                               (cal[2], ev["before"], ev["after"])):
        for cell, k in zip(row[1:], ("ece_15", "brier", "nll"), strict=True):
            assert _cell_numbers(cell) == pytest.approx([before[k], after[k]], abs=1e-4)


def test_report_on_training_run(tiny_runs, tmp_path):
    run = Path(shutil.copytree(tiny_runs["efficientnet_lite0"], tmp_path / "run"))
    assert main(["report", str(run)]) == 0
    _check_html(run / "Results" / "report.html")
    card = (run / "Results" / "MODEL_CARD.md").read_text()
    assert "training run (one member)" in card
    mj = json.loads((run / "model.json").read_text())
    assert mj["backbone_weights"] in card


def test_report_reads_nan_and_null(ens_copy):
    """metrics.json holds NaN where a metric is undefined (Python's json writes it) or null
    (strict JSON); both must print as n/a, not crash."""
    path = ens_copy / "Results" / "metrics.json"
    m = json.loads(path.read_text())
    m["metrics"]["ppv"] = {"value": math.nan, "ci95": [math.nan, math.nan], "k": 0, "n": 0}
    m["metrics"]["npv"] = {"value": None, "ci95": [None, None], "k": 0, "n": 0}
    m["calibration"]["after"]["ece_15"] = None
    path.write_text(json.dumps(m))  # allow_nan: writes the bare token NaN
    assert "NaN" in path.read_text()
    assert main(["report", str(ens_copy)]) == 0
    card = (ens_copy / "Results" / "MODEL_CARD.md").read_text()
    row = {r[0]: r for r in _md_table_after(card, "metric |")}
    assert row["PPV (precision)"][1] == "n/a" and row["NPV"][1] == "n/a"
    _check_html(ens_copy / "Results" / "report.html")


def test_report_errors_are_one_line(ens_copy, tmp_path, capsys):
    (ens_copy / "Results" / "metrics.json").write_text("{ not json")
    assert main(["report", str(ens_copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.json" in err and "Traceback" not in err

    assert main(["report", str(tmp_path)]) == 1
    assert "not a bonefrac model folder" in capsys.readouterr().err

    shutil.rmtree(ens_copy / "Results")
    assert main(["report", str(ens_copy)]) == 1
    assert "bonefrac evaluate" in capsys.readouterr().err


def test_corrupt_figure_is_left_out_with_a_warning(ens_copy, capsys):
    bad = ens_copy / "Results" / "broken.png"
    bad.write_bytes(b"not a png at all")
    assert main(["report", str(ens_copy), "--no-card"]) == 0
    assert "broken.png" in capsys.readouterr().err
    p = _check_html(ens_copy / "Results" / "report.html")
    assert len(p.imgs) == len(list((ens_copy / "Results").glob("*.png"))) - 1
    assert not (ens_copy / "Results" / "MODEL_CARD.md").exists()


def test_cards_say_what_the_shipped_models_are():
    """The shipped models' cards, rendered from their own folders: v2 explains the fracture
    map, letterbox inputs, its warm start and its gate; v1 explains Grad-CAM on stretched
    inputs; the date is the recorded fit date, not a file time of this checkout."""
    from helpers import SHIPPED_ENSEMBLE, SHIPPED_V2

    from bonefrac.evaluation.html_report import render_html
    from bonefrac.evaluation.model_card import gate_line, load_inputs, render_model_card

    v2 = load_inputs(SHIPPED_V2)
    card = render_model_card(v2)
    share = float(v2.meta["domain_gate"]["val_flagged"])
    assert "Explanations: the box-supervised fracture map" in card
    assert card.count("input 320 px letterbox (aspect kept, black bars)") == 2
    assert card.count("warm-started from `ensemble_bone-fracture_v1`") == 2
    assert f"fitted {v2.meta['fitted_on']['date']} (UTC)" in card
    assert "Input-domain gate: Mahalanobis distance" in card and f"flags {share:.1%}" in card
    html, _ = render_html(v2)
    assert "<h2>Heat maps</h2>" in html and "The box-supervised fracture map" in html

    v1 = render_model_card(load_inputs(SHIPPED_ENSEMBLE))
    assert "Explanations: closed-form Grad-CAM" in v1 and "warm-started" not in v1
    assert v1.count("input 224 px stretched to a square") == 2
    assert "none is shipped" in gate_line(None)
