"""Phase 3, once no code reads the old integer columns (``users.id_old``, ``events.user_id_old``): drop them.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # old_type: what the downgrade adds back (the ops' reverse() needs it too: nothing else remembers it).
    op.cleanup_column_type_change("users", "id", old_type=sa.Integer())
    op.cleanup_column_type_change("events", "user_id", old_type=sa.Integer())


def downgrade() -> None:
    # The old columns back, empty: 0008's downgrade copies every id into them.
    op.restore_column_type_change("events", "user_id", sa.Integer())
    op.restore_column_type_change("users", "id", sa.Integer())
