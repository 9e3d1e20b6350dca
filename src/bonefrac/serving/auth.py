"""API tokens for ``bonefrac serve``: a JSON file of salted hashes, never the tokens themselves.

A token is ``bf_<id>_<secret>``: ``id`` (12 hex digits) names the entry to check, ``secret`` is
32 random bytes (urlsafe base64). The file stores, per token, its name, id, a random salt,
``sha256(salt + secret)``, when it was made, when it expires and whether it was revoked.

Why a salted SHA-256 and not scrypt/PBKDF2: slow hashes protect *low-entropy* secrets
(passwords) against guessing; a 256-bit random secret cannot be guessed whatever the hash
costs, so a slow hash would only add ~50 ms of CPU to every request (and hand anyone who sends
wrong tokens a cheap way to load the server). The salt keeps equal tokens from having equal
hashes across stores and rules out precomputed tables. Hashes are compared in constant time
(``hmac.compare_digest``), and an unknown id costs the same hash and compare as a known one.

The server re-reads the file when it changes on disk, so ``bonefrac token revoke`` takes effect
on the next request without a restart. Writes are atomic (temporary file + rename, mode 0600)
under an advisory lock, so two ``bonefrac token create`` at once lose neither token.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bonefrac import BonefracError, InputError
from bonefrac.utils import atomic_write

PREFIX = "bf_"
ID_HEX = 12
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
TOKEN_RE = re.compile(rf"{PREFIX}(?P<id>[0-9a-f]{{{ID_HEX}}})_(?P<secret>[A-Za-z0-9_-]{{16,256}})")
FORMAT_VERSION = 1


class TokenFileError(BonefracError, ValueError):
    """A token file that cannot be read or used, or a bad request to change it."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    """One token as stored (the secret itself is not kept). Times are ISO 8601 UTC."""

    name: str
    id: str
    salt: str  # 16 random bytes, hex
    hash: str  # sha256(salt + secret), hex
    created: str
    expires: str | None = None
    revoked: str | None = None

    def status(self, now: dt.datetime | None = None) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked:
            return "revoked"
        if self.expires and parse_iso(self.expires) <= (now or utc_now()):
            return "expired"
        return "active"


def split_token(token: str) -> tuple[str, str] | None:
    """``bf_<id>_<secret>`` -> (id, secret), or None if it does not have that shape."""
    m = TOKEN_RE.fullmatch(token)
    return (m["id"], m["secret"]) if m else None


class TokenStore:
    """The token file at ``path``: read, verify and change it (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._entries: dict[str, TokenEntry] = {}
        self._dummy = TokenEntry("", "0" * ID_HEX, secrets.token_hex(16), "0" * 64, "")

    # ------------------------------------------------------------------------ reading
    def entries(self) -> list[TokenEntry]:
        """Every token in the file (a missing file has none); re-read when the file changed.

        Raises:
            TokenFileError: the file is not a bonefrac token file.
        """
        return list(self._by_id().values())

    def _by_id(self) -> dict[str, TokenEntry]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            st = None
        stamp = st and (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._entries = {e.id: e for e in self._read()} if st else {}
                self._stamp = stamp
            return self._entries

    def _read(self) -> list[TokenEntry]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("format") != "bonefrac-tokens" or doc.get("version") != FORMAT_VERSION:
                raise InputError("not a bonefrac token file (format/version)")
            return [TokenEntry(**e) for e in doc["tokens"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise TokenFileError(f"token file {self.path}: {reason}") from None

    def verify(self, token: str, now: dt.datetime | None = None) -> TokenEntry | None:
        """The active entry ``token`` belongs to, or None (unknown, wrong, expired, revoked).

        Costs one SHA-256 and one constant-time compare whether or not the id is known."""
        tid, secret = split_token(token) or ("", token)
        entry = self._by_id().get(tid)
        ref = entry or self._dummy
        ok = hmac.compare_digest(_digest(ref.salt, secret), ref.hash)
        if entry is None or not ok or entry.status(now) != "active":
            return None
        return entry

    # ------------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _editing(self) -> Iterator[list[TokenEntry]]:
        """Lock the file, yield its entries for changing in place, write them back atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read() if self.path.exists() else []
            yield entries
            doc = {"format": "bonefrac-tokens", "version": FORMAT_VERSION,
                   "tokens": [asdict(e) for e in entries]}
            with atomic_write(self.path, private=True) as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
        finally:
            os.close(fd)

    def create(self, name: str, expires_days: float | None = None) -> tuple[str, TokenEntry]:
        """Add a token called ``name``; returns (the token, to show once, and its entry).

        Raises:
            TokenFileError: a bad or already used name, or a non-positive expiry.
        """
        if not NAME_RE.fullmatch(name):
            raise TokenFileError(f"token name {name!r}: use 1-64 letters, digits or ._@- "
                                 "(it appears in the audit log)")
        if expires_days is not None and not expires_days > 0:
            raise TokenFileError(f"--expires must be > 0 days, got {expires_days:g}")
        now = utc_now()
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        with self._editing() as entries:
            if any(e.name == name for e in entries):
                raise TokenFileError(f"a token named {name!r} exists already in {self.path} "
                                     "(names stay unique so the audit log stays unambiguous; "
                                     "pick another)")
            tid = secrets.token_hex(ID_HEX // 2)
            entry = TokenEntry(name=name, id=tid, salt=salt, hash=_digest(salt, secret),
                               created=iso(now), expires=None if expires_days is None else
                               iso(now + dt.timedelta(days=expires_days)))
            entries.append(entry)
        return f"{PREFIX}{tid}_{secret}", entry

    def revoke(self, name: str) -> TokenEntry:
        """Mark the token ``name`` revoked (kept in the file, so the audit log stays readable).

        Raises:
            TokenFileError: no such token, or it was revoked already.
        """
        with self._editing() as entries:
            for i, e in enumerate(entries):
                if e.name == name:
                    if e.revoked:
                        raise TokenFileError(f"token {name!r} was revoked already ({e.revoked})")
                    entries[i] = TokenEntry(**{**asdict(e), "revoked": iso(utc_now())})
                    return entries[i]
        raise TokenFileError(f"no token named {name!r} in {self.path}")
