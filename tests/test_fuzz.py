"""Hostile input at scale (bonefrac.testing.fuzzing): 1,000 seeded mutants of real radiographs
and of pydicom's test objects in every transfer syntax, decompression bombs for each format and a
10,000-file folder of zero- and one-byte files, through ``bonefrac predict``, the decode pool
and the HTTP service (``TestClient`` and a real uvicorn server on loopback at concurrency 16).
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import EXAMPLES, SHIPPED_ENSEMBLE, TEST_DATA, free_port

from bonefrac.cli.common import EXIT_PARTIAL
from bonefrac.data.io import ImageReadError
from bonefrac.data.isolation import DecodePool
from bonefrac.testing.fuzzing import (
    HealthWatch,
    bomb_files,
    seed_files,
    stop_server,
    wait_healthy,
    write_bombs,
    write_mutants,
    write_seeds,
    write_tiny_files,
)

N_MUTANTS = 1000


def predict_cli(inputs: Path, out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bonefrac", "predict", str(inputs), "--model", "ensemble-224",
         "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=timeout)


def check_every_input_accounted_for(folder: Path, out: Path) -> tuple[dict, dict]:
    """Every file of ``folder`` is in predictions.csv or errors.csv (one line, a reason), never
    both; returns ({file: row}, {file: reason})."""
    with open(out / "predictions.csv", newline="") as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    with open(out / "errors.csv", newline="") as f:
        errors = {Path(r["file"]).name: r["reason"] for r in csv.DictReader(f)}
    names = {p.name for p in folder.iterdir()}
    assert not rows.keys() & errors.keys()
    assert rows.keys() | errors.keys() == names
    assert all(r and "\n" not in r and "Traceback" not in r for r in errors.values())
    return rows, errors


@pytest.mark.slow
def test_bonefrac_predict_over_1000_mutants(tmp_path):
    folder = tmp_path / "inputs"
    seeds = write_seeds(folder, TEST_DATA)
    write_mutants(folder, N_MUTANTS, seed_files(TEST_DATA), seed=15)
    t = time.monotonic()
    r = predict_cli(folder, tmp_path / "out")
    elapsed = time.monotonic() - t
    assert r.returncode == EXIT_PARTIAL, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    rows, errors = check_every_input_accounted_for(folder, tmp_path / "out")
    assert {p.name for p in seeds} <= rows.keys()  # every clean original predicted
    assert len(rows) + len(errors) == len(seeds) + N_MUTANTS
    assert len(errors) > 100 and len(rows) > 100  # the mutants are neither all good nor all bad
    assert elapsed < 300
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["n_ok"] == len(rows) and summary["n_failed"] == len(errors)


@pytest.mark.slow
def test_bombs_are_refused_or_decoded_within_the_limits(tmp_path):
    bombs = write_bombs(tmp_path, TEST_DATA)
    assert {Path(b).suffix for b in bombs} >= {".png", ".tif", ".webp", ".jpg", ".gif", ".j2k",
                                                ".dcm"}
    with DecodePool(2, timeout_s=2) as pool:
        for b in bombs:
            t = time.monotonic()
            try:
                d = pool.decode(b, (224,), resize="stretch")
                assert d.inputs[224].shape == (224, 224)
            except ImageReadError as e:
                assert e.reason and "\n" not in e.reason
            assert time.monotonic() - t < 2 + 3, b.name
        # header-only bombs never reach a decoder's pixel loop
        for name in ("bomb_png_100000x100000.png", "bomb_webp_16384x16384.webp",
                     "bomb_jpeg_65500x65500.jpg", "bomb_dicom_65535x65535.dcm",
                     "bomb_gif_65535x65535.gif", "bomb_tiff_1000000x1000000.tif",
                     "bomb_j2k_65535x65535.j2k"):
            with pytest.raises(ImageReadError, match="too large"):
                pool.decode(tmp_path / name, (224,), resize="stretch")
        with pytest.raises(ImageReadError, match="multi-frame"):
            pool.decode(tmp_path / "bomb_dicom_65535x65535x100000.dcm", (224,), resize="stretch")


@pytest.mark.slow
def test_a_folder_of_10000_empty_and_one_byte_files(tmp_path):
    folder = tmp_path / "tiny"
    write_tiny_files(folder, 10_000)
    r = predict_cli(folder, tmp_path / "out")
    assert r.returncode == EXIT_PARTIAL, r.stderr[-2000:]
    rows, errors = check_every_input_accounted_for(folder, tmp_path / "out")
    assert not rows and len(errors) == 10_000
    assert sum(v == "empty file (0 bytes)" for v in errors.values()) == 5000


# ----------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bonefrac.serving import create_app

    with TestClient(create_app(SHIPPED_ENSEMBLE)) as c:
        yield c


def post(client, path: Path, url: str = "/v1/predict"):
    return client.post(url, files={"file": (path.name, path.read_bytes(),
                                            "application/octet-stream")})


def test_hostile_uploads_get_4xx_with_a_reason_never_500(client, tmp_path):
    bombs = write_bombs(tmp_path / "b", TEST_DATA)
    files = write_mutants(tmp_path / "m", 150, seed_files(TEST_DATA), seed=7) + [
        p for p in bombs if "8000" not in p.name and "7900" not in p.name]
    statuses = {}
    for p in files:
        r = post(client, p)
        statuses[p.name] = r.status_code
        assert r.status_code in (200, 413, 415, 422), (p.name, r.status_code, r.text[:300])
        if r.status_code != 200:
            detail = r.json()["detail"]
            assert detail.startswith(p.name + ": ") and "\n" not in detail
    assert 200 in statuses.values() and 422 in statuses.values()
    assert client.get("/healthz").status_code == 200


def test_a_segfaulting_decoder_is_a_422_and_the_service_goes_on(client, tmp_path,
                                                                monkeypatch):
    from bonefrac.data import isolation

    good = sorted(EXAMPLES.glob("*.jpg"))[0]
    crash = tmp_path / "segv.jpg"
    crash.write_bytes(good.read_bytes() + b"segv")  # the hostile decoder's tag
    with DecodePool(1, decoder="hostile_decoders:by_name") as pool:
        monkeypatch.setattr(isolation, "_DEFAULT", pool)
        r = post(client, crash)
        assert r.status_code == 422 and r.json()["detail"] == "segv.jpg: decoder crashed (SIGSEGV)"
        r = client.post("/v1/predict/batch", files=[
            ("files", ("a.jpg", good.read_bytes(), "image/jpeg")),
            ("files", ("segv.jpg", crash.read_bytes(), "image/jpeg"))])
        assert r.status_code == 200
        body = r.json()
        assert [p["file"] for p in body["predictions"]] == ["a.jpg"]
        assert body["errors"] == [{"index": 1, "file": "segv.jpg", "status": 422,
                                   "reason": "decoder crashed (SIGSEGV)"}]
        assert post(client, good).status_code == 200


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.slow
def test_real_server_under_mixed_hostile_load(tmp_path):
    """160 uploads at concurrency 16 (a third good radiographs, the rest mutants and bombs)
    against ``bonefrac serve`` on loopback: every good one gets the CLI's probability, every
    hostile one a 4xx, /healthz answers throughout, and the server's memory comes back."""
    httpx = pytest.importorskip("httpx")
    from bonefrac.inference.ensemble import Ensemble
    from bonefrac.inference.predict import predict_files

    goods = sorted(EXAMPLES.glob("*.jpg"))
    with DecodePool(1) as pool:
        want = {Path(r["file"]).name: r["prob_fractured"] for r in predict_files(
            Ensemble.load(SHIPPED_ENSEMBLE), goods, progress=False, pool=pool).rows}
    hostile = write_mutants(tmp_path / "m", 120, seed_files(TEST_DATA), seed=99) + [
        tmp_path / "b" / n for n in bomb_files(TEST_DATA) if "8000" not in n and "7900" not in n]
    write_bombs(tmp_path / "b", TEST_DATA)
    mix = [goods[i % len(goods)] if i % 3 == 0 else hostile[i % len(hostile)]
           for i in range(160)]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bonefrac", "serve", "--model", "ensemble-224", "--port",
         str(port), "--rate-limit", "0", "--client-concurrency", "32", "--queue", "32",
         "--log-level", "warning"],  # one client, 16 at once: no per-address cap here
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(base, server, 60), "server did not start"

        async def send(paths: list[Path]) -> list[tuple[Path, int, dict]]:
            sem = asyncio.Semaphore(16)
            async with httpx.AsyncClient(base_url=base, timeout=120) as c:
                async def one(p: Path):
                    async with sem:
                        r = await c.post("/v1/predict", files={"file": (p.name, p.read_bytes())})
                        return p, r.status_code, r.json()
                return await asyncio.gather(*(one(p) for p in paths))

        asyncio.run(send(mix[:32]))  # warm-up: arenas, the decode workers, every code path
        baseline = rss_mib(server.pid)
        with HealthWatch(base, every=0.2, timeout=5) as watch:
            results = asyncio.run(send(mix))
        health = watch.checks
        after = rss_mib(server.pid)
        workers = children(server.pid)
        for p, status, body in results:
            if p in goods:
                assert status == 200, body
                assert body["prediction"]["prob_fractured"] == want[p.name]
            else:
                assert status in (200, 413, 415, 422), (p.name, status, body)
        assert health and all(ok for ok, _ in health)
        assert max(t for _, t in health) < 5
        assert after <= baseline * 1.10 + 20, (baseline, after)
        assert workers  # the decode workers are the server's children ...
    finally:
        stop_server(server)
    assert server.returncode == 0, server.stderr.read()[-2000:]
    deadline = time.monotonic() + 10  # ... and they end with it
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{w}").exists() for w in workers)
