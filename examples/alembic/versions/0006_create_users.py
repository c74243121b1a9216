"""An older table, created with ``serial`` (``integer``) keys, and a column of ``events`` that references it.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL)")
    op.execute("INSERT INTO users (name) SELECT 'user ' || g FROM generate_series(1, 100) AS g")
    op.execute("ALTER TABLE events ADD COLUMN user_id integer")
    op.add_index_concurrently("events", ["user_id"])
    op.add_foreign_key("events", ["user_id"], "users", ["id"])


def downgrade() -> None:
    op.drop_foreign_key("events", "events_user_id_fkey")
    op.execute("ALTER TABLE events DROP COLUMN user_id")
    op.execute("DROP TABLE users")
