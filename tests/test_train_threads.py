"""The trainer's intra-op thread count follows the process's CPU affinity (taskset, a SLURM or
container cpuset), not the machine's core count, so that pinned runs do not oversubscribe."""

import os
import subprocess
import sys

import pytest

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
