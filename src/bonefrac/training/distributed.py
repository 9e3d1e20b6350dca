"""Device choice and data-parallel training with PyTorch DDP, launched by ``torchrun``.

One process::

    bonefrac train --data DATA --out RUN [--device auto|cpu|cuda]

N processes on each of M nodes (run the same line on every node, with its ``--node-rank``)::

    torchrun --nproc-per-node N [--nnodes M --node-rank R --master-addr HOST --master-port PORT] \\
        -m bonefrac train --data DATA --out RUN

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE > 1`` :func:`setup` joins the process
group: NCCL when the device is CUDA (one GPU per local rank), gloo on CPU. What each rank does:

- **Batches.** ``--batch-size`` is the *global* batch and the learning rates are used as given,
  so the recipe does not change with the number of processes. Every rank draws the same
  per-epoch permutation (seeded by seed, stage and epoch: ``DistributedSampler.set_epoch``
  semantics) and takes every ``world``-th sample of each global batch (``DistributedSampler``'s
  strided split, applied per batch and without padding). Its loss is its share of the global
  batch's class-weighted mean cross-entropy times ``world`` (:meth:`Dist.loss`), because DDP
  *averages* gradients: one optimizer step equals the single-process step on the same batch, up
  to floating-point summation order. Dropout masks are drawn per rank.
- **Validation.** Each rank scores a contiguous slice; the logits are all-gathered so every rank
  computes the same metrics, and rank 0's validation loss is broadcast, so early stopping, the
  learning-rate schedule and the choice of best weights are identical on every rank.
- **Feature cache.** Each (split, view) of the frozen-backbone cache is computed by one rank
  (job ``i`` on rank ``i % world``); after a barrier, ranks on a node whose cache folder
  (``$BONEFRAC_CACHE``) did not receive a file -- node-local caches -- compute the missing ones
  among themselves. A cache folder shared by all nodes is filled once; node-local caches work
  too (each node computes what other nodes made). Files are bit-identical to a one-process run.
- **Files.** Rank 0 alone writes the run folder (logs, checkpoints, ``history.*``,
  ``model.json``, weights, ``Results/``) and reads it on ``--resume``; the other ranks receive
  its model, optimizer, scheduler and early-stopping state through the process group, so the
  run folder need not be shared between nodes. The other ranks' stdout and progress bars are
  silenced; their warnings and errors still reach stderr.

On CUDA, computation runs under bf16 autocast with channels-last inputs and weights (fp32 master
weights and losses); on CPU everything is fp32 and identical to earlier releases.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from bonefrac import InputError
from bonefrac.inference.runners import default_threads

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", local_rank: int = 0, local_world: int = 1) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if name not in DEVICES:
        raise InputError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but CUDA is not available (no GPU, or a "
                         "CPU-only torch build); use --device cpu or auto")
    if local_world > torch.cuda.device_count():
        raise InputError(f"{local_world} processes on this node but only "
                         f"{torch.cuda.device_count()} GPU(s): use --nproc-per-node "
                         f"{torch.cuda.device_count()} (NCCL needs one GPU per process)")
    return torch.device("cuda", local_rank)


class _Stage(nn.Module):
    """A training stage's forward function as a module (what DDP wraps), bf16 autocast on CUDA."""

    def __init__(self, trainable: nn.Module, forward: Callable, amp: bool):
        super().__init__()
        self.trainable, self.fn, self.amp = trainable, forward, amp

    def forward(self, x: torch.Tensor):
        with torch.autocast("cuda" if self.amp else "cpu", torch.bfloat16, enabled=self.amp):
            out = self.fn(x)  # logits, or (logits, fracture-map logits)
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)  # losses and metrics in fp32
        return out.float()


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; every method is the plain computation when alone."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    @property
    def cpu_threads(self) -> int:
        """Intra-op threads: the cores this process may run on (its affinity mask: a SLURM or
        container cpuset, taskset), shared by the node's ranks (torchrun's default is 1)."""
        return max(1, default_threads() // self.local_world)

    def describe(self, batch_size: int, lrs: Sequence[float]) -> str:
        """The log line stating device, precision and the effective batch size and rates."""
        where = f"{self.device}" + (" (bf16 autocast, channels-last)" if self.amp else " (fp32)")
        if self.world == 1:
            return f"device: {where}"
        lo, hi = batch_size // self.world, -(-batch_size // self.world)
        each = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return (f"distributed: {self.world} processes ({dist.get_backend()}), rank 0 on {where}; "
                f"global batch {batch_size} = {each} per rank; learning rates as given "
                f"({', '.join(f'{lr:g}' for lr in lrs)}), no scaling")

    # -- data ---------------------------------------------------------------------------------
    # Channels-last everywhere: measured on the 2 CPU cores it makes a fine-tuning step of the
    # top 12 blocks 1.23x (MobileNetV2) and 1.44x (EfficientNet-Lite0) faster.
    def tensor(self, a: np.ndarray) -> torch.Tensor:
        """A numpy (or memory-mapped) batch on this rank's device; 4-D is channels-last."""
        t = torch.from_numpy(np.array(a))
        if self.device.type == "cuda":
            t = t.to(self.device, non_blocking=True)
        if t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` on this rank's device, channels-last."""
        return model.to(self.device, memory_format=torch.channels_last)

    # -- training -----------------------------------------------------------------------------
    def wrap(self, trainable: nn.Module, forward: Callable) -> tuple[nn.Module, nn.Module]:
        """(module to train with, module to evaluate with) for one stage; DDP when distributed.

        ``forward`` maps inputs to logits using only ``trainable``'s parameters (and frozen
        ones). Buffers are not broadcast each step: BatchNorm in train mode normalises with
        batch statistics, and :meth:`sync_buffers` aligns the running ones once per epoch.
        """
        net = _Stage(trainable, forward, self.amp)
        if self.world == 1:
            return net, net
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False)
        return ddp, net

    def loss(self, loss_fn: nn.CrossEntropyLoss, logits: torch.Tensor, y: torch.Tensor,
             y_batch: np.ndarray) -> torch.Tensor:
        """This rank's loss for its share ``y`` of the global batch with labels ``y_batch``.

        Alone: ``loss_fn(logits, y)``. Distributed: ``world * sum_i w_yi * l_i / sum_batch w_y``,
        so DDP's gradient *average* over ranks is the gradient of the global batch's weighted
        mean loss, whatever the split (uneven or empty shares included). The returned values
        summed over ranks and divided by ``world`` give that mean.
        """
        if self.world == 1:
            return loss_fn(logits, y)
        w = loss_fn.weight
        denom = w[torch.as_tensor(y_batch, device=w.device)].sum() if w is not None \
            else float(len(y_batch))
        return F.cross_entropy(logits, y, weight=w, reduction="sum") * self.world / denom

    def gather_rows(self, fn: Callable[[np.ndarray], torch.Tensor], x: np.ndarray,
                    chunk: int) -> torch.Tensor:
        """``fn`` over ``x`` in chunks of ``chunk`` rows -> all rows in order, on every rank.

        Distributed, each rank runs ``fn`` on one contiguous slice and the results are
        all-gathered. ``fn`` maps ``(n, ...)`` inputs to ``(n, ...)`` outputs.
        """
        n = len(x)
        per = -(-n // self.world)
        lo, hi = min(n, self.rank * per), min(n, (self.rank + 1) * per)
        parts = [fn(x[i:min(i + chunk, hi)]) for i in range(lo, hi, chunk)]
        if self.world == 1:
            return torch.cat(parts)
        mine = torch.cat(parts) if parts else fn(x[lo:lo])  # a trailing rank may get nothing
        mine = torch.cat([mine, mine.new_zeros((per - len(mine), *mine.shape[1:]))])
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        return torch.cat(out)[:n]  # padding only ever follows the last real row

    def shuffle_dropout(self) -> None:
        """Give each rank its own dropout masks (after the shared permutation was drawn)."""
        if self.world > 1:
            torch.manual_seed(torch.initial_seed() + 1_000_003 * self.rank)

    # -- communication ------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (small picklable state from this job's own rank 0)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.amp else None)
        return box[0]

    def all_sum(self, *values: float) -> list[float]:
        """Each value summed over ranks."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sync_from_main(self, model: nn.Module, opt: torch.optim.Optimizer, sched, stopper,
                       extra):
        """Every rank takes rank 0's weights, optimizer, scheduler and early-stopping state.

        Rank 0 alone reads checkpoints (``--resume``), so the run folder need not be visible to
        other nodes. Returns rank 0's ``extra`` (e.g. start epoch and history).
        """
        if self.world == 1:
            return extra
        opt_state = _to_cpu(opt.state_dict()) if self.is_main else None
        state = self.broadcast((extra, opt_state, sched.state_dict(), stopper.best, stopper.bad))
        broadcast_tensors(list(model.state_dict().values()))
        extra, opt_state, sched_state, stopper.best, stopper.bad = state
        if not self.is_main:
            opt.load_state_dict(opt_state)
            sched.load_state_dict(sched_state)
        return extra

    def sync_model(self, model: nn.Module) -> None:
        """Every rank takes rank 0's weights (e.g. the best ones, which rank 0 reads)."""
        if self.world > 1:
            broadcast_tensors(list(model.state_dict().values()))

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics, which each rank updates from its own
        share of the batch) on every rank, so that validation and the replicas agree."""
        if self.world > 1:
            broadcast_tensors(list(module.buffers()))

    def log_replica(self, model: nn.Module, what: str) -> None:
        """One stderr line per rank with a digest of its weights: replicas must agree."""
        if self.world > 1:
            print(f"[rank {self.rank}/{self.world}] {what} weights sha256 "
                  f"{state_digest(model.state_dict())}", file=sys.stderr, flush=True)

    def spread(self, jobs: Sequence[Callable[[], object]]) -> None:
        """Run each idempotent cache-filling job once per cache folder, spread over the ranks.

        Round 1 gives job ``i`` to rank ``i % world``. Round 2 lets each node's ranks redo, split
        by local rank, whatever their cache folder still lacks (a job finding its files only
        loads them), which is nothing when all nodes share the folder.
        """
        if self.world == 1:
            return
        for slot, count in ((self.rank, self.world), (self.local_rank, self.local_world)):
            for i, job in enumerate(jobs):
                if i % count == slot:
                    job()
            dist.barrier()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values: one broadcast per dtype.

    Flattening through a buffer accepts any memory format (channels-last weights included).
    """
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # same order on every rank
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values (device and layout ignored)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def setup(device: str = "auto") -> Dist:
    """This process's :class:`Dist`; joins the process group when ``WORLD_SIZE > 1``.

    ``$BONEFRAC_DIST_TIMEOUT_MIN`` (default 120) bounds every collective wait, which includes
    waiting for other ranks' feature extraction.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Dist(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dev = resolve_device(device, local_rank, local_world)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        minutes = float(os.environ.get("BONEFRAC_DIST_TIMEOUT_MIN", "120"))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=minutes),
                                device_id=dev if dev.type == "cuda" else None)
    ctx = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
               local_world=local_world, device=dev)
    if not ctx.is_main:
        _silence()
    return ctx


def _silence() -> None:
    """Rank 0 does the talking: mute this rank's stdout and progress bars (not stderr)."""
    from functools import partialmethod

    from tqdm import std

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    std.tqdm.__init__ = partialmethod(std.tqdm.__init__, disable=True)  # tqdm's documented way


def teardown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
