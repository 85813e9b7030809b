"""Adapters from the ports to the bus (JetStream), S3 and NATS KV; the directory and the
auth-failure counters are the kit's DirectoryClient and KvCounters, with ``unavailable``.

Uses postbus.kit.bus / postbus.kit.blob only (never nats or boto3 directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from typing import Any, BinaryIO

from postbus.kit.blob import BlobStore, BlobUnavailable
from postbus.kit.bus import Bus, BusUnavailable, RemoteError
from postbus.kit.counter_keys import kv_key
from postbus.kit.logging import get_logger
from postbus.kit.net import Network, ip_in
from postbus.proto.mail import DELIVER_STREAM, INBOUND_STREAM, MAIL_RECEIVED, MailReceived
from postbus.smtp_ingress.ports import BlockEntry, Unavailable

log = get_logger(__name__)

BLOCKLIST_BUCKET = "smtp_ingress_blocklist"
LOAD_BUCKET = "smtp_ingress_load"
AUTHFAIL_BUCKET = "smtp_ingress_authfail"


def _kv_error(exc: BaseException, *names: str) -> bool:
    """True when ``exc`` is one of the named nats KV errors (matched by class name so
    that only kit.bus imports nats)."""
    return any(c.__name__ in names for c in type(exc).__mro__)


def unavailable(exc: BusUnavailable | RemoteError) -> Unavailable:
    """A bus error as the ports' Unavailable (the kit's DirectoryClient and KvCounters take
    this as ``errors``)."""
    return Unavailable(str(exc))


class BusQueue:
    """MAIL_RECEIVED on JetStream; returns after the ack. The queue id is the message id,
    so a publish retried by the client library inside the duplicate window is stored once."""

    def __init__(self, bus: Bus, *, timeout_s: float = 5.0) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def publish(self, msg: MailReceived) -> None:
        if not self.bus.nc.is_connected:
            # while reconnecting, nats-py would buffer the publish and may send it after
            # we answered 451: refuse at once instead
            raise Unavailable("not connected to NATS")
        try:
            await self.bus.publish(MAIL_RECEIVED, msg, msg_id=msg.queue_id, timeout=self.timeout_s)
        except BusUnavailable as exc:
            raise Unavailable(str(exc)) from exc


class StreamBacklog:
    """The depth of the work queues between a 250 and the mailbox: messages in the
    inbound stream (waiting for mime-processor) and in the delivery stream (waiting for
    mailbox-store). Both are work queues, so what is in them is what is not done yet."""

    def __init__(self, bus: Bus, streams: tuple[str, ...] = (INBOUND_STREAM.name,
                                                           DELIVER_STREAM.name)) -> None:
        self.bus = bus
        self.streams = streams

    async def depth(self) -> int:
        try:
            return sum([await self.bus.stream_messages(s) for s in self.streams])
        except BusUnavailable as exc:
            raise Unavailable(str(exc)) from exc


class S3Bodies:
    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    async def put_file(self, head: bytes, file: BinaryIO) -> str:
        try:  # never kept in the blob cache: ingress does not read a body back
            return await self.blobs.put_file(file, head=head)
        except BlobUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        except Exception as exc:  # connection refused etc. surface as botocore errors
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc


class KvLoadShare:
    """Every replica writes its per-IP snapshot (policy.load_snapshot) under its own key
    every ``interval_s`` and reads the others'; a snapshot older than ``max_age_s`` (a
    replica that died) is ignored. One KV write per replica per interval, none per
    connection."""

    def __init__(self, bus: Bus, *, interval_s: float = 1.0, max_age_s: float = 10.0) -> None:
        import os

        self.bus = bus
        self.interval_s = interval_s
        self.max_age_s = max_age_s
        self.replica = os.urandom(6).hex()
        self._kv: Any = None
        self._remote: dict[str, tuple[int, int]] = {}

    def remote(self, ip: str) -> tuple[int, int]:
        return self._remote.get(ip, (0, 0))

    async def _open(self) -> Any:
        if self._kv is None:
            try:
                self._kv = await self.bus.kv(LOAD_BUCKET, ttl_s=max(60.0, self.max_age_s * 6))
            except Exception as exc:
                raise Unavailable(f"KV {LOAD_BUCKET}: {exc}") from exc
        return self._kv

    async def exchange(self, snapshot: dict[str, list[int]]) -> None:
        """Publish ours, then read everybody else's."""
        from postbus.smtp_ingress.policy import merge_snapshots

        kv = await self._open()
        now = time.time()
        try:
            await kv.put(self.replica, json.dumps({"at": now, "ips": snapshot}).encode())
            try:
                keys = await kv.keys()
            except Exception as exc:
                if not _kv_error(exc, "NoKeysError"):
                    raise
                keys = []
            others = []
            for k in keys:
                if k == self.replica:
                    continue
                try:
                    data = json.loads((await kv.get(k)).value or b"{}")
                except Exception as exc:
                    if _kv_error(exc, "KeyNotFoundError"):
                        continue
                    raise
                if now - float(data.get("at", 0)) <= self.max_age_s:
                    others.append(data.get("ips", {}))
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable(str(exc)) from exc
        self._remote = merge_snapshots(others)

    async def withdraw(self) -> None:
        with contextlib.suppress(Exception):
            kv = await self._open()
            await kv.delete(self.replica)

    async def run(self, snapshot: Any) -> None:
        """Exchange forever; ``snapshot()`` gives this replica's current counts."""
        while True:
            try:
                await self.exchange(snapshot())
            except Unavailable as exc:
                log.warning("load share failed", error=str(exc)[:200])
            await asyncio.sleep(self.interval_s)


