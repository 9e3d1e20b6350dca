"""Two-stage transfer learning that is practical on a 2-core CPU.

Measured here, a full MobileNetV2 training step runs at ~10 img/s, but the lower, frozen part of
the network only needs a forward pass. So:

1. Decode every image once to 224x224 uint8 (cached on disk).
2. Run the frozen lower blocks once per *view*: view 0 is the clean image, views 1..V-1 are
   randomly augmented copies (rotation, translation, zoom, flip). Their activations are cached.
   With as many views as fine-tuning epochs, every epoch sees a fresh augmentation, as online
   augmentation would (measured on a GPU: same validation AUC), at a fraction of the cost.
3. Stage 1 (frozen backbone): train the head on pooled features of the first views.
4. Stage 2 (fine-tuning): train the top ``unfreeze_blocks`` blocks + head on the cached
   activations, one view per epoch, with a one-cycle learning rate. BatchNorm of those blocks
   uses batch statistics by default (``train_bn``); frozen statistics tolerate only ~1e-5.
   With ``soup_lrs``, stage 2 runs again per extra rate from stage 1's weights and the model is
   the average of the runs' weights (a model soup).

Both stages: cross-entropy with inverse-frequency class weights, Adam, early stopping on
``cfg.monitor`` (validation AUC by default) with the best weights restored; safetensors
checkpoints every epoch and ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bonefrac import InputError
from bonefrac.data.boxes import cell_targets, dataset_boxes, read_boxes
from bonefrac.data.dataset import DatasetIndex, DecodedSplit, decode_all, load_index
from bonefrac.data.preprocess import Preprocessing, boxes_to_letterbox
from bonefrac.evaluation.metrics import roc_auc
from bonefrac.inference.spec import write_run_meta
from bonefrac.models import create_model
from bonefrac.models.net import FractureNet, save_run_model
from bonefrac.models.weights import save_tensors
from bonefrac.training.augment import augment_batch, augment_with_boxes, train_augmentation
from bonefrac.training.config import TrainConfig
from bonefrac.training.detect_loss import DetectionLoss
from bonefrac.training.distributed import Dist, setup
from bonefrac.utils import cache_dir, publish, write_csv, write_json


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_weights(labels: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """Inverse-frequency weights ``N / (K * n_c)``; a balanced set gives all ones."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        raise InputError(f"a class has no training images (counts {counts.tolist()})")
    return len(labels) / (n_classes * counts)


@torch.inference_mode()
def run_blocks(blocks: nn.Module, x: np.ndarray, batch: int, desc: str = "") -> np.ndarray:
    """Forward numpy inputs through ``blocks`` in eval mode, in batches, channels-last."""
    from tqdm.auto import tqdm

    blocks.eval()
    dev = next((p.device for p in blocks.parameters()), torch.device("cpu"))
    out = []
    for i in tqdm(range(0, len(x), batch), desc=desc, unit="batch", disable=not desc,
                  leave=False):
        xb = torch.from_numpy(np.array(x[i:i + batch], dtype=np.float32)).to(dev)
        if xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            out.append(blocks(xb).float().contiguous().cpu().numpy())
    return np.concatenate(out)


class _Frozen(nn.Module):
    def __init__(self, lower: nn.Module, top: nn.Module):
        super().__init__()
        self.lower, self.top = lower, top

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.lower(x)
        return a, self.top(a).mean(dim=(2, 3))


# Stage 1 trains only the head, on pooled features; a few views suffice for it, and the other
# views skip the upper half of the frozen network (measured: MobileNetV2 105 -> 174 img/s).
STAGE1_VIEWS = 4


