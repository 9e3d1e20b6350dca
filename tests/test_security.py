"""Service security against real uvicorn servers on loopback: API tokens (missing, wrong,
revoked, expired, valid), the rate limit (1,000 wrong tokens), HTTPS with a self-signed
certificate made here by openssl, security headers, CORS, the hash-chained audit log and
`bonefrac audit verify`, and the `serve` / `token` commands. The model is the shipped v1
ensemble (224 px: no training run needed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import EXAMPLES, SHIPPED_ENSEMBLE, serve_cli, serving

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from bonefrac.cli.main import main  # noqa: E402
from bonefrac.inference.ensemble import Ensemble  # noqa: E402
from bonefrac.inference.predict import model_fingerprint  # noqa: E402
from bonefrac.serving import create_app  # noqa: E402
from bonefrac.serving.audit import AuditChainError, AuditLog, verify  # noqa: E402
from bonefrac.serving.auth import TokenStore  # noqa: E402
from bonefrac.serving.ratelimit import RateLimiter  # noqa: E402
from bonefrac.serving.security import SecurityConfig, scrub_paths  # noqa: E402

IMAGES = sorted(EXAMPLES.glob("*.jpg"))
OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def ens() -> Ensemble:
    return Ensemble.load(SHIPPED_ENSEMBLE)


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost, made by openssl (EC P-256)."""
    if OPENSSL is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def tokens(path: Path) -> dict[str, str]:
    """A token file with alice (valid), bob (revoked) and carol (expired); name -> token."""
    store = TokenStore(path)
    out = {name: store.create(name)[0] for name in ("alice", "bob")}
    store.revoke("bob")
    out["carol"] = store.create("carol", expires_days=1 / 86400)[0]  # one second
    return out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(img: Path) -> dict:
    return {"file": (img.name, img.read_bytes(), "image/jpeg")}


