"""``bonefrac serve``: the REST API and web page on one loaded model (needs the [serve] extra).

Security (``bonefrac.serving.security``): ``--token-file`` turns on Bearer tokens for every
``/v1/`` route, ``--tls-cert/--tls-key`` HTTPS (uvicorn's own TLS, with HSTS), ``--audit-log``
a hash-chained record of every API request. A non-loopback ``--host`` needs a token file
unless ``--insecure-no-auth`` says otherwise. The port is bound before the model is loaded, so
a busy port is a one-line error (exit 1); the uvicorn settings are ``serving.server``'s.
"""

from __future__ import annotations

import argparse
import ipaddress
import ssl
import sys
from pathlib import Path

from bonefrac.cli.common import EXIT_OK, CLIError, add_model_arg, resolve_model
from bonefrac.cli.extras import require_extra


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; the default answers this machine only. Any "
                        "other address needs --token-file (or --insecure-no-auth)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    add_model_arg(p)
    p.add_argument("--workers", type=int, default=2,
                   help="predictions run at the same time (threads sharing one model)")
    p.add_argument("--queue", type=int, default=16,
                   help="further requests allowed to wait; beyond that the answer is 503")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--body-idle-timeout", type=float, default=10.0, metavar="S",
                   help="longest pause within an upload (408 beyond); an upload is read "
                        "whole before it takes a worker or queue place")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest file accepted")
    p.add_argument("--max-batch-files", type=int, default=16,
                   help="most files in one /v1/predict/batch request")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads per prediction (default: CPUs / workers)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"],
                   help="onnx: ONNX Runtime; torch: PyTorch (needs [train]); auto: ONNX where "
                        "the model has an export, else torch")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="server log verbosity")
    add_security_arguments(p)


def add_security_arguments(p) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help="require 'Authorization: Bearer TOKEN' on every /v1 route, checked "
                        "against this file (made by `bonefrac token create`; re-read when it "
                        "changes, so revoking needs no restart)")
    g.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --token-file")
    g.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                   help="serve HTTPS with this certificate (chain) file; needs --tls-key")
    g.add_argument("--tls-key", type=Path, default=None, metavar="PEM",
                   help="the certificate's private key (PEM, unencrypted)")
    g.add_argument("--audit-log", type=Path, default=None, metavar="FILE",
                   help="append one hash-chained JSON line per API request (check it with "
                        "`bonefrac audit verify`); no pixels, file names or patient fields")
    g.add_argument("--audit-phi", action="store_true",
                   help="also log file names and DICOM patient/study fields (PatientName, "
                        "PatientID, ...): only where your ethics approval allows it")
    g.add_argument("--audit-max-mb", type=float, default=64.0, metavar="MB",
                   help="rotate the audit log to FILE.<UTC time> beyond this size")
    g.add_argument("--audit-keep", type=int, default=None, metavar="N",
                   help="keep only the N newest rotated audit files, deleting older ones at "
                        "rotation (disk use at most (N + 1) x --audit-max-mb); default: keep "
                        "all")
    g.add_argument("--audit-anchor-every", type=int, default=1000, metavar="N",
                   help="every N audit lines, write the chain's head (seq and sha256) to the "
                        "server log, to anchor it elsewhere (`bonefrac audit verify "
                        "--expect-head`); 0: never")
    g.add_argument("--rate-limit", type=float, default=600.0, metavar="PER_MIN",
                   help="requests per minute per token (per address without one); 0: off")
    g.add_argument("--rate-burst", type=int, default=60, metavar="N",
                   help="requests a client may send at once before --rate-limit applies")
    g.add_argument("--client-concurrency", type=int, default=8, metavar="N",
                   help="API requests one token (one address without tokens) may have in "
                        "flight at once; beyond that 429; 0: no limit")
    g.add_argument("--public-concurrency", type=int, default=16, metavar="N",
                   help="requests one address may have in flight at once on the page, "
                        "/docs and /healthz; 0: no limit")
    g.add_argument("--trusted-proxy", action="append", default=[], type=_proxy_address,
                   metavar="ADDR",
                   help="a reverse proxy's address or network (e.g. 10.0.0.5, 10.0.0.0/24) "
                        "whose X-Forwarded-For / -Proto headers are believed; repeat for "
                        "several; default: none (the TCP peer is the client)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://viewer.example.org) call "
                        "the API; repeat for several; default: CORS off")


