"""Load test of ``bonefrac serve`` on loopback: latency, throughput and memory stability, plain
and with the security layer on, in one invocation.

Starts two real servers in subprocesses (``python -m bonefrac serve`` on free 127.0.0.1 ports):
**plain** (no token, HTTP, no audit) and **secure** (``--token-file`` from a real
``bonefrac token create``, HTTPS with a self-signed certificate made by openssl,
``--audit-log``). Both get rate and in-flight limits too high to bite, so the limiters run
but never throttle. Each is warmed up, then gets ``--requests`` real radiographs (every
``--explain-every``-th with the heat map) from ``--concurrency`` concurrent httpx clients, in
``--rounds`` blocks alternated plain/secure/secure/plain... so that drift in the machine's load
falls on both alike. It checks that
- every request answers 200 (the server admits ``workers + queue`` >= concurrency requests);
- each server's resident memory (VmRSS from /proc/PID/status) after the run is within
  ``--rss-tolerance`` of its value after the warm-up: steady traffic must not grow memory;
- the secure p50 latency is within ``--p50-tolerance`` of the plain one;
- the secure server's audit log has one line per API request and its chain verifies.

Prints ONE JSON object on stdout (progress on stderr); exit 0 when all checks pass, else 1.
Bounded: loopback only, a fixed number of requests, the servers are always stopped.

    python benchmarks/serve_load.py                                  # the shipped ensemble
    python benchmarks/serve_load.py --model /tmp/bonefrac_dev/ens_dev
    python benchmarks/serve_load.py --only plain                     # the plain server only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bonefrac.testing import free_port

ROOT = Path(__file__).resolve().parent.parent

IMAGES = sorted((ROOT / "examples" / "test_images").glob("*.jpg")) + \
    sorted((ROOT / "tests" / "data").rglob("*.jpg"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """Resident memory of a process in MiB (``VmRSS``, or ``VmHWM`` for the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None


@dataclass
class Target:
    """One server under test: how to reach it and what it measured."""

    name: str
    url: str
    headers: dict = field(default_factory=dict)
    verify: ssl.SSLContext | bool = True
    proc: subprocess.Popen | None = None
    latencies: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    wall: float = 0.0


async def fire(t: Target, n: int, concurrency: int, explain_every: int, offset: int = 0
               ) -> tuple[list[float], list[str], float]:
    """``n`` POST /v1/predict requests, ``concurrency`` at a time: (latencies s, errors, wall s)."""
    data = [(p.name, p.read_bytes()) for p in IMAGES]
    jobs = iter(range(n))
    latencies, errors = [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=t.url, timeout=120, limits=limits, headers=t.headers,
                                 verify=t.verify) as client:

        async def worker() -> None:
            for i in jobs:  # one shared iterator: each request is sent exactly once
                name, body = data[(offset + i) % len(data)]
                explain = explain_every > 0 and i % explain_every == 0
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", params={"explain": str(explain).lower()},
                                          files={"file": (name, body, "image/jpeg")})
                    ok = r.status_code == 200 and 0 <= r.json()["prediction"][
                        "prob_fractured"] <= 1
                    if not ok:
                        errors.append(f"{name}: HTTP {r.status_code} {r.text[:200]}")
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    errors.append(f"{name}: {type(e).__name__}: {e}")
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# Far above what the benchmark sends: the limiters run on every request but never refuse
# (one token sends all --concurrency requests at once, over serve's default of 8 in flight).
NO_THROTTLE = ["--rate-limit", "100000000", "--rate-burst", "100000",
               "--client-concurrency", "100000"]


def start_server(model: Path, port: int, workers: int, queue: int, logfile,
                 extra: list[str] = (), verify: ssl.SSLContext | bool = True,
                 scheme: str = "http") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bonefrac", "serve", "--model", str(model), "--host",
           "127.0.0.1", "--port", str(port), "--workers", str(workers), "--queue", str(queue),
           "--log-level", "warning", *NO_THROTTLE, *extra]
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{scheme}://127.0.0.1:{port}/healthz", timeout=2,
                         verify=verify).status_code == 200:
                return proc
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not answer /healthz within 120 s")