class FeatureCache:
    """Per view: activations of the frozen lower blocks and pooled features of the whole frozen
    network, memory-mapped from the cache folder."""

    def __init__(self, model: FractureNet, cfg: TrainConfig, fingerprint: str,
                 boxes_digest: str | None = None):
        self.lower, self.top = model.split_at(cfg.unfreeze_blocks)
        parts = [cfg.arch, cfg.weights, model.n_blocks - cfg.unfreeze_blocks, cfg.seed,
                 cfg.size, fingerprint]
        if cfg.resize != "stretch":  # stretch runs keep their cache keys
            parts.append(cfg.resize)
        if cfg.init_from:  # warm-started frozen blocks compute other activations
            parts.append(_digest(_member_weights(Path(cfg.init_from), cfg.arch).read_bytes()))
        if boxes_digest:  # boxes change which augmentation draws are kept
            parts.append(boxes_digest)
        key = json.dumps(parts, sort_keys=True)
        if next(model.parameters()).is_cuda:
            key += "|bf16-autocast"  # GPU activations differ from CPU fp32 ones
        self.dir = cache_dir() / "features" / hashlib.sha256(key.encode()).hexdigest()[:20]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model = model

    def get(self, name: str, gray: np.ndarray, view: int, batch: int,
            boxes: list[np.ndarray] | None = None, pooled: bool = True
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(lower-block activations ``(N, C, h, w)``, pooled frozen features ``(N, F)`` or None,
        fracture-map targets ``(N, gh, gw)`` or None).

        All come from one forward pass of the frozen network and are cached on disk, so
        stage 1 costs no extra pass and ``--resume`` or a re-run costs none at all. Views from
        ``STAGE1_VIEWS`` on (or all, with ``pooled=False``) have no pooled features: the upper
        frozen blocks are not run. With ``boxes`` (per image, fractions) the view's boxes are
        moved with its pixels and turned into per-cell targets on the last feature map's grid.
        """
        kinds = ("act", "pooled") if view < STAGE1_VIEWS and pooled else ("act",)
        paths = [self.dir / f"{name}_view{view}_{kind}.npy" for kind in kinds]
        tpath = self.dir / f"{name}_view{view}_loc.npy" if boxes is not None else None
        bpath = self.dir / f"{name}_view{view}_boxes.npy" if boxes is not None else None
        if not all(p.exists() for p in [*paths, *([tpath, bpath] if tpath else [])]):
            src, moved = self._view(gray, view, boxes)
            if tpath:
                _save_npy(tpath, cell_targets(moved, self.grid))
                _save_npy(bpath, _flat_boxes(moved))
            run = self._frozen_session()
            outs: list[list[np.ndarray]] = [[] for _ in kinds]
            for i in _progress(range(0, len(src), batch), f"features {name} view {view}"):
                res = run(list(kinds), {"input": self.model.preprocessing(src[i:i + batch])})
                for o, r in zip(outs, res, strict=True):
                    o.append(r)
            for p, arr in zip(paths, outs, strict=True):
                tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp.npy")  # several processes
                np.save(tmp, np.concatenate(arr).astype(np.float32))
                publish(tmp, p)
        act, *rest = (np.load(p, mmap_mode="r") for p in paths)
        return act, (rest[0] if rest else None), (np.load(tpath) if tpath else None)

    def boxes(self, name: str, view: int, n: int) -> list[np.ndarray]:
        """The view's boxes per image (fractions of the input square), as :meth:`get` moved
        them (call it after :meth:`get` with boxes)."""
        return _unflat_boxes(np.load(self.dir / f"{name}_view{view}_boxes.npy"), n)

    @staticmethod
    def _view(gray: np.ndarray, view: int, boxes: list[np.ndarray] | None):
        """The view's images (view 0: the clean ones) and, with ``boxes``, their moved boxes."""
        if view == 0:
            return gray, boxes
        torch.manual_seed(10_000 * view + 17)  # each view is reproducible on its own
        if boxes is None:
            return augment_batch(gray, train_augmentation()), None
        return augment_with_boxes(gray, boxes, train_augmentation())

    @cached_property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the last feature map at the model's input size (one forward pass)."""
        size = self.model.preprocessing.size
        dev = next(self.model.parameters()).device
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            shape = self.model.features(torch.zeros(1, 3, size, size, device=dev)).shape
            self.model.train(was)
        return int(shape[2]), int(shape[3])

    def _frozen_session(self):
        """The frozen network as an ONNX Runtime session: input -> (activations, pooled).

        Measured here, ONNX Runtime runs these forward passes 3-6x faster than torch eager,
        and they dominate the training time; the activations agree to ~1e-6.
        """
        # The model's device, not the lower blocks': full fine-tuning leaves them empty.
        if next(self.model.parameters()).is_cuda:  # GPU: torch (bf16 autocast), not ORT's CPU
            def run(outputs, feed):
                a = run_blocks(self.lower, feed["input"], len(feed["input"]))
                if "pooled" not in outputs:
                    return [a]
                return a, run_blocks(self.top, a, len(a)).mean(axis=(2, 3))
            return run
        import onnxruntime as ort

        from bonefrac.inference.runners import session_options

        path = self.dir / "frozen.onnx"
        if not path.exists():
            size = self.model.preprocessing.size
            tmp = path.with_name(f".frozen.{os.getpid()}.tmp.onnx")  # ranks export at once
            torch.onnx.export(_Frozen(self.lower, self.top).eval(),
                              (torch.zeros(1, 3, size, size),), str(tmp),
                              input_names=["input"], output_names=["act", "pooled"],
                              dynamic_axes={"input": {0: "n"}, "act": {0: "n"},
                                            "pooled": {0: "n"}},
                              opset_version=17, dynamo=False)
            publish(tmp, path)
        sess = ort.InferenceSession(str(path), session_options(torch.get_num_threads()),
                                    providers=["CPUExecutionProvider"])
        return sess.run


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")  # several processes
    np.save(tmp, arr)
    publish(tmp, path)


def _flat_boxes(boxes: list[np.ndarray]) -> np.ndarray:
    """Per-image ``(k, 4)`` boxes -> one ``(M, 5)`` float32 array ``[image, x0, y0, x1, y1]``."""
    rows = [np.column_stack([np.full(len(b), i, np.float32), np.asarray(b, np.float32)])
            for i, b in enumerate(boxes) if len(b)]
    return np.concatenate(rows) if rows else np.zeros((0, 5), np.float32)


def _unflat_boxes(flat: np.ndarray, n: int) -> list[np.ndarray]:
    idx = flat[:, 0].astype(np.int64)
    return [flat[idx == i, 1:] for i in range(n)]


def warmup_share(total_steps: int) -> float:
    """One-cycle warm-up: 10% of the steps, but at least 2 steps from 4 steps on (at exactly
    10 steps torch's OneCycleLR would end the warm-up at step 0 and divide by zero)."""
    return max(0.1, 2 / total_steps) if total_steps >= 4 else 0.1


def _progress(it, desc):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="chunk", leave=False)


class WeightEma:
    """Exponential moving average of ``module``'s parameters and buffers (torch's
    ``AveragedModel``), swapped into ``module`` for validation and saving."""

    def __init__(self, module: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.module = module
        self.avg = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                 use_buffers=True)

    def update(self) -> None:
        self.avg.update_parameters(self.module)

    @contextmanager
    def swapped(self):
        """Inside: ``module`` holds the averaged weights; after: its own weights again."""
        own = _copy_state(self.module)
        self.module.load_state_dict(self.avg.module.state_dict())
        try:
            yield
        finally:
            self.module.load_state_dict(own)


class EarlyStopping:
    def __init__(self, patience: int):
        self.patience, self.best, self.bad = patience, math.inf, 0

    def step(self, value: float) -> bool:
        """True when ``value`` improves; sets ``should_stop`` after ``patience`` misses."""
        if value < self.best - 1e-4:
            self.best, self.bad = value, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience


