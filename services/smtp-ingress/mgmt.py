"""Management API of smtp-ingress (mounted at /api/v1 behind the admin token):
live sessions, counters, limits and the shared client block list."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field

from postbus.smtp_ingress.ports import BlockEntry, Unavailable
from postbus.smtp_ingress.server import Ingress


class BlockRequest(BaseModel):
    network: str = Field(description="An IP address or a CIDR network, e.g. 192.0.2.0/24")
    reason: str = ""


class BlockOut(BaseModel):
    network: str
    reason: str = ""
    added_at: str = ""


def router(ingress: Ingress) -> APIRouter:
    r = APIRouter(tags=["smtp-ingress"])

    @r.get("/sessions")
    async def sessions() -> list[dict[str, Any]]:
        """SMTP sessions open on this replica."""
        now = datetime.now(UTC)
        return [{**info.__dict__, "started_at": info.started_at.isoformat(),
                 "age_s": round((now - info.started_at).total_seconds(), 3)}
                for info in list(ingress.sessions.values())]

    @r.get("/counters")
    async def counters() -> dict[str, Any]:
        """Outcomes by reason since this replica started (Prometheus has the same, labelled)."""
        return {"counters": ingress.stats.as_dict(), "sessions_open": len(ingress.sessions)}

    @r.get("/limits")
    async def limits() -> dict[str, Any]:
        s = ingress.settings
        return {
            "max_message_size": s.max_message_size,
            "max_recipients": s.max_recipients,
            "max_line_length": s.max_line_length,
            "max_command_length": s.max_command_length,
            "max_commands": s.max_commands,
            "max_unknown_commands": s.max_unknown_commands,
            "idle_timeout_s": s.idle_timeout_s,
            "session_timeout_s": s.session_timeout_s,
            "max_connections": s.max_connections,
            "max_connections_per_ip": s.max_connections_per_ip,
            "connection_rate_per_ip": s.connection_rate_per_ip,
            "auth_fail_limit_ip": s.auth_fail_limit_ip,
            "auth_fail_limit_account": s.auth_fail_limit_account,
            "auth_fail_window_s": s.auth_fail_window_s,
            "trusted_networks": s.common.trusted_networks,
            "inline_threshold": ingress.inline_threshold,
            "data_bytes_in_flight": s.data_bytes_in_flight,
            "data_bytes_in_memory": ingress.spool.memory.used,
            "spool_max_bytes": s.spool_max_bytes,
            "spool_bytes": ingress.spool.disk.used,
            "listeners": ingress.ports,
        }

    @r.get("/blocklist", response_model=list[BlockOut])
    async def blocklist() -> list[BlockOut]:
        return [BlockOut(**e.__dict__) for e in ingress.blocklist.entries()]

    @r.post("/blocklist", status_code=status.HTTP_201_CREATED, response_model=BlockOut)
    async def block(req: BlockRequest) -> BlockOut:
        try:
            net = str(ipaddress.ip_network(req.network.strip(), strict=False))
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        entry = BlockEntry(net, req.reason, datetime.now(UTC).isoformat())
        try:
            await ingress.blocklist.add(entry)
        except Unavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
        return BlockOut(**entry.__dict__)

    @r.delete("/blocklist/{network:path}", status_code=status.HTTP_204_NO_CONTENT)
    async def unblock(network: str) -> None:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        try:
            existed = await ingress.blocklist.remove(network)
        except Unavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
        if not existed:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "not in the block list")

    return r
