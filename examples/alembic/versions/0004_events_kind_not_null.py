"""Phase 3: make events.kind NOT NULL without an ACCESS EXCLUSIVE table scan.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Finishes the backfill here if a deferred or interrupted run left work (finish=False would fail instead,
    # naming the CLI command that finishes it).
    op.ensure_backfill_finished("events_fill_kind")
    op.add_not_null_constraint("events", "kind")


def downgrade() -> None:
    op.drop_not_null_constraint("events", "kind")
