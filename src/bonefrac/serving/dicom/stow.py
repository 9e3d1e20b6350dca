"""DICOMweb STOW-RS (PS3.18 10.5): POST the result files of one study to ``{url}/studies`` as
one ``multipart/related; type="application/dicom"`` request.

The server's answer says what it stored: 200 (all), 202 (some: the Referenced SOP Sequence
lists what was stored, the Failed SOP Sequence what was not, with a reason), 409 (none). A file
counts as delivered only when listed as stored (or on a 200 without a body); everything else
stays in the outbox for the sender's retries.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from bonefrac.serving.dicom.config import Destination, read_secret

TIMEOUT = 60.0  # seconds for the whole request
# DICOM JSON tags (PS3.18 F.2): Failed SOP Sequence, Referenced SOP Sequence, their members.
FAILED, STORED = "00081198", "00081199"
SOP_INSTANCE, FAILURE_REASON = "00081155", "00081197"


def multipart(files: Sequence[Path]) -> tuple[bytes, str]:
    """The request body holding ``files`` (Part 10 files) and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n"
             % (boundary.encode(), f.read_bytes()) for f in files]
    body = b"".join(parts) + b"--%s--\r\n" % boundary.encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def auth_header(dest: Destination) -> dict[str, str]:
    """``Authorization`` from the destination's token or user:password file (read now)."""
    if dest.token_file is not None:
        return {"Authorization": f"Bearer {read_secret(dest.token_file)}"}
    if dest.basic_auth_file is not None:
        pair = read_secret(dest.basic_auth_file, basic=True).encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
    return {}


def stow(dest: Destination, files: Sequence[Path], context: ssl.SSLContext | None = None
         ) -> tuple[set[str], str]:
    """STOW-RS ``files`` (named ``<SOP Instance UID>.dcm``) to ``dest``: the SOP Instance
    UIDs the server stored, and '' or the first error."""
    body, content_type = multipart(files)
    try:
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json",
                   **auth_header(dest)}
    except ValueError as e:  # the credential file went missing or empty since start-up
        return set(), str(e)
    req = urllib.request.Request(f"{dest.url}/studies", data=body, headers=headers,
                                 method="POST")
    sent = {f.stem for f in files}
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as r:
            status, answer = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, answer = e.code, e.read()
    except (OSError, ValueError) as e:  # refused, timed out, TLS, a malformed reply
        return set(), f"STOW-RS to {dest.url}: {getattr(e, 'reason', None) or e}"
    stored, failed = _parse(answer)
    if status == 200 and not stored and not failed:
        return sent, ""  # a 200 without the (optional) listing: all stored
    stored &= sent
    if stored == sent and status in (200, 202):
        return stored, ""
    why = "; ".join(failed[:3]) or answer[:200].decode(errors="replace").strip()
    return stored, f"STOW-RS to {dest.url}: HTTP {status}, {len(sent - stored)} not " \
                   f"stored ({why or 'no reason given'})"


def _parse(answer: bytes) -> tuple[set[str], list[str]]:
    """(stored SOP Instance UIDs, failures as 'uid: reason') from a DICOM JSON reply."""
    try:
        doc = json.loads(answer) if answer.strip() else {}
    except ValueError:
        return set(), []
    if isinstance(doc, list):  # some servers wrap the dataset in a list
        doc = doc[0] if doc and isinstance(doc[0], dict) else {}
    if not isinstance(doc, dict):
        return set(), []

    def items(tag: str) -> list[dict]:
        return [i for i in (doc.get(tag) or {}).get("Value", []) if isinstance(i, dict)]

    def value(item: dict, tag: str) -> str:
        v = (item.get(tag) or {}).get("Value") or [""]
        return str(v[0])

    stored = {value(i, SOP_INSTANCE) for i in items(STORED)} - {""}
    failed = [f"{value(i, SOP_INSTANCE)}: reason {_hex(value(i, FAILURE_REASON))}"
              for i in items(FAILED)]
    return stored, failed


def _hex(code: str) -> str:
    """A status code as DICOM writes it (0xC000), or as given when it is not a number."""
    return f"0x{int(code):04X}" if code.isdigit() else code or "unknown"
