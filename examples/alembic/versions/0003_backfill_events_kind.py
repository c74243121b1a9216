"""Phase 2: fill events.kind for the existing rows, in short batches, resumable.

If this upgrade is interrupted, run it again: the backfill resumes from its checkpoint. With defer=True it would
only be registered, for `backfill run events_fill_kind` (CLI or cron) to do the work outside the deploy.

keep_in_sync=True installs a trigger first: rows that application code from before phase 1 (which does not know
events.kind) keeps writing get the same value, now and after phase 3 makes the column NOT NULL. A later revision
drops it with op.drop_backfill_trigger("events_fill_kind") once no such code runs any more.

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
        keep_in_sync=True,
        batch_size=2_000,
    )


def downgrade() -> None:
    # Drops the trigger and the backfill's record, so upgrading again runs it again; the data stays as it is
    # (revision 0002's downgrade drops the column).
    op.drop_backfill("events_fill_kind")
