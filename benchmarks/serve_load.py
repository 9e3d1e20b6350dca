"""Load test of ``bonefrac serve`` on loopback: latency, throughput and memory stability.

Starts the real server in a subprocess (``python -m bonefrac serve`` on a free 127.0.0.1 port),
warms it up, then sends ``--requests`` real radiographs (every ``--explain-every``-th with the
Grad-CAM heat map) from ``--concurrency`` concurrent httpx clients, and checks that
- every request answers 200 (the server admits ``workers + queue`` >= concurrency requests);
- the server's resident memory (VmRSS from /proc/PID/status) after the run is within
  ``--rss-tolerance`` of its value after the warm-up: steady traffic must not grow memory.

Prints ONE JSON object on stdout (progress on stderr); exit 0 when both checks pass, else 1.
Bounded: loopback only, a fixed number of requests, the server is always stopped.

    python benchmarks/serve_load.py                                  # the shipped ensemble
    python benchmarks/serve_load.py --model /tmp/bonefrac_dev/ens_dev
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
IMAGES = sorted((ROOT / "examples" / "test_images").glob("*.jpg")) + \
    sorted((ROOT / "tests" / "data").rglob("*.jpg"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


async def fire(url: str, n: int, concurrency: int, explain_every: int, offset: int = 0
               ) -> tuple[list[float], list[str], float]:
    """``n`` POST /v1/predict requests, ``concurrency`` at a time: (latencies s, errors, wall s)."""
    data = [(p.name, p.read_bytes()) for p in IMAGES]
    jobs = iter(range(n))
    latencies, errors = [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

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


def start_server(model: Path, port: int, workers: int, queue: int, logfile) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bonefrac", "serve", "--model", str(model), "--host",
           "127.0.0.1", "--port", str(port), "--workers", str(workers), "--queue", str(queue),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not answer /healthz within 120 s")


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
    args = p.parse_args(argv)
    if not (args.model / "ensemble_meta.json").is_file() and \
            not (args.model / "model.json").is_file():
        p.error(f"{args.model} is not a model folder")
    if min(args.requests, args.concurrency) < 1:
        p.error("--requests and --concurrency must be >= 1")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as server_log:
        proc = None
        try:
            log(f"starting bonefrac serve on {url} with {args.model}")
            proc = start_server(args.model, port, args.workers, args.concurrency, server_log)
            model_id = httpx.get(url + "/v1/model", timeout=10).json()["model"]["model_id"]
            log(f"warm-up: {args.warmup} requests")
            _, warm_errors, _ = asyncio.run(fire(url, args.warmup, args.concurrency,
                                                 args.explain_every))
            time.sleep(0.5)
            rss_warm = rss_mib(proc.pid)
            load_before = loadavg()
            log(f"load: {args.requests} requests at concurrency {args.concurrency}")
            lat, errors, wall = asyncio.run(fire(url, args.requests, args.concurrency,
                                                 args.explain_every, offset=args.warmup))
            time.sleep(0.5)
            rss_after = rss_mib(proc.pid)
            peak = rss_mib(proc.pid, "VmHWM")
        except RuntimeError as e:
            server_log.seek(0)
            log(f"error: {e}\n--- server log ---\n{server_log.read()[-4000:]}")
            return 1
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    growth = rss_after / rss_warm - 1
    ms = [x * 1000 for x in lat]
    out = {
        "benchmark": "serve_load", "model": str(args.model), "model_id": model_id,
        "requests": args.requests, "concurrency": args.concurrency,
        "explain_fraction": round(sum(1 for i in range(args.requests)
                                      if args.explain_every and i % args.explain_every == 0)
                                  / args.requests, 3),
        "server_workers": args.workers, "server_queue": args.concurrency,
        "errors": len(errors), "warmup_errors": len(warm_errors),
        "error_examples": list(itertools.islice(errors, 3)),
        "p50_ms": round(statistics.median(ms), 1), "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms), 1),
        "requests_per_s": round(args.requests / wall, 2), "wall_s": round(wall, 2),
        "rss_warm_mib": round(rss_warm, 1), "rss_after_mib": round(rss_after, 1),
        "rss_peak_mib": round(peak, 1), "rss_growth": round(growth, 4),
        "rss_ok": abs(growth) <= args.rss_tolerance,
        "cpus": len(os.sched_getaffinity(0)), "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    print(json.dumps(out, indent=2))
    return 0 if out["errors"] == 0 and out["rss_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
