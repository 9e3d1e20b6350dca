"""The DICOM node's configuration: a TOML file (``bonefrac dicom-node --config node.toml``).

Every key is checked when the file is read, so a typo stops the node before it listens, with
one line naming the key. Example (README, "DICOM node")::

    ae_title = "BONEFRAC"
    host = "0.0.0.0"
    port = 11112
    model = "ensemble"
    spool = "/var/lib/bonefrac/spool"
    settle_seconds = 30

    [allowed_callers]            # calling AE title -> addresses (IPs or networks) it may use
    ORTHANC = ["10.0.0.5"]

    [[destinations]]             # where results (SR, Secondary Captures, GSPS) are sent
    ae_title = "ORTHANC"         # by C-STORE
    host = "10.0.0.5"
    port = 4242
    results = ["sr", "sc", "gsps"]   # the default: all three

    [[destinations]]             # by DICOMweb STOW-RS: POST {url}/studies
    url = "https://pacs.example.org/dicom-web"
    token_file = "/etc/bonefrac/pacs.token"   # or basic_auth_file (one line user:password)
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonefrac import BonefracError

AE_TITLE_MAX = 16  # PS3.5: an AE title is at most 16 characters
# What a destination can receive: the SR, the Secondary Captures, the presentation states.
RESULT_KINDS = ("sr", "sc", "gsps")


class ConfigError(BonefracError, ValueError):
    """A node.toml that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Destination:
    """Where results go: a peer AE by C-STORE (``ae_title``, ``host``, ``port``), or a
    DICOMweb server by STOW-RS (``url``, its base: the node POSTs to ``{url}/studies``)."""

    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False  # reach it over TLS (verified against [tls] ca, else the system CAs)
    url: str = ""
    token_file: Path | None = None  # STOW-RS: "Authorization: Bearer <the file's text>"
    basic_auth_file: Path | None = None  # STOW-RS: one line user:password
    results: tuple[str, ...] = RESULT_KINDS

    @property
    def name(self) -> str:
        """The outbox folder name of this destination."""
        if self.url:
            parts = urllib.parse.urlsplit(self.url)
            digest = hashlib.sha1(self.url.encode()).hexdigest()[:8]
            return f"stowrs@{parts.hostname}_{parts.port or parts.scheme}_{digest}"
        return f"{self.ae_title}@{self.host}_{self.port}"


@dataclass(frozen=True)
class TLSConfig:
    """TLS for incoming associations, and for destinations with ``tls = true``.

    ``cert``/``key``: the node's certificate and key (PEM), also its client certificate
    towards destinations. ``ca``: when set, callers must present a certificate signed by it,
    and destinations are verified against it (else against the system's CAs).
    """

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class NodeConfig:
    """What the node is, who may call it, where results go. Times in seconds."""

    spool: Path
    allowed_callers: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]
    destinations: tuple[Destination, ...] = ()
    ae_title: str = "BONEFRAC"
    host: str = "127.0.0.1"
    port: int = 11112
    model: str = "ensemble"
    settle_seconds: float = 30.0
    max_instance_mb: float = 256.0
    send_retries: int = 5
    retry_seconds: float = 2.0
    log_patient_names: bool = False
    tls: TLSConfig | None = None
    threads: int | None = None

    def caller_allowed(self, ae_title: str, address: str) -> bool:
        """Whether ``ae_title`` (stripped) may associate from ``address`` (an IP)."""
        nets = self.allowed_callers.get(ae_title.strip())
        if not nets:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in nets)


_TOP_KEYS = {"ae_title", "host", "port", "model", "spool", "settle_seconds", "max_instance_mb",
             "log_patient_names", "threads", "allowed_callers", "destinations", "send", "tls"}


