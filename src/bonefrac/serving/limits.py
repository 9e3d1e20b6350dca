"""Request limits as one pure ASGI middleware, applied before a request body is read.

For the prediction routes it:
- admits at most ``capacity`` requests at once (running + queued); the next one is answered
  503 at once, so overload never turns into an unbounded queue of buffered uploads;
- refuses a body over ``max_body`` bytes with 413, from Content-Length when sent, and by
  counting bytes as they arrive otherwise (chunked uploads);
- gives the request a deadline (``scope["bonefrac.deadline"]``, event-loop time); an upload
  still arriving at the deadline gets 408, and the handler uses what is left for inference.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bonefrac.serving.uploads import human_bytes

DEADLINE_KEY = "bonefrac.deadline"


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
                 max_body: Callable[[str], int | None]):
        """``max_body(path)`` gives the body cap in bytes for a path, or None: not limited."""
        self.app = app
        self.capacity = capacity
        self.timeout_s = timeout_s
        self.max_body = max_body
        self.active = 0  # admitted requests; only touched on the event loop, so no lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        if self.active >= self.capacity:
            await self._reply(send, 503, f"server busy: {self.capacity} requests already "
                                         "running or queued; retry shortly",
                              {"Retry-After": "1"})
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reply(send, 413, f"request body is {human_bytes(int(length))}, over "
                                         f"the {human_bytes(limit)} limit")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        scope[DEADLINE_KEY] = deadline
        received, body_done = 0, False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls only wait for a disconnect: no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(408, f"upload not complete within {self.timeout_s:g} s"
                                    ) from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body over the {human_bytes(limit)} "
                                             "limit")
                body_done = not msg.get("more_body", False)
            return msg

        self.active += 1
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.active -= 1

    @staticmethod
    async def _reply(send: Send, status: int, detail: str,
                     headers: dict[str, str] | None = None) -> None:
        start, body = json_error(status, detail, headers)
        await send(start)
        await send(body)
