"""Round 5 of the recipe sweep, for a lent GPU (``v2_gpu.sh`` runs it): the package's own CUDA
path once, then the v2 sweep with the package's trainer, every run scored on VALIDATION only.

1. CUDA path: ``bonefrac train --device cuda`` and ``torchrun --nproc-per-node 1 -m bonefrac
   train`` (same short recipe, each alone on the GPU, cold caches): status, log lines, images/s.
2. Sweep: ``bonefrac train --init-from <v1 member> --device cuda`` with boxes, over input size,
   fracture-map loss weight, top-12 vs all blocks, stretch vs letterbox, seed, MobileNetV2 then
   EfficientNet-Lite0; each run then scored by ``v2_val.py`` (AUC, hflip TTA, pointing game).

The pack (``v2_pack.py build``) holds train + validation only, so nothing here sees the test
split. Runs are listed most informative first. ``--workers`` runs train at once on the one GPU
(the trainer's view augmentation is CPU-bound, so the CPU cores are split between them, each
run pinned to its share); runs sharing a feature cache (arch, size, resize, blocks, boxes,
seed) go one after another on the warm cache. No run starts that its estimated time (calibrated
on the runs done) would carry past ``--budget``; runs still going then are stopped and recorded.

    python experiments/recipe_sweep/v2_gpu.py --pack .gpu/v2 --out $OUT --device cuda
    SMOKE=1 bash experiments/recipe_sweep/v2_gpu.sh      # the same, tiny, on this CPU
    python experiments/recipe_sweep/v2_gpu.py --table round5.json    # its table again

Writes to ``--out`` (the device tool returns at most 8 files): ``round5.json`` (everything),
``round5_val.jsonl`` (one v2_val line per run, with its spec), ``round5_table.md``,
``logs.tar.gz`` (every run's log) and ``best_<arch>.tar`` (the best run per architecture:
weights, model.json, config, history). Prints progress lines and, last, the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bonefrac.utils import write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The round-4 CPU recipe (scripts/release/train_v2.sh) is each sweep run's base.
RECIPE = ["--epochs-frozen", "0", "--epochs-finetune", "6", "--views", "6",
          "--lr-finetune", "2e-4", "--batch-size", "64"]
CHECK = ["--size", "320", "--epochs-frozen", "1", "--epochs-finetune", "2", "--views", "2",
         "--lr-finetune", "2e-4", "--batch-size", "64", "--loc-weight", "1.0"]
SMOKE_RECIPE = ["--epochs-frozen", "0", "--epochs-finetune", "1", "--views", "2",
                "--batch-size", "8", "--max-images", "16"]
SMOKE_CHECK = ["--size", "224", "--epochs-frozen", "1", "--epochs-finetune", "1", "--views", "2",
               "--batch-size", "8", "--max-images", "16", "--loc-weight", "1.0"]
CHECK_S = 180  # the most one CUDA-path check may take (measured: ~20-40 s on CPU, smoke)
NO_TEST = "no readable images in split 'test'"  # finalize's test Results on a train+val pack


@dataclass(frozen=True)
class Spec:
    """One sweep run: the levers that differ from the base recipe."""

    name: str
    arch: str = "mobilenetv2"
    size: int = 320
    resize: str = "stretch"
    loc: float = 1.0  # --loc-weight; 0 trains without boxes
    blocks: int = 12  # --unfreeze-blocks; 99 = every block (full fine-tuning)
    seed: int = 0

    @property
    def chain(self) -> str:
        """Runs with the same chain share one feature cache (the trainer's cache key)."""
        return (f"{self.arch}-{self.size}-{self.resize}-k{self.blocks}-"
                f"{'box' if self.loc > 0 else 'nobox'}-s{self.seed}")

    def args(self) -> list[str]:
        """``bonefrac train`` options besides --arch."""
        return ["--size", str(self.size), "--resize", self.resize, "--loc-weight", str(self.loc),
                "--unfreeze-blocks", str(self.blocks), "--seed", str(self.seed)]


M, L = "mobilenetv2", "efficientnet_lite0"
SWEEP = [  # most informative first
    Spec("mnv2_320"),  # the round-4 CPU recipe, on the GPU: the reference
    Spec("mnv2_448", size=448),
    Spec("mnv2_320_letterbox", resize="letterbox"),
    Spec("lite0_320", arch=L),
    Spec("mnv2_320_loc3", loc=3.0),
    Spec("mnv2_320_loc0.3", loc=0.3),
    Spec("mnv2_320_s1", seed=1),  # seed-to-seed spread of the reference
    Spec("lite0_448", arch=L, size=448),
    Spec("mnv2_224", size=224),
    Spec("mnv2_512", size=512),
    Spec("mnv2_320_full", blocks=99),
    Spec("mnv2_448_letterbox", size=448, resize="letterbox"),
    Spec("mnv2_320_loc0", loc=0.0),  # no box supervision
    Spec("lite0_320_letterbox", arch=L, resize="letterbox"),
    Spec("mnv2_448_loc3", size=448, loc=3.0),
    Spec("lite0_320_loc3", arch=L, loc=3.0),
    Spec("lite0_512", arch=L, size=512),
    Spec("lite0_320_full", arch=L, blocks=99),
]
SMOKE_SWEEP = ["mnv2_320", "mnv2_320_letterbox", "lite0_320", "mnv2_320_loc3", "mnv2_320_full"]
N_TRAIN = 3631  # train images of the canonical split, for estimates before a run reports


# -- estimates --------------------------------------------------------------------------------
def cache_bytes(spec: Spec, n_train: int, views: int) -> int:
    """Disk the run's feature cache takes: fp32 activations below the trained blocks (stride 8:
    32 channels MobileNetV2, 40 Lite0) or, fully fine-tuned, the 3-channel input."""
    per = 3 * spec.size ** 2 if spec.blocks >= 18 else \
        (32 if spec.arch == M else 40) * (spec.size // 8) ** 2
    return 4 * per * (n_train * views + 400)


def estimate_s(spec: Spec, warm: bool, smoke: bool) -> float:
    """Seconds a run takes before calibration: augmented views (CPU, per image ~3 ms at 320 px),
    6 epochs (GPU), the val scoring (CPU) and start-up; calibrated by the runs done."""
    area = (spec.size / 320) ** 2 * (1.4 if spec.arch == L else 1.0)
    if smoke:
        return 40 + 20 * area
    views = 0 if warm else 5 * N_TRAIN * 3e-3 * area
    train = 6 * N_TRAIN / 1500 * area * (3 if spec.blocks >= 18 else 1)
    return 25 + views + train + 25 * area


# -- processes --------------------------------------------------------------------------------
def launch(cmd: list[str], log: Path, env: dict, cores: set[int] | None, deadline: float
           ) -> tuple[int | None, float]:
    """Run ``cmd`` with output to ``log``, pinned to ``cores``; stop it at ``deadline``.
    Returns (exit code or None when stopped, seconds)."""
    t = time.time()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                             start_new_session=True)
        if cores:  # before the child starts its threads (preexec_fn is unsafe with threads)
            os.sched_setaffinity(p.pid, cores)
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _stop(p)
            rc = None
    return rc, round(time.time() - t, 1)


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM the process group (torchrun's children too), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def run_env(cache: Path, threads: int) -> dict:
    """The child's environment: the repo's src on the path (nothing is installed on the device
    machine), its own cache folder, its share of the cores, no progress bars."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""), BONEFRAC_CACHE=str(cache),
               OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return env


def chain_cache(work: Path, chain: str) -> Path:
    """A chain's cache folder; the decoded images are shared by all (``decoded`` links)."""
    d = work / "cache" / chain
    d.mkdir(parents=True, exist_ok=True)
    shared = work / "cache" / "_decoded"
    shared.mkdir(exist_ok=True)
    if not (d / "decoded").exists():
        (d / "decoded").symlink_to(shared, target_is_directory=True)
    return d


def say(line: str) -> None:
    """One progress line, whole (workers print from several threads)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- reading a run ----------------------------------------------------------------------------
def read_run(run: Path, log: Path, rc: int | None) -> dict:
    """Status, timings and images/s of a finished ``bonefrac train`` from its folder and log."""
    text = log.read_text(errors="replace") if log.exists() else ""
    mj = _json(run / "model.json")
    hist = _json(run / "history.json") or []
    if rc is None:
        status = "stopped"
    elif rc == 0:
        status = "ok"
    elif NO_TEST in text and mj and "threshold" in mj:
        status = "ok_no_test"  # trained and fitted on validation; only test Results failed
    else:
        status = "failed"
    # the images trained on (--max-images cuts the split the summary line counts)
    n_train = _int(r"of (\d+) training images", text) or _int(r"train:\s+(\d+) images", text)
    n_val = _int(r"val\s*:\s+(\d+) images", text)
    views_s = _int(r"cached activations of \d+ frozen blocks for \d+ view\(s\) in (\d+)s", text)
    views = _int(r"for (\d+) view\(s\)", text)
    out = {"status": status, "rc": rc, "n_train": n_train, "n_val": n_val,
           "device_line": _line(r"^(device: .*|distributed: .*)$", text),
           "views": views, "views_s": views_s,
           "train_seconds": mj.get("train_seconds") if mj else None,
           "epochs": [{k: h[k] for k in ("stage", "epoch", "loss", "val_auc", "seconds",
                                         "loc_loss") if k in h} for h in hist]}
    if views_s and n_train and views:
        # CPU augmentation + GPU forward of the frozen blocks + writing the cache, per image
        out["views_img_per_s"] = round((n_train * views + (n_val or 0)) / max(views_s, 1), 1)
    for stage in ("frozen", "finetune"):
        secs = [h["seconds"] for h in hist if h["stage"] == stage]
        if secs and n_train:  # the stage's last epoch (past warm-up): n_train images + val
            out[f"{stage}_img_per_s"] = round(n_train / max(secs[-1], 1e-3), 1)
    if hist:
        best = max(hist, key=lambda h: h["val_auc"])
        out["trainer_best_val_auc"] = round(best["val_auc"], 4)
        out["trainer_best_epoch"] = f"{best['stage']} {best['epoch']}"
    if status in ("failed", "stopped"):
        out["log_tail"] = text.splitlines()[-25:]
    return out


def _json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _int(pattern: str, text: str) -> int | None:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def _line(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text, re.M)
    return m.group(1) if m else None


# -- the sweep --------------------------------------------------------------------------------
@dataclass
class Ctx:
    pack: Path
    data: Path  # the pack's data folder (PACK/data, or data.tar unpacked into the work folder)
    out: Path
    work: Path
    device: str
    smoke: bool
    budget_end: float  # no run may go on past this (time.time())
    py: str = sys.executable

    def init(self, arch: str) -> Path:
        return self.pack / "init" / f"{arch}.safetensors"

    def train_cmd(self, out: Path, arch: str, extra: list[str]) -> list[str]:
        return ["-m", "bonefrac", "train", "--data", str(self.data), "--out", str(out),
                "--weights", "none", "--init-from", str(self.init(arch)),
                "--device", self.device, "--arch", arch, *extra]


def cuda_path(ctx: Ctx, nproc: int) -> dict:
    """The short check recipe twice, alone: plain ``bonefrac train`` and under torchrun."""
    res = {}
    extra = SMOKE_CHECK if ctx.smoke else CHECK
    launchers = {"bonefrac_train": [ctx.py],
                 f"torchrun_nproc{nproc}": [ctx.py, "-m", "torch.distributed.run", "--standalone",
                                            f"--nproc-per-node={nproc}"]}
    for name, pre in launchers.items():
        run, log = ctx.work / "runs" / f"check_{name}", ctx.work / "logs" / f"check_{name}.log"
        cmd = pre + ctx.train_cmd(run, M, extra)
        env = run_env(chain_cache(ctx.work, f"check_{name}"), len(os.sched_getaffinity(0)))
        # a hung launcher (rendezvous, driver) must not eat the sweep's time
        rc, wall = launch(cmd, log, env, None, min(ctx.budget_end, time.time() + CHECK_S))
        res[name] = {"cmd": " ".join(cmd), "wall_s": wall, **read_run(run, log, rc)}
        say(f"[cuda path] {name}: {res[name]['status']} in {wall}s, "
            f"{res[name].get('finetune_img_per_s')} img/s fine-tuning")
    aucs = [r.get("trainer_best_val_auc") for r in res.values()]
    res["same_val_auc"] = None if None in aucs else abs(aucs[0] - aucs[1]) < 0.01
    return res


class Sweep:
    """Workers take the first pending run whose chain is idle, fits the time left and the disk.
    ``header`` goes into every (partial) ``round5.json``."""

    def __init__(self, ctx: Ctx, specs: list[Spec], workers: int, header: dict):
        self.ctx, self.pending, self.results, self.header = ctx, list(specs), {}, header
        self.why: dict[str, str] = {}  # why a pending run has not started yet
        self.failed = 0
        self.skipped: list[Spec] = []  # runs that will not start
        self.busy: set[str] = set()
        self.warm: set[str] = set()
        self.ratio: list[float] = []  # observed / estimated seconds of finished runs
        self.lock = threading.Lock()
        cores = sorted(os.sched_getaffinity(0))
        per = max(1, len(cores) // workers)
        self.slices = [set(cores[i * per:(i + 1) * per]) or set(cores) for i in range(workers)]

    def run(self) -> dict:
        threads = [threading.Thread(target=self._worker, args=(i,)) for i in
                   range(len(self.slices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for spec in self.skipped + self.pending:
            self.results[spec.name] = {"spec": dataclasses.asdict(spec), "status": "not_started",
                                       "why": self.why.get(spec.name, "time budget")}
        return self.results

    def _worker(self, i: int) -> None:
        while (picked := self._pick()) is not None:
            if picked == "wait":  # a pending run waits for its chain or for disk
                time.sleep(2)
                continue
            spec, est = picked
            res = self._one(spec, est, i)
            with self.lock:
                self._finished(spec, est, res)

    def _finished(self, spec: Spec, est: float, res: dict) -> None:
        """Book a finished run (under the lock): its chain is idle (and warm when it trained),
        the time calibration, its chain's disk when no run of it is left, round5.json."""
        self.busy.discard(spec.chain)
        ok = res["status"].startswith("ok")
        if ok:
            self.warm.add(spec.chain)
        self.failed += res["status"] == "failed"
        if ok and res["wall_s"] > 0:
            self.ratio.append(round(res["wall_s"] / est, 2))
        self.results[spec.name] = res
        if not any(s.chain == spec.chain for s in self.pending):
            shutil.rmtree(self.ctx.work / "cache" / spec.chain / "features", ignore_errors=True)
        write_json(self.ctx.out / "round5.json", {**self.header, "runs": self.results})

    def _pick(self) -> tuple[Spec, float] | str | None:
        """The next run to start with its estimate, "wait" when the pending ones wait for a busy
        chain or for disk, None when nothing more can start. A run that no longer fits the
        time left is dropped (time only runs out)."""
        with self.lock:
            if self.failed >= 2 and not self.ratio:
                self.why |= {s.name: "the first runs failed" for s in self.pending}
                self.skipped += self.pending
                self.pending = []
            left = self.ctx.budget_end - time.time()
            scale = max(self.ratio) if self.ratio else 1.0
            free = shutil.disk_usage(self.ctx.work).free
            for spec in list(self.pending):
                warm = spec.chain in self.warm
                est = estimate_s(spec, warm, self.ctx.smoke)
                need = 0 if warm or self.ctx.smoke else cache_bytes(spec, N_TRAIN, 6)
                if est * scale > left:
                    self.why[spec.name] = f"time budget (estimate {est * scale:.0f}s, " \
                                          f"{left:.0f}s left)"
                    self.pending.remove(spec)
                    self.skipped.append(spec)
                elif spec.chain in self.busy:
                    continue
                elif need + 3e9 > free:
                    self.why[spec.name] = f"disk ({need / 1e9:.0f} GB cache, " \
                                          f"{free / 1e9:.0f} GB free)"
                else:
                    self.pending.remove(spec)
                    self.busy.add(spec.chain)
                    return spec, est
            if self.pending and self.busy:
                return "wait"
            self.skipped += self.pending
            self.pending = []
            return None

    def _one(self, spec: Spec, est: float, worker: int) -> dict:
        """Train, then score on validation with v2_val.py; the result row."""
        ctx, cores = self.ctx, self.slices[worker]
        run, log = ctx.work / "runs" / spec.name, ctx.work / "logs" / f"{spec.name}.log"
        env = run_env(chain_cache(ctx.work, spec.chain), len(cores))
        recipe = SMOKE_RECIPE if ctx.smoke else RECIPE
        t0 = time.time()
        say(f"[sweep] start {spec.name} on worker {worker} (est {est:.0f}s)")
        rc, wall = launch([ctx.py, *ctx.train_cmd(run, spec.arch, recipe + spec.args())],
                          log, env, cores, ctx.budget_end)
        res = {"spec": dataclasses.asdict(spec), "chain": spec.chain, "worker": worker,
               "start_s": round(t0 - T0, 1), "train_wall_s": wall, "est_s": round(est),
               **read_run(run, log, rc)}
        if res["status"].startswith("ok"):
            res["val"] = self._score(spec, run, log, env, cores)
            if "error" in res["val"]:  # trained, but not scored: not a result
                res["status"] = "val_stopped" if res["val"]["rc"] is None else "val_failed"
        res["wall_s"] = round(time.time() - t0, 1)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        v = res.get("val") or {}
        say(f"[sweep] done {spec.name}: {res['status']}, val AUC {v.get('val_auc')}, "
            f"{res['wall_s']}s")
        return res

    def _score(self, spec: Spec, run: Path, log: Path, env: dict, cores: set[int]) -> dict:
        """v2_val.py's JSON line for ``run`` (validation only), also appended to
        ``round5_val.jsonl`` with the run's spec."""
        vlog = log.with_suffix(".val.log")
        cmd = [self.ctx.py, str(HERE / "v2_val.py"), "--data", str(self.ctx.data), str(run)]
        rc, _ = launch(cmd, vlog, env, cores, self.ctx.budget_end)
        text = vlog.read_text().splitlines() if vlog.exists() else []
        lines = [ln for ln in text if ln.startswith("{")]
        if rc != 0 or not lines:
            return {"error": f"v2_val exit {rc}", "rc": rc, "log_tail": text[-10:]}
        val = json.loads(lines[-1])
        with self.lock, (self.ctx.out / "round5_val.jsonl").open("a") as f:
            f.write(json.dumps({"run": run.name, "spec": dataclasses.asdict(spec), **val}) + "\n")
        return val


# -- outputs ----------------------------------------------------------------------------------
def _pg(val: dict, kind: str) -> str:
    v = (val.get(f"localisation_{kind}") or {}).get("pointing_game", {}).get("value")
    return "-" if v is None else f"{v:.3f}"


def table(runs: dict) -> str:
    """Markdown: one row per sweep run in priority order, the best validation AUC in bold."""
    head = ("| run | arch | size | resize | loc w | blocks | seed | val AUC | + hflip TTA | "
            "PG fracture map | PG Grad-CAM | status | train s |\n" + "|---" * 13 + "|\n")
    rows, aucs = [], [r["val"]["val_auc"] for r in runs.values()
                      if isinstance(r.get("val"), dict) and "val_auc" in r["val"]]
    for s in SWEEP:
        r = runs.get(s.name)
        if r is None:
            continue
        v = r.get("val") if isinstance(r.get("val"), dict) else {}
        auc = v.get("val_auc")
        a = "-" if auc is None else (f"**{auc:.4f}**" if auc == max(aucs) else f"{auc:.4f}")
        tta = v.get("val_auc_hflip_tta")
        rows.append(f"| {s.name} | {s.arch} | {s.size} | {s.resize} | {s.loc:g} | "
                    f"{'all' if s.blocks >= 18 else s.blocks} | {s.seed} | {a} | "
                    f"{'-' if tta is None else f'{tta:.4f}'} | {_pg(v, 'fracture_map')} | "
                    f"{_pg(v, 'gradcam')} | {r['status']} | {r.get('train_seconds') or '-'} |")
    return head + "\n".join(rows) + "\n"


def best_tars(ctx: Ctx, runs: dict) -> list[str]:
    """``best_<arch>.tar``: the run with the highest validation AUC (then fracture-map
    pointing game) per architecture, without checkpoints."""
    made = []
    for arch in (M, L):
        scored = [(r["val"]["val_auc"], float(_pg(r["val"], "fracture_map").replace("-", "0")),
                   name) for name, r in runs.items() if r["spec"]["arch"] == arch
                  and isinstance(r.get("val"), dict) and "val_auc" in r["val"]]
        if not scored:
            continue
        name = max(scored)[2]
        run, tar = ctx.work / "runs" / name, ctx.out / f"best_{arch}.tar"
        with tarfile.open(tar, "w") as t:
            for f in ("model.safetensors", "model.json", "config.json", "history.json"):
                if (run / f).exists():
                    t.add(run / f, arcname=f"{name}/{f}")
        made.append(f"{tar.name} ({name})")
    return made


def logs_tar(ctx: Ctx) -> None:
    with tarfile.open(ctx.out / "logs.tar.gz", "w:gz") as t:
        t.add(ctx.work / "logs", arcname="logs")


class GpuSampler:
    """``nvidia-smi`` every 15 s while the sweep runs: GPU load and memory, to size --workers."""

    def __init__(self):
        self.samples: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        q = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"]
        while not self.done.wait(15):
            try:
                r = subprocess.run(q, capture_output=True, text=True, timeout=10)
                self.samples.append(f"{time.time() - T0:.0f}s {r.stdout.strip()}")
            except (OSError, subprocess.TimeoutExpired):
                return

    def stop(self) -> list[str]:
        self.done.set()
        return self.samples


def environment(device: str, work: Path) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "cpus": len(os.sched_getaffinity(0)),
           "work_disk_free_gb": round(shutil.disk_usage(work).free / 1e9, 1)}
    if torch.cuda.is_available():
        env |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    if device == "cuda" and not env["cuda_available"]:
        raise SystemExit(f"--device cuda but torch {torch.__version__} sees no GPU")
    return env


def pack_data(pack: Path, work: Path) -> Path:
    """The pack's data folder: ``PACK/data``, or ``PACK/data.zip`` (``v2_pack.py build
    --zip``) unpacked into ``work`` (zipfile drops absolute and ``..`` parts of names)."""
    if (pack / "data" / "manifest.csv").exists():
        return pack / "data"
    if (pack / "data.zip").exists():
        with zipfile.ZipFile(pack / "data.zip") as z:
            z.extractall(work)
        return work / "data"
    raise SystemExit(f"{pack}: no pack here (run v2_pack.py build)")


def pick_work(work: str) -> Path:
    if work != "auto":
        return Path(work)
    options = [Path("/tmp/v2gpu_work"), ROOT / ".gpu" / "work"]
    return max(options, key=lambda p: shutil.disk_usage(_existing(p)).free)


def _existing(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p


T0 = time.time()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", default=".gpu/v2", help="v2_pack.py build's folder")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/v2gpu_out"))
    ap.add_argument("--work", default="auto", help="run folders, caches, logs; auto: "
                    "/tmp/v2gpu_work or .gpu/work in the repo, whichever disk has more room")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--budget", type=float, default=500, help="seconds for everything")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=1, help="torchrun --nproc-per-node (check)")
    ap.add_argument("--smoke", action="store_true", help="tiny runs (CPU check of the script)")
    ap.add_argument("--skip-check", action="store_true", help="sweep only")
    ap.add_argument("--table", metavar="ROUND5_JSON", help="only print the markdown table of a "
                    "saved round5.json (as the Round 5 README table)")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())["runs"]), end="")
        return 0
    pack, out, work = (Path(p).resolve() for p in (a.pack, a.out, pick_work(a.work)))
    shutil.rmtree(work, ignore_errors=True)
    for d in (out, work / "runs", work / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    (out / "round5_val.jsonl").unlink(missing_ok=True)
    ctx = Ctx(pack, pack_data(pack, work), out, work, a.device, a.smoke, T0 + a.budget)
    head = {"note": "validation split only (the pack holds no test image)", "device": a.device,
            "smoke": a.smoke, "env": environment(a.device, work), "pack": _json(pack / "PACK.json")}
    print("[env]", json.dumps(head["env"]), flush=True)
    head["cuda_path"] = None if a.skip_check else cuda_path(ctx, a.nproc)
    write_json(out / "round5.json", head)
    specs = [s for s in SWEEP if not a.smoke or s.name in SMOKE_SWEEP]
    sampler = GpuSampler() if a.device == "cuda" else None
    runs = Sweep(ctx, specs, a.workers, head).run()
    head["gpu_samples"] = sampler.stop() if sampler else None
    head |= {"runs": runs, "seconds": round(time.time() - T0, 1)}
    logs_tar(ctx)
    head["best_tars"] = best_tars(ctx, runs)
    md = table(runs)
    (out / "round5_table.md").write_text(md)
    write_json(out / "round5.json", head)
    print(md, flush=True)
    print(f"[done] {len(runs)} runs listed in {head['seconds']}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
