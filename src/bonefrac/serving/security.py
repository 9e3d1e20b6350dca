"""Who may ask and what was answered: the server's authentication, rate limit, security headers
and audit trail, as two pure ASGI middlewares around the app.

Order of a request through them (outermost first):

1. ``RecordMiddleware``: security headers on every response (CSP allowing only the page's own
   scripts, ``X-Content-Type-Options``, ``Referrer-Policy``, ``Cache-Control: no-store`` on the
   API, HSTS when TLS is on) and, for every ``/v1/`` request, one audit line written *before*
   the answer leaves: if the line cannot be written the client gets 503 instead of an
   unrecorded answer.
2. CORS (Starlette's), only when origins are configured, so preflights never need a token.
3. ``GuardMiddleware`` on ``/v1/``: the Bearer token is checked and the client's rate limit
   spent *before* the body is read, so an unauthenticated client can make the server neither
   spool an upload nor run a model. 400 for two ``Authorization`` headers (which one would
   count is ambiguous), 429 + ``Retry-After`` over the limit (per token name, per address
   without a valid token), then 401 + ``WWW-Authenticate`` without a valid token, then 429
   when the client already has ``client_concurrency`` requests in flight (one token cannot
   take every upload or queue place the server has).

The web page, ``/static``, ``/docs``, ``/openapi.json`` and ``/healthz`` (the liveness probe,
which then answers only ``{"status": "ok"}``) stay public: they hold no patient data; each
address may have ``public_concurrency`` requests on them in flight at once.

The audit trail stays bounded under a flood of refused requests: a path is recorded to
``ENDPOINT_MAX`` characters (with its full length), and refusals (400/401/429 from the guard)
are recorded per (address or token, auth, status) and ``refusal_interval_s``: the first one in
full, the rest of that interval as one ``"event": "refused"`` line with their ``count``
(``RefusalDigest``). The address is the TCP peer's; uvicorn's proxy headers are honoured only
from ``bonefrac serve --trusted-proxy`` peers (``serving.server``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bonefrac import InputError
from bonefrac.serving.audit import AuditLog, now_iso
from bonefrac.serving.auth import TokenFileError, TokenStore
from bonefrac.serving.limits import json_error
from bonefrac.serving.ratelimit import ConcurrencyLimiter, RateLimiter
from bonefrac.serving.uploads import sniff

log = logging.getLogger("bonefrac.serving")

API_PREFIX = "/v1/"
CLIENT_KEY = "bonefrac.client"  # scope: the token's name once authenticated
AUTH_KEY = "bonefrac.auth"  # scope: off | token | missing | invalid
AUDIT_KEY = "bonefrac.audit"  # scope: per-request fields the handlers add (files)
REFUSED_KEY = "bonefrac.refused"  # scope: set when the guard refused the request
ENDPOINT_MAX = 256  # characters of a path kept in the audit log
# The page and the docs load nothing from elsewhere and run no inline script.
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer", "x-frame-options": "DENY"}
HSTS = "max-age=31536000"
# DICOM attributes that identify a patient or study: audited only with --audit-phi.
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
            "StudyInstanceUID", "StudyDate")
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:/[^\s/'\"():,;]+)+/([^\s/'\"():,;]*)")


@dataclass(frozen=True)
class SecurityConfig:
    """The security settings of one app (``bonefrac serve`` options).

    token_file: token store; None: no authentication. audit_log: JSON-lines file; None: no
    audit. audit_phi: also log file names and DICOM patient fields. rate_per_minute /
    rate_burst: per-client limit (None: off, the library default; ``bonefrac serve`` turns
    it on with 600 per minute, bursts of 60). cors_origins: origins allowed to call the API
    from a browser (empty: CORS off). hsts: send Strict-Transport-Security (TLS is on).
    audit_keep: rotated audit files kept (None: all). audit_anchor_every: log the audit head
    every that many lines (0: never). client_concurrency / public_concurrency: requests in
    flight at once per token (per address without one) on ``/v1``, and per address on the
    public routes (None: no limit, the library default; ``bonefrac serve``: 8 and 16).
    refusal_interval_s: the window over which refused requests are counted in one line."""

    token_file: Path | None = None
    audit_log: Path | None = None
    audit_phi: bool = False
    audit_max_bytes: int = 64 * 2**20
    audit_keep: int | None = None
    audit_anchor_every: int = 0
    rate_per_minute: float | None = None
    rate_burst: int = 60
    client_concurrency: int | None = None
    public_concurrency: int | None = None
    refusal_interval_s: float = 60.0
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    hsts: bool = False

    def __post_init__(self):
        """The rules ``bonefrac serve`` enforces on its options, so that ``create_app()``
        cannot be given a configuration the CLI would refuse (``InputError``, one line)."""
        if self.token_file is not None and not Path(self.token_file).is_file():
            raise InputError(f"token_file {self.token_file}: no such file (make it with "
                             "`bonefrac token create`)")
        if self.rate_per_minute is not None and not self.rate_per_minute > 0:
            raise InputError("rate_per_minute must be > 0 (None: no rate limit)")
        if self.rate_burst < 1 or self.audit_max_bytes < 4096:
            raise InputError("rate_burst must be >= 1 and audit_max_bytes >= 4096")
        if any(v is not None and v < 1 for v in (self.client_concurrency,
                                                  self.public_concurrency)):
            raise InputError("client_concurrency and public_concurrency must be >= 1 (None: "
                             "no limit)")
        if (self.audit_keep is not None and self.audit_keep < 0) or self.audit_anchor_every < 0:
            raise InputError("audit_keep and audit_anchor_every must be >= 0")
        if not self.refusal_interval_s > 0:
            raise InputError("refusal_interval_s must be > 0 seconds")
        if not all(isinstance(o, str) and o for o in self.cors_origins):
            raise InputError("cors_origins must be non-empty strings")


def scrub_paths(text: str) -> str:
    """Absolute paths in a message -> their last component (no server layout in answers)."""
    return _ABS_PATH.sub(lambda m: m.group(1) or "<path>", text)


def _bearer(values: list[bytes]) -> str | None:
    """The token of the ``Authorization: Bearer`` header value (one at most); '' for another
    scheme; None if absent."""
    if not values:
        return None
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _remote(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class GuardMiddleware:
    """Bearer authentication, the rate limit and the concurrency limits (see the module
    docstring)."""

    def __init__(self, app: ASGIApp, *, store: TokenStore | None,
                 limiter: RateLimiter | None, clients: ConcurrencyLimiter | None = None,
                 public: ConcurrencyLimiter | None = None):
        """``clients``: in-flight limit per token (address without one) on ``/v1``;
        ``public``: per address on the other routes."""
        self.app, self.store, self.limiter = app, store, limiter
        self.clients, self.public = clients, public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not scope["path"].startswith(API_PREFIX):
            await self._limited(self.public, f"addr:{_remote(scope)}", scope, receive, send)
            return
        key = await self._admit(scope, send)
        if key is not None:
            await self._limited(self.clients, key, scope, receive, send)

    async def _admit(self, scope: Scope, send: Send) -> str | None:
        """Authenticate and rate-limit one ``/v1`` request: the client's key, or None once a
        refusal was sent."""
        auths = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(auths) > 1:
            scope[REFUSED_KEY], scope[AUTH_KEY] = True, "invalid"
            await _reply(send, 400, f"{len(auths)} Authorization headers sent; send one")
            return None
        token = _bearer(auths) if self.store else None
        entry = None
        if self.store is not None and token:
            try:
                entry = self.store.verify(token)
            except TokenFileError as e:  # fail closed: nobody gets in on a broken file
                log.error("%s", e)
                await _reply(send, 503, "the server's token file is unreadable; see its log")
                return None
        auth = "off" if self.store is None else "token" if entry else \
            "missing" if token is None else "invalid"
        scope[AUTH_KEY] = auth
        if entry:
            scope[CLIENT_KEY] = entry.name
        key = f"token:{entry.name}" if entry else f"addr:{_remote(scope)}"
        wait = self.limiter.take(key) if self.limiter else 0.0
        if wait:
            scope[REFUSED_KEY] = True
            await _reply(send, 429, f"rate limit: at most {self.limiter.burst:g} requests at "
                                    f"once and {self.limiter.rate * 60:g} per minute; retry "
                                    "after Retry-After seconds",
                         {"Retry-After": RateLimiter.retry_after(wait)})
            return None
        if auth in ("missing", "invalid"):
            scope[REFUSED_KEY] = True
            await _reply(send, 401, *_unauthorized(auth))
            return None
        return key

    async def _limited(self, limit: ConcurrencyLimiter | None, key: str, scope: Scope,
                       receive: Receive, send: Send) -> None:
        """Run the request within ``key``'s in-flight limit (429 over it)."""
        if limit is None:
            await self.app(scope, receive, send)
            return
        if not limit.acquire(key):
            scope[REFUSED_KEY] = True
            who = "token" if key.startswith("token:") else "address"
            await _reply(send, 429, f"this {who} has {limit.limit} requests in flight "
                                    "already (the most at once); retry when one is answered",
                         {"Retry-After": "1"})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            limit.release(key)


