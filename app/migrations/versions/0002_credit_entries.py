"""credit_entries: the append-only credits ledger, with an opening entry for every existing balance
(revision 0002, after 0001, 2026-11-25)"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"


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
    unique_when = (
        ("uq_credit_entries_signup_grant", ["profile_id"], "kind = 'signup_grant'"),
        ("uq_credit_entries_spend_key", ["profile_id", "reference"], "kind = 'spend' AND reference IS NOT NULL"),
        (
            "uq_credit_entries_stripe_grant",
            ["kind", "reference"],
            "kind IN ('purchase', 'subscription_grant', 'refund') AND reference IS NOT NULL",
        ),
    )
    for name, columns, where in unique_when:
        op.create_index(name, "credit_entries", columns, unique=True, postgresql_where=sa.text(where))
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