# --------------------------------------------------------------------------- token file
def test_token_cli_stores_only_salted_hashes_in_a_0600_file(tmp_path, capsys):
    f = tmp_path / "conf" / "tokens.json"
    assert main(["token", "create", "--token-file", str(f), "--name", "ward-3",
                 "--expires", "30"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("bf_") and len(token) > 50 and "shown only now" in out.err
    assert f.stat().st_mode & 0o777 == 0o600
    text = f.read_text()
    secret = token.split("_", 2)[2]
    assert secret not in text and token not in text
    (entry,) = json.loads(text)["tokens"]
    assert entry["name"] == "ward-3" and len(entry["salt"]) == 32
    assert entry["hash"] == hashlib.sha256(bytes.fromhex(entry["salt"]) + secret.encode()
                                           ).hexdigest()
    store = TokenStore(f)
    assert store.verify(token).name == "ward-3"
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify("not-a-token") is None and store.verify("") is None
    # a second token: same secret twice would still hash differently (own salt)
    assert main(["token", "create", "--token-file", str(f), "--name", "lab"]) == 0
    capsys.readouterr()
    assert main(["token", "create", "--token-file", str(f), "--name", "lab"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bonefrac token: error:") and "exists already" in err
    assert "\n" not in err
    assert main(["token", "revoke", "--token-file", str(f), "lab"]) == 0
    assert main(["token", "revoke", "--token-file", str(f), "nobody"]) == 1
    capsys.readouterr()
    assert main(["token", "list", "--token-file", str(f)]) == 0
    listing = capsys.readouterr().out
    assert "ward-3" in listing and "active" in listing and "revoked" in listing
    assert secret not in listing and entry["hash"] not in listing
    assert f.stat().st_mode & 0o777 == 0o600  # still, after every rewrite
    assert main(["token", "create", "--token-file", str(f), "--name", "bad name!"]) == 1
    f.write_text("{not json")
    assert main(["token", "list", "--token-file", str(f)]) == 1
    assert f"token file {f}" in capsys.readouterr().err


def test_token_and_audit_commands_need_no_serve_extra(tmp_path):
    """`bonefrac token` and `bonefrac audit` run with fastapi/uvicorn unimportable (an auditor's
    machine need not have the server installed)."""
    log = AuditLog(tmp_path / "a.jsonl")
    log.append({"endpoint": "/v1/model", "status": 200})
    log.close()
    blocked = ("fastapi", "uvicorn", "starlette", "multipart", "python_multipart")
    for argv, want in [(["token", "create", "--token-file", str(tmp_path / "t.json"),
                         "--name", "x"], "bf_"),
                       (["audit", "verify", str(tmp_path / "a.jsonl")], "ok: 1 lines")]:
        code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
                "from bonefrac.cli.main import main\n"
                f"sys.exit(main({argv!r}))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and out.stdout.startswith(want), out.stderr


# ----------------------------------------------------------------- auth + TLS + headers
def test_tokens_and_https_on_a_real_server(ens, cert, tmp_path):
    tok = tokens(tmp_path / "tokens.json")
    time.sleep(1.1)  # carol's token expires
    cfg = SecurityConfig(token_file=tmp_path / "tokens.json", hsts=True)
    ca = ssl.create_default_context(cafile=str(cert[0]))
    with serving(create_app(ens, security=cfg), tls=cert) as url, \
            httpx.Client(base_url=url, verify=ca, timeout=60) as c:
        for name, headers in [("none", {}), ("bob (revoked)", bearer(tok["bob"])),
                              ("carol (expired)", bearer(tok["carol"])),
                              ("wrong", bearer(tok["alice"][:-2] + "xx")),
                              ("basic", {"Authorization": "Basic YWxpY2U6eA=="})]:
            for r in (c.post("/v1/predict", files=upload(IMAGES[0]), headers=headers),
                      c.get("/v1/model", headers=headers)):
                assert r.status_code == 401, (name, r.text)
                assert r.headers["www-authenticate"].startswith('Bearer realm="bonefrac"')
                assert "detail" in r.json()
        r = c.post("/v1/predict", files=upload(IMAGES[0]), headers=bearer(tok["alice"]))
        assert r.status_code == 200, r.text
        assert 0 <= r.json()["prediction"]["prob_fractured"] <= 1
        assert r.headers["strict-transport-security"].startswith("max-age=")
        assert r.headers["cache-control"] == "no-store"
        assert c.get("/v1/model", headers=bearer(tok["alice"])).status_code == 200
        # revoking in the file takes effect at once, without a restart
        TokenStore(tmp_path / "tokens.json").revoke("alice")
        assert c.get("/v1/model", headers=bearer(tok["alice"])).status_code == 401
        # public: the page, its assets, the docs and the liveness probe (status only)
        assert c.get("/healthz").json() == {"status": "ok"}
        page = c.get("/")
        assert page.status_code == 200 and 'id="login"' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        for path in ("/", "/static/app.js", "/docs", "/healthz", "/v1/model"):
            h = c.get(path).headers
            assert h["x-content-type-options"] == "nosniff", path
            assert h["referrer-policy"] == "no-referrer", path
            assert "content-security-policy" in h and "strict-transport-security" in h, path
        spec = c.get("/openapi.json").json()
        assert "HTTPBearer" in spec["components"]["securitySchemes"]
        assert "security" in spec["paths"]["/v1/predict"]["post"]
        assert "access-control-allow-origin" not in c.options(
            "/v1/predict", headers={"Origin": "https://evil.example",
                                    "Access-Control-Request-Method": "POST"}).headers
    # the certificate really is what secures it: an unverified client is refused
    with pytest.raises(httpx.ConnectError), httpx.Client(base_url=url) as c:
        c.get("/healthz")


def test_wrong_tokens_get_401_until_the_rate_limit_then_429(ens, tmp_path):
    tok = tokens(tmp_path / "tokens.json")
    burst = 20
    cfg = SecurityConfig(token_file=tmp_path / "tokens.json", rate_per_minute=120,
                         rate_burst=burst)
    with serving(create_app(ens, security=cfg)) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        codes, retry = [], set()
        t0 = time.monotonic()
        for i in range(1000):
            r = c.get("/v1/model", headers=bearer(f"bf_{i:012x}_{'x' * 43}"))
            codes.append(r.status_code)
            if r.status_code == 429:
                retry.add(int(r.headers["retry-after"]))
        elapsed = time.monotonic() - t0
        assert set(codes) == {401, 429}
        first = codes.index(429)  # the burst, plus what refilled meanwhile (2 per second)
        assert codes[:burst] == [401] * burst and first <= burst + 2 * elapsed + 1
        # after the burst only the refill (2 per second) gets through to the token check
        assert codes.count(401) <= burst + 2 * elapsed + 1
        assert retry and min(retry) >= 1
        # the address's failures cost the real token nothing: its own bucket
        r = c.get("/v1/model", headers=bearer(tok["alice"]))
        assert r.status_code == 200
        codes = [c.get("/v1/model", headers=bearer(tok["alice"])).status_code
                 for _ in range(2 * burst)]
        assert codes.count(429) >= 5 and 200 in codes


def test_rate_limiter_refills_at_its_rate():
    lim = RateLimiter(per_minute=60, burst=3)
    assert [lim.take("a", now=0.0) for _ in range(3)] == [0.0] * 3
    assert lim.take("a", now=0.0) == pytest.approx(1.0)
    assert lim.take("b", now=0.0) == 0.0  # keys are independent
    assert lim.take("a", now=1.0) == 0.0  # one per second refilled
    assert lim.take("a", now=1.5) == pytest.approx(0.5)
    assert RateLimiter.retry_after(0.2) == "1" and RateLimiter.retry_after(2.1) == "3"
    small = RateLimiter(per_minute=60, burst=1, max_keys=2)
    for k in "xyz":
        small.take(k, now=0.0)
    assert len(small._buckets) == 2  # memory bounded under a flood of addresses


# ---------------------------------------------------------------------------- audit log
def test_audit_log_has_one_verifiable_line_per_request(ens, tmp_path, capsys):
    tok = tokens(tmp_path / "tokens.json")
    log_path = tmp_path / "audit" / "audit.jsonl"
    cfg = SecurityConfig(token_file=tmp_path / "tokens.json", audit_log=log_path)
    good, bad = IMAGES[0], tmp_path / "notes.txt"
    bad.write_text("not an image")
    with serving(create_app(ens, security=cfg)) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        sent = [
            c.post("/v1/predict", files=upload(good), headers=bearer(tok["alice"])),
            c.post("/v1/predict", files=upload(good)),  # no token
            c.post("/v1/predict/batch", headers=bearer(tok["alice"]), files=[
                ("files", (good.name, good.read_bytes())), ("files", (bad.name, b"text"))]),
            c.get("/v1/model", headers=bearer(tok["bob"])),  # revoked
            c.get("/v1/nothing", headers=bearer(tok["alice"])),
        ]
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
    assert [r.status_code for r in sent] == [200, 401, 200, 401, 404]
    assert log_path.stat().st_mode & 0o777 == 0o600
    lines = log_path.read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == len(sent)  # the page and /healthz are not API requests
    assert [r["status"] for r in recs] == [r.status_code for r in sent]
    assert [r["endpoint"] for r in recs] == ["/v1/predict", "/v1/predict", "/v1/predict/batch",
                                             "/v1/model", "/v1/nothing"]
    assert [r["client"] for r in recs] == ["alice", None, "alice", None, "alice"]
    assert [r["auth"] for r in recs] == ["token", "missing", "token", "invalid", "token"]
    for r in recs:
        assert r["remote"] == "127.0.0.1" and r["latency_ms"] >= 0 and r["time"].endswith("Z")
        assert r["model_id"] == ens.model_id
        assert r["model_fingerprint"] == model_fingerprint(ens)
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    p = sent[0].json()["prediction"]
    assert recs[0]["files"] == [{"sha256": sha, "bytes": good.stat().st_size, "status": 200,
                                 "prob_fractured": p["prob_fractured"],
                                 "decision": p["decision"], "threshold": p["threshold"]}]
    assert [f["status"] for f in recs[2]["files"]] == [200, 415]
    assert "files" not in recs[1]  # refused before its body was read
    text = log_path.read_text()
    for secret in tok.values():
        assert secret not in text and secret.split("_", 2)[2] not in text
    assert good.name not in text and "notes.txt" not in text  # names only with --audit-phi
    # the chain verifies, and an edited line is named
    assert main(["audit", "verify", str(log_path)]) == 0
    assert "5 lines" in capsys.readouterr().out
    edited = dict(recs[2], files=[dict(recs[2]["files"][0], decision="non_fractured")])
    lines[2] = json.dumps(edited, separators=(",", ":"))
    log_path.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(log_path)]) == 1
    err = capsys.readouterr().err
    assert f"{log_path} line 4:" in err and "line 3 was edited" in err
    del lines[2]  # a removed line is found too
    log_path.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(log_path)]) == 1
    assert f"{log_path} line 3:" in capsys.readouterr().err


