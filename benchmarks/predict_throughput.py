"""End-to-end prediction throughput: file bytes -> fused P(fractured), decoding included.

Compares, on the same N real radiographs and in the same process:
  (a) the ONNX Runtime path: the real ``bonefrac.inference.predict.predict_files`` pipeline;
  (b) a PyTorch eager path of the same ensemble: ``Ensemble.load(backend="torch")``, the same
      threaded decode (prefetched, overlapped with inference), ``torch.set_num_threads``
      (default 2), ``torch.inference_mode``, batches of ``--torch-batch``.
and reports images/s, the ratio a/b, achieved GFLOP/s (FLOPs counted from each ONNX graph's
Conv/Gemm/MatMul nodes after shape inference, multiply-add = 2 FLOPs, batch 1) against a nominal
peak, max |P_onnx - P_torch| over the images, and the wall-clock cold start of
``python -m bonefrac predict ONE_IMAGE`` in fresh processes (median of ``--cold-runs``), beside
a baseline measured in the same run, interleaved with it: a fresh ``python -c "import numpy,
onnxruntime, PIL.Image"``, the floor any ONNX prediction pays. Their ratio moves far less
with the machine's load than either time (``--cold-start-only`` measures just these).

Prints ONE JSON object on stdout (progress goes to stderr). /proc/loadavg is recorded before and
after: numbers taken while other jobs load the CPUs are depressed; rerun on a quiet machine.
``cpu_ms_per_image`` (process CPU time, all threads) is less sensitive to such load: on an idle
machine with C cores throughput cannot exceed about C * 1000 / cpu_ms_per_image.

    python benchmarks/predict_throughput.py              # shipped v1 (224 px) and v2, 256 images
    python benchmarks/predict_throughput.py --model /tmp/bonefrac_dev/ens_dev --sweep
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "bone-fracture"
TEST_DATA = ROOT / "tests" / "data"
PEAK_GFLOPS = 156.0  # nominal fp32 peak of the 2-core reference machine (see docs of issue 4)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def benchmark_images(n: int, data: Path = SHARED_DATA) -> tuple[list[Path], str]:
    """The first ``n`` images of the canonical test then validation splits of the full data set,
    or (when it is absent) the committed ``tests/data`` images repeated up to ``n``."""
    manifest = data / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        split = "orig_split" if "orig_split" in rows[0] else "split"
        files = [data / r["path"] for s in ("test", "valid", "val") for r in rows
                 if r[split] == s]
        return files[:n], f"{data} (test+val splits, first {min(n, len(files))})"
    base = sorted(TEST_DATA.rglob("*.jpg"))
    return [base[i % len(base)] for i in range(n)], f"{TEST_DATA} repeated to {n}"


def onnx_flops(path: str | os.PathLike) -> int:
    """FLOPs of one image through an ONNX graph: Conv, Gemm and MatMul, multiply-add = 2.

    Tensor shapes are measured, not inferred: ONNX shape inference loses the spatial sizes
    after the dynamic "same" padding of TF-ported EfficientNets, so every operand of these nodes
    is exposed as a graph output and the unoptimised graph is run once on a 1-image batch.
    Bias additions, activations, pooling and the CAM einsum are not counted (< 1 %).
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    shapes = {i.name: list(numpy_helper.to_array(i).shape) for i in g.initializer}
    nodes = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    have = {o.name for o in g.output}
    for name in {x for n in nodes for x in (*n.input[:2], n.output[0])}:
        if name not in shapes and name not in have:
            g.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = [d if isinstance(d, int) else 1 for d in inp.shape]
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, {inp.name: np.zeros(size, np.float32)})
    shapes.update({k: list(v.shape) for k, v in zip(names, outs, strict=True)})
    total = 0
    for node in nodes:
        a, b, out = (shapes[x] for x in (*node.input[:2], node.output[0]))
        if node.op_type == "Conv":  # b: (Cout, Cin/group, kh, kw); out: (1, Cout, H, W)
            total += 2 * int(np.prod(out)) * int(np.prod(b[1:]))
        else:  # (.., M, K) x (K, N) -> (.., M, N): one multiply-add per output and k
            total += 2 * int(np.prod(out)) * a[-1]
    return total


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def time_onnx(model: Path, files: list[Path], *, batch: int, workers: int, threads: int,
              repeats: int) -> tuple[float, float, dict[str, float]]:
    """Best-of-``repeats`` images/s of ``predict_files``, CPU ms per image and the fused
    probabilities."""
    from bonefrac.inference.ensemble import Ensemble
    from bonefrac.inference.predict import predict_files

    ens = Ensemble.load(model, backend="onnx", threads=threads)
    predict_files(ens, files[:2 * batch * workers], batch_size=batch, workers=workers,
                  progress=False)  # warm-up: arenas, page cache
    best, cpu, res = 0.0, [], []
    for _ in range(repeats):
        wall, c = timed(lambda: res.append(predict_files(
            ens, files, batch_size=batch, workers=workers, progress=False)))
        best, cpu = max(best, len(files) / wall), cpu + [c]
    if res[-1].errors:
        raise SystemExit(f"benchmark images failed to decode: {res[-1].errors[:3]}")
    return best, 1e3 * min(cpu) / len(files), {r["file"]: r["prob_fractured"]
                                               for r in res[-1].rows}


