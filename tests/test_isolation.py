"""Isolated decoding (bonefrac.data.isolation): worker processes that crash, hang, run out of
memory or answer garbage cost only their file; the pool recovers, shares its workers between
threads, decodes exactly as in-process, and leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SHIPPED_ENSEMBLE, TEST_DATA, real_images

from bonefrac.data import io as bio
from bonefrac.data.io import ImageReadError, load_inputs
from bonefrac.data.isolation import DecodePool
from bonefrac.inference.ensemble import Ensemble
from bonefrac.inference.predict import predict_files

HOSTILE = "hostile_decoders:by_name"


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has exited: not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def worker_pids(pool: DecodePool) -> list[int]:
    return [w.proc.pid for w in pool._idle]


@pytest.fixture
def hostile_files(tmp_path) -> dict[str, Path]:
    """A real radiograph copied under names that make the hostile decoder misbehave."""
    src = real_images(1)[0]
    names = ("good1", "segv", "good2", "abort", "hang", "oom", "panic", "exit", "badshape",
             "good3")
    out = {}
    for n in names:
        out[n] = tmp_path / f"{n}.jpg"
        shutil.copy(src, out[n])
    return out


def test_pool_decodes_exactly_as_in_process(tmp_path):
    files = real_images(3)
    with DecodePool(2) as pool:
        for f in files:
            for resize in ("stretch", "letterbox"):
                got = pool.decode(f, (96, 224), display=True, resize=resize)
                want = load_inputs(f, (96, 224), display=True, resize=resize)
                assert got.inputs.keys() == want.inputs.keys() == {96, 224}
                for s in (96, 224):
                    assert np.array_equal(got.inputs[s], want.inputs[s])
                assert np.array_equal(got.display, want.display)
                assert (got.width, got.height) == (want.width, want.height)
        assert pool.decode(files[0], (64,), resize="stretch").display is None
        assert pool.stats["started"] <= 2


def test_every_misbehaving_decoder_costs_only_its_file(hostile_files):
    ens = Ensemble.load(SHIPPED_ENSEMBLE)
    files = list(hostile_files.values())
    with DecodePool(2, timeout_s=2, decoder=HOSTILE) as pool:
        t = time.monotonic()
        res = predict_files(ens, files, batch_size=4, progress=False, pool=pool)
        elapsed = time.monotonic() - t
        reasons = {Path(e["file"]).stem: e["reason"] for e in res.errors}
        assert reasons == {
            "segv": "decoder crashed (SIGSEGV)",
            "abort": "decoder crashed (SIGABRT)",
            "hang": "decode timed out after 2 s (decoder stopped)",
            "oom": "decoder exceeded 2 GiB of memory (not decoded)",
            "panic": "cannot decode image (FakePanic: called `Result::unwrap()` on an `Err` "
                     "value)",
            "exit": "decoder process exited with code 3",
            "badshape": "decoder sent arrays of unexpected shapes [(225, 224)]",
        }
        assert sorted(Path(r["file"]).stem for r in res.rows) == ["good1", "good2", "good3"]
        assert elapsed < 30
        # the good rows are those of a run with the real decoder
        with DecodePool(1) as plain:
            ref = predict_files(ens, [hostile_files["good1"]], progress=False, pool=plain)
        assert {r["prob_fractured"] for r in res.rows} == {ref.rows[0]["prob_fractured"]}
        # and the pool goes on: fresh workers, at most two at a time
        d = pool.decode(hostile_files["good3"], (224,), resize="stretch")
        assert d.inputs[224].shape == (224, 224)
        assert pool.stats["timed_out"] == 1 and pool.stats["crashed"] == 4
        assert len(pool._idle) <= 2 and pool._live <= 2
        pids = worker_pids(pool)
    assert not any(running(p) for p in pids)


def test_hang_is_killed_at_the_limit_and_the_worker_replaced(hostile_files):
    with DecodePool(1, timeout_s=1.5, decoder=HOSTILE) as pool:
        pool.decode(hostile_files["good1"], (64,), resize="stretch")
        (hung_pid,) = worker_pids(pool)
        t = time.monotonic()
        with pytest.raises(ImageReadError, match="timed out after 1.5 s"):
            pool.decode(hostile_files["hang"], (64,), resize="stretch")
        assert 1.4 < time.monotonic() - t < 4
        assert not running(hung_pid)
        pool.decode(hostile_files["good2"], (64,), resize="stretch")
        assert worker_pids(pool) != [hung_pid]


def test_a_worker_killed_while_idle_does_not_fail_the_next_file():
    """The kernel's OOM killer or an operator may kill an idle worker: the next file is
    decoded by a fresh one, not blamed."""
    f = real_images(1)[0]
    with DecodePool(1) as pool:
        pool.decode(f, (64,), resize="stretch")
        (pid,) = worker_pids(pool)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.decode(f, (64,), resize="stretch").inputs[64].shape == (64, 64)
        assert worker_pids(pool) != [pid] and pool.stats["crashed"] == 0


def test_a_real_rust_panic_is_a_reason_not_an_escape(tmp_path):
    """pyo3's PanicException derives from BaseException: one byte deleted inside the first RLE
    segment of pydicom's MR_small_RLE makes pylibjpeg-rle's decoder panic."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("rle")
    src = (Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small_RLE.dcm")
    data = src.read_bytes()
    bad = tmp_path / "panics.dcm"
    bad.write_bytes(data[:1889] + data[1890:])
    with pytest.raises(ImageReadError, match="PanicException") as in_process:
        load_inputs(bad, (64,), resize="stretch")
    assert "\n" not in in_process.value.reason
    with DecodePool(1) as pool, pytest.raises(ImageReadError, match="PanicException"):
        pool.decode(bad, (64,), resize="stretch")


def test_a_real_decoder_abort_costs_only_its_file(tmp_path):
    """Fuzz mutant 12123 of seed 0 (a byte run in a JPEG-baseline DICOM of a real radiograph)
    makes gdcm throw a C++ exception nobody catches: std::terminate, SIGABRT, the whole
    process gone when decoded in-process. In the pool it is one error row."""
    pytest.importorskip("gdcm")
    from bonefrac.testing.fuzzing import seed_files, write_mutants

    (bad,) = write_mutants(tmp_path, 1, seed_files(TEST_DATA), seed=0, start=12123)
    assert bad.name == "m12123_xray0_radiograph_jpeg_baseline_run.dcm"
    code = ("import sys\nfrom bonefrac.data.io import load_inputs\n"
            f"load_inputs({str(bad)!r}, (224,), resize='stretch')\n")
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert alone.returncode == -signal.SIGABRT
    with DecodePool(1) as pool:
        with pytest.raises(ImageReadError, match=r"decoder crashed \(SIGABRT\)"):
            pool.decode(bad, (224,), resize="stretch")
        d = pool.decode(real_images(1)[0], (224,), resize="stretch")
        assert d.inputs[224].shape == (224, 224)


def test_keyboard_interrupt_is_not_swallowed(monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bio, "decode_pil", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_inputs(real_images(1)[0], (64,), resize="stretch")


def test_threads_share_the_workers():
    files = real_images(8)
    want = {f: load_inputs(f, (96,), resize="stretch").inputs[96] for f in files}
    errors: list[str] = []
    with DecodePool(2) as pool:
        def run():
            for f in files:
                if not np.array_equal(pool.decode(f, (96,), resize="stretch").inputs[96], want[f]):
                    errors.append(str(f))

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert pool.stats["started"] == 2 and pool.stats["decoded"] == 32


def test_workers_are_recycled_after_max_requests():
    with DecodePool(1, max_requests=3) as pool:
        for f in real_images(7):
            pool.decode(f, (64,), resize="stretch")
        assert pool.stats["started"] >= 3


def test_stat_refusals_need_no_worker(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with DecodePool(1) as pool:
        for p, why in ((tmp_path / "empty.png", "empty file"), (fifo, "not a regular file"),
                       (tmp_path, "is a directory"), (tmp_path / "missing.jpg", "not found")):
            with pytest.raises(ImageReadError, match=why):
                pool.decode(p, (64,), resize="stretch")
        assert pool.stats["started"] == 0


def test_closing_leaves_no_process_and_no_shared_memory():
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    pool = DecodePool(2)
    for f in real_images(4):
        pool.decode(f, (64,), resize="stretch")
    pids = worker_pids(pool)
    assert pids and all(running(p) for p in pids)
    pool.close()
    assert not any(running(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.decode(real_images(1)[0], (64,), resize="stretch")
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) <= shm_before


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """A parent killed with SIGKILL runs no cleanup: idle workers see the end of their stdin."""
    code = ("import os, signal, sys\n"
            "from bonefrac.data.isolation import DecodePool\n"
            f"pool = DecodePool(2)\npool.decode({str(real_images(1)[0])!r}, (64,), "
            "resize='stretch')\n"
            "pool.prestart()\n"
            "print(*[w.proc.pid for w in pool._idle], flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent)
    assert out.returncode == -signal.SIGKILL
    pids = [int(x) for x in out.stdout.split()]
    assert pids
    deadline = time.monotonic() + 10
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(p) for p in pids)
