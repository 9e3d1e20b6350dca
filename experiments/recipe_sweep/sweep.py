"""Recipe sweep on a lent GPU: which fine-tuning recipe to run on the 2 CPU cores.

Trains bonefrac's own model (``create_model``), with per-sample affine augmentation done on the
GPU so that a 12-epoch run takes ~20 s, and prints validation ROC-AUC per epoch. The pack holds
train and validation only, so recipes are chosen without the test split.

    python experiments/recipe_sweep/make_pack.py ../shared/data/bone-fracture .gpu   # here
    ROUND=1 PACK=.gpu PYTHONPATH=src python3 experiments/recipe_sweep/sweep.py      # on the GPU

Results of the two rounds run for the shipped recipe (H100, 2026-11-27): round1_val.json and
round2_val.json (per-epoch history and final validation probabilities of every run).
"""

import io
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from bonefrac.models import create_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OUT = os.environ.get("OUT", "/tmp/sweep_out")
PACK = os.environ.get("PACK", ".gpu")
SMOKE = os.environ.get("SMOKE") == "1"  # a few images, 1+1 epochs: checks the script on a CPU
BUDGET = float(os.environ.get("BUDGET", "520"))  # seconds after which no new run starts


def load_split(pack, sp: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 224, 224)`` uint8 images and ``(N,)`` labels on the device."""
    blob, lens = pack[f"{sp}_bytes"].tobytes(), pack[f"{sp}_lens"]
    offs = np.concatenate([[0], np.cumsum(lens)])
    ids = np.arange(len(lens)) if n is None else np.random.default_rng(0).permutation(len(lens))[:n]
    imgs = np.stack([np.array(Image.open(io.BytesIO(blob[offs[i]:offs[i + 1]]))) for i in ids])
    return torch.from_numpy(imgs).to(DEV), torch.from_numpy(pack[f"{sp}_labels"][ids]).to(DEV)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample rotation +-20 deg, translation <= 10 %, zoom <= 10 %, horizontal flip.

    ``x``: ``(B, 1, H, W)`` float. Translations are in grid units ([-1, 1] spans the image).
    """
    b = x.shape[0]

    def r() -> torch.Tensor:
        return torch.rand(b, device=x.device, generator=g)

    ang, scale = (r() * 2 - 1) * math.radians(20), 0.9 + 0.2 * r()
    tx, ty = (r() * 2 - 1) * 0.2, (r() * 2 - 1) * 0.2
    flip = torch.where(r() < 0.5, -1.0, 1.0)
    c, s = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([c * flip, -s, tx], 1), torch.stack([s * flip, c, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


ARCHS = {"mnv2": "mobilenetv2", "lite0": "efficientnet_lite0"}


class Net(nn.Module):
    """bonefrac's own model (``create_model``) on ``(B, 1, H, W)`` images in [0, 1], with the
    backbone's normalisation applied on the device."""

    def __init__(self, arch: str):
        super().__init__()
        self.net = create_model(ARCHS[arch], f"{PACK}/{arch}.safetensors")
        pp = self.net.preprocessing
        self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1))

    @property
    def features(self) -> nn.Sequential:
        return self.net.features

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = (x01.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.net(x.contiguous(memory_format=torch.channels_last))


@torch.no_grad()
def evaluate(model: Net, xv: torch.Tensor, yv: torch.Tensor) -> tuple[float, float, np.ndarray]:
    """(validation ROC-AUC, log-loss, P(fractured) per image)."""
    model.eval()
    ps = []
    for i in range(0, len(xv), 256):
        with torch.autocast(DEV, torch.bfloat16, enabled=DEV == "cuda"):
            ps.append(model(xv[i:i + 256, None].float() / 255).float().softmax(1)[:, 1])
    p, y = torch.cat(ps).cpu().numpy(), yv.cpu().numpy()
    return (float(roc_auc_score(y, p)),
            float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])), p)


