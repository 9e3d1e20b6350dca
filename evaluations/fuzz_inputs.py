"""Hostile input at scale: seeded mutants, decompression bombs and empty files through the
decode pool, ``bonefrac predict`` and the HTTP service; prints ONE JSON object.

Inputs (``bonefrac.testing.fuzzing``): the clean originals (real radiographs from the data
set in every raster format and as DICOM in every transfer syntax pydicom encodes here, plus
pydicom's test objects per transfer syntax), ``--mutants`` seeded mutants of them (bit flips,
byte runs, interesting integers, truncations, spliced headers, duplicated/deleted chunks), a
bomb per format, and a separate folder of ``--tiny`` zero- and one-byte files. Then:

1. ``decode``: every input through a ``DecodePool`` (one thread per worker): the outcome of each
   file (decoded, refused with a reason, decoder crashed, killed at the time limit, over the
   memory cap), the slowest files, files that took longer than the limit (hangs past it) and
   the workers' peak resident memory;
2. ``predict_cli``: ``bonefrac predict`` over the whole folder (the real CLI, its own process):
   exit code (3 = some files failed), whether it printed a traceback, whether every input is
   in ``predictions.csv`` or in ``errors.csv`` with a reason, the clean originals predicted,
   its peak memory and that of its decode workers;
3. ``tiny_files``: ``bonefrac predict`` over the empty/one-byte folder;
4. ``serve``: ``bonefrac serve`` on loopback, ``--serve`` of the inputs (every k-th) posted to
   ``POST /v1/predict`` at concurrency 16: status counts (no 500 allowed), ``/healthz``
   polled throughout, the server's RSS after a warm-up and at the end.

``crashes_of_the_run`` counts a CLI exit other than 0/3, a traceback, a server 500 or a server
that died; ``hangs_past_limit`` files that took longer than the time limit + 2 s.

    python evaluations/fuzz_inputs.py --mutants 20000          # the issue's acceptance run
    python evaluations/fuzz_inputs.py --mutants 500 --serve 100 --tiny 1000   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bonefrac.testing import free_port, fuzzing

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = ROOT / "tests" / "data"  # the seed radiographs (fuzzing.RADIOGRAPHS)

# Runs the CLI in its own process and reports its peak memory and that of its children.
_CLI = ("import json, resource, sys\n"
        "from bonefrac.cli.main import main\n"
        "from bonefrac.data.isolation import default_pool\n"
        "rc = main(sys.argv[2:])\n"
        "default_pool().close()\n"
        "kib = lambda who: resource.getrusage(who).ru_maxrss\n"
        "open(sys.argv[1], 'w').write(json.dumps({'self_kib': kib(resource.RUSAGE_SELF), "
        "'children_kib': kib(resource.RUSAGE_CHILDREN)}))\n"
        "sys.exit(rc)\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def category(reason: str) -> str:
    """A decode outcome's kind, from its one-line reason."""
    if reason.startswith("decoder crashed"):
        return "decoder_crashed"
    if reason.startswith("decode timed out"):
        return "timed_out"
    if reason.startswith("decoder exceeded"):
        return "memory_cap"
    if reason.startswith("decoder process exited") or reason.startswith("decoder sent"):
        return "decoder_failed"
    if "PanicException" in reason:  # a Rust decoder's panic (a BaseException), caught
        return "native_panic_caught"
    return "refused"


