"""Ports over the kit: the memo over NATS KV (the directory is the kit's DirectoryClient,
whose bus errors the worker retries on)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from postbus.kit.bus import Bus

MEMO_BUCKET = "postbus_mime_auth"
MEMO_TTL_S = 24 * 3600.0


def memo_key(key: str) -> str:
    """KV keys allow ``[-/_=.a-zA-Z0-9]``; anything else is hashed."""
    if re.fullmatch(r"[-_=a-zA-Z0-9]{1,200}", key):
        return key
    return "h" + hashlib.sha256(key.encode()).hexdigest()


class KvMemo:
    """Remembers the Authentication-Results of a queue id, so a retried message gets the
    same header, hence the same content-addressed blob, whatever DNS says the second time."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: Any = None

    async def _bucket(self) -> Any:
        if self._kv is None:
            self._kv = await self.bus.kv(MEMO_BUCKET, ttl_s=MEMO_TTL_S)
        return self._kv

    async def get(self, key: str) -> str | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(memo_key(key))
        except Exception:  # not found (the kit alone names nats' exception types)
            return None
        return bytes(entry.value).decode() if entry and entry.value is not None else None

    async def put(self, key: str, value: str) -> None:
        kv = await self._bucket()
        await kv.put(memo_key(key), value.encode())
