"""balances and ledger amounts in 64-bit integers, keeping every row (revision 0006, after 0005, 2026-11-28)"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"

COLUMNS = (("profiles", "credits"), ("credit_entries", "amount"), ("credit_entries", "balance_after"))


def upgrade() -> None:
    # Rewrites both tables once (an exclusive lock for as long as that takes): run it in a quiet moment on a
    # large database. create_tables.py waits at most 10 s for the lock rather than queue the live service.
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_nullable=False)
