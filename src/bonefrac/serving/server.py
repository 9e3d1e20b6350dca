"""The uvicorn server around the app, as ``bonefrac serve`` runs it (needs the [serve] extra).

- The listening socket is bound first (:func:`listen`), so a busy port fails before the model
  is loaded or any URL printed, and uvicorn serves on that very socket (no second bind).
- Proxy headers (``X-Forwarded-For`` / ``-Proto``) are off unless ``trusted_proxies`` names
  the peers that set them: uvicorn's own default trusts them from 127.0.0.1, which lets any
  local client (or a TCP-mode proxy that does not set the header) choose the address the rate
  limit and the audit log see.
- The access log writes paths without their query strings (:class:`StripQuery`): a token or
  anything else sent as ``?access_token=...`` never lands in the server log.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import uvicorn

ACCESS_LOGGER = "uvicorn.access"


class StripQuery(logging.Filter):
    """Drops the query string from uvicorn's access-log lines (their third argument is the
    path with the query, ``'%s - "%s %s HTTP/%s" %d'``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def strip_access_queries() -> None:
    """Install :class:`StripQuery` on uvicorn's access logger (once)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, StripQuery) for f in logger.filters):
        logger.addFilter(StripQuery())


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (as uvicorn binds: SO_REUSEADDR, IPv6 for an
    address with ':'), for :func:`serve`.

    Raises:
        OSError: the address is in use, not this machine's, or not allowed.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def server_config(app, host: str, port: int, *, log_level: str = "info",
                  tls: tuple[Path, Path] | None = None,
                  trusted_proxies: Sequence[str] = ()) -> uvicorn.Config:
    """The uvicorn configuration of ``bonefrac serve``: proxy headers only from
    ``trusted_proxies`` (addresses or networks, e.g. ``10.0.0.5``, ``10.0.0.0/24``), HTTPS
    with ``tls`` = (certificate, key), no ``Server`` header, query strings kept out of the
    access log."""
    tls_kw = {"ssl_certfile": os.fspath(tls[0]), "ssl_keyfile": os.fspath(tls[1])} if tls \
        else {}
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_keep_alive=5, server_header=False,
                            proxy_headers=bool(trusted_proxies),
                            forwarded_allow_ips=list(trusted_proxies) or None, **tls_kw)
    strip_access_queries()  # after Config, which (re)configures uvicorn's loggers
    return config


def serve(config: uvicorn.Config, sock: socket.socket) -> None:
    """Run uvicorn with ``config`` on the bound ``sock`` until it is stopped."""
    uvicorn.Server(config).run(sockets=[sock])
