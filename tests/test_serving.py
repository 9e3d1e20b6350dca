"""The HTTP service: every answer (200, 408, 413, 415, 422, 404, 500, 503, 504) with real
radiographs and the really trained ``tiny_ensemble``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import EXAMPLES, real_images, serve_cli, serving

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from bonefrac import DISCLAIMER  # noqa: E402
from bonefrac.data.io import FORMATS, ImageReadError, load_gray  # noqa: E402
from bonefrac.inference.detections import shown_detections  # noqa: E402
from bonefrac.inference.ensemble import Ensemble  # noqa: E402
from bonefrac.inference.heatmap import heatmap_png, map_opacity  # noqa: E402
from bonefrac.serving import create_app  # noqa: E402
from bonefrac.serving.uploads import sniff  # noqa: E402
from bonefrac.utils import sha256_file  # noqa: E402

IMAGES = sorted(EXAMPLES.glob("*.jpg"))
LOC = ("peak_x", "peak_y", "box_x0", "box_y0", "box_x1", "box_y1", "box_score")


@pytest.fixture(scope="module")
def client(tiny_ensemble):
    with TestClient(create_app(tiny_ensemble)) as c:
        yield c


@pytest.fixture
def fresh_ens(tiny_ensemble) -> Ensemble:
    """A model instance of the test's own, so patching it affects no other test."""
    return Ensemble.load(tiny_ensemble)


def post(client, path: Path | str, content: bytes | None = None, url: str = "/v1/predict",
         **kw):
    """Upload one file (its bytes, or ``content`` under its name); ``kw`` go to httpx."""
    path = Path(path)
    body = path.read_bytes() if content is None else content
    return client.post(url, files={"file": (path.name, body, "application/octet-stream")}, **kw)


def direct(ens: Ensemble, path: Path, explain: bool = False):
    """What the CLI path computes for one file: load_gray -> predict_gray."""
    gray = {s: load_gray(path, s, ens.resize)[None] for s in ens.sizes}
    return gray, ens.predict_gray(gray, explain=explain)