def _proxy_address(text: str) -> str:
    """An argparse type: an IP address or network (no '*': trusting every peer is the
    spoofing this option exists to prevent)."""
    try:
        return str(ipaddress.ip_network(text, strict=False)) if "/" in text else \
            str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or network "
                                         "(e.g. 10.0.0.5 or 10.0.0.0/24)") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(args) -> None:
    """Refuse unsafe or broken security options before the model is loaded."""
    if not _is_loopback(args.host) and args.token_file is None and not args.insecure_no_auth:
        raise CLIError(f"--host {args.host} is reachable from other machines: give "
                       "--token-file (see `bonefrac token create`), or --insecure-no-auth to "
                       "serve without authentication")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CLIError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None:
        try:  # the files uvicorn will load, checked now for a one-line reason
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CLIError(f"TLS certificate {args.tls_cert} / key {args.tls_key}: "
                           f"{reason}") from None
    if args.token_file is not None:
        if not args.token_file.is_file():
            raise CLIError(f"--token-file {args.token_file}: no such file (make it with "
                           f"`bonefrac token create --token-file {args.token_file} --name "
                           "NAME`)")
        _check_token_file(args.token_file)
    if args.rate_limit < 0 or args.rate_burst < 1:
        raise CLIError("--rate-limit must be >= 0 and --rate-burst >= 1")
    if args.audit_max_mb * 2**20 < 4096:
        raise CLIError("--audit-max-mb must be at least 0.004 (4 KiB)")
    if min(args.client_concurrency, args.public_concurrency, args.audit_anchor_every) < 0 \
            or (args.audit_keep is not None and args.audit_keep < 0):
        raise CLIError("--client-concurrency, --public-concurrency, --audit-keep and "
                       "--audit-anchor-every must be >= 0")
    if not args.body_idle_timeout > 0:
        raise CLIError("--body-idle-timeout must be > 0 seconds")


def _check_token_file(path: Path) -> None:
    from bonefrac.serving.auth import TokenFileError, TokenStore

    try:
        entries = TokenStore(path).entries()
    except TokenFileError as e:
        raise CLIError(str(e)) from None
    if not any(e.status() == "active" for e in entries):
        print(f"warning: {path} has no active token: every API request will get 401",
              file=sys.stderr)
    if path.stat().st_mode & 0o077:
        print(f"warning: {path} is readable by others; chmod 600 it", file=sys.stderr)


def security_config(args):
    from bonefrac.serving.security import SecurityConfig

    return SecurityConfig(
        token_file=args.token_file, audit_log=args.audit_log, audit_phi=args.audit_phi,
        audit_max_bytes=int(args.audit_max_mb * 2**20), audit_keep=args.audit_keep,
        audit_anchor_every=args.audit_anchor_every,
        rate_per_minute=args.rate_limit or None, rate_burst=args.rate_burst,
        client_concurrency=args.client_concurrency or None,
        public_concurrency=args.public_concurrency or None,
        cors_origins=tuple(args.cors_origin), hsts=args.tls_cert is not None)


def run(args) -> int:
    from bonefrac import DISCLAIMER

    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be 1-65535, got {args.port}")
    require_extra("serve", "serve")
    if args.backend == "torch":
        require_extra("train", "serve --backend torch")
    check_security(args)
    from bonefrac.serving import create_app
    from bonefrac.serving.server import listen, serve, server_config

    try:  # before the model loads: a busy port fails at once, before any URL is printed
        sock = listen(args.host, args.port)
    except OSError as e:
        raise CLIError(f"could not listen on {args.host}:{args.port}: "
                       f"{e.strerror or e}") from None
    with sock:
        upload = int(args.max_upload_mb * 2**20)
        app = create_app(resolve_model(args.model), max_upload_bytes=upload,
                         max_batch_files=args.max_batch_files,
                         max_batch_bytes=upload * args.max_batch_files, workers=args.workers,
                         queue=args.queue, timeout_s=args.timeout,
                         body_idle_s=args.body_idle_timeout, threads=args.threads,
                         backend=args.backend, security=security_config(args))
        config = server_config(app, args.host, args.port, log_level=args.log_level,
                               tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
                               trusted_proxies=args.trusted_proxy)
        _log_audit_anchors(args)
        _warn_exposure(args)
        _print_banner(args, app.state.ensemble.model_id, DISCLAIMER)
        try:
            serve(config, sock)
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has already shut down gracefully
            print("bonefrac serve: stopped", file=sys.stderr)
        except SystemExit as e:  # uvicorn exits (code 3) when its start fails; it logged why
            if e.code in (0, None):
                raise
            raise CLIError("the server could not start (see the line above)") from None
    return EXIT_OK


def _print_banner(args, model_id: str, disclaimer: str) -> None:
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    scheme = "https" if args.tls_cert else "http"
    auth = f"tokens from {args.token_file}" if args.token_file else "no authentication"
    proxies = f"; proxy headers from {', '.join(args.trusted_proxy)}" if args.trusted_proxy \
        else ""
    print(f"bonefrac serve: model {model_id} on {scheme}://{url_host}:{args.port}/  ({auth}"
          f"{proxies}; API reference: /docs, OpenAPI: /openapi.json)\n{disclaimer}",
          flush=True)


def _log_audit_anchors(args) -> None:
    """Send the audit log's head anchors (``bonefrac.audit`` at INFO) to stderr, the server
    log, whatever --log-level says about uvicorn's own lines."""
    if args.audit_log is None or not args.audit_anchor_every:
        return
    import logging

    logger = logging.getLogger("bonefrac.audit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s bonefrac: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _warn_exposure(args) -> None:
    if _is_loopback(args.host):
        return
    if args.token_file is None:
        print(f"warning: listening on {args.host}, reachable from other machines, WITHOUT "
              "authentication (--insecure-no-auth)", file=sys.stderr)
    if args.tls_cert is None:
        print(f"warning: listening on {args.host} without TLS: tokens and images cross the "
              "network in clear text (give --tls-cert/--tls-key, or put a TLS proxy in front)",
              file=sys.stderr)