def secure_setup(tmp: Path) -> tuple[list[str], dict, ssl.SSLContext]:
    """A token (through the real ``bonefrac token create``) and a self-signed certificate:
    (serve options, request headers, client TLS context)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the secure run needs openssl to make its certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
                   check=True, capture_output=True)
    token = subprocess.run([sys.executable, "-m", "bonefrac", "token", "create", "--token-file",
                            str(tmp / "tokens.json"), "--name", "bench"], check=True,
                           capture_output=True, text=True).stdout.strip()
    opts = ["--token-file", str(tmp / "tokens.json"), "--tls-cert", str(tmp / "cert.pem"),
            "--tls-key", str(tmp / "key.pem"), "--audit-log", str(tmp / "audit.jsonl")]
    return opts, {"Authorization": f"Bearer {token}"}, \
        ssl.create_default_context(cafile=str(tmp / "cert.pem"))


def stats(t: Target, n: int, rss_warm: float, rss_after: float, peak: float,
          tolerance: float) -> dict:
    ms = [x * 1000 for x in t.latencies]
    growth = rss_after / rss_warm - 1
    return {
        "url": t.url, "requests": n, "errors": len(t.errors),
        "error_examples": list(itertools.islice(t.errors, 3)),
        "p50_ms": round(statistics.median(ms), 1), "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms), 1),
        "requests_per_s": round(n / t.wall, 2), "wall_s": round(t.wall, 2),
        "rss_warm_mib": round(rss_warm, 1), "rss_after_mib": round(rss_after, 1),
        "rss_peak_mib": round(peak, 1), "rss_growth": round(growth, 4),
        "rss_ok": abs(growth) <= tolerance,
    }


def main(argv: list[str] | None = None) -> int:
    from bonefrac.cli.common import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=48, help="requests before the RSS baseline")
    p.add_argument("--explain-every", type=int, default=2,
                   help="every N-th request asks for the heat map (0: never)")
    p.add_argument("--workers", type=int, default=2, help="server inference threads")
    p.add_argument("--rss-tolerance", type=float, default=0.20)
    p.add_argument("--rounds", type=int, default=4,
                   help="blocks the requests are sent in, alternating the servers")
    p.add_argument("--p50-tolerance", type=float, default=0.10,
                   help="largest allowed secure p50 / plain p50 - 1")
    p.add_argument("--only", choices=["plain", "secure"], default=None,
                   help="run one server only (default: both)")
    args = p.parse_args(argv)
    if not (args.model / "ensemble_meta.json").is_file() and \
            not (args.model / "model.json").is_file():
        p.error(f"{args.model} is not a model folder")
    if min(args.requests, args.concurrency, args.rounds) < 1:
        p.error("--requests, --concurrency and --rounds must be >= 1")

    with tempfile.TemporaryDirectory(prefix="bonefrac_serve_load_") as tmp, \
            tempfile.TemporaryFile("w+") as server_log:
        tmp = Path(tmp)
        targets: list[Target] = []
        try:
            if args.only in (None, "plain"):
                port = free_port()
                t = Target("plain", f"http://127.0.0.1:{port}")
                log(f"starting the plain server on {t.url} with {args.model}")
                t.proc = start_server(args.model, port, args.workers, args.concurrency,
                                      server_log)
                targets.append(t)
            if args.only in (None, "secure"):
                opts, headers, ctx = secure_setup(tmp)
                port = free_port()
                t = Target("secure", f"https://127.0.0.1:{port}", headers, ctx)
                log(f"starting the secure server (token, TLS, audit) on {t.url}")
                t.proc = start_server(args.model, port, args.workers, args.concurrency,
                                      server_log, opts, ctx, "https")
                targets.append(t)
            out = run_load(args, targets, tmp / "audit.jsonl")
        except (RuntimeError, subprocess.CalledProcessError) as e:
            server_log.seek(0)
            log(f"error: {e}\n--- server log ---\n{server_log.read()[-4000:]}")
            return 1
        finally:
            for t in targets:
                stop(t.proc)
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_load(args, targets: list[Target], audit_path: Path) -> dict:
    """Warm up every target, send the load in alternating blocks, and gather the JSON."""
    first = targets[0]
    model_id = httpx.get(first.url + "/v1/model", headers=first.headers, verify=first.verify,
                         timeout=10).json()["model"]["model_id"]
    warm_errors = {}
    for t in targets:
        log(f"{t.name}: warm-up, {args.warmup} requests")
        warm_errors[t.name] = len(asyncio.run(fire(t, args.warmup, args.concurrency,
                                                   args.explain_every))[1])
    time.sleep(0.5)
    rss_warm = {t.name: rss_mib(t.proc.pid) for t in targets}
    load_before = loadavg()
    blocks = [args.requests // args.rounds + (i < args.requests % args.rounds)
              for i in range(args.rounds)]
    done = 0
    for i, n in enumerate(blocks):
        for t in (targets if i % 2 == 0 else targets[::-1]):  # ABBA: drift hits both alike
            log(f"{t.name}: block {i + 1}/{args.rounds}, {n} requests at concurrency "
                f"{args.concurrency}")
            lat, errors, wall = asyncio.run(fire(t, n, args.concurrency, args.explain_every,
                                                 offset=args.warmup + done))
            t.latencies += lat
            t.errors += errors
            t.wall += wall
        done += n
    time.sleep(0.5)
    out = {
        "benchmark": "serve_load", "model": str(args.model), "model_id": model_id,
        "requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
        "explain_fraction": round(sum(1 for i in range(args.requests)
                                      if args.explain_every and i % args.explain_every == 0)
                                  / args.requests, 3),
        "server_workers": args.workers, "server_queue": args.concurrency,
        "warmup_errors": warm_errors,
        "cpus": len(os.sched_getaffinity(0)), "loadavg_before": load_before,
    }
    for t in targets:
        out[t.name] = stats(t, args.requests, rss_warm[t.name], rss_mib(t.proc.pid),
                            rss_mib(t.proc.pid, "VmHWM"), args.rss_tolerance)
    out["loadavg_after"] = loadavg()
    ok = all(out[t.name]["errors"] == 0 and out[t.name]["rss_ok"] for t in targets)
    if len(targets) == 2:
        ratio = out["secure"]["p50_ms"] / out["plain"]["p50_ms"]
        out["secure_over_plain_p50"] = round(ratio, 3)
        out["p50_within_tolerance"] = ratio <= 1 + args.p50_tolerance
        ok = ok and out["p50_within_tolerance"]
    if any(t.name == "secure" for t in targets):
        expected = args.warmup + args.requests + (first.name == "secure")  # + GET /v1/model
        out["secure"]["audit"] = audit_summary(audit_path, expected)
        ok = ok and out["secure"]["audit"]["ok"]
    out["ok"] = ok
    return out


def audit_summary(path: Path, expected: int) -> dict:
    """The secure server's audit log: one line per API request, chain verified."""
    from bonefrac.serving.audit import AuditChainError, verify

    try:
        rep = verify([path])
    except AuditChainError as e:
        return {"lines": None, "expected": expected, "chain": str(e), "ok": False}
    return {"lines": rep.lines, "expected": expected, "chain": "intact",
            "head": rep.head, "ok": rep.lines == expected}

if __name__ == "__main__":
    sys.exit(main())