def decode_all(files: list[Path], workers: int, timeout_s: float) -> dict:
    """Phase 1: every file through a pool; outcomes, slowest files, peak worker memory."""
    from bonefrac.data.io import ImageReadError
    from bonefrac.data.isolation import DecodePool

    def one(pool, f: Path) -> tuple[str, float, str, str]:
        t = time.monotonic()
        try:
            pool.decode(f, (224,), resize="stretch")
            kind, reason = "decoded", ""
        except ImageReadError as e:
            kind, reason = category(e.reason), e.reason
        return f.name, time.monotonic() - t, kind, reason

    t0 = time.monotonic()
    with DecodePool(workers, timeout_s=timeout_s) as pool, ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(lambda f: one(pool, f), files))
        stats = dict(pool.stats)
    wall = time.monotonic() - t0
    kinds = Counter(k for _, _, k, _ in results)
    signals = Counter(re.sub(r"^decoder crashed \((.*)\)$", r"\1", r) for _, _, k, r in results
                      if k == "decoder_crashed")
    slowest = sorted(results, key=lambda r: -r[1])[:5]
    return {"files": len(files), "wall_s": round(wall, 1),
            "files_per_s": round(len(files) / wall, 1), "outcomes": dict(kinds),
            "decoder_crashes_by_signal": dict(signals),
            "hangs_killed_at_limit": kinds.get("timed_out", 0),
            "hangs_past_limit": sum(t > timeout_s + 2 for _, t, _, _ in results),
            "slowest": [{"file": n, "s": round(t, 2), "outcome": k, "reason": r[:160]}
                        for n, t, k, r in slowest],
            "examples": {kind: [f"{n}: {r[:120]}" for n, _, k, r in results if k == kind][:10]
                         for kind in kinds if kind not in ("decoded", "refused")},
            "workers_started": stats["started"],
            "peak_worker_rss_mib": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def predict_cli(folder: Path, out: Path, model: str, originals: set[str]) -> dict:
    """Phase 2/3: the real ``bonefrac predict`` over ``folder``, checked file by file."""
    mem = out.parent / f"{out.name}_rusage.json"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _CLI, str(mem), "predict", str(folder),
                        "--model", model, "--out", str(out), "--quiet"],
                       capture_output=True, text=True)
    wall = time.monotonic() - t0
    res = {"exit_code": r.returncode, "wall_s": round(wall, 1),
           "traceback": "Traceback" in r.stderr}
    try:
        with open(out / "predictions.csv", newline="") as f:
            rows = {Path(x["file"]).name for x in csv.DictReader(f)}
        with open(out / "errors.csv", newline="") as f:
            errors = {Path(x["file"]).name: x["reason"] for x in csv.DictReader(f)}
    except OSError as e:
        return {**res, "error": f"no outputs ({e})", "stderr_tail": r.stderr[-1500:]}
    names = {p.name for p in folder.iterdir()}
    usage = json.loads(mem.read_text()) if mem.is_file() else {}
    res.update({
        "inputs": len(names), "n_ok": len(rows), "n_failed": len(errors),
        "every_input_accounted_for": rows | errors.keys() == names and not rows & errors.keys(),
        "errors_without_reason": sum(not v.strip() or "\n" in v for v in errors.values()),
        "originals_predicted": f"{len(originals & rows)}/{len(originals)}",
        "error_kinds": dict(Counter(category(v) for v in errors.values())),
        "peak_rss_mib": {"cli_process": round(usage.get("self_kib", 0) / 1024, 1),
                         "decode_workers": round(usage.get("children_kib", 0) / 1024, 1)}})
    if r.returncode not in (0, 3) or res["traceback"]:
        res["stderr_tail"] = r.stderr[-1500:]
    return res