def _save_checkpoint(run: Path, stage: str, epoch: int, trainable: nn.Module,
                     model: FractureNet, opt: torch.optim.Optimizer,
                     sched, stopper: EarlyStopping, history: list[dict],
                     ema: WeightEma | None) -> None:
    """Model, weight average and optimizer as safetensors; counters as JSON (no pickle)."""
    ck = run / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema.{k}": v.contiguous() for k, v in ema.avg.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, t in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(t).contiguous()
    save_tensors(tensors, ck / f"{stage}_last.safetensors")
    write_json(ck / "state.json", {
        "stage": stage, "epoch": epoch, "lr": [g["lr"] for g in opt.param_groups],
        "sched": {k: v for k, v in sched.state_dict().items() if isinstance(v, int | float)},
        "stopper": {"best": stopper.best, "bad": stopper.bad}, "history": history})


def _load_checkpoint(run: Path, stage: str, model: FractureNet, opt, sched,
                     stopper: EarlyStopping, ema: WeightEma | None) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    state = json.loads((run / "checkpoints" / "state.json").read_text())
    t = load_file(str(run / "checkpoints" / f"{stage}_last.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    if ema is not None:
        ema.avg.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    sd = opt.state_dict()
    for idx in sd["state"] or range(len([p for g in sd["param_groups"] for p in g["params"]])):
        names = {k.split(".", 2)[2] for k in t if k.startswith(f"opt.{idx}.")}
        if names:
            sd["state"][idx] = {n: t[f"opt.{idx}.{n}"] for n in names}
    for g, lr in zip(sd["param_groups"], state["lr"], strict=True):
        g["lr"] = lr
    opt.load_state_dict(sd)
    sched.load_state_dict({**sched.state_dict(), **state["sched"]})
    stopper.best, stopper.bad = state["stopper"]["best"], state["stopper"]["bad"]
    return state["epoch"], state["history"]


@dataclass
class RunSetup:
    """What every stage of one run shares."""

    cfg: TrainConfig
    model: FractureNet
    run: Path  # the run folder (rank 0 writes it)
    ctx: Dist  # this process's place in a DDP job (:mod:`bonefrac.training.distributed`)
    weights: torch.Tensor  # cross-entropy class weights
    resume: bool  # continue from the run folder's checkpoint


@dataclass
class StageSpec:
    """One stage's inputs. ``data(epoch)`` gives that epoch's training inputs and labels (every
    epoch the same length); ``forward(x)`` maps inputs to logits, or to (logits, fracture-map
    logits) when ``aux`` (``aux(map_logits, epoch, rows) -> loss``, added to the classification
    loss) is given. ``schedule``: "plateau" (ReduceLROnPlateau on ``cfg.monitor``) or
    "onecycle" (per batch, peaking at ``lr``). ``start_from``: weights to start from, which
    are also the result when the stage never beats stage 1."""

    name: str  # "frozen", "finetune", "finetune2", ...: the history's and checkpoints' name
    trainable: nn.Module
    forward: Callable
    data: Callable[[int], tuple[np.ndarray, np.ndarray]]
    val: tuple[np.ndarray, np.ndarray]
    epochs: int
    lr: float
    schedule: str = "plateau"
    start_from: dict | None = None
    aux: Callable | None = None
    val_metrics: Callable[[], dict[str, float]] | None = None  # more validation numbers


class Stage:
    """One training stage in named steps: :meth:`resume`, then per epoch :meth:`train_epoch`,
    :meth:`validate` and :meth:`checkpoint`; :meth:`run` does them all.

    Adam with the spec's schedule; early stopping on ``cfg.monitor``, which a fine-tuning stage
    must beat stage 1 on to replace its weights; cross-entropy with ``cfg.label_smoothing``,
    optionally on mixup batches (``cfg.mixup``); with ``cfg.ema`` the weight average is what is
    validated, early-stopped on and saved as best. Distributed: every rank trains its share of
    each global batch, rank 0 alone reads and writes the run folder.
    """

    def __init__(self, spec: StageSpec, rs: RunSetup, history: list[dict]):
        cfg = rs.cfg
        self.spec, self.rs, self.history = spec, rs, history
        self.net, self.evaluate = rs.ctx.wrap(spec.trainable, spec.forward)  # DDP if several
        params = [p for p in spec.trainable.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=spec.lr, weight_decay=cfg.weight_decay)
        if spec.schedule == "onecycle":
            steps = math.ceil(len(spec.data(1)[0]) / cfg.batch_size)
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                self.opt, spec.lr, epochs=spec.epochs, steps_per_epoch=steps,
                pct_start=warmup_share(steps * spec.epochs))
        else:
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, factor=0.3,
                                                                    patience=1)
        self.stopper = EarlyStopping(cfg.patience)
        # A fine-tuning stage must beat stage 1 to replace its weights.
        self.stopper.best = min((_monitored(h, cfg) for h in history if h["stage"] == "frozen"),
                                default=math.inf)
        self.loss_fn = nn.CrossEntropyLoss(weight=rs.weights,
                                           label_smoothing=cfg.label_smoothing)
        self.val_loss_fn = nn.CrossEntropyLoss(weight=rs.weights)  # same for any smoothing
        self.ema = WeightEma(spec.trainable, cfg.ema) if cfg.ema else None
        self.best_path = rs.run / "checkpoints" / f"best_{spec.name}.safetensors"
        self.start = 0  # the last epoch already done (set by resume)
        self.t0 = 0.0  # when the current epoch started

    def run(self) -> list[dict]:
        """Train until ``epochs`` or early stopping; returns the history. ``model`` then holds
        the stage's best weights (or ``start_from``'s, when it never beat stage 1)."""
        if not self.resume():
            for epoch in range(self.start + 1, self.spec.epochs + 1):
                if self.stopper.should_stop:
                    break
                trained = self.train_epoch(epoch)
                val, improved = self.validate()
                self.checkpoint(epoch, self._record(epoch, trained, val, improved))
            self.rs.ctx.log_replica(self.rs.model, self.spec.name)
        _restore_best(self.rs.model, self.best_path, self.spec.start_from, self.rs.ctx)
        return self.history

    def resume(self) -> bool:
        """Start from ``start_from``; with ``--resume``, from rank 0's checkpoint of this stage
        (weights, average, optimizer, schedule, early stopping, history; sets ``start``), on
        every rank. True when the stage had already finished before the interruption."""
        s, ctx = self.rs, self.rs.ctx
        start, history, done = 0, self.history, False
        if self.spec.start_from is not None:
            s.model.load_state_dict(self.spec.start_from)
        state_path = s.run / "checkpoints" / "state.json"
        if s.resume and ctx.is_main and state_path.exists():  # rank 0 owns the run folder
            if json.loads(state_path.read_text())["stage"] == self.spec.name:
                start, history = _load_checkpoint(s.run, self.spec.name, s.model, self.opt,
                                                  self.sched, self.stopper, self.ema)
                print(f"resumed {self.spec.name} after epoch {start}")
            elif [h for h in history if h["stage"] == self.spec.name]:
                done = True  # this stage finished before the interruption
        self.start, self.history, done = ctx.sync_from_main(
            s.model, self.opt, self.sched, self.stopper, (start, history, done))
        if self.ema is not None:
            ctx.sync_model(self.ema.avg)  # a resumed average, from rank 0
        return done

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the epoch's inputs in shuffled global batches: the global batch's
        mean ``loss`` and ``accuracy``, the ``lr`` of the last step, and with ``aux`` the sum
        of this rank's fracture-map losses (``aux_sum``) and the number of images (``seen``)."""
        from tqdm.auto import tqdm

        spec, cfg, ctx = self.spec, self.rs.cfg, self.rs.ctx
        seed_everything(cfg.seed * 1000 + epoch + (500 if spec.name.startswith("finetune") else 0))
        x, y = spec.data(epoch)
        order = np.random.permutation(len(x))
        ctx.shuffle_dropout()
        spec.trainable.train()
        if not cfg.train_bn:
            _freeze_bn(self.rs.model)
        tot, tot_aux, correct, seen, lr_used = 0.0, 0.0, 0, 0, math.nan
        self.t0 = time.time()
        bar = tqdm(range(0, len(x), cfg.batch_size), desc=f"{spec.name} {epoch}/{spec.epochs}",
                   unit="batch", leave=False)
        for i in bar:
            idx = np.sort(order[i:i + cfg.batch_size])
            mine = idx[ctx.rank::ctx.world]  # this rank's share of the global batch
            xb, yb = ctx.tensor(x[mine]), ctx.tensor(y[mine])
            loss, logits, aux_loss = self._loss(xb, yb, y[idx], mine, epoch)
            lr_used = self._step(loss)
            tot_aux += aux_loss * len(mine)
            tot += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{tot / seen:.4f}")
        ctx.sync_buffers(spec.trainable)
        if ctx.world > 1:  # global-batch numbers; ctx.loss scales each rank's loss by world
            tot, correct = ctx.all_sum(tot / ctx.world, correct)
        return {"loss": tot / seen, "accuracy": correct / seen, "lr": lr_used,
                "aux_sum": tot_aux, "seen": seen}

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor, y_batch: np.ndarray, mine: np.ndarray,
              epoch: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(loss, logits, fracture-map loss or 0) of this rank's share of a batch."""
        cfg, ctx, fn = self.rs.cfg, self.rs.ctx, self.loss_fn
        if cfg.mixup:
            lam, perm = float(np.random.beta(cfg.mixup, cfg.mixup)), torch.randperm(len(xb))
            logits = self.net(lam * xb + (1 - lam) * xb[perm])
            # The shuffle stays within this rank's share: the batch's labels are unchanged.
            return (lam * ctx.loss(fn, logits, yb, y_batch)
                    + (1 - lam) * ctx.loss(fn, logits, yb[perm], y_batch)), logits, 0.0
        logits, maps = _split_outputs(self.net(xb))
        loss = ctx.loss(fn, logits, yb, y_batch)
        if self.spec.aux is None:
            return loss, logits, 0.0
        extra = self.spec.aux(maps, epoch, mine)
        return loss + extra, logits, extra.item()

    def _step(self, loss: torch.Tensor) -> float:
        """One optimizer step (+ average, + one-cycle step); the rate it used."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update()
        lr_used = self.opt.param_groups[0]["lr"]  # what the history reports: the epoch's last
        if self.spec.schedule == "onecycle":
            self.sched.step()
        return lr_used

    def validate(self) -> tuple[dict[str, float], bool]:
        """Validate the epoch's weights (with EMA the average; the trained weights' AUC as
        ``val_auc_raw``), step early stopping and the plateau schedule, and save an improvement
        as the stage's best. Returns (metrics, improved), identical on every rank."""
        s = self.rs
        s.model.eval()
        raw = {}
        if self.ema is not None:
            s.ctx.sync_buffers(self.ema.avg)
            raw["val_auc_raw"] = self._measure()[2]  # the trained weights themselves, for the log
        with self.ema.swapped() if self.ema is not None else nullcontext():
            val_loss, val_acc, val_auc = self._measure()
            raw |= self.spec.val_metrics() if self.spec.val_metrics else {}
            monitored = _monitored({"val_loss": val_loss, "val_auc": val_auc, **raw}, s.cfg)
            improved = self.stopper.step(monitored)
            if improved and s.ctx.is_main:
                save_tensors(s.model.state_dict(), self.best_path)
        if self.spec.schedule == "plateau":
            self.sched.step(monitored)
        return {"val_loss": val_loss, "val_accuracy": val_acc, "val_auc": val_auc, **raw}, improved

    @torch.inference_mode()
    def _measure(self) -> tuple[float, float, float]:
        """(loss, accuracy, ROC-AUC) of the weights in ``model`` on the validation inputs."""
        ctx, (val_x, val_y) = self.rs.ctx, self.spec.val
        yv = ctx.tensor(val_y)
        vl = ctx.gather_rows(lambda a: _logits(self.evaluate(ctx.tensor(a))), val_x, 256)
        auc = roc_auc(val_y, (vl[:, 1] - vl[:, 0]).cpu().numpy())
        acc = float((vl.argmax(1) == yv).float().mean())
        return ctx.broadcast(float(self.val_loss_fn(vl, yv))), acc, ctx.broadcast(auc)

    def _record(self, epoch: int, trained: dict, val: dict, improved: bool) -> dict:
        """The epoch's history row, appended and printed."""
        extra = {k: val[k] for k in ("val_auc_raw", "val_ap50") if k in val}
        if self.spec.aux is not None:
            extra["loc_loss"] = trained["aux_sum"] / trained["seen"]
        rec = {"stage": self.spec.name, "epoch": epoch, "loss": trained["loss"],
               "accuracy": trained["accuracy"], "val_loss": val["val_loss"],
               "val_accuracy": val["val_accuracy"], "val_auc": val["val_auc"],
               "lr": trained["lr"], **extra, "seconds": round(time.time() - self.t0, 2)}
        self.history.append(rec)
        raw = f" (raw {extra['val_auc_raw']:.4f})" if "val_auc_raw" in extra else ""
        raw += f" | loc_loss {extra['loc_loss']:.4f}" if "loc_loss" in extra else ""
        raw += f" | val_ap50 {extra['val_ap50']:.4f}" if "val_ap50" in extra else ""
        print(f"{rec['stage']} epoch {epoch}: loss {rec['loss']:.4f} acc {rec['accuracy']:.3f} | "
              f"val_loss {rec['val_loss']:.4f} val_acc {rec['val_accuracy']:.3f} val_auc "
              f"{rec['val_auc']:.4f}{raw} | lr {rec['lr']:.1e} | {rec['seconds']:.0f}s"
              f"{'  *best*' if improved else ''}", flush=True)
        return rec

    def checkpoint(self, epoch: int, record: dict) -> None:
        """Rank 0: the resumable state after ``epoch`` and the history so far (``record`` is
        its last row)."""
        s = self.rs
        if s.ctx.is_main:
            _save_checkpoint(s.run, self.spec.name, epoch, self.spec.trainable, s.model,
                             self.opt, self.sched, self.stopper, self.history, self.ema)
            _write_history(s.run, self.history)


