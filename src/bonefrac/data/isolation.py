"""Decoding untrusted files in worker processes, so that no file can stop a batch or a server.

A decoder written in C or Rust (libjpeg, openjpeg, gdcm, the RLE decoder) can segfault, hang
or allocate without bound on a hostile file, and no ``except`` catches that. So every file
from outside is decoded by :func:`bonefrac.data.io.load_inputs` in a worker process of a
:class:`DecodePool`:

- each worker caps its own address space (``RLIMIT_AS``, default 2 GiB) and is killed
  (SIGKILL) when one decode takes longer than the time limit (default 10 s);
- a worker that dies (signal or exit) or is killed is replaced by a fresh one on demand; the
  file gets a one-line reason ("decoder crashed (SIGSEGV)", "decode timed out after 10 s",
  "decoder exceeded 2 GiB of memory") and every other file its result;
- pixels come back over the worker's stdout pipe as raw bytes after a small JSON header
  (shapes checked against the request), never as pickled objects;
- workers are plain ``python`` processes started with ``subprocess`` (fork-and-exec: safe
  from a parent running ONNX Runtime threads), in their own session (a Ctrl-C or SIGTERM to
  the terminal's process group reaches only the parent, which shuts them down), reused
  across files and retired after ``max_requests``; an idle worker exits when the parent goes
  (end of file on stdin), a busy one at its own alarm (twice the time limit) at the latest.

The pool is thread-safe: ``decode`` blocks the calling thread until a worker is free (at most
``workers`` decode at once, default one per CPU), so threads that decode and then infer, as
``bonefrac.inference.predict`` does, keep every core busy. :func:`default_pool` is the
process-wide pool, started on first use and shut down at exit.

Wire protocol (frames of a 4-byte big-endian length + payload): the worker first sends
``{"ready": true}``; request = JSON ``{"path", "sizes", "display", "resize", "checks"}``;
reply = JSON ``{"ok": true, "width", "height", "notes", "shapes"}`` + one frame holding every
array's bytes (uint8, C order, in the order of ``shapes``), or ``{"ok": false, "reason"}``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bonefrac import BonefracError, InputError
from bonefrac.data.io import (
    DISPLAY_MAX_SIDE,
    OUT_OF_MEMORY,
    Decoded,
    ImageReadError,
    ImageRefused,
    check_regular_file,
    failure_reason,
    one_line,
)
from bonefrac.data.preprocess import require_resize

__all__ = ["DEFAULT_DECODER", "DecodePool", "decode_file", "default_pool", "worker_main"]

DEFAULT_DECODER = "bonefrac.data.io:load_inputs"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY = 2 * 2**30
DEFAULT_MAX_REQUESTS = 500
# Environment overrides of the defaults (used by default_pool; a DecodePool takes arguments).
ENV_TIMEOUT, ENV_MEMORY, ENV_WORKERS = ("BONEFRAC_DECODE_TIMEOUT_S", "BONEFRAC_DECODE_MEMORY_MB",
                                        "BONEFRAC_DECODE_WORKERS")
_HEADER_MAX = 1 << 16  # a reply header is a few hundred bytes; more means a broken worker
_LEN = struct.Struct(">I")
_BOOT = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
         "from bonefrac.data.isolation import worker_main; sys.exit(worker_main(sys.argv[2:]))")


class _Failed(BonefracError):
    """A decode that ended without a reply; ``reason`` names why, for the file's error row."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry = retry  # the worker was already gone before it saw the request


def human_memory(n: int) -> str:
    """``2147483648`` -> ``'2 GiB'``; ``1536 * 2**20`` -> ``'1.5 GiB'``; ``512 MiB``."""
    if n >= 2**30:
        return f"{n / 2**30:g} GiB"
    return f"{n / 2**20:g} MiB"


def signal_name(code: int) -> str:
    """``-11`` (a subprocess return code) -> ``'SIGSEGV'``."""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


# ------------------------------------------------------------------------------ the worker
def worker_main(argv: Sequence[str]) -> int:
    """The worker process: ``DECODER MEMORY_BYTES ALARM_S``; serves requests until stdin ends.

    Its own stdin/stdout are moved to private descriptors for the protocol; file descriptors
    0 and 1 then point at /dev/null and stderr, so a C library that prints cannot corrupt it.
    """
    decoder_spec, memory, alarm_s = argv[0], int(argv[1]), float(argv[2])
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    warnings.simplefilter("ignore")  # malformed files warn a lot; the reason is what counts
    decode = _import_decoder(decoder_spec)
    _limit_memory(memory)
    _write_frame(proto_out, b'{"ready": true}')
    while True:
        request = _read_frame_blocking(proto_in)
        if request is None:  # the parent closed the pipe (or is gone)
            return 0
        signal.setitimer(signal.ITIMER_REAL, alarm_s)  # backstop if the parent cannot kill us
        try:
            header, body = _serve_one(decode, json.loads(request), memory)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        _write_frame(proto_out, json.dumps(header).encode())
        if body is not None:
            _write_frame(proto_out, body)


