"""Phase 3, once no code reads the old integer columns (``users.id_old``, ``events.user_id_old``): drop them.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.cleanup_column_type_change("users", "id")
    op.cleanup_column_type_change("events", "user_id")


def downgrade() -> None:
    pass  # the old columns are gone; 0008's downgrade changes the types back
