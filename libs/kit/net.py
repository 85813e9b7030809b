"""Network rules and socket helpers shared by the services: addresses in networks, what
counts as loopback, per-address connection caps, closing a connection so the client reads
its last reply. The one home of these rules (smtp-ingress, mime-processor, imap-access,
pop3-access). No protocol logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections import Counter
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address, IPv4-mapped IPv6 (a dual-stack listener's view of an IPv4 client)
    as the IPv4 address, a zone id dropped; None when it is not an address."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_networks(items: Iterable[str]) -> list[Network]:
    """CIDR texts as networks; an entry that is not one is skipped (settings reject them
    at start-up, see ``CommonSettings.trusted_networks``)."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            continue
    return out


def ip_in(ip: str, networks: Sequence[Network]) -> bool:
    """Whether a client address lies in one of the networks (the relay-trust test)."""
    addr = _address(ip) if networks else None
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


def is_loopback(ip: str) -> bool:
    """Loopback peers count as secure where the operator allows it, as Dovecot treats them
    (ARCHITECTURE.md); ``::ffff:127.0.0.1`` is loopback too."""
    addr = _address(ip)
    return addr is not None and addr.is_loopback


def literal_is_public(domain: str) -> bool:
    """False for an address literal (RFC 5321 §4.1.3, ``IPv6:`` in any case) that is not a
    global address; True for anything else (domains are checked elsewhere)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return True
    lit = domain[1:-1]
    if lit[:5].lower() == "ipv6:":
        lit = lit[5:]
    addr = _address(lit)
    return addr is not None and bool(addr.is_global)


class PerIpLimit:
    """Open connections per client address, at most ``limit`` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: Counter[str] = Counter()

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip``; False (and not counted) when over the cap."""
        if self.limit and self.open[ip] >= self.limit:
            return False
        self.open[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self.open[ip] -= 1
        if self.open[ip] <= 0:
            del self.open[ip]


class BadProxyHeader(Exception):
    """The connection did not start with a valid PROXY protocol header."""


async def read_proxy_header(reader: asyncio.StreamReader,
                            timeout_s: float) -> tuple[str, int] | None:
    """The client's address from a HAProxy PROXY v1 or v2 header, read before anything else
    on a listener behind a load balancer (aiosmtpd's parser). None for a v2 LOCAL header
    (the balancer's own health check: the socket peer stands). Raises BadProxyHeader; only
    turn this on for listeners that nothing but the balancer can reach."""
    from aiosmtpd.proxy_protocol import get_proxy

    try:
        data = await asyncio.wait_for(get_proxy(reader), timeout_s)
    except TimeoutError as exc:
        raise BadProxyHeader("no PROXY header in time") from exc
    if not data.valid:
        raise BadProxyHeader(str(data.error))
    if data.src_addr is None:
        return None
    return str(data.src_addr), int(data.src_port or 0)


LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024


async def linger_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       seconds: float = LINGER_S, max_bytes: int = LINGER_BYTES) -> None:
    """Close a connection the server ends while the client may still be sending: half-close,
    then read and drop at most ``max_bytes`` for at most ``seconds``. Closing with unread
    input makes the kernel answer RST, and the client loses the last reply (BAD, BYE) that
    says why; bounded so a client that keeps sending gains nothing by it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with contextlib.suppress(Exception):
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        got = 0
        while got < max_bytes:
            left = deadline - loop.time()
            if left <= 0:
                break
            data = await asyncio.wait_for(reader.read(64 * 1024), left)
            if not data:
                break
            got += len(data)
    with contextlib.suppress(Exception):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2)
