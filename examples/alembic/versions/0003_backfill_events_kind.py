"""Phase 2: fill events.kind for the existing rows, in short batches, resumable.

If this upgrade is interrupted, run it again: the backfill resumes from its checkpoint. With defer=True it would
only be registered, for `backfill run events_fill_kind` (CLI or cron) to do the work outside the deploy.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.backfill(
        "events_fill_kind",
        "events",
        {"kind": "coalesce(payload->>'kind', 'unknown')"},
        where="kind IS NULL",
        key="id",  # read from the catalog online; needed only by the offline (--sql) rendering
        batch_size=2_000,
    )


def downgrade() -> None:
    # The data stays as it is; revision 0002's downgrade drops the column.
    pass