def serve(files: list[Path], model: str, concurrency: int = 16) -> dict:
    """Phase 4: uploads to a real server on loopback; statuses, /healthz, RSS."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "bonefrac", "serve", "--model", model,
                             "--port", str(port), "--rate-limit", "0", "--queue", "64",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        if not fuzzing.wait_healthy(base, proc, 120):
            return {"error": "server did not start", "stderr": proc.stderr.read()[-1500:]}

        async def send(paths: list[Path]) -> Counter:
            sem, codes = asyncio.Semaphore(concurrency), Counter()
            async with httpx.AsyncClient(base_url=base, timeout=300) as c:
                async def one(p: Path):
                    async with sem:
                        r = await c.post("/v1/predict", files={"file": (p.name, p.read_bytes())})
                        codes[r.status_code] += 1
                await asyncio.gather(*(one(p) for p in paths))
            return codes

        asyncio.run(send(files[:64]))  # warm-up
        rss0 = _rss_mib(proc.pid)
        t0 = time.monotonic()
        with fuzzing.HealthWatch(base) as watch:
            codes = asyncio.run(send(files))
        wall = time.monotonic() - t0
        health = watch.checks
        rss1 = _rss_mib(proc.pid)
        alive = proc.poll() is None
    finally:
        fuzzing.stop_server(proc)
    return {"uploads": len(files), "concurrency": concurrency, "wall_s": round(wall, 1),
            "status_counts": {str(k): v for k, v in sorted(codes.items())},
            "http_500": codes.get(500, 0), "server_alive_after": alive,
            "healthz_checks": len(health), "healthz_failed": sum(not ok for ok, _ in health),
            "healthz_max_s": round(max((t for _, t in health), default=0), 3),
            "rss_mib_after_warmup": round(rss0, 1), "rss_mib_at_end": round(rss1, 1)}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mutants", type=int, default=20_000, help="seeded mutants to generate")
    p.add_argument("--seed", type=int, default=0, help="fuzzer seed (mutant i: seed, i)")
    p.add_argument("--model", default="ensemble-224", help="model for predict and serve")
    p.add_argument("--timeout", type=float, default=10.0, help="decode time limit, seconds")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: CPUs)")
    p.add_argument("--tiny", type=int, default=10_000, help="zero/one-byte files (0: skip)")
    p.add_argument("--serve", type=int, default=2000,
                   help="inputs posted to a real server (every k-th; 0: skip)")
    p.add_argument("--keep", type=Path, default=None, help="write the inputs here and keep "
                   "them (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    workers = args.workers or len(os.sched_getaffinity(0))
    work = args.keep or Path(tempfile.mkdtemp(prefix="bonefrac_fuzz_"))
    try:
        inputs = work / "inputs"
        log(f"writing seeds, {args.mutants} mutants and bombs to {inputs}")
        seeds = fuzzing.seed_files(TEST_DATA)
        originals = {p.name for p in fuzzing.write_seeds(inputs, TEST_DATA)}
        fuzzing.write_mutants(inputs, args.mutants, seeds, seed=args.seed)
        bombs = fuzzing.write_bombs(inputs, TEST_DATA)
        files = sorted(inputs.iterdir())
        out: dict = {"mutants": args.mutants, "seed": args.seed, "originals": len(originals),
                     "bombs": len(bombs), "inputs": len(files), "decode_timeout_s": args.timeout,
                     "decode_memory_cap": "2 GiB", "workers": workers,
                     "transfer_syntaxes": sorted({ts for _, ts in fuzzing.PYDICOM_SEEDS}),
                     "loadavg_before": os.getloadavg()}
        log("phase 1: decode pool")
        out["decode"] = decode_all(files, workers, args.timeout)
        log("phase 2: bonefrac predict over every input")
        out["predict_cli"] = predict_cli(inputs, work / "out", args.model, originals)
        if args.tiny:
            log(f"phase 3: bonefrac predict over {args.tiny} zero/one-byte files")
            fuzzing.write_tiny_files(work / "tiny", args.tiny)
            out["tiny_files"] = predict_cli(work / "tiny", work / "out_tiny", args.model, set())
        if args.serve:
            log(f"phase 4: {args.serve} uploads to bonefrac serve")
            step = max(1, len(files) // args.serve)
            out["serve"] = serve(files[::step][:args.serve], args.model)
        cli = [out["predict_cli"]] + ([out["tiny_files"]] if args.tiny else [])
        srv = out.get("serve", {})
        out["crashes_of_the_run"] = (
            sum(c["exit_code"] not in (0, 3) or c["traceback"] for c in cli)
            + srv.get("http_500", 0) + (0 if srv.get("server_alive_after", True) else 1))
        out["hangs_past_limit"] = out["decode"]["hangs_past_limit"]
        out["loadavg_after"] = os.getloadavg()
        print(json.dumps(out, indent=2))
        return 0 if out["crashes_of_the_run"] == 0 and out["hangs_past_limit"] == 0 else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
