"""profiles.credits defaults to 0: a balance comes from its ledger, never from a column default
(revision 0004, after 0003, 2026-11-25)"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.alter_column("profiles", "credits", server_default=sa.text("0"))


def downgrade() -> None:
    op.alter_column("profiles", "credits", server_default=sa.text("1000"))
