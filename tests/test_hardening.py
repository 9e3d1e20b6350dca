"""Service hardening (issue #28), each attack run against a real server on 127.0.0.1:
audit-log flooding by refused requests and rotated-file retention, one token starving the
others with slow uploads, X-Forwarded-For spoofing, truncation at either end of the audit log,
query strings in the access log and two Authorization headers. The model is the shipped v1
ensemble (224 px: no training run needed); the CLI cases run `python -m bonefrac serve`."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
from helpers import EXAMPLES, SHIPPED_ENSEMBLE, serve_cli, serving

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bonefrac.cli.main import build_parser, main  # noqa: E402
from bonefrac.cli.serve import security_config  # noqa: E402
from bonefrac.inference.ensemble import Ensemble  # noqa: E402
from bonefrac.serving import create_app  # noqa: E402
from bonefrac.serving.audit import rotated_files, verify  # noqa: E402
from bonefrac.serving.auth import TokenStore  # noqa: E402
from bonefrac.serving.security import ENDPOINT_MAX, SecurityConfig  # noqa: E402

IMAGE = sorted(EXAMPLES.glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def ens() -> Ensemble:
    return Ensemble.load(SHIPPED_ENSEMBLE)


def serve_defaults(*extra: str):
    """``SecurityConfig`` exactly as ``bonefrac serve *extra`` builds it (its defaults)."""
    return security_config(build_parser().parse_args(["serve", *extra]))


def make_tokens(path: Path, *names: str) -> dict[str, str]:
    store = TokenStore(path)
    return {n: store.create(n)[0] for n in names}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ 1. audit-log flooding
def test_500_refused_requests_with_14kb_paths_add_at_most_256kb(ens, tmp_path):
    make_tokens(tmp_path / "t.json", "alice")
    log = tmp_path / "audit.jsonl"
    cfg = serve_defaults("--token-file", str(tmp_path / "t.json"), "--audit-log", str(log))
    path = "/v1/" + "a" * 14_000
    with serving(create_app(ens, security=cfg)) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        codes = [c.get(path, headers=bearer(f"bf_{i:012x}_{'x' * 43}")).status_code
                 for i in range(500)]
        during = log.stat().st_size
    assert set(codes) == {401, 429}  # 60 at once, then 10 a second: the rate limit bit
    assert during <= 256 * 1024, during
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    full = [r for r in recs if "event" not in r]
    summaries = [r for r in recs if r.get("event") == "refused"]
    assert len(full) == 2 and {r["status"] for r in full} == {401, 429}
    assert all(len(r["endpoint"]) == ENDPOINT_MAX and r["endpoint_chars"] == len(path)
               for r in full)
    # at shutdown the counted ones are written: every refusal is accounted for
    assert len(full) + sum(r["count"] for r in summaries) == 500
    assert log.stat().st_size <= 256 * 1024 and verify([log]).lines == len(recs)


def test_refusal_summary_is_written_when_its_window_ends(ens, tmp_path):
    """While the server runs (not only at shutdown): the counted refusals of a window appear
    as one line once the window is over."""
    make_tokens(tmp_path / "t.json", "alice")
    log = tmp_path / "audit.jsonl"
    cfg = SecurityConfig(token_file=tmp_path / "t.json", audit_log=log, refusal_interval_s=1)
    with serving(create_app(ens, security=cfg)) as url:
        for _ in range(10):
            assert httpx.get(url + "/v1/model", timeout=30).status_code == 401
        deadline = time.monotonic() + 10
        while '"refused"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        running = [json.loads(x) for x in log.read_text().splitlines()]
    assert running[0].get("event") is None and running[1]["event"] == "refused"
    # after shutdown (a slow machine may have opened further windows): all accounted for
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    summaries = [r for r in recs if r.get("event") == "refused"]
    assert len(recs) - len(summaries) + sum(r["count"] for r in summaries) == 10
    assert {(r["remote"], r["auth"], r["status"]) for r in summaries} == \
        {("127.0.0.1", "missing", 401)}


def test_audit_keep_bounds_the_rotated_files(ens, tmp_path):
    tok = make_tokens(tmp_path / "t.json", "alice")
    log = tmp_path / "audit.jsonl"
    cfg = serve_defaults("--token-file", str(tmp_path / "t.json"), "--audit-log", str(log),
                         "--audit-max-mb", "0.004", "--audit-keep", "2", "--rate-limit", "0")
    with serving(create_app(ens, security=cfg)) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        codes = {c.get("/v1/" + "b" * 2000, headers=bearer(tok["alice"])).status_code
                 for _ in range(200)}  # a token holder's 404s: each one a full line
    assert codes == {404}
    rotated = rotated_files(log)
    assert len(rotated) == 2 and sum(f.stat().st_size for f in [*rotated, log]) <= 3 * 4096
    rep = verify([*rotated, log])  # what is left still verifies, as a continuation
    assert rep.last_seq == 200 and not rep.starts_at_genesis
    assert main(["audit", "verify", "--from-genesis", *map(str, rotated), str(log)]) == 1


# -------------------------------------------------------- 2. one token starving the others
def slow_upload(url: str, token: str) -> socket.socket:
    """A POST /v1/predict that sends its headers and the first bytes of a 200 kB body, then
    holds the connection (well inside the idle timeout while the test runs)."""
    port = int(url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}"
              "\r\nContent-Type: multipart/form-data; boundary=xx\r\nContent-Length: 200000"
              "\r\n\r\n--xx\r\n".encode())
    return s


def answered(s: socket.socket, wait_s: float = 0.05) -> int | None:
    """The status the server sent on ``s`` so far, or None (still waiting for the body)."""
    s.settimeout(wait_s)
    try:
        head = s.recv(4096)
    except TimeoutError:
        return None
    m = re.match(rb"HTTP/1\.1 (\d{3})", head)
    return int(m[1]) if m else None


@pytest.mark.parametrize("limit", ["8", "0"], ids=["client-limit-8", "no-client-limit"])
def test_token_b_gets_200_while_token_a_holds_18_slow_uploads(ens, tmp_path, limit):
    """2 workers + 16 queue places. A's 18 slow uploads take no place while their bodies
    trickle in (read first, under their own idle timeout), and beyond 8 in flight A gets 429:
    each defence alone keeps B's prediction answered."""
    tok = make_tokens(tmp_path / "t.json", "a", "b")
    cfg = serve_defaults("--token-file", str(tmp_path / "t.json"),
                         "--client-concurrency", limit)
    app = create_app(ens, workers=2, queue=16, security=cfg)
    with serving(app) as url:
        held = [slow_upload(url, tok["a"]) for _ in range(18)]
        try:
            time.sleep(0.5)  # all 18 arrived: 429 sent, or waiting for their bodies
            r = httpx.post(url + "/v1/predict", headers=bearer(tok["b"]), timeout=30,
                           files={"file": (IMAGE.name, IMAGE.read_bytes())})
            assert r.status_code == 200, r.text
            statuses = [answered(s) for s in held]
        finally:
            for s in held:
                s.close()
    if limit == "8":
        assert statuses.count(None) == 8 and statuses.count(429) == 10, statuses
    else:
        assert statuses == [None] * 18, statuses


