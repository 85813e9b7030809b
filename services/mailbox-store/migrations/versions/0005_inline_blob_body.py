"""blobs.body: the bytes of a small blob kept in its row instead of in S3 (ADR 0014).

A delivery or APPEND of a message of at most ``inline_body_max`` bytes writes its body here,
in the transaction that adds the message row, and makes no S3 PUT; readers get it from the
store (``store.bodies.v1``) instead of from S3. Existing rows keep NULL: their bodies are in
S3, as before.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER TABLE ADD COLUMN, nullable: no table rebuild on SQLite
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('body', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # the inline bodies would be lost: refuse rather than drop mail
    raise RuntimeError("0005 cannot be downgraded: small message bodies live in blobs.body")
