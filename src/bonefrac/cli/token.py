"""``bonefrac token create|list|revoke``: the API tokens ``bonefrac serve --token-file`` accepts.

The token is printed once, on ``create``; the file keeps only a salted hash
(:mod:`bonefrac.serving.auth`), written atomically with mode 0600. Needs no extra.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

from bonefrac.cli.common import EXIT_OK, CLIError


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="make a token and print it (once)",
                            description="make a token and print it (once)")
    create.add_argument("--name", required=True,
                        help="who or what uses it (appears in the audit log; unique)")
    create.add_argument("--expires", type=float, default=None, metavar="DAYS",
                        help="valid for this many days (default: until revoked)")
    lst = sub.add_parser("list", help="the tokens in the file, without their secrets",
                         description="the tokens in the file, without their secrets")
    revoke = sub.add_parser("revoke", help="revoke a token by name (effective at once)",
                            description="revoke a token by name; a running server refuses it "
                                        "from its next request on")
    revoke.add_argument("name", help="the token's name")
    for sp in (create, lst, revoke):
        sp.add_argument("--token-file", type=Path, required=True, metavar="FILE",
                        help="the token file (`bonefrac serve --token-file FILE`)")


def run(args) -> int:
    from bonefrac.serving.auth import TokenFileError, TokenStore

    store = TokenStore(args.token_file)
    try:
        if args.action == "create":
            token, entry = store.create(args.name, args.expires)
            until = f"until {entry.expires}" if entry.expires else "until revoked"
            print(token)
            print(f"token {entry.name!r} ({entry.id}) valid {until}; stored as a salted hash "
                  f"in {args.token_file}. It is shown only now: copy it.",
                  file=sys.stderr)
        elif args.action == "revoke":
            entry = store.revoke(args.name)
            print(f"revoked token {entry.name!r} ({entry.id}) at {entry.revoked}")
        else:
            _print_table(store.entries())
    except TokenFileError as e:
        raise CLIError(str(e)) from None
    return EXIT_OK


def _print_table(entries) -> None:
    if not entries:
        print("no tokens")
        return
    now = dt.datetime.now(dt.UTC)
    rows = [("name", "id", "status", "created", "expires")] + [
        (e.name, e.id, e.status(now), e.created, e.expires or "-") for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
