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
    # The way back is a type change of its own (while every id still fits an integer): the old columns go first,
    # so that the names they keep are free for the next change.
    for table, column in (("events", "user_id"), ("users", "id")):
        op.cleanup_column_type_change(table, column)
        op.start_column_type_change(table, column, "integer")
    for table, column in (("users", "id"), ("events", "user_id")):
        op.finish_column_type_change(table, column)
        op.cleanup_column_type_change(table, column)