def time_torch(model: Path, files: list[Path], *, batch: int, threads: int, repeats: int
               ) -> tuple[float, float, dict[str, float]]:
    """PyTorch eager: same decode (prefetched in 2 threads), the model in the main thread."""
    import torch

    from bonefrac.data.io import load_gray
    from bonefrac.inference.ensemble import Ensemble

    torch.set_num_threads(threads)
    ens = Ensemble.load(model, backend="torch")
    sizes = sorted(ens.sizes)

    def decode(f: Path) -> dict[int, np.ndarray]:
        return {s: load_gray(f, s, ens.resize) for s in sizes}

    def run(fs: list[Path]) -> np.ndarray:
        probs = []
        with ThreadPoolExecutor(2) as ex, torch.inference_mode():
            decoded = ex.map(decode, fs)  # runs ahead of the model while it computes
            buf = []
            for i, d in enumerate(decoded):
                buf.append(d)
                if len(buf) == batch or i == len(fs) - 1:
                    gray = {s: np.stack([b[s] for b in buf]) for s in sizes}
                    probs.append(ens.predict_gray(gray).prob)
                    buf = []
        return np.concatenate(probs)

    run(files[:batch])  # warm-up
    best, cpu, probs = 0.0, [], []
    for _ in range(repeats):
        wall, c = timed(lambda: probs.append(run(files)))
        best, cpu = max(best, len(files) / wall), cpu + [c]
    return best, 1e3 * min(cpu) / len(files), {str(f): float(p) for f, p in
                                               zip(files, probs[-1], strict=True)}


BASELINE_CMD = [sys.executable, "-c", "import numpy, onnxruntime, PIL.Image"]