def _unauthorized(auth: str) -> tuple[str, dict[str, str]]:
    """(detail, headers) of a 401 for a missing or an invalid token (RFC 6750)."""
    if auth == "missing":
        return ("this server needs an API token: send 'Authorization: Bearer TOKEN' (tokens "
                "come from `bonefrac token create`)",
                {"WWW-Authenticate": 'Bearer realm="bonefrac"'})
    return ("invalid, expired or revoked API token",
            {"WWW-Authenticate": 'Bearer realm="bonefrac", error="invalid_token"'})


async def _reply(send: Send, status: int, detail: str, headers: dict | None = None) -> None:
    start, body = json_error(status, detail, headers)
    await send(start)
    await send(body)


BEARER = HTTPBearer(auto_error=False, description="an API token from `bonefrac token create`; "
                    "needed when the server runs with --token-file")


async def require_client(
        request: Request,
        _: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> str | None:
    """Route dependency of every ``/v1/`` route: the token name ``GuardMiddleware`` accepted
    (None: authentication off). It also declares the Bearer scheme in the OpenAPI document,
    and refuses the request should the route ever be reached around the middleware."""
    cfg: SecurityConfig = request.app.state.security
    if cfg.token_file is not None and CLIENT_KEY not in request.scope:
        detail, headers = _unauthorized("missing")
        raise HTTPException(401, detail, headers=headers)
    return request.scope.get(CLIENT_KEY)


class RefusalDigest:
    """Refused requests, recorded in bounded form (see the module docstring).

    Per key (address or token, auth, status), the first refusal of each ``interval_s`` window
    is written in full and the rest are counted; when the window is over, one summary line
    (``"event": "refused"``, ``count``, ``since``, ``until``) stands for them. Beyond
    ``max_keys`` open windows, new keys share one window per (auth, status) with remote
    ``"*"``, so a flood from many addresses is bounded too. Lives on the event loop."""

    def __init__(self, interval_s: float = 60.0, max_keys: int = 1000):
        if interval_s <= 0 or max_keys < 1:
            raise ValueError("refusal digest: interval_s must be > 0 and max_keys >= 1")
        self.interval_s, self.max_keys = interval_s, max_keys
        self._open: dict[tuple, dict] = {}  # key -> {"start", "count", "since", "until", ...}

    def note(self, rec: dict, now: float) -> tuple[bool, list[dict]]:
        """Count the refusal ``rec`` (an audit record) at loop time ``now``: (whether to write
        it in full, the summary lines now due)."""
        due = self.due(now)
        key = (rec["remote"], rec["client"], rec["auth"], rec["status"])
        if key not in self._open and len(self._open) >= self.max_keys:
            key = ("*", None, rec["auth"], rec["status"])
        win = self._open.get(key)
        if win is None:
            self._open[key] = {"start": now, "count": 0, "since": None, "until": None,
                               "remote": key[0], "client": key[1], "auth": key[2],
                               "status": key[3]}
            return True, due
        win["count"] += 1
        win["since"] = win["since"] or rec["time"]
        win["until"] = rec["time"]
        return False, due

    def due(self, now: float | None = None) -> list[dict]:
        """Summary lines of the windows over at ``now`` (None: all of them, at shutdown);
        those windows are closed."""
        over = [k for k, w in self._open.items()
                if now is None or now - w["start"] >= self.interval_s]
        out = []
        for k in over:
            w = self._open.pop(k)
            if w["count"]:
                out.append({"event": "refused", "remote": w["remote"], "client": w["client"],
                            "auth": w["auth"], "status": w["status"], "count": w["count"],
                            "since": w["since"], "until": w["until"]})
        return out


class RecordMiddleware:
    """Security headers on every response and an audit line per ``/v1/`` request."""

    def __init__(self, app: ASGIApp, *, audit: AuditLog | None, hsts: bool, model: dict,
                 refusals: RefusalDigest | None = None):
        """``model``: ``model_id`` and ``model_fingerprint`` for every audit line;
        ``refusals``: where refused requests are counted (None: each gets its own line)."""
        self.app, self.audit, self.model, self.refusals = app, audit, model, refusals
        self.headers = {**HEADERS, **({"strict-transport-security": HSTS} if hsts else {})}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith(API_PREFIX)
        audited = api and self.audit is not None
        t0 = asyncio.get_running_loop().time()
        arrived = now_iso()
        state = {"started": False, "drop": False}

        async def send_wrapper(msg: Message) -> None:
            if state["drop"]:
                return
            if msg["type"] == "http.response.start":
                state["started"] = True
                headers = MutableHeaders(scope=msg)
                for k, v in self.headers.items():
                    headers.setdefault(k, v)
                if api:
                    headers.setdefault("cache-control", "no-store")
                if audited and not await self._record(scope, msg["status"], t0, arrived):
                    state["drop"] = True  # answer 503 instead of an unrecorded answer
                    start, body = json_error(503, "the audit log cannot be written; the "
                                                  "request was not answered (see the log)")
                    MutableHeaders(scope=start).update(self.headers)
                    await send(start)
                    await send(body)
                    return
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if audited and not state["started"]:
                await self._record(scope, 500, t0, arrived)
            raise

    async def _record(self, scope: Scope, status: int, t0: float, arrived: str) -> bool:
        """Write the request's audit line (off the event loop), or count it when it is a
        repeated refusal, with the refusal summaries now due; False if writing failed."""
        now = asyncio.get_running_loop().time()
        path = scope["path"]
        rec = {"time": arrived, "client": scope.get(CLIENT_KEY),
               "auth": scope.get(AUTH_KEY, "off"), "remote": _remote(scope),
               "method": scope["method"], "endpoint": path[:ENDPOINT_MAX], "status": status,
               "latency_ms": round((now - t0) * 1000, 1), **self.model,
               **scope.get(AUDIT_KEY, {})}
        if len(path) > ENDPOINT_MAX:
            rec["endpoint_chars"] = len(path)
        if self.refusals is None:
            return await write_audit(self.audit, [rec])
        if scope.get(REFUSED_KEY):
            full, due = self.refusals.note(rec, now)
            return await write_audit(self.audit, due + ([rec] if full else []))
        return await write_audit(self.audit, self.refusals.due(now) + [rec])


async def write_audit(audit: AuditLog, records: list[dict]) -> bool:
    """Append ``records`` to ``audit`` off the event loop; False (logged) if writing failed."""
    if not records:
        return True
    try:
        await run_in_threadpool(lambda: [audit.append(r) for r in records])
        return True
    except (OSError, ValueError) as e:
        log.error("audit log %s: %s", audit.path, e)
        return False


async def flush_refusals(audit: AuditLog, refusals: RefusalDigest, every_s: float) -> None:
    """Write the refusal summaries as their windows end (a task for the app's life; at
    shutdown the app writes the rest, ``refusals.due(None)``)."""
    while True:
        await asyncio.sleep(every_s)
        await write_audit(audit, refusals.due(asyncio.get_running_loop().time()))


# ------------------------------------------------------------------- per-file audit fields
def _digest(f: BinaryIO) -> tuple[str, int]:
    """(sha256 hex, bytes) of a seekable upload; the read position is left at the start."""
    f.seek(0)
    h, n = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
        n += len(chunk)
    f.seek(0)
    return h.hexdigest(), n


def dicom_phi(f: BinaryIO) -> dict[str, str]:
    """The ``PHI_TAGS`` of a DICOM upload (header only, no pixels); {} if not DICOM or unread."""
    f.seek(0)
    head = f.read(132)
    f.seek(0)
    if sniff(head) != "DICOM":
        return {}
    try:
        import pydicom

        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(PHI_TAGS))
        return {k: str(ds[k].value) for k in PHI_TAGS if k in ds}
    except Exception:  # an unreadable header is logged without its fields, never fatal
        return {}
    finally:
        f.seek(0)


def _file_fields(name: str, f: BinaryIO, phi: bool) -> dict:
    sha, size = _digest(f)
    out = {"sha256": sha, "bytes": size}
    if phi:
        out = {"file": name, **out, **dicom_phi(f)}
    return out


async def audit_uploads(request: Request, items: list[tuple[str, BinaryIO]]) -> None:
    """Note each upload's sha256 and size (and, with ``audit_phi``, name and DICOM patient
    fields) for the request's audit line; nothing when auditing is off."""
    cfg: SecurityConfig = request.app.state.security
    if cfg.audit_log is None:
        return
    files = await run_in_threadpool(
        lambda: [_file_fields(name, f, cfg.audit_phi) for name, f in items])
    request.scope[AUDIT_KEY] = {"files": files}


def audit_results(request: Request, rows: list[dict], errors: list[dict]) -> None:
    """Add P(fracture), decision and threshold (or the error status) to each noted file."""
    files = request.scope.get(AUDIT_KEY, {}).get("files")
    if files is None:
        return
    for r in rows:
        files[r["index"]].update(status=200, prob_fractured=r["prob_fractured"],
                                 decision=r["decision"], threshold=r["threshold"])
    for e in errors:
        files[e["index"]].update(status=e["status"])
