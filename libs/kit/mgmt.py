"""The management app every service serves: /healthz, /readyz, /metrics, /api/v1, OpenAPI.

``HTTPException`` belongs here and in each service's ``mgmt`` router, nowhere else.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

Check = Callable[[], Awaitable[object]]

_bearer = HTTPBearer(auto_error=False)


def admin_guard(token_source: Callable[[], str | None]) -> Callable[..., Awaitable[None]]:
    """A dependency that requires ``Authorization: Bearer <admin token>``."""

    async def guard(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        expected = token_source()
        if (creds is None or expected is None
                or not secrets.compare_digest(creds.credentials.encode(), expected.encode())):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return guard


def create_app(
    service: str,
    *,
    checks: dict[str, Check],
    routers: list[APIRouter],
    token_source: Callable[[], str | None],
    version: str = "0.1.0",
    docs: bool = True,
) -> FastAPI:
    """``docs``: the interactive pages /docs and /redoc, which load their scripts from a CDN
    (a third party runs code on the admin's browser): off in production; /openapi.json
    stays."""
    app = FastAPI(title=f"Postbus {service}", version=version,
                  description=f"Management API of the {service} service",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok", "service": service}

    @app.get("/readyz", tags=["probes"])
    async def readyz(response: Response) -> dict[str, object]:
        """Ready: every dependency answered within two seconds."""
        results: dict[str, str] = {}

        async def run(name: str, check: Check) -> None:
            try:
                await asyncio.wait_for(check(), 2.0)
                results[name] = "ok"
            except Exception as exc:  # a readiness probe reports, never raises
                results[name] = f"fail: {type(exc).__name__}: {exc}"[:300]

        await asyncio.gather(*(run(n, c) for n, c in checks.items()))
        ok = all(v == "ok" for v in results.values())
        if not ok:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "ok" if ok else "unavailable", "checks": results}

    @app.get("/metrics", tags=["probes"])
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    guard = admin_guard(token_source)
    for r in routers:
        app.include_router(r, prefix="/api/v1", dependencies=[Depends(guard)])
    return app