def test_without_tokens_the_in_flight_limit_is_per_address(ens, tmp_path):
    cfg = serve_defaults("--client-concurrency", "2")
    with serving(create_app(ens, security=cfg)) as url:
        held = [slow_upload(url, "unused") for _ in range(3)]
        try:
            time.sleep(0.5)
            statuses = [answered(s) for s in held]
        finally:
            for s in held:
                s.close()
    assert sorted(statuses, key=str) == [429, None, None], statuses


def test_stalled_upload_gets_408_after_the_body_idle_timeout(ens, tmp_path):
    app = create_app(ens, body_idle_s=0.5)
    with serving(app) as url:
        s = slow_upload(url, "none")
        t0 = time.monotonic()
        with s:
            s.settimeout(10)
            head = b""
            while chunk := s.recv(4096):  # the answer, then the server closes
                head += chunk
                if b"}" in chunk:
                    break
        elapsed = time.monotonic() - t0
    assert head.startswith(b"HTTP/1.1 408") and b"no data for 0.5 s" in head
    assert 0.4 < elapsed < 5


# ----------------------------------- 3. X-Forwarded-For, 5. access-log queries, 4. anchors
def test_forwarded_for_is_ignored_by_default_and_queries_stay_out_of_the_log(tmp_path):
    """The attack of the issue: 100 wrong tokens, each with another X-Forwarded-For, to evade
    the per-address limit and forge the audit log's address; and a token in the query."""
    make_tokens(tmp_path / "t.json", "alice")
    log = tmp_path / "audit.jsonl"
    common = ("--token-file", str(tmp_path / "t.json"), "--audit-log", str(log),
              "--rate-limit", "60", "--rate-burst", "20")

    def attack(url: str) -> list[int]:
        with httpx.Client(base_url=url, timeout=30) as c:
            codes = [c.get("/v1/model", headers={**bearer(f"bf_{i:012x}_{'x' * 43}"),
                                                 "X-Forwarded-For": f"203.0.113.{i}"}
                           ).status_code for i in range(100)]
            assert c.get("/v1/model?access_token=SECRET-IN-QUERY").status_code in (401, 429)
        return codes

    with serve_cli(*common, "--log-level", "info") as (url, proc):
        codes = attack(url)
    assert codes.count(429) >= 70, codes
    remotes = {json.loads(x)["remote"] for x in log.read_text().splitlines()}
    assert remotes == {"127.0.0.1"}
    assert "GET /v1/model HTTP/1.1" in proc.out and "SECRET-IN-QUERY" not in proc.out
    # behind a proxy that is named, its header is believed (for that peer only)
    log.unlink()
    with serve_cli(*common, "--trusted-proxy", "127.0.0.1") as (url, proc):
        codes = attack(url)
    assert codes.count(429) == 0 and "proxy headers from 127.0.0.1" in proc.out
    remotes = {json.loads(x)["remote"] for x in log.read_text().splitlines()}
    assert "203.0.113.99" in remotes


