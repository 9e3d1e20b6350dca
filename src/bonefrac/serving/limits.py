"""Request limits as one pure ASGI middleware, applied before a request body is read.

For the prediction routes it:
- refuses a body over ``max_body`` bytes with 413, from Content-Length when sent, and by
  counting bytes as they arrive otherwise (chunked uploads);
- gives the request a deadline (``scope["bonefrac.deadline"]``, event-loop time) and reads
  the whole body first, spooled, with its own idle timeout: a pause of more than
  ``body_idle_s`` between two parts, or an upload still arriving at the deadline, gets 408;
- only then admits it to one of ``capacity`` places (running + queued), or answers 503: a
  slow upload holds no place while it trickles in, so slow clients cannot starve the workers
  (how many uploads one client may have in flight is ``security.GuardMiddleware``'s limit);
  the handler uses what is left of the deadline for inference.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from tempfile import SpooledTemporaryFile
from typing import BinaryIO

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bonefrac.serving.uploads import human_bytes

DEADLINE_KEY = "bonefrac.deadline"
SPOOL_MEMORY = 1 << 20  # body bytes held in memory before the spool moves to a temporary file
REPLAY_CHUNK = 1 << 16


def json_error(status: int, detail: str, headers: dict[str, str] | None = None
               ) -> tuple[dict, dict]:
    """ASGI start + body messages for ``{"detail": ...}`` (the shape FastAPI uses)."""
    body = json.dumps({"detail": detail}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": hdrs},
            {"type": "http.response.body", "body": body})


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, *, capacity: int, timeout_s: float,
                 max_body: Callable[[str], int | None], body_idle_s: float = 10.0):
        """``max_body(path)`` gives the body cap in bytes for a path, or None: not limited.
        ``body_idle_s``: the longest pause between two parts of an upload (408 beyond)."""
        self.app = app
        self.capacity = capacity
        self.timeout_s = timeout_s
        self.body_idle_s = body_idle_s
        self.max_body = max_body
        self.active = 0  # admitted requests; only touched on the event loop, so no lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        if self.active >= self.capacity:  # full already: not worth reading the body
            await self._busy(send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reply(send, 413, f"request body is {human_bytes(int(length))}, over "
                                         f"the {human_bytes(limit)} limit")
            return
        scope[DEADLINE_KEY] = asyncio.get_running_loop().time() + self.timeout_s
        try:
            body = await self._read_body(receive, limit, scope[DEADLINE_KEY])
        except HTTPException as e:
            await self._reply(send, e.status_code, e.detail)
            return
        if body is None:  # the client went away
            return
        with body:
            if self.active >= self.capacity:
                await self._busy(send)
                return
            self.active += 1
            try:
                await self.app(scope, _replay(body, receive), send)
            finally:
                self.active -= 1

    async def _read_body(self, receive: Receive, limit: int, deadline: float
                         ) -> SpooledTemporaryFile | None:
        """The whole body, spooled (in memory up to ``SPOOL_MEMORY``, then a temporary file),
        read before a place is taken; None if the client disconnected.

        Raises:
            HTTPException: 408 (a pause over ``body_idle_s``, or past the deadline), 413.
        """
        loop = asyncio.get_running_loop()
        spool = SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 (returned)
        try:
            received = 0
            while True:
                left = deadline - loop.time()
                try:
                    msg = await asyncio.wait_for(receive(), max(0.0, min(left, self.body_idle_s)))
                except TimeoutError:
                    raise HTTPException(408, f"upload not complete within {self.timeout_s:g} s"
                                        if left <= self.body_idle_s else "upload stalled: no "
                                        f"data for {self.body_idle_s:g} s") from None
                if msg["type"] == "http.disconnect":
                    spool.close()
                    return None
                chunk = msg.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise HTTPException(413, f"request body over the {human_bytes(limit)} "
                                             "limit")
                spool.write(chunk)
                if not msg.get("more_body", False):
                    spool.seek(0)
                    return spool
        except BaseException:
            spool.close()
            raise

    async def _busy(self, send: Send) -> None:
        await self._reply(send, 503, f"server busy: {self.capacity} requests already running "
                                     "or queued; retry shortly", {"Retry-After": "1"})

    @staticmethod
    async def _reply(send: Send, status: int, detail: str,
                     headers: dict[str, str] | None = None) -> None:
        start, body = json_error(status, detail, headers)
        await send(start)
        await send(body)


def _replay(body: BinaryIO, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the spooled ``body`` (``REPLAY_CHUNK`` bytes at a
    time), then waits on the real one (for a disconnect)."""
    size = body.seek(0, 2)
    body.seek(0)
    done = False

    async def replay() -> Message:
        nonlocal done
        if done:
            return await receive()
        chunk = body.read(REPLAY_CHUNK)
        done = body.tell() >= size
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replay