def blocking(ens: Ensemble, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make ``ens.predict_gray`` wait for ``release``; ``entered`` is set once it runs."""
    entered, release = threading.Event(), threading.Event()
    real = ens.predict_gray

    def slow(*a, **kw):
        entered.set()
        release.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(ens, "predict_gray", slow)
    return entered, release


# ------------------------------------------------------------------------------------- 200
def test_predict_matches_cli_path(client, tiny_ensemble):
    ens = Ensemble.load(tiny_ensemble)
    meta_members = {m["name"]: m for m in ens.meta["members"]}
    for img in IMAGES[:2]:
        r = post(client, img)
        assert r.status_code == 200, r.text
        body = r.json()
        p = body["prediction"]
        _, want = direct(ens, img)
        assert p["file"] == img.name
        assert p["prob_fractured"] == pytest.approx(float(want.prob[0]), abs=1e-5)
        for name, probs in want.member_probs.items():
            assert p[f"prob_{name}"] == pytest.approx(float(probs[0]), abs=1e-5)
        assert p["decision"] == ("fractured" if want.prob[0] >= ens.threshold
                                 else "non_fractured")
        assert set(ens.operating_points) == {"triage", "confirmation"}
        for name, op in ens.operating_points.items():
            expect = "fractured" if want.prob[0] >= op["threshold"] else "non_fractured"
            assert p[f"decision_{name}"] == expect
            assert body["model"]["operating_points"][name] == op["threshold"]
            assert body["model"]["operating_point_info"][name]["description"]
        assert "heatmap_png_base64" not in p and p["warning"] == ""
        # the localisation columns are always there, as in the CLI's rows
        want_loc = direct(ens, img, explain=True)[1].loc
        loc = [*want_loc.peak[0], *want_loc.box[0], want_loc.score[0]]
        assert [p[k] for k in LOC] == pytest.approx([round(float(v), 4) for v in loc],
                                                    abs=1e-4)
        assert body["disclaimer"] == DISCLAIMER
        assert body["model"]["model_id"] == ens.model_id
        for m in body["model"]["members"]:
            spec = meta_members[m["name"]]
            assert m["onnx_sha256"] == spec["onnx_sha256"] == sha256_file(
                tiny_ensemble / spec["onnx"])
            assert m["weights_sha256"] == spec["weights_sha256"]


@pytest.mark.parametrize("how", ["query", "form"])
def test_explain_returns_the_heatmap(client, tiny_ensemble, how):
    ens = Ensemble.load(tiny_ensemble)
    img = IMAGES[2]
    kw = {"params": {"explain": "true"}} if how == "query" else {"data": {"explain": "true"}}
    r = post(client, img, **kw)
    assert r.status_code == 200, r.text
    p = r.json()["prediction"]
    _, want = direct(ens, img, explain=True)
    # the localisation, as fractions of the image's width/height, rounded as in make_row
    loc = [*want.loc.peak[0], *want.loc.box[0], want.loc.score[0]]
    assert [p[k] for k in LOC] == pytest.approx([round(float(v), 4) for v in loc], abs=1e-4)
    assert 0 <= p["box_x0"] < p["box_x1"] <= 1 and 0 <= p["box_y0"] < p["box_y1"] <= 1
    assert p["box_x0"] <= p["peak_x"] <= p["box_x1"] and p["box_y0"] <= p["peak_y"] <= p["box_y1"]
    # the overlay figure: the upload at its own size and aspect, with the box and the caption
    own = load_gray(img, None)
    assert own.shape == Image.open(img).size[::-1] != (max(ens.sizes),) * 2
    png = base64.b64decode(p["heatmap_png_base64"])  # the box as in the row, like the CLI
    assert png == heatmap_png(own, want.cam[0], prob=float(want.prob[0]),
                              threshold=ens.threshold, decision=p["decision"],
                              boxes=shown_detections(p, ens.box_threshold),
                              peak=[p["peak_x"], p["peak_y"]])
    fig = Image.open(io.BytesIO(png))
    assert fig.mode == "RGB" and fig.width > own.shape[1] and fig.height > own.shape[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(
        base64.b64decode(p["image_png_base64"])))), own)
    # the map alone for the web page: same aspect, alpha faded below the threshold
    layer = Image.open(io.BytesIO(base64.b64decode(p["heatmap_layer_png_base64"])))
    assert layer.mode == "RGBA" and max(layer.size) <= 256
    assert layer.width / layer.height == pytest.approx(own.shape[1] / own.shape[0], rel=0.02)
    alpha = np.asarray(layer)[..., 3]
    assert (alpha == round(255 * map_opacity(p["prob_fractured"], ens.threshold, 1.0))).all()


def test_png_upload_is_sniffed_and_predicted(client, tiny_ensemble):
    """A PNG (content-sniffed) gives the same answer as the CLI on the same PNG file."""
    buf = io.BytesIO()
    Image.open(IMAGES[0]).save(buf, format="PNG")
    r = post(client, "scan.png", buf.getvalue())
    assert r.status_code == 200, r.text
    assert r.json()["prediction"]["file"] == "scan.png"


def test_dicom_upload(client, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    try:
        import bonefrac.data.dicom  # noqa: F401
    except ImportError:
        pytest.skip("DICOM decoding (bonefrac.data.dicom) is not in this tree yet")
    from pydicom.uid import SecondaryCaptureImageStorage

    from bonefrac.testing.dicom import write_dicom

    px = np.asarray(Image.open(IMAGES[0]).convert("L"))
    data = write_dicom(tmp_path / "x.dcm", px, sop_class=SecondaryCaptureImageStorage
                       ).read_bytes()
    assert pydicom and sniff(data[:132]) == "DICOM"
    for name in ("x.dcm", "x"):  # by suffix, and by the DICM tag alone
        r = post(client, name, data, params={"explain": "true"})
        assert r.status_code == 200, r.text
        p = r.json()["prediction"]
        assert 0 <= p["prob_fractured"] <= 1
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_png_base64"]))))
        assert shown.shape == px.shape  # decoded at its own size for the overlay
        fig = Image.open(io.BytesIO(base64.b64decode(p["heatmap_png_base64"])))
        assert fig.width > px.shape[1] and fig.height > px.shape[0]
    # a .dcm name lets content without the DICM tag through to the decoder, which refuses it
    r = post(client, "scan.dcm", b"no DICM tag and not an image either")
    assert r.status_code == 422 and r.json()["detail"].startswith("scan.dcm: ")


def test_batch_keeps_good_results_and_reports_bad_files(client):
    good = IMAGES[:2]
    files = [("files", (good[0].name, good[0].read_bytes(), "image/jpeg")),
             ("files", ("notes.txt", b"not an image", "text/plain")),
             ("files", (good[1].name, good[1].read_bytes(), "image/jpeg")),
             ("files", ("cut.jpg", good[1].read_bytes()[:2000], "image/jpeg")),
             ("files", ("empty.png", b"", "image/png"))]
    r = client.post("/v1/predict/batch", files=files, params={"explain": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["n_ok"], body["n_failed"]) == (2, 3)
    assert [p["index"] for p in body["predictions"]] == [0, 2]
    for p, img in zip(body["predictions"], good, strict=True):
        single = post(client, img, params={"explain": "true"}).json()["prediction"]
        assert p["prob_fractured"] == pytest.approx(single["prob_fractured"], abs=1e-5)
        assert [p[k] for k in LOC] == pytest.approx([single[k] for k in LOC], abs=2e-4)
        own = load_gray(img, None)
        assert Image.open(io.BytesIO(base64.b64decode(p["image_png_base64"]))).size == \
            own.shape[::-1]
    errs = {e["file"]: e for e in body["errors"]}
    assert errs["notes.txt"]["status"] == 415
    assert errs["cut.jpg"]["status"] == 422 and "truncated" in errs["cut.jpg"]["reason"]
    assert errs["empty.png"]["status"] == 422 and "empty" in errs["empty.png"]["reason"]
    assert body["disclaimer"] == DISCLAIMER


# ------------------------------------------------------------------------------- 413 / 415
def test_413_too_many_batch_files(tiny_ensemble):
    with TestClient(create_app(tiny_ensemble, max_batch_files=2)) as c:
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in IMAGES[:3]]
        r = c.post("/v1/predict/batch", files=files)
    assert r.status_code == 413 and "at most 2" in r.json()["detail"]


def test_413_file_over_the_cap(tiny_ensemble):
    with TestClient(create_app(tiny_ensemble, max_upload_bytes=4096)) as c:
        r = post(c, IMAGES[0])  # ~15 KB: within the body slack, refused by the file check
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = post(c, "big.jpg", b"\xff\xd8\xff" + b"\0" * 200_000)  # refused by Content-Length
        assert r.status_code == 413 and "request body is" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200


def asgi_call(app, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]],
              delay: float = 0.0) -> tuple[int, dict]:
    """Drive the app with a streamed body and no Content-Length (as a chunked upload is)."""
    sent: list[dict] = []

    async def go():
        queue = list(chunks)

        async def receive():
            if not queue:
                await asyncio.sleep(3600)  # the body is over; a real server would wait too
            await asyncio.sleep(delay)
            chunk = queue.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "headers": headers,
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, receive, send), 30)

    asyncio.run(go())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def _multipart(name: str, data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    b = "bonefracboundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + \
        f"\r\n--{b}--\r\n".encode()
    return body, [(b"content-type", f"multipart/form-data; boundary={b}".encode())]


def test_413_chunked_upload_without_content_length(tiny_ensemble):
    app = create_app(tiny_ensemble, max_upload_bytes=64 * 1024)
    body, headers = _multipart("big.jpg", b"\xff\xd8\xff" + b"\0" * 200_000)
    chunks = [body[i:i + 16384] for i in range(0, len(body), 16384)]
    status, out = asgi_call(app, "/v1/predict", chunks, headers)
    assert status == 413 and "limit" in out["detail"]
    # the same streamed way, a good file is answered normally
    body, headers = _multipart(IMAGES[0].name, IMAGES[0].read_bytes())
    status, out = asgi_call(app, "/v1/predict", [body[:5000], body[5000:]], headers)
    assert status == 200 and out["prediction"]["file"] == IMAGES[0].name


def test_408_upload_slower_than_the_timeout(tiny_ensemble):
    app = create_app(tiny_ensemble, timeout_s=0.3)
    body, headers = _multipart(IMAGES[0].name, IMAGES[0].read_bytes())
    status, out = asgi_call(app, "/v1/predict", [body[:100], body[100:]], headers, delay=0.5)
    assert status == 408 and "0.3 s" in out["detail"]


@pytest.mark.parametrize("name,data,why", [
    ("notes.txt", b"hello", "unsupported file type '.txt'"),
    ("scan.jpg", b"%PDF-1.4\n" + b"x" * 300, "not a supported image format"),
    ("scan.exe", None, "unsupported file type '.exe'"),  # a real JPEG, but not that name
])
def test_415_unsupported_type(client, name, data, why):
    r = post(client, name, IMAGES[0].read_bytes() if data is None else data)
    assert r.status_code == 415, r.text
    assert r.json()["detail"].startswith(f"{name}: ") and why in r.json()["detail"]


# ------------------------------------------------------------------------------------- 422
@pytest.mark.parametrize("name,data", [
    ("cut.jpg", IMAGES[0].read_bytes()[:3000]),  # truncated
    ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),  # a PNG signature, then nothing valid
    ("tiny.png", None),  # a real PNG, too small to classify
])
def test_422_unreadable_image(client, tmp_path, name, data):
    if data is None:
        buf = io.BytesIO()
        Image.open(IMAGES[0]).resize((8, 8)).save(buf, format="PNG")
        data = buf.getvalue()
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageReadError) as e:  # the CLI's reason for the same bytes
        load_gray(tmp_path / name, 224, "stretch")
    r = post(client, name, data)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == f"{name}: {e.value.reason}"
    assert "Traceback" not in r.text and str(tmp_path) not in r.text


def test_422_empty_file(client):
    r = post(client, "empty.jpg", b"")
    assert r.status_code == 422 and r.json()["detail"] == "empty.jpg: empty file (0 bytes)"


def test_422_missing_file_field(client):
    r = client.post("/v1/predict", data={"explain": "true"})
    assert r.status_code == 422
    assert r.json() == {"detail": "file: Field required (got form field 'explain'; send the "
                                  "file as 'file')"}
    r = client.post("/v1/predict")
    assert r.json() == {"detail": "file: Field required (no form fields sent: send the file "
                                  "as the multipart form field 'file')"}


def test_422_wrong_form_field_names_the_field_it_got(client):
    img = (IMAGES[0].name, IMAGES[0].read_bytes())
    r = client.post("/v1/predict", files={"image": img})
    assert r.status_code == 422
    assert r.json() == {"detail": "file: Field required (got form field 'image'; send the "
                                  "file as 'file')"}
    r = client.post("/v1/predict/batch", files=[("file", img), ("file", img)])
    assert r.status_code == 422
    assert r.json() == {"detail": "files: Field required (got form field 'file'; send the "
                                  "file as 'files')"}


# ------------------------------------------------------------------------- 500, 503, 504
def test_500_has_no_traceback(fresh_ens, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("secret internal state /srv/model")

    monkeypatch.setattr(fresh_ens, "predict_gray", boom)
    with TestClient(create_app(fresh_ens), raise_server_exceptions=False) as c:
        r = post(c, IMAGES[0])
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error (see the server log)"}
    assert "secret" not in r.text and "Traceback" not in r.text


def test_503_when_running_and_queue_are_full(fresh_ens, monkeypatch):
    entered, release = blocking(fresh_ens, monkeypatch)
    with TestClient(create_app(fresh_ens, workers=1, queue=0)) as c, \
            ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, c, IMAGES[0])
        assert entered.wait(30)
        r = post(c, IMAGES[1])
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200  # not a prediction: never refused
        release.set()
        assert first.result(30).status_code == 200
        assert post(c, IMAGES[1]).status_code == 200  # the slot is given back


def test_504_when_inference_outlives_the_timeout(fresh_ens, monkeypatch):
    entered, release = blocking(fresh_ens, monkeypatch)
    with TestClient(create_app(fresh_ens, timeout_s=0.5)) as c:
        r = post(c, IMAGES[0])
        assert r.status_code == 504 and "0.5 s" in r.json()["detail"]
        release.set()
        assert post(c, IMAGES[0]).status_code == 200


def test_concurrent_requests_share_one_model(tiny_ensemble):
    """Parallel requests on the shared ONNX sessions give exactly the sequential answers."""
    files = real_images(8)
    with TestClient(create_app(tiny_ensemble, workers=2, queue=8)) as c:
        seq = [post(c, f).json()["prediction"]["prob_fractured"] for f in files]
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda f: post(c, f, params={"explain": "true"}), files))
    assert [r.status_code for r in rs] == [200] * len(files)
    assert [r.json()["prediction"]["prob_fractured"] for r in rs] == pytest.approx(seq, abs=1e-6)
    assert [r.json()["prediction"]["file"] for r in rs] == [f.name for f in files]


# ------------------------------------------------------------------- model, health, docs, UI
def test_model_info_with_and_without_card(client, tiny_ensemble, tmp_path):
    info = client.get("/v1/model").json()
    ens = Ensemble.load(tiny_ensemble)
    assert info["model_card"] is None
    assert info["meta"]["operating_points"] == ens.operating_points
    assert info["meta"]["threshold"] == ens.threshold
    assert info["limits"]["max_upload_bytes"] == 32 * 2**20
    assert info["disclaimer"] == DISCLAIMER
    carded = tmp_path / "model"
    shutil.copytree(tiny_ensemble, carded)
    (carded / "MODEL_CARD.md").write_text("# Model card\n\nTrained on tests/data.\n")
    with TestClient(create_app(carded)) as c:
        assert c.get("/v1/model").json()["model_card"].startswith("# Model card")


def test_health_openapi_and_offline_docs(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model_id"]
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert {"413", "415", "422", "503"} <= set(spec["paths"]["/v1/predict"]["post"]["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "POST /v1/predict/batch" in docs.text
    assert all(k in docs.text for k in LOC) and "heatmap_layer_png_base64" in docs.text
    assert "Content-Security-Policy" in docs.headers
    assert client.get("/redoc").status_code == 404
    assert client.get("/v1/nothing").status_code == 404


def test_head_of_the_page_and_healthz_answers_200(tiny_ensemble):
    """On a real server (uvicorn drops the body of a HEAD answer itself)."""
    import httpx

    with serving(create_app(tiny_ensemble)) as url:
        for path in ("/", "/healthz"):
            r = httpx.head(url + path, timeout=30)
            assert r.status_code == 200 and r.content == b"", path
            assert r.headers["x-content-type-options"] == "nosniff"


def test_ui_is_served_and_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    texts = [page.text] + [client.get(f"/static/{n}").text for n in ("app.js", "style.css")]
    assert all(client.get(f"/static/{n}").status_code == 200 for n in ("app.js", "style.css"))
    for t in texts + [client.get("/docs").text]:
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", t), "external asset"
        assert "@import" not in t and "cdn" not in t.lower()


# ------------------------------------------------------------------------------- sniffing
@pytest.mark.parametrize("head,kind", [
    (b"\xff\xd8\xff\xe0", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF89a", "GIF"),
    (b"BM\0\0", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"RIFF\0\0\0\0WEBPVP8 ", "WEBP"), (b"\0" * 128 + b"DICM", "DICOM"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"), (b"P5\n224 224\n255\n", "PNM"),
    (b"\0\0\0\x1cftypavif", "HEIF"),
    (b"%PDF-1.7", None), (b"", None), (b"MZ\x90\x00", None), (b"P7\n", None)])
def test_sniff(head, kind):
    assert sniff(head) == kind


def test_sniff_knows_every_format_the_decoder_reads():
    """Each format of ``bonefrac.data.io.FORMATS`` that this Pillow can write is recognised,
    so no decodable upload is refused as 415 (this fails when the decoder gains a format)."""
    Image.init()
    im = Image.open(IMAGES[0]).convert("L")
    pillow_format = {"MPO": "JPEG", "HEIF": "AVIF"}
    tried = 0
    for fmt in FORMATS:
        save_as = pillow_format.get(fmt, fmt)
        if save_as not in Image.SAVE:
            continue
        buf = io.BytesIO()
        try:
            im.save(buf, format=save_as)
        except (OSError, KeyError, ValueError):  # a codec this Pillow build lacks
            continue
        assert sniff(buf.getvalue()[:132]) is not None, fmt
        tried += 1
    assert tried >= 6


# ----------------------------------------------------------------------------------- CLI
def test_serve_cli_errors_are_one_line(tmp_path, capsys, tiny_ensemble):
    from bonefrac.cli.main import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bonefrac serve: error:") and "\n" not in err
    assert main(["serve", "--port", "70000"]) == 1
    assert "--port" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use: exit 1, not uvicorn's own code
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_ensemble), "--port", str(port),
                     "--log-level", "critical"]) == 1
    out = capsys.readouterr()
    assert out.err == (f"bonefrac serve: error: could not listen on 127.0.0.1:{port}: "
                       "Address already in use\n")
    assert out.out == ""  # failed before the URL (or the model) was printed
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "--max-upload-mb" in capsys.readouterr().out


def test_serve_cli_end_to_end(tiny_ensemble):
    """`python -m bonefrac serve` in a subprocess: answers, then stops cleanly on SIGINT."""
    import httpx

    with serve_cli("--log-level", "warning", model=tiny_ensemble) as (url, proc):
        r = httpx.post(url + "/v1/predict", files={"file": (IMAGES[0].name,
                                                            IMAGES[0].read_bytes())})
        assert r.status_code == 200 and r.json()["disclaimer"] == DISCLAIMER
    assert f"{url}/" in proc.out and DISCLAIMER in proc.out
    assert "Traceback" not in proc.out