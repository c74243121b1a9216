"""The rest of the family on the live table: an index built concurrently, a foreign key and a CHECK constraint,
each added NOT VALID and validated by a scan that blocks neither reads nor writes.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("event_kinds", sa.Column("name", sa.Text, primary_key=True))
    op.execute("INSERT INTO event_kinds VALUES ('unknown'), ('click'), ('view'), ('buy'), ('share')")
    # The index first: without it, every delete from event_kinds would scan events to check the foreign key (the
    # op warns and names this very call when the index is missing).
    op.add_index_concurrently("events", ["kind"])
    op.add_foreign_key("events", ["kind"], "event_kinds", ["name"])
    op.add_check_constraint(
        "events", "events_payload_is_object", sa.func.jsonb_typeof(sa.column("payload")) == "object"
    )


def downgrade() -> None:
    op.drop_check_constraint("events", "events_payload_is_object")
    op.drop_foreign_key("events", "events_kind_fkey")
    op.drop_index_concurrently("events_kind_idx", table="events")
    op.drop_table("event_kinds")
