"""Socket helpers shared by the protocol listeners (asyncio streams). No protocol logic."""

from __future__ import annotations

import asyncio
import contextlib

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
