"""``users.id`` and ``events.user_id`` to ``bigint`` before the sequence runs out, phase 1: shadow columns kept in
sync by a trigger, the existing rows copied in short resumable batches (``backfill status`` shows the copies).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.start_column_type_change("users", "id", sa.BigInteger())
    op.start_column_type_change("events", "user_id", sa.BigInteger())


def downgrade() -> None:
    op.cancel_column_type_change("events", "user_id")
    op.cancel_column_type_change("users", "id")
