"""profiles.credits defaults to 0: a balance comes from its ledger, never from a column default

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("profiles", "credits", server_default=sa.text("0"))


def downgrade() -> None:
    op.alter_column("profiles", "credits", server_default=sa.text("1000"))
