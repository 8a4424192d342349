"""credit_holds: credits reserved for a running job, and each profile's held total (revision 0007, after 0006,
2026-11-28)"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.add_column("profiles", sa.Column("held", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
    op.create_check_constraint(op.f("ck_profiles_held_not_negative"), "profiles", "held >= 0")
    op.create_table(
        "credit_holds",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("profile_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("state", sa.Text(), server_default=sa.text("'active'"), nullable=False),
        sa.Column("ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("captured", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("resolved_key", sa.Text(), nullable=True),
        sa.CheckConstraint("amount > 0", name=op.f("ck_credit_holds_amount_positive")),
        sa.CheckConstraint(
            "state IN ('active', 'captured', 'released', 'expired')", name=op.f("ck_credit_holds_state_known")
        ),
        sa.CheckConstraint("captured >= 0 AND captured <= amount", name=op.f("ck_credit_holds_captured_within_amount")),
        sa.CheckConstraint("char_length(reason) <= 200", name=op.f("ck_credit_holds_reason_length")),
        sa.ForeignKeyConstraint(
            ["profile_id"], ["profiles.id"], name=op.f("fk_credit_holds_profile_id_profiles"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_holds")),
    )
    op.create_index(
        "ix_credit_holds_active",
        "credit_holds",
        ["profile_id", "expires_at"],
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_index("ix_credit_holds_profile_id_created_at", "credit_holds", ["profile_id", "created_at"])
    op.create_index(
        "uq_credit_holds_key",
        "credit_holds",
        ["profile_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_table("credit_holds")
    op.drop_constraint(op.f("ck_profiles_held_not_negative"), "profiles", type_="check")
    op.drop_column("profiles", "held")
