"""``bonefrac audit verify FILE...``: check the hash chain of ``bonefrac serve --audit-log``.

Exit 0 when every line chains to the one before it, printing the line count and the head hash
(to keep elsewhere as an anchor); exit 1 naming the first file and line where the chain
breaks. Give a rotated series oldest first: ``bonefrac audit verify audit.jsonl.* audit.jsonl``.

A chain cut at its end, or with its first lines dropped, is still a chain: ``--expect-head
HASH`` (a head stored earlier, e.g. by a monitoring job or from the server's ``audit head``
log lines) and ``--from-genesis`` (the chain must start at the first record ever written) make
those cases exit 1.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bonefrac.cli.common import EXIT_OK, CLIError


def _sha256_hex(text: str) -> str:
    """An argparse type: a sha256 in hex (as `verify` prints it), lower-cased."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 hex digits, as "
                                         "`bonefrac audit verify` prints the head)")
    return text.lower()


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="check the hash chain of audit log files",
                       description="check the hash chain of audit log files (oldest first)")
    v.add_argument("files", type=Path, nargs="+", metavar="FILE",
                   help="audit log files, oldest first (rotated ones are FILE.<UTC time>)")
    v.add_argument("--expect-head", type=_sha256_hex, default=None, metavar="HASH",
                   help="a head sha256 stored earlier: exit 1 unless that line is still in "
                        "the chain (catches lines cut or edited at the end)")
    v.add_argument("--from-genesis", action="store_true",
                   help="exit 1 unless the chain starts at the first record ever written "
                        "(catches lines dropped at the start, or missing older files)")


def run(args) -> int:
    from bonefrac.serving.audit import AuditChainError, verify

    try:
        rep = verify(args.files, expect_head=args.expect_head, from_genesis=args.from_genesis)
    except AuditChainError as e:
        raise CLIError(f"chain broken: {e}") from None
    except OSError as e:
        raise CLIError(f"{e.filename}: {e.strerror or e}") from None
    start = "from the first line ever written" if rep.starts_at_genesis else \
        f"continuing an earlier file not given here (from seq {rep.first_seq})"
    anchor = "" if rep.anchor_seq is None else \
        f"; expected head found at seq {rep.anchor_seq} ({rep.last_seq - rep.anchor_seq} " \
        "lines after it)"
    print(f"ok: {rep.lines} lines in {rep.files} file(s), seq up to {rep.last_seq}, chain "
          f"intact {start}{anchor}; head sha256 {rep.head}")
    return EXIT_OK