def test_audit_phi_only_when_asked(ens, tmp_path):
    pytest.importorskip("pydicom")
    from PIL import Image
    from pydicom.uid import SecondaryCaptureImageStorage

    from bonefrac.testing.dicom import write_dicom

    px = np.asarray(Image.open(IMAGES[0]).convert("L"))
    data = write_dicom(tmp_path / "doe_jane.dcm", px, sop_class=SecondaryCaptureImageStorage,
                       PatientName="Doe^Jane", PatientID="MRN-0042").read_bytes()
    for phi in (False, True):
        log_path = tmp_path / f"audit_{phi}.jsonl"
        cfg = SecurityConfig(audit_log=log_path, audit_phi=phi)
        with serving(create_app(ens, security=cfg)) as url:
            r = httpx.post(url + "/v1/predict", files={"file": ("doe_jane.dcm", data)},
                           timeout=60)
        text = log_path.read_text()
        (rec,) = [json.loads(x) for x in text.splitlines()]
        assert r.status_code == 200 and rec["auth"] == "off" and rec["client"] is None
        assert rec["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
        assert ("Doe^Jane" in text and "MRN-0042" in text and "doe_jane" in text) is phi
        assert ("Doe" in text or "MRN" in text or "doe_jane" in text) is phi
        if phi:
            assert rec["files"][0]["PatientID"] == "MRN-0042"
        assert "PixelData" not in text and len(text) < 2000  # never pixels


def test_audit_rotation_keeps_the_chain_across_files(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, max_bytes=4096)
    for i in range(60):
        log.append({"endpoint": "/v1/predict", "status": 200, "i": i, "pad": "x" * 100})
    log.close()
    files = sorted(tmp_path.glob("a.jsonl.*")) + [path]
    assert len(files) >= 3 and all(f.stat().st_size <= 4096 for f in files)
    rep = verify(files)
    assert rep.lines == 60 and rep.last_seq == 60 and rep.starts_at_genesis
    assert not verify(files[1:]).starts_at_genesis  # a continuation still verifies
    with pytest.raises(AuditChainError, match="line 1"):
        verify([files[0], files[2]])  # a missing file in between breaks the chain
    # a restarted server continues the same chain
    log = AuditLog(path, max_bytes=4096)
    log.append({"endpoint": "/v1/model", "status": 200})
    log.close()
    assert verify(files).last_seq == 61


def test_unwritable_audit_log_answers_503_not_an_unrecorded_answer(ens):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    cfg = SecurityConfig(audit_log=Path("/dev/full"))  # every write fails with ENOSPC
    with serving(create_app(ens, security=cfg)) as url:
        r = httpx.post(url + "/v1/predict", files=upload(IMAGES[0]), timeout=60)
        assert r.status_code == 503 and "audit log" in r.json()["detail"]
        assert "prediction" not in r.text
        assert httpx.get(url + "/healthz").status_code == 200  # not audited: still answers


# ------------------------------------------------------------------- errors, CORS, paths
def test_no_traceback_or_internal_path_in_any_answer(ens, tmp_path):
    cfg = SecurityConfig(audit_log=tmp_path / "a.jsonl")
    bodies = []
    with serving(create_app(ens, security=cfg)) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        bodies += [c.get(p).text for p in ("/v1/nothing", "/static/nothing.js", "/../etc")]
        bodies.append(c.get("/v1/predict").text)  # 405
        bodies.append(c.post("/v1/predict").text)  # no file field
        bodies.append(c.post("/v1/predict", content=b"garbage",
                             headers={"content-type": "multipart/form-data; boundary=x"}).text)
        for name, data in [("cut.jpg", IMAGES[0].read_bytes()[:2000]),
                           ("a.dcm", b"\0" * 128 + b"DICM" + b"\xff" * 300),
                           ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64), ("e.jpg", b"")]:
            r = c.post("/v1/predict", files={"file": (name, data)})
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            bodies.append(r.text)
        bodies.append(c.post("/v1/predict/batch", files=[
            ("files", ("cut.jpg", IMAGES[0].read_bytes()[:2000])),
            ("files", ("a.dcm", b"\0" * 128 + b"DICM" + b"\x00" * 50))]).text)
    roots = {str(Path.cwd()), str(Path(__file__).parent.parent), sys.prefix, "/tmp/",
             os.path.expanduser("~"), "site-packages"}
    for body in bodies:
        assert "Traceback" not in body and 'File "' not in body, body
        assert not any(root in body for root in roots), body