def set_mode(model: Net, k: int, bn_train: bool) -> None:
    """Train mode; BatchNorm frozen except in the top ``k`` blocks when ``bn_train``."""
    model.train()
    for i, block in enumerate(model.features):
        if not (i >= len(model.features) - k and bn_train):
            for m in block.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def run(cfg: dict, data: dict) -> tuple[list[dict], np.ndarray]:
    """Stage 1 (head, ``e1`` epochs at ``lr1``), stage 2 (top ``k`` blocks, one-cycle to ``lr2``,
    ``e2`` epochs). ``views``: that many fixed views (view 0 clean), cycled; else online."""
    xtr, ytr, xv, yv = data["xtr"], data["ytr"], data["xv"], data["yv"]
    torch.manual_seed(cfg["seed"])
    g = torch.Generator(device=DEV)
    g.manual_seed(cfg["seed"])
    model = Net(cfg["arch"]).to(DEV).to(memory_format=torch.channels_last)
    counts = np.bincount(ytr.cpu().numpy(), minlength=2)
    cw = torch.tensor(len(ytr) / (2 * counts), dtype=torch.float32, device=DEV)
    loss_fn = nn.CrossEntropyLoss(weight=cw)
    bs, hist, nb = 64, [], len(model.features)
    fixed = None
    if cfg.get("views"):
        gv = torch.Generator(device=DEV)
        gv.manual_seed(123)
        fixed = [xtr[:, None].float() / 255]
        for _ in range(1, cfg["views"]):
            fixed.append(torch.cat([augment(fixed[0][i:i + 512], gv)
                                    for i in range(0, len(xtr), 512)]))
    n_epoch, p = 0, None
    for stage, k, epochs, lr in (("frozen", 0, cfg["e1"], cfg["lr1"]),
                                 ("finetune", cfg["k"], cfg["e2"], cfg["lr2"])):
        for prm in model.features.parameters():
            prm.requires_grad_(False)
        for block in list(model.features)[nb - k:] if k else []:
            for prm in block.parameters():
                prm.requires_grad_(True)
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=lr)
        sched = None
        if stage == "finetune":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, lr, total_steps=epochs * math.ceil(len(xtr) / bs), pct_start=0.1)
        for ep in range(epochs):
            set_mode(model, k, cfg["bn"])
            t, total = time.time(), torch.zeros((), device=DEV)
            perm = torch.randperm(len(xtr), device=DEV, generator=g)
            for i in range(0, len(xtr), bs):
                idx = perm[i:i + bs]
                if fixed is not None:
                    x = fixed[n_epoch % len(fixed)][idx]
                else:
                    x = augment(xtr[idx, None].float() / 255, g)
                with torch.autocast(DEV, torch.bfloat16, enabled=DEV == "cuda"):
                    loss = loss_fn(model(x).float(), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched:
                    sched.step()
                total += loss.detach() * len(idx)
            auc, ll, p = evaluate(model, xv, yv)
            n_epoch += 1
            hist.append({"stage": stage, "ep": ep + 1, "loss": round(float(total) / len(xtr), 4),
                         "val_auc": round(auc, 4), "val_ll": round(ll, 4),
                         "s": round(time.time() - t, 1)})
            print(cfg["name"], hist[-1], flush=True)
    return hist, p


def round1():
    """Full vs top-12 fine-tuning, online vs 4 cached views, peak rate 1e-4 vs 3e-4."""
    base = dict(seed=0, e1=5, lr1=1e-3, bn=True, e2=12)
    cfgs = []
    for lr in ("1e-4", "3e-4"):
        for k, kn in ((99, "full"), (12, "k12")):
            for arch in ("mnv2", "lite0"):
                cfgs.append(dict(base, name=f"{arch}_{kn}_{lr}" + ("_online" if k == 12 else ""),
                                 arch=arch, k=k, lr2=float(lr)))
        if lr == "1e-4":
            cfgs.append(dict(base, name="mnv2_k12_1e-4_4views", arch="mnv2", k=12, lr2=1e-4,
                             views=4))
    cfgs += [dict(base, name=f"{a}_full_1e-4_s1", arch=a, k=99, lr2=1e-4, seed=1)
             for a in ("mnv2", "lite0")]
    return cfgs


def round2():
    """The CPU recipe's analogue: E cached views for E fine-tuning epochs, two seeds."""
    base = dict(e1=5, lr1=1e-3, bn=True, k=12, lr2=3e-4)
    return [dict(base, name=f"{arch}_k12_3e-4_views{e}_e{e}_s{seed}", arch=arch, e2=e, views=e,
                 seed=seed)
            for e, seeds in ((12, (0, 1)), (8, (0, 1)), (10, (0,)))
            for seed in seeds for arch in ("mnv2", "lite0")]


CFGS = round1() if os.environ.get("ROUND", "2") == "1" else round2()


def main() -> None:
    t0 = time.time()
    os.makedirs(OUT, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    pack = np.load(f"{PACK}/pack.npz")
    n = 96 if SMOKE else None
    xtr, ytr = load_split(pack, "train", n)
    xv, yv = load_split(pack, "val", n)
    data = {"xtr": xtr, "ytr": ytr, "xv": xv, "yv": yv}
    print("data", tuple(xtr.shape), tuple(xv.shape), f"{time.time() - t0:.1f}s", flush=True)
    cfgs = [dict(c, e1=1, e2=1) for c in CFGS[:5]] if SMOKE else CFGS
    res = {"yval": yv.cpu().numpy().tolist(), "runs": {}}
    for cfg in cfgs:
        if time.time() - t0 > BUDGET:
            print("budget reached, skipping", cfg["name"])
            continue
        t = time.time()
        hist, p = run(cfg, data)
        res["runs"][cfg["name"]] = {"cfg": cfg, "hist": hist, "s": round(time.time() - t, 1),
                                    "p_val": [round(float(v), 5) for v in p]}
        tmp = f"{OUT}/sweep.json.tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, f"{OUT}/sweep.json")
    print("done", f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