def _serve_one(decode: Callable, req: dict, memory: int) -> tuple[dict, bytes | None]:
    """Decode one request: (reply header, array bytes or None)."""
    try:
        d = decode(req["path"], tuple(req["sizes"]), display=bool(req["display"]),
                   resize=req.get("resize"))
        arrays = [d.inputs[s] for s in req["sizes"]] + ([d.display] if req["display"] else [])
        arrays = [np.ascontiguousarray(a, dtype=np.uint8) for a in arrays]
        body = b"".join(a.tobytes() for a in arrays)
        return {"ok": True, "width": int(d.width), "height": int(d.height),
                "notes": _notes(req.get("checks"), req["path"]),
                "shapes": [list(a.shape) for a in arrays]}, body
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError:
        return {"ok": False, "reason": _memory_reason(memory)}, None
    except ImageReadError as e:
        reason = _memory_reason(memory) if e.reason == OUT_OF_MEMORY else e.reason
        return {"ok": False, "reason": reason}, None
    except BaseException as e:  # a decoder that raises what load_inputs does not wrap
        return {"ok": False, "reason": failure_reason(e)}, None


def _notes(spec: str | None, path: str) -> str:
    """The named check's notes on a file that decoded ('' without one, or if it fails)."""
    if not spec:
        return ""
    try:
        return one_line(str(_import_decoder(spec)(path) or ""), 2000)
    except Exception:  # a check never costs the file its prediction
        return ""


def _memory_reason(memory: int) -> str:
    return f"decoder exceeded {human_memory(memory)} of memory (not decoded)"