def load_config(path: str | os.PathLike) -> NodeConfig:
    """Read and check ``node.toml``; relative paths in it are relative to its folder.

    Raises:
        ConfigError: unreadable TOML, an unknown key, a value of the wrong type or range.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not readable TOML ({e})") from None
    return parse_config(raw, path.parent, str(path))


def parse_config(raw: dict[str, Any], base: Path, where: str = "config") -> NodeConfig:
    """:func:`load_config` on an already parsed TOML table."""
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: "
                          f"{', '.join(sorted(_TOP_KEYS))})")
    if "spool" not in raw:
        raise ConfigError(f"{where}: `spool` (the folder received images wait in) is required")
    send = _table(raw.get("send", {}), "send", {"retries", "retry_seconds"}, where)
    port = _int(raw.get("port", 11112), "port", where, 0, 65535)  # 0: any free port
    return NodeConfig(
        spool=_path(raw["spool"], base, "spool", where),
        allowed_callers=_callers(raw.get("allowed_callers"), where),
        destinations=_destinations(raw.get("destinations"), base, where),
        ae_title=_ae_title(raw.get("ae_title", "BONEFRAC"), "ae_title", where),
        host=_str(raw.get("host", "127.0.0.1"), "host", where),
        port=port,
        model=_str(raw.get("model", "ensemble"), "model", where),
        settle_seconds=_float(raw.get("settle_seconds", 30.0), "settle_seconds", where, 0.0),
        max_instance_mb=_float(raw.get("max_instance_mb", 256.0), "max_instance_mb", where,
                               0.001),
        send_retries=_int(send.get("retries", 5), "send.retries", where, 0, 1000),
        retry_seconds=_float(send.get("retry_seconds", 2.0), "send.retry_seconds", where, 0.0),
        log_patient_names=_bool(raw.get("log_patient_names", False), "log_patient_names", where),
        tls=_tls(raw.get("tls"), base, where),
        threads=(None if raw.get("threads") is None
                 else _int(raw["threads"], "threads", where, 1, 256)))


def _callers(value: Any, where: str) -> dict[str, tuple]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: [allowed_callers] must list at least one calling AE "
                          "title with the addresses it may come from, e.g. ORTHANC = "
                          "[\"10.0.0.5\"]")
    out = {}
    for aet, addrs in value.items():
        _ae_title(aet, "allowed_callers key", where)
        if isinstance(addrs, str):
            addrs = [addrs]
        if not isinstance(addrs, list) or not addrs:
            raise ConfigError(f"{where}: allowed_callers.{aet} must be a list of IP addresses "
                              "or networks")
        try:
            out[aet] = tuple(ipaddress.ip_network(a, strict=False) for a in addrs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: allowed_callers.{aet}: {e}") from None
    return out


def _destinations(value: Any, base: Path, where: str) -> tuple[Destination, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: at least one [[destinations]] table (ae_title, host, "
                          "port) is required: where the results go")
    return tuple(_destination(d, i, base, where) for i, d in enumerate(value))


_DIMSE_KEYS, _STOW_KEYS = {"ae_title", "host", "port", "tls"}, {"url", "token_file",
                                                                 "basic_auth_file"}


def _destination(value: Any, i: int, base: Path, where: str) -> Destination:
    key = f"destinations[{i}]"
    d = _table(value, key, _DIMSE_KEYS | _STOW_KEYS | {"results"}, where)
    results = _results(d.get("results", list(RESULT_KINDS)), f"{key}.results", where)
    if "url" in d:
        return _stow_destination(d, key, results, base, where)
    missing = [k for k in ("ae_title", "host", "port") if k not in d]
    if missing:
        raise ConfigError(f"{where}: {key} lacks {', '.join(missing)} (or a STOW-RS `url`)")
    stray = sorted(set(d) & (_STOW_KEYS - {"url"}))
    if stray:
        raise ConfigError(f"{where}: {key}: {', '.join(stray)} need a STOW-RS `url`")
    return Destination(_ae_title(d["ae_title"], f"{key}.ae_title", where),
                       _str(d["host"], f"{key}.host", where),
                       _int(d["port"], f"{key}.port", where, 1, 65535),
                       _bool(d.get("tls", False), f"{key}.tls", where), results=results)


def _stow_destination(d: dict, key: str, results: tuple[str, ...], base: Path,
                      where: str) -> Destination:
    url = _str(d["url"], f"{key}.url", where).rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: {key}.url {url!r} is not an http(s) URL")
    stray = sorted(set(d) & _DIMSE_KEYS)
    if stray:
        raise ConfigError(f"{where}: {key}: {', '.join(stray)} do not apply to a STOW-RS "
                          "`url` destination")
    if "token_file" in d and "basic_auth_file" in d:
        raise ConfigError(f"{where}: {key}: token_file or basic_auth_file, not both")
    files = {k: _path(d[k], base, f"{key}.{k}", where)
             for k in ("token_file", "basic_auth_file") if k in d}
    for k, p in files.items():
        try:
            read_secret(p, basic=k == "basic_auth_file")
        except ValueError as e:
            raise ConfigError(f"{where}: {key}.{k}: {e}") from None
    return Destination(url=url, results=results, **files)


def read_secret(path: Path, basic: bool = False) -> str:
    """The credential in ``path``: its text without surrounding white space. ``basic``: it
    must be ``user:password``. Read at each send, so a rotated file takes effect at once.

    Raises:
        ConfigError: (a ValueError) unreadable, empty, or (``basic``) without a colon; names
            the file.
    """
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not text or "\n" in text:
        raise ConfigError(f"{path}: must hold one non-empty line")
    if basic and ":" not in text:
        raise ConfigError(f"{path}: must hold user:password")
    return text


def _results(value: Any, key: str, where: str) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value or len(set(value)) != len(value)
            or not set(value) <= set(RESULT_KINDS)):
        raise ConfigError(f"{where}: `{key}` must list some of {', '.join(RESULT_KINDS)}, "
                          f"each once; got {value!r}")
    return tuple(k for k in RESULT_KINDS if k in value)


def _tls(value: Any, base: Path, where: str) -> TLSConfig | None:
    if value is None:
        return None
    t = _table(value, "tls", {"cert", "key", "ca"}, where)
    if "cert" not in t or "key" not in t:
        raise ConfigError(f"{where}: [tls] needs both `cert` and `key`")
    paths = {k: _path(t[k], base, f"tls.{k}", where) for k in t}
    for k, p in paths.items():
        if not p.is_file():
            raise ConfigError(f"{where}: tls.{k} {p}: no such file")
    return TLSConfig(paths["cert"], paths["key"], paths.get("ca"))


def _table(value: Any, key: str, known: set[str], where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: `{key}` must be a table")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in {key}: {', '.join(unknown)}")
    return value


def _str(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: `{key}` must be a non-empty string")
    return value.strip()


def _ae_title(value: Any, key: str, where: str) -> str:
    s = _str(value, key, where)
    if len(s) > AE_TITLE_MAX or not s.isascii() or "\\" in s:
        raise ConfigError(f"{where}: `{key}` {s!r} is not an AE title (at most 16 ASCII "
                          "characters, no backslash)")
    return s


def _int(value: Any, key: str, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: `{key}` must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _float(value: Any, key: str, where: str, lo: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < lo:
        raise ConfigError(f"{where}: `{key}` must be a number >= {lo}, got {value!r}")
    return float(value)


def _bool(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: `{key}` must be true or false, got {value!r}")
    return value


def _path(value: Any, base: Path, key: str, where: str) -> Path:
    p = Path(os.path.expanduser(_str(value, key, where)))
    return p if p.is_absolute() else base / p
