"""Tools for testing bonefrac and measuring it (as ``numpy.testing``): shared by ``tests/``,
``benchmarks/`` and ``evaluations/`` so that none of them has to put ``tests/`` on
``sys.path``. Nothing in the other layers imports this package.

- :func:`free_port`: a free loopback TCP port for a server a test or benchmark starts;
- :mod:`bonefrac.testing.fuzzing`: the seeded mutation fuzzer for the decoders, decompression
  bombs, and health probes of a running server.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
