"""Create the events table with some rows (the application's existing data).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("payload", postgresql.JSONB, nullable=False),
    )
    rows = int(context.get_x_argument(as_dictionary=True).get("rows", "20000"))
    # One event in five has no "kind" in its payload: the backfill gives those 'unknown'.
    op.execute(
        sa.text(
            "INSERT INTO events (payload) "
            "SELECT jsonb_build_object('n', g, 'kind', (ARRAY[NULL, 'click', 'view', 'buy', 'share'])[mod(g, 5) + 1]) "
            "FROM generate_series(1, :rows) AS g"
        ).bindparams(rows=rows)
    )


def downgrade() -> None:
    op.drop_table("events")
