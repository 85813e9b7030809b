"""The one home of network rules (libs/kit/net.py): trust by network, loopback, per-address
caps. IMAP and POP3 used to disagree on ::ffff:127.0.0.1."""

from __future__ import annotations

import pytest

from postbus.kit.net import PerIpLimit, ip_in, is_loopback, parse_networks


@pytest.mark.parametrize(("ip", "loop"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("fe80::1%eth0", False), ("192.0.2.1", False), ("::ffff:192.0.2.1", False),
    ("localhost", False), ("", False), ("?", False),
])
def test_loopback(ip: str, loop: bool) -> None:
    assert is_loopback(ip) is loop


def test_ip_in_networks() -> None:
    nets = parse_networks(["192.0.2.0/24", "2001:db8::/32", "not a network"])
    assert len(nets) == 2
    assert ip_in("192.0.2.9", nets) and ip_in("::ffff:192.0.2.9", nets) and ip_in("2001:db8::1", nets)
    assert not ip_in("198.51.100.1", nets) and not ip_in("junk", nets)
    assert not ip_in("127.0.0.1", parse_networks([]))  # nothing is trusted by default


def test_per_ip_limit() -> None:
    lim = PerIpLimit(2)
    assert lim.admit("a") and lim.admit("a") and not lim.admit("a")
    assert lim.admit("b")
    lim.release("a")
    assert lim.admit("a")
    for _ in range(3):
        if lim.open.get("a"):
            lim.release("a")
    assert "a" not in lim.open
    unlimited = PerIpLimit(0)
    assert all(unlimited.admit("x") for _ in range(1000))


def test_recent_failures_window_and_bound() -> None:
    from postbus.kit.flow import RecentFailures

    now = [0.0]
    f = RecentFailures(3, 10, max_keys=2, clock=lambda: now[0])
    for _ in range(3):
        assert not f.over("a")
        f.add("a")
    assert f.over("a")
    now[0] = 11  # the window moved on
    assert not f.over("a")
    f.add("b")
    f.add("c")
    f.add("d")  # only the two most recent keys are kept
    assert "b" not in f._d and not RecentFailures(0, 10).over("x")


@pytest.mark.parametrize(("domain", "public"), [
    ("example.net", True), ("[8.8.8.8]", True), ("[IPv6:2001:4860:4860::8888]", True),
    ("[ipv6:2001:4860:4860::8888]", True), ("[127.0.0.1]", False), ("[10.1.2.3]", False),
    ("[169.254.169.254]", False), ("[::1]", False), ("[IPv6:::ffff:127.0.0.1]", False),
    ("[not an address]", False), ("[]", False),
])
def test_literal_is_public(domain: str, public: bool) -> None:
    from postbus.kit.net import literal_is_public

    assert literal_is_public(domain) is public


@pytest.mark.parametrize(("header", "client"), [
    (b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 143\r\n", ("198.51.100.7", 40000)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 993\r\n", ("2001:db8::7", 40001)),
])
async def test_proxy_header_gives_the_client(header: bytes, client: tuple[str, int]) -> None:
    import asyncio

    from postbus.kit.net import read_proxy_header

    r = asyncio.StreamReader()
    r.feed_data(header + b"a LOGIN x y\r\n")
    assert await read_proxy_header(r, 1) == client
    assert await r.readline() == b"a LOGIN x y\r\n"  # the rest is left for the protocol


async def test_no_or_bad_proxy_header_is_refused() -> None:
    import asyncio

    from postbus.kit.net import BadProxyHeader, read_proxy_header

    bad = asyncio.StreamReader()
    bad.feed_data(b"a LOGIN alice secret\r\n")
    with pytest.raises(BadProxyHeader):
        await read_proxy_header(bad, 1)
    silent = asyncio.StreamReader()  # nothing comes: refused after the timeout
    with pytest.raises(BadProxyHeader):
        await read_proxy_header(silent, 0.05)
