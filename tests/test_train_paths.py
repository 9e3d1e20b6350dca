"""Trainer paths the GPU sweep (experiments/recipe_sweep/v2_gpu.py) relies on: the intra-op thread
count follows the process's CPU affinity (taskset, a SLURM or container cpuset), not the
machine's core count, so pinned runs do not oversubscribe; and full fine-tuning (every block
trainable, nothing frozen below) trains."""

import json
import os
import subprocess
import sys

import pytest
from conftest import TEST_DATA, TINY_SIZE

from bonefrac.training import TrainConfig, train

CODE = """
import os
cpu = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cpu})
from bonefrac.training.distributed import Dist
print(Dist().cpu_threads, Dist(local_world=2).cpu_threads)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_cpu_threads_follow_affinity():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.split() == ["1", "1"]


@pytest.mark.slow
def test_full_fine_tuning_trains_every_block(tmp_path):
    cfg = TrainConfig(epochs_frozen=0, epochs_finetune=1, views=1, size=TINY_SIZE, batch_size=16,
                      unfreeze_blocks=99, loc_weight=0.0)
    run = train(TEST_DATA, tmp_path / "full", cfg, finalize=False)
    hist = json.loads((run / "history.json").read_text())
    assert [h["stage"] for h in hist] == ["finetune"]
    assert (run / "model.safetensors").stat().st_size > 0