def test_scrub_paths():
    assert scrub_paths("/tmp/bonefrac_upload_1.dcm: bad tag in /usr/lib/x.py") == \
        "bonefrac_upload_1.dcm: bad tag in x.py"
    assert scrub_paths("cannot decode image (3/4 of 1.5 MiB/s)") == \
        "cannot decode image (3/4 of 1.5 MiB/s)"


def test_cors_only_for_configured_origins(ens, tmp_path):
    tok = tokens(tmp_path / "tokens.json")
    cfg = SecurityConfig(token_file=tmp_path / "tokens.json",
                         cors_origins=("https://viewer.example",))
    pre = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization"}
    with serving(create_app(ens, security=cfg)) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        ok = c.options("/v1/predict", headers={"Origin": "https://viewer.example", **pre})
        assert ok.status_code == 200  # the preflight needs no token
        assert ok.headers["access-control-allow-origin"] == "https://viewer.example"
        evil = c.options("/v1/predict", headers={"Origin": "https://evil.example", **pre})
        assert "access-control-allow-origin" not in evil.headers
        r = c.get("/v1/model", headers={"Origin": "https://viewer.example",
                                        **bearer(tok["alice"])})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://viewer.example"
        assert c.get("/v1/model", headers={"Origin": "https://viewer.example"}
                     ).status_code == 401  # CORS is not authentication