@functools.cache
def _import_decoder(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (the default is ``load_inputs``)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _limit_memory(memory: int) -> None:
    """Cap this process's address space (a decoder's malloc then fails instead of growing)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _read_frame_blocking(fd: int) -> bytes | None:
    head = _read_exact(fd, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    return _read_exact(fd, n)


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(_LEN.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


# ------------------------------------------------------------------------------ the parent
class _Worker:
    """One worker process and its pipes; used by one thread at a time."""

    def __init__(self, decoder: str, memory: int, alarm_s: float, quiet: bool):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "RUST_BACKTRACE": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, json.dumps([str(x) for x in sys.path]), decoder,
             str(memory), str(alarm_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None, env=env, start_new_session=True)
        self.requests = 0
        self.ready = False
        self._poll = select.poll()
        self._poll.register(self.proc.stdout.fileno(), select.POLLIN)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for the worker's ready frame (it has imported its decoder)."""
        if not self.ready:
            try:
                self._frame(time.monotonic() + timeout_s, _HEADER_MAX)
            except _Failed as e:
                raise _Failed(f"decoder worker did not start ({e.reason})") from None
            self.ready = True

    def send(self, payload: bytes) -> None:
        """Send a request. Raises ``_Failed(retry=True)`` when the worker died while idle (the
        kernel's OOM killer, an operator): not this file's doing."""
        self.requests += 1
        if self.proc.poll() is not None:
            raise _Failed(self.exit_reason(), retry=True)
        try:
            _write_frame(self.proc.stdin.fileno(), payload)
        except OSError:  # BrokenPipeError
            raise _Failed(self.exit_reason(), retry=True) from None

    def header(self, deadline: float) -> dict:
        """The reply's JSON header. Raises ``_Failed`` (timeout, death, garbage)."""
        try:
            header = json.loads(self._frame(deadline, _HEADER_MAX))
        except ValueError:
            raise _Failed("decoder sent a malformed reply") from None
        if not isinstance(header, dict):
            raise _Failed("decoder sent a malformed reply")
        return header

    def _frame(self, deadline: float, limit: int, exact: bool = False) -> bytearray:
        (n,) = _LEN.unpack(self.read(_LEN.size, deadline))
        if n > limit or (exact and n != limit):
            raise _Failed(f"decoder sent a malformed reply ({n:,} bytes)")
        return self.read(n, deadline)

    def body(self, deadline: float, n: int) -> bytearray:
        return self._frame(deadline, n, exact=True)

    def read(self, n: int, deadline: float) -> bytearray:
        """Exactly ``n`` bytes from the worker by ``deadline`` (monotonic seconds)."""
        buf, got, fd = bytearray(n), 0, self.proc.stdout.fileno()
        view = memoryview(buf)
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failed(TIMEOUT)
            if not self._poll.poll(max(1, int(left * 1000))):
                continue
            k = os.readv(fd, [view[got:]])
            if k == 0:
                raise _Failed(self.exit_reason())
            got += k
        return buf

    def exit_reason(self) -> str:
        """Why the worker is gone: ``decoder crashed (SIGSEGV)`` or its exit code."""
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:  # it closed its pipe but lingers: finish it
            self.kill()
            code = self.proc.returncode
        if code < 0:
            return f"decoder crashed ({signal_name(code)})"
        return f"decoder process exited with code {code}"

    def kill(self) -> None:
        """SIGKILL and reap (no zombie)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def stop(self, grace_s: float = 2.0) -> None:
        """Close its stdin (it exits at end of file); kill it if it has not after ``grace_s``."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


TIMEOUT = "timeout"
STARTUP_TIMEOUT_S = 60.0  # an interpreter start and imports; generous on a loaded machine


class DecodePool:
    """Worker processes that decode files; see the module docstring.

    Args:
        workers: most decodes at once (default: the CPUs this process may use).
        timeout_s: per-file limit; a worker past it is killed and replaced.
        memory_bytes: each worker's address-space cap (``RLIMIT_AS``).
        decoder: ``"module:function"`` the worker calls as
            ``fn(path, sizes, display=..., resize=...) -> Decoded`` (tests name one that
            crashes); default :func:`bonefrac.data.io.load_inputs`.
        max_requests: files a worker decodes before it is replaced (bounds slow leaks).
        quiet: send the workers' stderr (decoder warnings, Rust panic messages) to /dev/null.
    """

    def __init__(self, workers: int | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_bytes: int = DEFAULT_MEMORY, decoder: str = DEFAULT_DECODER,
                 max_requests: int = DEFAULT_MAX_REQUESTS, quiet: bool = True):
        if timeout_s <= 0 or memory_bytes < 2**27 or max_requests < 1:
            raise InputError("timeout_s must be > 0, memory_bytes >= 128 MiB, "
                             "max_requests >= 1")
        self.workers = max(1, workers or len(os.sched_getaffinity(0)))
        self.timeout_s, self.memory_bytes = float(timeout_s), int(memory_bytes)
        self.decoder, self.max_requests, self.quiet = decoder, max_requests, quiet
        self.stats = {"decoded": 0, "refused": 0, "crashed": 0, "timed_out": 0, "started": 0}
        self._idle: list[_Worker] = []
        self._live = 0  # idle + busy workers (and ones being started)
        self._cond = threading.Condition()
        self._closed = False

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def decode(self, path: str | os.PathLike, sizes: Sequence[int], *,
               display: bool = False, resize: str | None = None, checks: str | None = None
               ) -> Decoded:
        """Decode one file in a worker: as ``load_inputs(path, sizes, display, resize)``.

        ``checks``: ``"module:function"`` of a check the worker also runs on a file that
        decoded, ``fn(path) -> str``, whose notes come back as ``Decoded.notes`` (checks that
        parse the file belong in the worker too).

        Raises:
            ImageReadError: the file cannot be used (the decoder's reason, or that it crashed,
                timed out or exceeded its memory cap); the pool itself carries on.
            RuntimeError: the pool is closed.
        """
        sizes = [int(s) for s in sizes]
        require_resize(resize, sizes)  # the caller's mistake, not the file's: raised here
        try:  # a stat, no parsing: empty files, folders and FIFOs never cost a round trip
            check_regular_file(Path(path))
        except (ImageRefused, OSError) as e:
            raise ImageReadError(path, failure_reason(e)) from None
        payload = json.dumps({"path": os.path.abspath(path), "sizes": sizes,
                              "display": bool(display), "resize": resize,
                              "checks": checks}).encode()
        for attempt in range(2):
            worker = self._acquire()
            healthy = False
            try:
                result = self._exchange(worker, payload, sizes, display)
                healthy = True
            except _Failed as e:
                if e.retry and attempt == 0:
                    continue
                raise ImageReadError(path, self._failure(e)) from None
            finally:
                self._release(worker, healthy)
            if isinstance(result, str):
                self._count("refused")
                raise ImageReadError(path, result)
            self._count("decoded")
            return result
        raise AssertionError("unreachable")

    def _exchange(self, worker: _Worker, payload: bytes, sizes: list[int], display: bool
                  ) -> Decoded | str:
        """One request: the decoded file, or the decoder's reason. Raises ``_Failed``."""
        worker.wait_ready(STARTUP_TIMEOUT_S)
        worker.send(payload)
        deadline = time.monotonic() + self.timeout_s
        header = worker.header(deadline)
        if not header.get("ok"):
            return one_line(str(header.get("reason") or "decoder failed"))
        try:
            shapes = [tuple(int(x) for x in s) for s in header["shapes"]]
            width, height = int(header["width"]), int(header["height"])
        except (KeyError, TypeError, ValueError):
            raise _Failed("decoder sent a malformed reply") from None
        if not _shapes_ok(shapes, sizes, display):
            raise _Failed(f"decoder sent arrays of unexpected shapes {shapes}")
        body = worker.body(deadline, sum(h * w for h, w in shapes))
        arrays, offset = [], 0
        for h, w in shapes:
            arrays.append(np.frombuffer(body, np.uint8, h * w, offset).reshape(h, w))
            offset += h * w
        return Decoded(dict(zip(sizes, arrays, strict=False)), arrays[-1] if display else None,
                       width, height, one_line(str(header.get("notes") or ""), 2000))

    def _failure(self, e: _Failed) -> str:
        if e.reason == TIMEOUT:
            self._count("timed_out")
            return f"decode timed out after {self.timeout_s:g} s (decoder stopped)"
        self._count("crashed")
        return e.reason

    def prestart(self) -> None:
        """Start one worker now without waiting for it: its interpreter starts while the
        caller does other work (loads a model). Does nothing once the pool has workers."""
        with self._cond:
            if self._closed or self._live:
                return
            self._live += 1
        self._release(self._start(), True)

    def close(self) -> None:
        """Stop every worker (idle ones now; busy ones when their decode returns)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._cond.notify_all()
        for w in idle:
            w.stop()

    # ---------------------------------------------------------------------- worker handling
    def _start(self) -> _Worker:
        try:
            w = _Worker(self.decoder, self.memory_bytes, 2 * self.timeout_s + 5, self.quiet)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise
        self._count("started")
        return w

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the decode pool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._live < self.workers:
                    self._live += 1
                    break
                self._cond.wait()
        return self._start()

    def _release(self, worker: _Worker, healthy: bool) -> None:
        """Back to the idle list, or (unhealthy, worn out, pool closed) stopped and reaped."""
        keep = healthy and worker.requests < self.max_requests
        with self._cond:
            if keep and not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
            self._live -= 1
            self._cond.notify()
        if healthy:
            worker.stop()
        else:
            worker.kill()
        self._replace()

    def _replace(self) -> None:
        """Start a worker in place of one just retired, so that its interpreter boots while
        the callers carry on (the next decode would otherwise wait for it)."""
        with self._cond:
            if self._closed or self._live >= self.workers:
                return
            self._live += 1
        with contextlib.suppress(OSError):  # no process now: the next decode tries again
            self._release(self._start(), True)

    def _count(self, key: str) -> None:
        with self._cond:
            self.stats[key] += 1


def _shapes_ok(shapes: list[tuple[int, ...]], sizes: list[int], display: bool) -> bool:
    """One ``(s, s)`` per requested size, then (``display``) one ``(H, W)`` within the cap."""
    if len(shapes) != len(sizes) + bool(display) or any(len(s) != 2 for s in shapes):
        return False
    if shapes[:len(sizes)] != [(s, s) for s in sizes]:
        return False
    return not display or min(shapes[-1]) > 0 and max(shapes[-1]) <= DISPLAY_MAX_SIDE


_DEFAULT: DecodePool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> DecodePool:
    """The process-wide pool (created on first use; closed at exit). Its limits come from
    ``BONEFRAC_DECODE_TIMEOUT_S`` (default 10), ``BONEFRAC_DECODE_MEMORY_MB`` (2048) and
    ``BONEFRAC_DECODE_WORKERS`` (the CPUs)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed:
            env = os.environ
            _DEFAULT = DecodePool(
                int(env[ENV_WORKERS]) if env.get(ENV_WORKERS) else None,
                timeout_s=float(env.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S),
                memory_bytes=int(float(env.get(ENV_MEMORY) or DEFAULT_MEMORY / 2**20) * 2**20))
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def decode_file(path: str | os.PathLike | Path, sizes: Sequence[int], *,
                display: bool = False, resize: str | None = None, checks: str | None = None,
                pool: DecodePool | None = None) -> Decoded:
    """Decode one untrusted file in ``pool`` (default: :func:`default_pool`); raises
    :class:`~bonefrac.data.io.ImageReadError` with the reason when it cannot be used."""
    return (pool or default_pool()).decode(path, sizes, display=display, resize=resize,
                                           checks=checks)
