"""Memory an unauthenticated client can make a service hold, measured on the real process
(RSS before and after) against a bound: issue 8, items 1 and 6."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from postbus.kit.testing import Platform, RunningNats, RunningS3, start_platform
from postbus.kit.topology import BY_NAME

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def imap_process(nats_server: RunningNats, s3_server: RunningS3,
                 tmp_path: Path) -> Iterator[Platform]:
    plat = start_platform(tmp_path / "p", nats_server.url, s3_server.endpoint,
                          services=(BY_NAME["imap-access"],))
    yield plat
    plat.stop()


def _flood(port: int, opening: bytes, body: int, chunk: bytes) -> None:
    """One unauthenticated client: the opening, then up to ``body`` octets, no final CRLF."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.recv(4096)  # greeting
        try:
            s.sendall(opening)
            sent = 0
            while sent < body:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server said BAD + BYE and closed: what we want


@pytest.mark.parametrize("opening", [
    b"a LOGIN {41943040+}\r\n",  # one literal as large as the old per-literal bound
    b"a LOGIN " + b"".join(b"{40000+}\r\n" + b"u" * 40000 + b" " for _ in range(1000)),  # many
    b"a LOGIN " + b"x" * 100,  # a line that never ends
], ids=["one-big-literal", "many-literals", "endless-line"])
def test_imap_preauth_input_does_not_grow_the_process(imap_process: Platform,
                                                      opening: bytes) -> None:
    pid = imap_process.procs["imap-access"].pid
    port = imap_process.port("imap-access", "imap_port")
    before = rss(pid)
    clients = [threading.Thread(target=_flood, args=(port, opening, 40 * MB, b"x" * MB))
               for _ in range(4)]
    peak = before
    for t in clients:
        t.start()
    while any(t.is_alive() for t in clients):
        peak = max(peak, rss(pid))
        for t in clients:
            t.join(0.02)
    peak = max(peak, rss(pid))
    # was: +245 MB for one such client, +630 MB for four
    assert peak - before < 24 * MB, (before // MB, peak // MB)
