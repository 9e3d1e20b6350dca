"""``bonefrac audit verify FILE...``: check the hash chain of ``bonefrac serve --audit-log``.

Exit 0 when every line chains to the one before it (and prints the head hash, to keep
elsewhere as an anchor); exit 1 naming the first file and line where the chain breaks. Give a
rotated series oldest first: ``bonefrac audit verify audit.jsonl.* audit.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

from bonefrac.cli.common import EXIT_OK, CLIError


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="check the hash chain of audit log files",
                       description="check the hash chain of audit log files (oldest first)")
    v.add_argument("files", type=Path, nargs="+", metavar="FILE",
                   help="audit log files, oldest first (rotated ones are FILE.<UTC time>)")


def run(args) -> int:
    from bonefrac.serving.audit import AuditChainError, verify

    try:
        rep = verify(args.files)
    except AuditChainError as e:
        raise CLIError(f"chain broken: {e}") from None
    start = "from the first line ever written" if rep.starts_at_genesis else \
        "continuing an earlier file not given here"
    print(f"ok: {rep.lines} lines in {rep.files} file(s), seq up to {rep.last_seq}, chain "
          f"intact {start}; head sha256 {rep.head}")
    return EXIT_OK
