"""credit_entries: the append-only credits ledger, with an opening entry for every existing balance

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "credit_entries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("profile_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("balance_after", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("balance_after >= 0", name=op.f("ck_credit_entries_balance_after_not_negative")),
        sa.CheckConstraint(
            "kind IN ('signup_grant', 'purchase', 'subscription_grant', 'spend', 'refund', 'adjustment')",
            name=op.f("ck_credit_entries_kind_known"),
        ),
        sa.CheckConstraint("char_length(note) <= 500", name=op.f("ck_credit_entries_note_length")),
        sa.ForeignKeyConstraint(
            ["profile_id"], ["profiles.id"], name=op.f("fk_credit_entries_profile_id_profiles"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_entries")),
    )
    op.create_index("ix_credit_entries_profile_id_id", "credit_entries", ["profile_id", sa.text("id DESC")])
    op.create_index(
        "uq_credit_entries_signup_grant",
        "credit_entries",
        ["profile_id"],
        unique=True,
        postgresql_where=sa.text("kind = 'signup_grant'"),
    )
    op.create_index(
        "uq_credit_entries_spend_key",
        "credit_entries",
        ["profile_id", "reference"],
        unique=True,
        postgresql_where=sa.text("kind = 'spend' AND reference IS NOT NULL"),
    )
    op.create_index(
        "uq_credit_entries_stripe_grant",
        "credit_entries",
        ["kind", "reference"],
        unique=True,
        postgresql_where=sa.text("kind IN ('purchase', 'subscription_grant', 'refund') AND reference IS NOT NULL"),
    )
    # Balances that existed before the ledger get one opening entry each, so the invariant
    # profiles.credits == sum(credit_entries.amount) holds from here on.
    op.execute(
        """
        INSERT INTO credit_entries (profile_id, amount, balance_after, kind, note, created_at)
        SELECT id, credits, credits, 'adjustment', 'opening balance', created_at FROM profiles
        """
    )


def downgrade() -> None:
    op.drop_table("credit_entries")
