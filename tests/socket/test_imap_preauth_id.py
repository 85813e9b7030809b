"""A real imap-access listener on port 0 (in-memory ports) and a raw client: an ID as long as
RFC 2971 §3.3 allows, before login, is answered and the session goes on (imaptest's `id`
script); one past the cap, or any other over-long pre-login line, still ends the session."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_imap_socket import serving

from postbus.imap_access.memory import MemoryPlatform
from postbus.imap_access.server import ImapServer
from postbus.imap_access.settings import Settings
from postbus.kit.settings import CommonSettings
from postbus.protocols.imap_parser import MAX_ID_LINE, PREAUTH

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = "alice@example.test", "secret"


@pytest.fixture
def port(tmp_path: Path) -> Iterator[int]:
    settings = Settings(common=CommonSettings(admin_token_file=tmp_path / "tok"),
                        auth_fail_delay_s=0)
    mp = MemoryPlatform()
    mp.add_user(USER, PASSWORD)
    with serving(ImapServer(settings, mp, mp, mp, mp), tls=False) as (_, ports):
        yield ports[0]


def _connect(port: int) -> tuple[socket.socket, io.BufferedReader]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    return s, f


def rfc_max_id(tag: bytes) -> bytes:
    """30 pairs, names of 30 octets, values of 1024 (RFC 2971 §3.3): about 31 KiB."""
    pairs = (b'"%02d%s" "%s"' % (i, b"n" * 28, b"v" * 1024) for i in range(30))
    return tag + b" ID (" + b" ".join(pairs) + b")\r\n"


def test_longest_id_before_login_is_answered_and_the_session_goes_on(port: int) -> None:
    line = rfc_max_id(b"a")
    assert PREAUTH.max_line < len(line) <= MAX_ID_LINE
    s, f = _connect(port)
    s.sendall(line + b"b LOGIN %s %s\r\n" % (USER.encode(), PASSWORD.encode()))
    assert f.readline().startswith(b'* ID ("name" "Postbus"')
    assert f.readline().startswith(b"a OK")
    assert f.readline().startswith(b"b OK")
    s.close()


@pytest.mark.parametrize("opening", [b'a ID ("name" "', b"a LOGIN "])
def test_past_the_bounds_is_bad_and_bye(port: int, opening: bytes) -> None:
    s, f = _connect(port)
    size = MAX_ID_LINE if opening.startswith(b"a ID") else PREAUTH.max_line
    s.sendall(opening + b"x" * size)
    with contextlib.suppress(OSError):
        s.sendall(b"y" * 200_000)  # the server stops reading: this may fail
    assert f.readline().startswith(b"a BAD [TOOBIG]")
    assert f.readline().startswith(b"* BYE")
    assert f.readline() == b""
    s.close()
