"""``bonefrac dicom-node``: a DICOM node that a PACS sends studies to and that sends results
(SR, Secondary Captures, GSPS) back by C-STORE or STOW-RS (needs the [dicom-node] extra). Runs
until SIGINT/SIGTERM; what it acknowledged stays in its spool, so a restarted node finishes it."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from bonefrac import DISCLAIMER
from bonefrac.cli.common import EXIT_OK, resolve_model
from bonefrac.cli.extras import require_extra


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, metavar="NODE_TOML",
                   help="the node's TOML file: ae_title, host, port, allowed_callers, "
                        "destinations (C-STORE or STOW-RS url, results), model, "
                        "settle_seconds, spool, optional [tls] (docs/deployment/dicom-node.md)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="log verbosity (stderr)")


def run(args) -> int:
    require_extra("dicom-node", "dicom-node")
    from bonefrac.inference.ensemble import Ensemble
    from bonefrac.serving.dicom.config import load_config
    from bonefrac.serving.dicom.node import DicomNode

    config = load_config(args.config)  # every key checked before the model loads
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("pynetdicom", "highdicom"):  # per-PDU / per-module INFO lines
        logging.getLogger(chatty).setLevel(logging.WARNING)
    ens = Ensemble.load(resolve_model(config.model), threads=1)
    node = DicomNode(config, ens, workers=config.threads)
    done = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: done.set())
    node.start()
    print(f"bonefrac dicom-node: {config.ae_title} on {config.host}:{node.port}, model "
          f"{ens.model_id}, spool {config.spool}; {DISCLAIMER}", file=sys.stderr, flush=True)
    done.wait()
    node.stop()
    print(f"stopped; {node.spool.pending()} instance(s) spooled, {node.sender.pending()} "
          "result(s) in the outbox (a restart continues them)", file=sys.stderr)
    return EXIT_OK