class KvBlockList:
    """Client networks refused at connect time. The truth is a NATS KV bucket shared by
    every replica; each replica answers from its own copy, refreshed every few seconds
    (and at once for changes it makes itself)."""

    def __init__(self, bus: Bus, *, refresh_s: float = 2.0) -> None:
        self.bus = bus
        self.refresh_s = refresh_s
        self._kv: Any = None
        self._entries: dict[str, BlockEntry] = {}
        self._nets: list[Network] = []

    async def _open(self) -> Any:
        if self._kv is None:
            try:
                self._kv = await self.bus.kv(BLOCKLIST_BUCKET)
            except Exception as exc:
                raise Unavailable(f"KV {BLOCKLIST_BUCKET}: {exc}") from exc
        return self._kv

    def _rebuild(self) -> None:
        self._nets = [ipaddress.ip_network(e.network, strict=False)
                      for e in self._entries.values()]

    def blocked(self, ip: str) -> bool:
        return ip_in(ip, self._nets)

    def entries(self) -> list[BlockEntry]:
        return sorted(self._entries.values(), key=lambda e: e.network)

    async def add(self, entry: BlockEntry) -> None:
        net = str(ipaddress.ip_network(entry.network, strict=False))
        entry = BlockEntry(net, entry.reason, entry.added_at)
        kv = await self._open()
        try:
            await kv.put(kv_key(net), json.dumps(entry.__dict__).encode())
        except Exception as exc:
            raise Unavailable(str(exc)) from exc
        self._entries[net] = entry
        self._rebuild()

    async def remove(self, network: str) -> bool:
        net = str(ipaddress.ip_network(network, strict=False))
        kv = await self._open()
        existed = net in self._entries
        if not existed:
            await self.refresh()
            existed = net in self._entries
        try:
            await kv.delete(kv_key(net))
        except Exception as exc:
            raise Unavailable(str(exc)) from exc
        self._entries.pop(net, None)
        self._rebuild()
        return existed

    async def refresh(self) -> None:
        kv = await self._open()
        try:
            keys = await kv.keys()
        except Exception as exc:
            if _kv_error(exc, "NoKeysError"):
                keys = []
            else:
                raise Unavailable(str(exc)) from exc
        fresh: dict[str, BlockEntry] = {}
        for k in keys:
            try:
                entry = await kv.get(k)
                data = json.loads(entry.value or b"{}")
                fresh[data["network"]] = BlockEntry(data["network"], data.get("reason", ""),
                                                    data.get("added_at", ""))
            except Exception as exc:
                if _kv_error(exc, "KeyNotFoundError"):
                    continue
                log.warning("bad block list entry", key=k, error=str(exc))
        self._entries = fresh
        self._rebuild()

    async def run(self) -> None:
        """Refresh forever (a ServiceContext task)."""
        while True:
            with contextlib.suppress(Unavailable):
                await self.refresh()
            await asyncio.sleep(self.refresh_s)
