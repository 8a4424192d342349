"""billing: stripe_events (each Stripe event processed once) and the profile's subscription state
(revision 0003, after 0002, 2026-11-26)"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_events")),
    )
    op.add_column(
        "profiles",
        sa.Column("subscription_cancel_at_period_end", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column("profiles", sa.Column("subscription_event_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("profiles", "subscription_event_at")
    op.drop_column("profiles", "subscription_cancel_at_period_end")
    op.drop_table("stripe_events")