def _timed_child(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system, all its processes) seconds of one fresh process."""
    import resource

    def child_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    t, c = time.perf_counter(), child_cpu()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, child_cpu() - c
    if r.returncode != 0:
        raise SystemExit(f"cold-start run failed ({r.returncode}): {r.stderr.strip()}")
    return wall, cpu


def cold_start(model: Path, image: Path, runs: int = 5) -> dict:
    """Median wall / CPU seconds of ``python -m bonefrac predict IMAGE`` in fresh processes,
    each run followed by one of :data:`BASELINE_CMD`, and the ratio of the medians."""
    walls, cpus, base = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        _timed_child(BASELINE_CMD)  # warm the page cache for both
        for i in range(runs):
            cmd = [sys.executable, "-m", "bonefrac", "predict", str(image), "--model", str(model),
                   "--out", f"{tmp}/out{i}", "--quiet"]
            wall, cpu = _timed_child(cmd)
            walls.append(wall)
            cpus.append(cpu)
            base.append(_timed_child(BASELINE_CMD)[0])
    med = statistics.median(walls)
    return {"median": round(med, 3), "runs": [round(t, 3) for t in walls],
            "cpu_median": round(statistics.median(cpus), 3),
            "baseline_import_median": round(statistics.median(base), 3),
            "ratio_to_baseline": round(med / statistics.median(base), 2)}


def measure(model: Path, files: list[Path], args, workers: int) -> dict:
    """Every number of the module docstring for one exported ensemble folder."""
    members = json.loads((model / "ensemble_meta.json").read_text())["members"]
    flops = {m["name"]: onnx_flops(model / m["onnx"]) for m in members if m.get("onnx")}
    out: dict = {"model": str(model),
                 "input_sizes": sorted({m["preprocessing"]["size"] for m in members})}
    log(f"{model.name}: ONNX Runtime path, {len(files)} images, batch {args.batch_size}, "
        f"{workers} workers x {args.threads} thread(s)")
    onnx_ips, onnx_cpu, p_onnx = time_onnx(model, files, batch=args.batch_size, workers=workers,
                                           threads=args.threads, repeats=args.repeats)
    gflop_img = sum(flops.values()) / 1e9
    out["onnx"] = {"images_per_s": round(onnx_ips, 2), "cpu_ms_per_image": round(onnx_cpu, 2),
                   "batch_size": args.batch_size,
                   "workers": workers, "threads_per_run": args.threads,
                   "gflop_per_image": {k: round(v / 1e9, 4) for k, v in flops.items()},
                   "gflops_achieved": round(onnx_ips * gflop_img, 2),
                   "fraction_of_peak": round(onnx_ips * gflop_img / args.peak_gflops, 3),
                   "peak_gflops": args.peak_gflops}
    if args.sweep:
        out["sweep"] = []
        for w, th, b in [(workers, 1, 4), (workers, 1, 16), (workers, 1, 32),
                         (1, workers, 8), (1, workers, 32), (1, workers, 64),
                         (workers, workers, 8)]:
            log(f"sweep: {w} workers x {th} threads, batch {b}")
            ips, cpu, _ = time_onnx(model, files, batch=b, workers=w, threads=th,
                                    repeats=max(1, args.repeats - 1))
            out["sweep"].append({"workers": w, "threads": th, "batch": b,
                                 "images_per_s": round(ips, 2), "cpu_ms_per_image": round(cpu, 2)})
    if not args.no_torch:
        log(f"{model.name}: PyTorch eager path, batch {args.torch_batch}, "
            f"{args.torch_threads} threads")
        torch_ips, torch_cpu, p_torch = time_torch(model, files, batch=args.torch_batch,
                                                   threads=args.torch_threads,
                                                   repeats=args.repeats)
        out["torch"] = {"images_per_s": round(torch_ips, 2),
                        "cpu_ms_per_image": round(torch_cpu, 2), "batch_size": args.torch_batch,
                        "threads": args.torch_threads}
        out["speedup_onnx_over_torch"] = round(onnx_ips / torch_ips, 2)
        # ONNX probabilities come from the output rows, rounded to 6 decimals (<= 5e-7).
        out["max_abs_prob_diff"] = float(max(abs(p_onnx[k] - p_torch[k]) for k in p_onnx))
    out["cold_start_s"] = measure_cold_start(model, files[0], args.cold_runs)
    return out


def measure_cold_start(model: Path, image: Path, runs: int) -> dict:
    log(f"{model.name}: cold start, {runs} fresh `bonefrac predict` processes on one image")
    return cold_start(model, image, runs)


def main(argv: list[str] | None = None) -> int:
    from bonefrac.cli.common import resolve_model
    from bonefrac.inference.runners import default_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", nargs="+", default=["ensemble-224", "ensemble"],
                   help="exported ensemble folders (ONNX members) or shipped short names, "
                        "measured one after the other in this run; ratios are against the first")
    p.add_argument("-n", "--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="ONNX path batch size")
    p.add_argument("--workers", type=int, default=None, help="ONNX path workers (default: CPUs)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per run")
    p.add_argument("--torch-batch", type=int, default=32)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    p.add_argument("--peak-gflops", type=float, default=PEAK_GFLOPS)
    p.add_argument("--sweep", action="store_true",
                   help="also time the ONNX path over workers x threads x batch settings")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch path")
    p.add_argument("--cold-runs", type=int, default=5, help="fresh processes for cold start")
    p.add_argument("--cold-start-only", action="store_true",
                   help="measure only the cold start (and its baseline) of each model")
    args = p.parse_args(argv)

    models = [resolve_model(m) for m in args.model]
    for model in models:
        if not (model / "ensemble_meta.json").is_file():
            raise SystemExit(f"{model}: no ensemble_meta.json - pass --model with exported "
                             "ensemble folders (ONNX members)")
    files, source = benchmark_images(args.images)
    workers = args.workers or default_threads()
    out: dict = {"images": len(files), "image_source": source,
                 "cpus": default_threads(), "loadavg_before": loadavg(),
                 "python": platform.python_version(), "machine": platform.processor() or
                 platform.machine()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if args.cold_start_only:
        out["models"] = [{"model": str(m), "cold_start_s": measure_cold_start(
            m, files[0], args.cold_runs)} for m in models]
        out["loadavg_after"] = loadavg()
        print(json.dumps(out, indent=2))
        return 0
    out["models"] = [measure(m, files, args, workers) for m in models]
    base = out["models"][0]["onnx"]["images_per_s"]
    for m in out["models"]:
        m["onnx"]["images_per_s_vs_first"] = round(m["onnx"]["images_per_s"] / base, 3)
    out["loadavg_after"] = loadavg()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
