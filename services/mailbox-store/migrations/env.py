"""Alembic environment: runs on the connection db.migrate passes in, or (from the alembic
command line) on an engine built from POSTBUS_DATABASE_URL."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from postbus.mailbox_store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    from postbus.mailbox_store.db import normalize_url

    url = normalize_url(os.environ.get("POSTBUS_DATABASE_URL", "sqlite:///.run/postbus.db"))
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


async def _run_online_async() -> None:
    from postbus.mailbox_store.db import create_engine

    engine = create_engine(os.environ.get("POSTBUS_DATABASE_URL", "sqlite:///.run/postbus.db"))
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_online_async())
