"""messages.pop3_pad: octets POP3 adds to end an unterminated last line, so LIST and STAT
report exactly what RETR sends (RFC 1939 §11) for messages appended without a final CRLF.

Rows stored before this revision get 0: their blob is not read here; a message without a
final CRLF among them is listed 2 octets short, as before.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pop3_pad', sa.SmallInteger(), server_default='0',
                                      nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('pop3_pad')