def test_trusted_proxy_must_be_an_address(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--trusted-proxy", "*"])
    assert e.value.code == 2 and "not an IP address or network" in capsys.readouterr().err


def test_truncated_audit_log_fails_verify_against_an_anchor(tmp_path, capsys):
    """A real server's log, anchored by its own `audit head` lines; then every truncation of
    the issue: last line deleted, cut at a line boundary, last line edited, first 300 dropped."""
    tok = make_tokens(tmp_path / "t.json", "alice")
    log = tmp_path / "audit.jsonl"
    with serve_cli("--token-file", str(tmp_path / "t.json"), "--audit-log", str(log),
                   "--audit-anchor-every", "400", "--rate-limit", "0",
                   "--log-level", "warning") as (url, proc), \
            httpx.Client(base_url=url, timeout=30) as c:
        assert {c.get("/v1/model", headers=bearer(tok["alice"])).status_code
                for _ in range(400)} == {200}
    (head,) = re.findall(r"audit head \S+ seq 400 sha256 ([0-9a-f]{64})", proc.out)
    assert main(["audit", "verify", str(log), "--expect-head", head, "--from-genesis"]) == 0
    out = capsys.readouterr().out
    assert "400 lines" in out and f"head sha256 {head}" in out and "found at seq 400" in out
    lines = log.read_text().splitlines(keepends=True)
    edited = lines[-1].replace('"status":200', '"status":404')
    cases = {"last line deleted": lines[:-1], "cut at a line boundary": lines[:250],
             "last line edited": [*lines[:-1], edited]}
    for name, kept in cases.items():
        log.write_text("".join(kept))
        assert main(["audit", "verify", str(log)]) == 0, name  # a chain, still
        capsys.readouterr()
        assert main(["audit", "verify", str(log), "--expect-head", head]) == 1, name
        err = capsys.readouterr().err
        assert "is not in the chain" in err and "\n" not in err.strip(), name
    log.write_text("".join(lines[300:]))
    assert main(["audit", "verify", str(log)]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", str(log), "--from-genesis"]) == 1
    assert "seq 301 does not start the chain" in capsys.readouterr().err


# -------------------------------------------------------------- 5. two Authorization headers
def test_two_authorization_headers_get_400(ens, tmp_path):
    tok = make_tokens(tmp_path / "t.json", "alice")
    cfg = serve_defaults("--token-file", str(tmp_path / "t.json"))
    with serving(create_app(ens, security=cfg)) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        for pair in ([tok["alice"], "wrong"], ["wrong", tok["alice"]]):
            r = c.get("/v1/model", headers=[("Authorization", f"Bearer {t}") for t in pair])
            assert r.status_code == 400 and "2 Authorization headers" in r.json()["detail"]
        assert c.get("/v1/model", headers=bearer(tok["alice"])).status_code == 200
