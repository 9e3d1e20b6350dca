"""``bonefrac serve``: the REST API and web page on one loaded model (needs the [serve] extra)."""

from __future__ import annotations

import ipaddress
import sys

from bonefrac.cli.common import EXIT_OK, CLIError, add_model_arg, resolve_model
from bonefrac.cli.extras import require_extra


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; the default answers this machine only. The "
                        "service has no authentication: expose it only behind one")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    add_model_arg(p)
    p.add_argument("--workers", type=int, default=2,
                   help="predictions run at the same time (threads sharing one model)")
    p.add_argument("--queue", type=int, default=16,
                   help="further requests allowed to wait; beyond that the answer is 503")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    from bonefrac import DISCLAIMER

    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be 1-65535, got {args.port}")
    require_extra("serve", "serve")
    if args.backend == "torch":
        require_extra("train", "serve --backend torch")
    import uvicorn

    from bonefrac.serving import create_app

    upload = int(args.max_upload_mb * 2**20)
    app = create_app(resolve_model(args.model), max_upload_bytes=upload,
                     max_batch_files=args.max_batch_files,
                     max_batch_bytes=upload * args.max_batch_files, workers=args.workers,
                     queue=args.queue, timeout_s=args.timeout, threads=args.threads,
                     backend=args.backend)
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}, reachable from other machines; the service "
              "has no authentication or TLS", file=sys.stderr)
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"bonefrac serve: model {app.state.ensemble.model_id} on http://{url_host}:{args.port}/"
          f"  (API reference: /docs, OpenAPI: /openapi.json)\n{DISCLAIMER}", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_keep_alive=5, server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has already shut down gracefully
        print("bonefrac serve: stopped", file=sys.stderr)
    except SystemExit as e:  # uvicorn exits (code 3) when it cannot bind; it logged why
        if e.code in (0, None):
            raise
        raise CLIError(f"could not listen on {args.host}:{args.port} (see the line above)"
                       ) from None
    return EXIT_OK
