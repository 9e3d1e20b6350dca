"""Paths and helpers shared by the tests. Import them from here (``from helpers import ...``):
``conftest.py`` holds fixtures and hooks, which pytest finds by itself and which no test should
import as a module."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from pathlib import Path
from types import ModuleType

from bonefrac.testing import free_port  # noqa: F401  (the tests take it from here)

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = ROOT / "tests" / "data"
EXAMPLES = ROOT / "examples" / "test_images"
# v1 (224 px, "ensemble-224"); the default model ("ensemble") is v2.
SHIPPED_ENSEMBLE = ROOT / "src" / "bonefrac" / "pretrained" / "ensemble_bone-fracture_v1"
SHIPPED_V2 = ROOT / "src" / "bonefrac" / "pretrained" / "ensemble_bone-fracture_v2"
SHIPPED_V3 = ROOT / "src" / "bonefrac" / "pretrained" / "ensemble_bone-fracture_v3"  # default
SHIPPED_BASELINE = ROOT / "src" / "bonefrac" / "pretrained" / "mobilenetv2_bone-fracture_v1"
SHARED_DATA = ROOT.parent / "shared" / "data" / "bone-fracture"
TINY_SIZE = 96  # small inputs keep the real training runs in tests to seconds


def real_images(n: int | None = None) -> list[Path]:
    """The real radiographs in tests/data (the first ``n``, in a fixed order)."""
    files = sorted(p for p in TEST_DATA.rglob("*.jpg"))
    return files[:n] if n else files


def load_script(rel: str) -> ModuleType:
    """The repository's script ``rel`` (e.g. ``"evaluations/domain_gate.py"``) as a module: the
    tests reuse an evaluation's own data builders and measurements."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def serving(app, tls: tuple[Path, Path] | None = None):
    """uvicorn serving ``app`` in a thread on a free loopback port (HTTPS with ``tls`` =
    (certificate, key)); yields the base URL."""
    import uvicorn

    kw = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                        **kw))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def serve_cli(*args: str, model: Path = SHIPPED_ENSEMBLE, https: bool = False, verify=True):
    """``python -m bonefrac serve --model MODEL ARGS`` on a free loopback port, answering
    ``/healthz`` (``https``: checked with ``verify``, an ``ssl.SSLContext``); yields (base URL,
    process). On leaving, SIGINT must stop it with exit 0; its output is then ``proc.out``."""
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bonefrac", "serve", "--model", str(model), "--port", str(port),
         *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"{'https' if https else 'http'}://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/healthz", verify=verify, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, proc
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        proc.out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