# --------------------------------------------------------------------------- serve CLI
def test_serve_refuses_unsafe_or_broken_security_options(tmp_path, capsys, cert):
    model = str(SHIPPED_ENSEMBLE)
    cases = [
        (["--host", "0.0.0.0"], "--token-file"),
        (["--host", "10.1.2.3", "--tls-cert", str(cert[0]), "--tls-key", str(cert[1])],
         "--insecure-no-auth"),
        (["--tls-cert", str(cert[0])], "--tls-cert and --tls-key go together"),
        (["--tls-cert", str(cert[1]), "--tls-key", str(cert[1])], "TLS certificate"),
        (["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(cert[1])],
         "No such file"),
        (["--token-file", str(tmp_path / "none.json")], "bonefrac token create"),
        (["--rate-burst", "0"], "--rate-burst"),
    ]
    for extra, why in cases:
        assert main(["serve", "--model", model, *extra]) == 1, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("bonefrac serve: error:") and why in err, (extra, err)
        assert "\n" not in err and "Traceback" not in err


def test_serve_cli_https_with_tokens_and_audit_end_to_end(tmp_path, cert, capsys):
    """`python -m bonefrac serve --token-file --tls-cert --tls-key --audit-log`, then
    `bonefrac audit verify` on what it wrote."""
    f = tmp_path / "tokens.json"
    assert main(["token", "create", "--token-file", str(f), "--name", "ward"]) == 0
    token = capsys.readouterr().out.strip()
    audit = tmp_path / "audit.jsonl"
    ca = ssl.create_default_context(cafile=str(cert[0]))
    with serve_cli("--log-level", "warning", "--token-file", str(f), "--tls-cert",
                   str(cert[0]), "--tls-key", str(cert[1]), "--audit-log", str(audit),
                   https=True, verify=ca) as (url, proc):
        assert httpx.get(url + "/v1/model", verify=ca).status_code == 401
        r = httpx.post(url + "/v1/predict", files=upload(IMAGES[1]), verify=ca,
                       headers=bearer(token), timeout=60)
        assert r.status_code == 200 and "strict-transport-security" in r.headers
    assert f"{url}/" in proc.out and "tokens from" in proc.out
    assert token not in proc.out and "Traceback" not in proc.out
    assert main(["audit", "verify", str(audit)]) == 0
    assert "2 lines" in capsys.readouterr().out
    assert [json.loads(x)["client"] for x in audit.read_text().splitlines()] == [None, "ward"]


# ------------------------------------------------------------------------ the web page
@pytest.mark.browser
def test_page_asks_for_the_token_once_and_keeps_it_in_the_tab(ens, tmp_path):
    """Chromium (Playwright) against a server with tokens: the page asks for the token,
    refuses a wrong one, analyses with the right one, and keeps it in sessionStorage only."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} not installed (run scripts/ci/install_browser.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    tok = tokens(tmp_path / "tokens.json")
    cfg = SecurityConfig(token_file=tmp_path / "tokens.json")
    with serving(create_app(ens, security=cfg)) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_context().new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#login:not([hidden])", timeout=30_000)
        assert page.is_hidden("#drop") and page.is_hidden("#login-error")
        page.fill("#token", tok["bob"])  # revoked
        page.click("#login button")
        page.wait_for_selector("#login-error:not([hidden])", timeout=30_000)
        assert "not accepted" in page.text_content("#login-error")
        page.fill("#token", tok["alice"])
        page.click("#login button")
        page.wait_for_selector("#drop:not([hidden])", timeout=30_000)
        page.set_input_files("#file", str(IMAGES[0]))
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        assert page.text_content("#filename") == IMAGES[0].name
        assert page.evaluate("sessionStorage.getItem('bonefrac-token')") == tok["alice"]
        assert page.evaluate("localStorage.length") == 0
        assert page.context.cookies() == []
        assert page.input_value("#token") == ""  # not left in the form
        # a new tab of the same browser has no token: sessionStorage is per tab
        other = page.context.new_page()
        other.goto(url + "/")
        other.wait_for_selector("#login:not([hidden])", timeout=30_000)
        assert other.evaluate("sessionStorage.length") == 0
        # the token is revoked while the page is open: the next upload asks again
        TokenStore(tmp_path / "tokens.json").revoke("alice")
        page.set_input_files("#file", str(IMAGES[1]))
        page.wait_for_selector("#login:not([hidden])", timeout=30_000)
        assert page.evaluate("sessionStorage.getItem('bonefrac-token')") is None
        assert errors == []
        browser.close()
