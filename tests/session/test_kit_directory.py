"""kit.directory.DirectoryClient against a stub bus: the request it builds, its resolve
cache, and the errors it raises (the bus's, or a port's own type)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from postbus.kit.bus import Bus, BusUnavailable, RemoteError
from postbus.kit.directory import DirectoryClient
from postbus.proto.directory import AuthReply, AuthRequest, ResolveReply, SendAsReply


class StubBus:
    def __init__(self, fail: Exception | None = None) -> None:
        self.sent: list[tuple[str, Any, float | None]] = []
        self.fail = fail

    async def request(self, rpc: Any, data: Any, *, timeout: float | None = None) -> Any:
        self.sent.append((rpc.name, data, timeout))
        if self.fail is not None:
            raise self.fail
        if isinstance(data, AuthRequest):
            return AuthReply(ok=True, account_id=1)
        if rpc.name.startswith("directory.send_as"):
            return SendAsReply(addresses=["a@example.test"])
        return ResolveReply(status="remote")


class PortError(Exception):
    pass


async def test_resolve_is_cached_by_address_whatever_its_case() -> None:
    stub = StubBus()
    client = DirectoryClient(cast(Bus, stub), "smtp", resolve_ttl_s=60)
    assert (await client.resolve("Bob@Example.test")).status == "remote"
    assert (await client.resolve("bob@example.TEST")).status == "remote"
    assert len(stub.sent) == 1


async def test_no_cache_without_a_ttl() -> None:
    stub = StubBus()
    client = DirectoryClient(cast(Bus, stub), timeout_s=5.0)
    await client.resolve("bob@example.test")
    await client.resolve("bob@example.test")
    assert [t for _, _, t in stub.sent] == [5.0, 5.0]


async def test_authenticate_names_the_service() -> None:
    stub = StubBus()
    reply = await DirectoryClient(cast(Bus, stub), "pop3").authenticate("u", "p", "192.0.2.1")
    assert reply.ok
    [(_, req, _)] = stub.sent
    assert (req.service, req.client_ip) == ("pop3", "192.0.2.1")
    with pytest.raises(ValueError):
        await DirectoryClient(cast(Bus, stub)).authenticate("u", "p", None)


async def test_send_as() -> None:
    assert await DirectoryClient(cast(Bus, StubBus()), "api").send_as(7) == ["a@example.test"]


@pytest.mark.parametrize("exc", [BusUnavailable("down"), RemoteError("internal", "x")])
async def test_errors_are_the_bus_s_or_the_port_s(exc: Exception) -> None:
    with pytest.raises(type(exc)):
        await DirectoryClient(cast(Bus, StubBus(exc)), "imap").resolve("a@b")
    client = DirectoryClient(cast(Bus, StubBus(exc)), "imap",
                             errors=lambda e: PortError(str(e)))
    with pytest.raises(PortError):
        await client.authenticate("u", "p", None)