def _restore_best(model: nn.Module, best_path: Path, start_from: dict | None, ctx: Dist) -> None:
    """The stage's best weights into ``model`` on every rank (rank 0 reads the file); without
    any (fine-tuning never beat stage 1), ``start_from``."""
    if ctx.is_main:
        from safetensors.torch import load_file

        if best_path.exists():
            model.load_state_dict(load_file(str(best_path)))
        elif start_from is not None:
            model.load_state_dict(start_from)
    ctx.sync_model(model)


def _split_outputs(out) -> tuple[torch.Tensor, torch.Tensor | tuple | None]:
    """(logits, what the box losses take: the map, or a tuple of several outputs, or None)."""
    if not isinstance(out, tuple):
        return out, None
    return out[0], out[1] if len(out) == 2 else out[1:]


def _logits(out) -> torch.Tensor:
    return _split_outputs(out)[0]


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of state dicts of one architecture: a "uniform model soup"
    (Wortsman et al., 2022). Integer buffers (BatchNorm's batch counters) keep the first's."""
    return {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()}


def _monitored(rec: dict, cfg: TrainConfig) -> float:
    """The quantity early stopping and the LR schedule minimise."""
    if cfg.monitor == "val_ap50":  # rows of a stage without a detector score 0
        return -rec.get("val_ap50", 0.0)
    return -rec["val_auc"] if cfg.monitor == "val_auc" else rec["val_loss"]


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _write_history(run: Path, history: list[dict]) -> None:
    write_json(run / "history.json", history)
    # Every key of every row: stages log different extras (loc_loss only while fine-tuning).
    write_csv(run / "history.csv", list(dict.fromkeys(k for h in history for k in h)), history)


def _forward_with_det(model: FractureNet, start: int, x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, maps, _, det = model.forward_detect(x, start)
    return logits, maps, det


class BoxLosses:
    """Stage 2's box losses with a detection head: the fracture map's and the detector's."""

    def __init__(self, loc: LocLoss, det: DetectionLoss):
        self.loc, self.det = loc, det

    def __call__(self, outs: tuple[torch.Tensor, torch.Tensor], epoch: int, rows: np.ndarray
                 ) -> torch.Tensor:
        maps, raw = outs
        return self.loc(maps, epoch, rows) + self.det(raw, epoch, rows)


def _val_ap50(model: FractureNet, start: int, cached: Cached, batch: int) -> dict[str, float]:
    """The detector's AP@0.5 (VOC all-point) on the validation split's boxes."""
    from bonefrac.evaluation.detection import average_precision
    from bonefrac.inference.detect import DecodeConfig, decode

    dev = next(model.parameters()).device
    with torch.inference_mode():
        raw = np.concatenate([
            model.forward_detect(torch.from_numpy(np.array(cached.val_act[i:i + batch]))
                                 .to(dev), start)[3].float().cpu().numpy()
            for i in range(0, len(cached.val_act), batch)])
    dets = decode(raw, DecodeConfig(model.preprocessing.size, model.det.strides))
    return {"val_ap50": average_precision(dets, cached.val_boxes)}


def _forward_with_loc(model: FractureNet, top: nn.Module, x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    fmap = top(x)
    return model.head(fmap), model.forward_loc(fmap)


class LocLoss:
    """The fracture map's loss for a batch: ``cfg.loc_weight`` x mean BCE over the cells of the
    scored images (``mask``) against the epoch's view's box targets."""

    def __init__(self, targets: list[np.ndarray], mask: np.ndarray, cfg: TrainConfig,
                 device: torch.device):
        self.targets, self.views = targets, cfg.views
        self.mask = torch.as_tensor(mask, dtype=torch.float32)
        self.weight, self.device = cfg.loc_weight, device
        self.pos_weight = torch.tensor(cfg.loc_pos_weight, device=device)

    def __call__(self, maps: torch.Tensor, epoch: int, rows: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(self.targets[(epoch - 1) % self.views][rows]).to(self.device)
        m = self.mask[rows].to(self.device)
        per_cell = nn.functional.binary_cross_entropy_with_logits(
            maps, t, pos_weight=self.pos_weight, reduction="none")
        per_image = per_cell.mean(dim=(1, 2)) * m
        return self.weight * per_image.sum() / m.sum().clamp(min=1.0)


def _training_boxes(data: str | Path, cfg: TrainConfig) -> dict[str, np.ndarray] | None:
    """The fracture boxes to supervise with, or None (no boxes, or ``loc_weight`` 0)."""
    if cfg.loc_weight <= 0:
        return None
    boxes = read_boxes(cfg.boxes) if cfg.boxes else dataset_boxes(data)
    if boxes is None:
        print("no boxes.csv: training without box supervision")
    return boxes


def _image_boxes(samples, boxes: dict[str, np.ndarray] | None, resize: str,
                 sizes: np.ndarray | None = None) -> tuple[list[np.ndarray] | None, np.ndarray]:
    """Per sample its boxes in the model input's frame (non-fractured: none) and whether the
    fracture map is scored on it: non-fractured images always (all-zero target), fractured ones
    only with a box. ``sizes``: ``(N, 2)`` (width, height) of each image, needed for
    letterbox."""
    if boxes is None:
        return None, np.zeros(len(samples), np.float32)
    empty = np.zeros((0, 4), np.float32)
    per = [boxes.get(s.rel, empty) if s.label == 1 else empty for s in samples]
    if resize == "letterbox":  # boxes are fractions of the image, which fills only part
        per = [boxes_to_letterbox(b, int(w), int(h)) if len(b) else b
               for b, (w, h) in zip(per, sizes, strict=True)]
    mask = np.array([s.label == 0 or len(b) > 0 for s, b in zip(samples, per, strict=True)],
                    np.float32)
    return per, mask


def warm_start(model: FractureNet, source: str | Path) -> Path:
    """Load a trained member's weights into ``model`` (same arch); only a new fracture-map head
    may be missing from the file. ``source``: a .safetensors file, a run folder or an ensemble
    folder (its member of ``model.arch``, checked against the meta's sha256)."""
    from safetensors.torch import load_file

    path = _member_weights(Path(source), model.arch)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or any(not k.startswith(("loc.", "det.")) for k in missing):
        raise InputError(f"{path}: not a {model.arch} member of this head layout (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    print(f"warm start: {model.arch} weights from {path}"
          + (f" (new heads: {sorted({k.split('.')[0] for k in missing})})" if missing else ""),
          flush=True)
    return path


def _member_weights(source: Path, arch: str) -> Path:
    """The safetensors file to warm-start ``arch`` from: ``source`` itself, or the ``arch``
    member of the model folder ``source`` (checked against its recorded sha256)."""
    from bonefrac.inference.model_folder import ModelFolder

    if source.is_file():
        return source
    folder = ModelFolder.open(source)
    spec = next((m for m in folder.members if m["arch"] == arch), None)
    if spec is None:
        raise InputError(f"{source}: no {arch} member to warm-start from")
    return folder.member_file(spec, "weights")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _limit(samples, n):
    if not n:
        return samples
    # Keep both classes in a tiny smoke-test subset.
    by = [[s for s in samples if s.label == c] for c in (0, 1)]
    return [s for c in by for s in c[: max(1, n // 2)]]


@dataclass
class Cached:
    """What the frozen network computed once for both stages (:class:`FeatureCache`)."""

    cache: FeatureCache
    # per training view: (lower-block activations, pooled features or None, box targets or None)
    views: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]
    val_act: np.ndarray
    pooled_val: np.ndarray | None  # None without stage 1
    y_train: np.ndarray
    y_val: np.ndarray
    loc_mask: np.ndarray  # per training image: whether its fracture map is scored
    # per training view, per image: its boxes in that view (fractions); None without boxes
    view_boxes: list[list[np.ndarray]] | None = None
    val_boxes: list[np.ndarray] | None = None  # validation boxes (fractions of the input)


def train(data: str | Path, out: str | Path, cfg: TrainConfig, *, resume: bool = False,
          index: DatasetIndex | None = None, finalize: bool = True,
          device: str = "auto") -> Path:
    """Train ``cfg.arch`` on ``data`` into run folder ``out``; returns ``out``.

    Writes ``model.safetensors``, ``model.json`` (arch, preprocessing, threshold), ``history.*``,
    ``config.json``, checkpoints, and the evaluation artifacts in ``Results/``.
    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. Under ``torchrun`` this
    process is one rank of a DDP job (:mod:`bonefrac.training.distributed`).
    """
    t_start = time.time()
    run, ctx = Path(out), setup(device)
    index = _start_run(data, run, cfg, ctx, index, resume)
    model, boxes = _build_model(data, cfg, ctx)
    gray, splits = _decode(index, cfg, model.preprocessing)
    cached = _cache_views(model, cfg, ctx, index, gray, splits, boxes)
    weights = torch.tensor(class_weights(cached.y_train), dtype=torch.float32, device=ctx.device)
    print(f"class weights (non_fractured, fractured): {weights.tolist()}")
    rs = RunSetup(cfg, model, run, ctx, weights, resume)
    history = _stage1(rs, cached)
    _stage2(rs, cached, history)
    elapsed = _save_model(rs, index, t_start)
    if finalize and ctx.is_main:
        _finalize(run, index, cfg, t_start, elapsed)
    return run


def _start_run(data: str | Path, run: Path, cfg: TrainConfig, ctx: Dist,
               index: DatasetIndex | None, resume: bool) -> DatasetIndex:
    """Refuse what cannot work, seed, index the data and (rank 0) write ``config.json``."""
    if cfg.batch_size < ctx.world:
        raise InputError(f"--batch-size {cfg.batch_size} is the global batch: it cannot be "
                         f"split over {ctx.world} processes")
    if ctx.is_main:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    if (run / "model.json").exists() and not resume:
        raise FileExistsError(f"{run} already holds a trained model; use --resume or a new --out")
    seed_everything(cfg.seed)
    torch.set_num_threads(ctx.cpu_threads)
    index = index or load_index(data, seed=cfg.seed, val_frac=cfg.val_frac,
                                test_frac=cfg.test_frac)
    print(index.summary(), flush=True)
    print(ctx.describe(cfg.batch_size, (cfg.lr_frozen, cfg.lr_finetune)), flush=True)
    if ctx.is_main:
        write_json(run / "config.json", {**asdict(cfg), "data": str(Path(data).resolve()),
                                         "data_fingerprint": index.fingerprint(),
                                         "split_source": index.source,
                                         "device": str(ctx.device), "world_size": ctx.world})
    return index


def _build_model(data: str | Path, cfg: TrainConfig, ctx: Dist
                 ) -> tuple[FractureNet, dict[str, np.ndarray] | None]:
    """(the network on this rank's device, the boxes that supervise its fracture-map head or
    None); warm-started and resized as ``cfg`` says."""
    boxes = _training_boxes(data, cfg)
    if boxes is not None and cfg.mixup:
        raise InputError("--mixup cannot be combined with box supervision (use --loc-weight 0)")
    if cfg.det_weight > 0 and boxes is None:
        raise InputError("--det-weight needs fracture boxes (DATA/boxes.csv or --boxes) and "
                         "--loc-weight > 0")
    model = create_model(cfg.arch, cfg.weights, hidden=cfg.hidden, dropout=cfg.dropout,
                         loc_head=boxes is not None, det_head=cfg.det_weight > 0,
                         size=cfg.size or None, resize=cfg.resize)
    if cfg.init_from:
        warm_start(model, cfg.init_from)
    return ctx.place(model), boxes


def _decode(index: DatasetIndex, cfg: TrainConfig, prep: Preprocessing
            ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, DecodedSplit]]:
    """({split: (images decoded as ``prep`` says, labels)} for train and val, {split: the
    split as decoded}). Decoded once, cached on disk; unreadable files are skipped and listed."""
    gray, splits = {}, {}
    for sp in ("train", "val"):
        d = decode_all(_limit(index.split(sp), cfg.max_images), prep.size, resize=prep.resize,
                       desc=f"decoding {sp}", cache_dir=cache_dir() / "decoded")
        index.skipped += d.skipped
        gray[sp] = (d.images, np.array([s.label for s in d.kept], dtype=np.int64))
        splits[sp] = d
    for f, r in index.skipped:
        print(f"skipped {f}: {r}")
    return gray, splits


def _cache_views(model: FractureNet, cfg: TrainConfig, ctx: Dist, index: DatasetIndex,
                 gray: dict[str, tuple[np.ndarray, np.ndarray]],
                 splits: dict[str, DecodedSplit], boxes: dict[str, np.ndarray] | None
                 ) -> Cached:
    """Freeze the backbone and run its frozen part once per view (each job by one rank)."""
    train, val = splits["train"], splits["val"]
    lower, _ = model.split_at(cfg.unfreeze_blocks)
    for p in model.features.parameters():
        p.requires_grad_(False)
    train_boxes, loc_mask = _image_boxes(train.kept, boxes, model.preprocessing.resize,
                                         train.sizes)
    cache = FeatureCache(model, cfg, index.fingerprint(),
                         _digest(json.dumps([b.tolist() for b in train_boxes]).encode())
                         if boxes is not None else None)
    t_feat = time.time()
    pooled_too = cfg.epochs_frozen > 0  # stage 1 trains on pooled features; skip them if none
    jobs = [("train", v, train_boxes) for v in range(cfg.views)] + [("val", 0, None)]
    ctx.spread([partial(cache.get, sp, gray[sp][0], v, cfg.batch_size, b, pooled_too)
                for sp, v, b in jobs])
    views = [cache.get("train", gray["train"][0], v, cfg.batch_size, train_boxes, pooled_too)
             for v in range(cfg.views)]
    val_act, pooled_val, _ = cache.get("val", gray["val"][0], 0, cfg.batch_size, None,
                                       pooled_too)
    print(f"cached activations of {len(lower)} frozen blocks for {cfg.views} view(s) in "
          f"{time.time() - t_feat:.0f}s", flush=True)
    out = Cached(cache, views, val_act, pooled_val, gray["train"][1], gray["val"][1], loc_mask)
    if model.det is not None:
        out.view_boxes = [cache.boxes("train", v, len(train.kept)) for v in range(cfg.views)]
        out.val_boxes = _image_boxes(val.kept, boxes, model.preprocessing.resize, val.sizes)[0]
    return out


def _stage1(rs: RunSetup, cached: Cached) -> list[dict]:
    """Stage 1: the head on pooled features of the frozen network, the first views together.
    Returns the history (with ``--resume``, the run's history so far plus this stage)."""
    cfg, head = rs.cfg, rs.model.head
    pooled = np.concatenate([p for _, p, _ in cached.views if p is not None]
                            or [np.zeros((0, 1))])
    y_all = np.tile(cached.y_train, len(pooled) // len(cached.y_train))
    history: list[dict] = []
    if (rs.run / "history.json").exists() and rs.resume:
        history = json.loads((rs.run / "history.json").read_text())
    spec = StageSpec("frozen", head, head.forward_pooled, lambda e: (pooled, y_all),
                     (cached.pooled_val, cached.y_val), epochs=cfg.epochs_frozen,
                     lr=cfg.lr_frozen)
    return Stage(spec, rs, history).run()


def _stage2(rs: RunSetup, cached: Cached, history: list[dict]) -> list[dict]:
    """Stage 2: fine-tune the top blocks (+ head, + fracture-map head) on one cached view per
    epoch (a fresh one while they last), once per peak rate, each time from stage 1's best
    weights; several runs' weights are averaged (a model soup)."""
    cfg, model = rs.cfg, rs.model
    if cfg.unfreeze_blocks <= 0 or cfg.epochs_finetune <= 0:
        return history
    _, top = model.split_at(cfg.unfreeze_blocks)  # the blocks the cached activations feed
    for p in top.parameters():
        p.requires_grad_(True)
    trainable = nn.ModuleList([top, model.head, *([model.loc] if model.loc else []),
                               *([model.det] if model.det else [])])
    forward, aux, val_metrics = (lambda x: model.head(top(x))), None, None
    if model.loc is not None:
        forward = partial(_forward_with_loc, model, top)
        aux = LocLoss([t for _, _, t in cached.views], cached.loc_mask, cfg, rs.ctx.device)
        print(f"box supervision: fracture-map loss weight {cfg.loc_weight} on "
              f"{int(cached.loc_mask.sum())} of {len(cached.loc_mask)} training images "
              f"(grid {cached.cache.grid}); fractured images without a box are not scored")
    if model.det is not None:
        start = model.n_blocks - cfg.unfreeze_blocks
        if min(model.taps) < start - 1:
            raise InputError(f"--unfreeze-blocks {cfg.unfreeze_blocks} freezes the detector's "
                             f"stride-8 features (block {min(model.taps)}): unfreeze at least "
                             f"{model.n_blocks - min(model.taps) - 1}")
        forward = partial(_forward_with_det, model, start)
        aux = BoxLosses(aux, DetectionLoss(cached.view_boxes, model.preprocessing.size,
                                           model.det.strides, cfg.det_weight, rs.ctx.device))
        val_metrics = partial(_val_ap50, model, start, cached, cfg.batch_size)
        print(f"detection head: loss weight {cfg.det_weight}, strides {model.det.strides}, "
              f"features of blocks {model.taps}")
    stage1 = _copy_state(model)
    ingredients = []
    for k, lr in enumerate((cfg.lr_finetune, *cfg.soup_lrs)):
        spec = StageSpec("finetune" if k == 0 else f"finetune{k + 1}", trainable, forward,
                         lambda e: (cached.views[(e - 1) % cfg.views][0], cached.y_train),
                         (cached.val_act, cached.y_val), epochs=cfg.epochs_finetune, lr=lr,
                         schedule=cfg.schedule, start_from=stage1, aux=aux,
                         val_metrics=val_metrics)
        history = Stage(spec, rs, history).run()
        ingredients.append(_copy_state(model))
    if len(ingredients) > 1:
        model.load_state_dict(average_weights(ingredients))
        z = run_blocks(nn.Sequential(top, model.head), cached.val_act, cfg.batch_size)
        print(f"model soup of {len(ingredients)} fine-tuning runs: val_auc "
              f"{roc_auc(cached.y_val, z[:, 1] - z[:, 0]):.4f}", flush=True)
    return history


def _save_model(rs: RunSetup, index: DatasetIndex, t_start: float) -> float:
    """Rank 0 writes ``model.safetensors`` + ``model.json``; every rank returns once it has.
    Returns the seconds since ``t_start``."""
    for p in rs.model.parameters():
        p.requires_grad_(True)
    rs.model.eval()
    elapsed = time.time() - t_start
    if rs.ctx.is_main:
        write_run_meta(rs.run, save_run_model(rs.model, rs.run / "model.safetensors", {
            "classes": ["non_fractured", "fractured"], "positive_class": 1,
            "train_seconds": round(elapsed, 1), "data_fingerprint": index.fingerprint()}))
        print(f"trained {rs.cfg.arch} in {elapsed / 60:.1f} min -> {rs.run}", flush=True)
    rs.ctx.barrier()  # the other ranks return once the model is written
    return elapsed


def _finalize(run: Path, index: DatasetIndex, cfg: TrainConfig, t_start: float,
              elapsed: float) -> None:
    """Threshold and operating points, calibration and ``Results/`` (validation only)."""
    from bonefrac.training.fit import finalize_run

    finalize_run(run, index, cfg.threshold_policy)
    took = time.time() - t_start - elapsed
    print(f"threshold, calibration and Results/ written in {took:.0f}s", flush=True)
