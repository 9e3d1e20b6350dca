"""The web page in a real browser: Debian's Chromium driven by Playwright against a real
uvicorn server on a loopback port, with the really trained ``tiny_ensemble``.

Needs ``scripts/ci/install_browser.sh`` (apt's chromium + the playwright package; Playwright's own
browser download is not used). Set BONEFRAC_UI_SCREENSHOT=path to keep a screenshot.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from helpers import EXAMPLES, serving

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not installed (run scripts/ci/install_browser.sh)",
                allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed (run scripts/ci/install_browser.sh)")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_ensemble):
    """uvicorn serving the app in a thread on a free loopback port; yields the base URL."""
    from bonefrac.serving import create_app

    with serving(create_app(tiny_ensemble)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page that records console errors and every host it talks to."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    pg.errors, pg.hosts = [], set()
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("request", lambda r: pg.hosts.add(urlparse(r.url).netloc or urlparse(r.url).scheme))
    pg.goto(server + "/")
    yield pg
    ctx.close()


def wait_until(page, js: str, timeout_s: float = 30) -> None:
    """Poll a JS expression from Python: the page's CSP (rightly) forbids the string eval that
    Playwright's ``wait_for_function`` would inject."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(js):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.05)


def _pct(p: float) -> str:
    return f"{100 * p:.1f} %"


def _expect_result(page, server, img: Path) -> dict:
    """Wait for the result panel and return what the API says for the same file."""
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    import httpx

    api = httpx.post(server + "/v1/predict", params={"explain": "true"},
                     files={"file": (img.name, img.read_bytes())}, timeout=60).json()["prediction"]
    assert page.text_content("#prob") == _pct(api["prob_fractured"])
    assert page.text_content("#filename") == img.name
    assert page.text_content("#decision") in ("fractured", "not fractured")
    assert page.locator("#points tr").count() == 2  # triage and confirmation
    assert page.locator("#members tr").count() == 2
    for sel in ("#radiograph", "#heatmap"):
        wait_until(page, f"document.querySelector('{sel}').naturalWidth > 0")
    assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
    assert "RESEARCH USE ONLY" in page.text_content("#result-disclaimer")
    # the localisation: printed, and the box and peak drawn over the image at their fractions
    assert page.text_content("#box-score") == f"{api['box_score']:.2f}"
    assert page.text_content("#peak-xy").startswith(
        f"x {_pct(api['peak_x'])}, y {_pct(api['peak_y'])}")
    assert page.is_visible("#loc-peak")
    wait_until(page, "document.querySelector('#radiograph').getBoundingClientRect().width > 0")
    base = page.locator("#radiograph").bounding_box()
    shown = api["shown_detections"]  # the boxes the overlay draws too
    assert page.locator(".loc-box:visible").count() == len(shown)
    if not shown:
        assert "none shown" in page.text_content("#box-xy")
    for el, d in zip(page.locator(".loc-box:visible").all(), shown, strict=True):
        assert _pct(d["x0"]) in page.text_content("#box-xy")
        assert el.text_content() == f"{d['rank']}: {d['score']:.2f}"
        want = {"x": base["x"] + d["x0"] * base["width"],
                "y": base["y"] + d["y0"] * base["height"],
                "width": (d["x1"] - d["x0"]) * base["width"],
                "height": (d["y1"] - d["y0"]) * base["height"]}
        assert el.bounding_box() == pytest.approx(want, abs=1.5)
    peak = page.locator("#loc-peak").bounding_box()
    assert peak["x"] + peak["width"] / 2 == pytest.approx(
        base["x"] + api["peak_x"] * base["width"], abs=1.5)
    assert peak["y"] + peak["height"] / 2 == pytest.approx(
        base["y"] + api["peak_y"] * base["height"], abs=1.5)
    assert page.get_attribute("#overlay-link", "href") == \
        "data:image/png;base64," + api["heatmap_png_base64"]
    return api


def test_upload_shows_probability_and_heatmap(page, server, tmp_path):
    img = sorted(EXAMPLES.glob("*.jpg"))[0]
    assert "RESEARCH USE ONLY" in page.text_content("#disclaimer")
    page.set_input_files("#file", str(img))
    api = _expect_result(page, server, img)
    # the original is shown (sharper than the model input) with the heat map stretched on it
    assert page.get_attribute("#radiograph", "src").startswith("blob:")
    box_base = page.locator("#radiograph").bounding_box()
    box_heat = page.locator("#heatmap").bounding_box()
    assert box_heat == pytest.approx(box_base, abs=1)
    assert page.eval_on_selector("#heatmap", "e => e.style.opacity") == "0.4"  # the default
    # the page lays the transparent map layer over the original, not the captioned figure
    assert page.get_attribute("#heatmap", "src") == "data:image/png;base64," + \
        api["heatmap_layer_png_base64"]
    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("BONEFRAC_UI_SCREENSHOT"):
        shutil.copy(shot, os.environ["BONEFRAC_UI_SCREENSHOT"])
    page.fill("#opacity", "25")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector("#heatmap", "e => e.style.opacity") == "0.25"
    assert page.text_content("#opacity-value") == "25 %"
    assert page.errors == []  # CSP violations (a CDN link, inline script) would show here
    assert page.hosts <= {urlparse(server).netloc, "blob", "data"}  # nothing from elsewhere


def test_drag_and_drop(page, server):
    img = sorted(EXAMPLES.glob("*.jpg"))[1]
    dt = page.evaluate_handle(
        """([name, bytes]) => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], name, {type: "image/jpeg"}));
            return dt;
        }""", [img.name, list(img.read_bytes())])
    page.dispatch_event("#drop", "drop", {"dataTransfer": dt})
    _expect_result(page, server, img)
    assert page.errors == []


def test_image_the_browser_cannot_show_falls_back_to_the_server_rendering(page, server,
                                                                         tmp_path):
    """Chromium does not render TIFF: the page shows the server's grayscale rendering, at the
    image's own size (so the box still sits where its fractions say)."""
    from PIL import Image

    img = tmp_path / "film.tif"
    buf = io.BytesIO()
    src = Image.open(sorted(EXAMPLES.glob("*.jpg"))[2]).convert("L")
    src.save(buf, format="TIFF")
    img.write_bytes(buf.getvalue())
    page.set_input_files("#file", str(img))
    _expect_result(page, server, img)
    assert page.get_attribute("#radiograph", "src").startswith("data:image/png;base64,")
    assert page.eval_on_selector("#radiograph", "e => [e.naturalWidth, e.naturalHeight]") == \
        list(src.size)


def test_errors_are_shown_in_plain_words(page, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    text = page.text_content("#error")
    assert text.startswith("This file type is not supported.") and "notes.txt" in text
    assert page.is_hidden("#result")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(sorted(EXAMPLES.glob("*.jpg"))[0].read_bytes()[:3000])
    page.set_input_files("#file", str(cut))
    page.wait_for_selector("#error:has-text('cut.jpg')", timeout=30_000)
    assert page.text_content("#error").startswith("The file could not be read as an image.")
