"""Phase 1: add events.kind as a nullable column (instant: no rewrite, no scan).

Deploy application code that writes kind for new rows after this revision.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("kind", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("events", "kind")
