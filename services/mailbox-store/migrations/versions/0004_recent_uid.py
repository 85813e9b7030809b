"""mailboxes.recent_uid: the first UID no session has yet been told about, so IMAP can give
\\Recent (RFC 3501 §2.3.2) to exactly one session per message: SELECT claims [recent_uid,
uidnext) and moves recent_uid up to uidnext.

Existing mailboxes get recent_uid = uidnext: nothing is recent right after the upgrade.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # added as a plain ALTER TABLE ADD COLUMN (no table rebuild on SQLite, which would
    # cascade to the messages); the server default only fills the existing rows
    with op.batch_alter_table('mailboxes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recent_uid', sa.BigInteger(), server_default='1',
                                      nullable=False))
    op.execute("UPDATE mailboxes SET recent_uid = uidnext")


def downgrade() -> None:
    with op.batch_alter_table('mailboxes', schema=None) as batch_op:
        batch_op.drop_column('recent_uid')
