"""Phase 2: the bigint columns take the old ones' place (indexes and foreign keys copied concurrently, then one short
swap; the sequence becomes ``AS bigint``). Deploy the code that reads the new columns with it.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.finish_column_type_change("users", "id")
    op.finish_column_type_change("events", "user_id")


def downgrade() -> None:
    # finish run the other way round, online: the ids written since the swap are copied back into the integer
    # columns (refused, changing nothing, once an id no longer fits an integer), then one short swap back.
    op.unfinish_column_type_change("events", "user_id")
    op.unfinish_column_type_change("users", "id")
