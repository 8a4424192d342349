"""ORM models: the tables the migrations create."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Profile(Base):
    __tablename__ = "profiles"
    __table_args__ = (
        CheckConstraint("credits >= 0", name="credits_not_negative"),
        CheckConstraint("char_length(full_name) <= 200", name="full_name_length"),
    )

    # Equal to Supabase's auth.users.id.
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    full_name: Mapped[str | None] = mapped_column(Text)
    # No default worth having: a balance starts with its ledger's signup grant (rows made outside the API
    # start empty rather than with credits the ledger never recorded).
    credits: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    stripe_customer_id: Mapped[str | None] = mapped_column(Text, unique=True)
    subscription_id: Mapped[str | None] = mapped_column(Text)
    subscription_status: Mapped[str | None] = mapped_column(Text)
    subscription_price_id: Mapped[str | None] = mapped_column(Text)
    subscription_current_period_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    subscription_cancel_at_period_end: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    # Stripe's time of the event the subscription fields come from: an older event never overwrites them.
    subscription_event_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    # Moved by a trigger, so updates made through Supabase's data API move it too.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class CreditKind(StrEnum):
    SIGNUP_GRANT = "signup_grant"
    PURCHASE = "purchase"
    SUBSCRIPTION_GRANT = "subscription_grant"
    SPEND = "spend"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"


class CreditEntry(Base):
    """One change of one balance. Append-only: profiles.credits == sum(amount) for every profile."""

    __tablename__ = "credit_entries"
    __table_args__ = (
        CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
        CheckConstraint(
            "kind IN ('signup_grant', 'purchase', 'subscription_grant', 'spend', 'refund', 'adjustment')",
            name="kind_known",
        ),
        CheckConstraint("char_length(note) <= 500", name="note_length"),
        Index("ix_credit_entries_profile_id_id", "profile_id", text("id DESC")),
        # A profile's signup grant happens once.
        Index(
            "uq_credit_entries_signup_grant", "profile_id", unique=True, postgresql_where=text("kind = 'signup_grant'")
        ),
        # A spend with an Idempotency-Key happens once per user and key.
        Index(
            "uq_credit_entries_spend_key",
            "profile_id",
            "reference",
            unique=True,
            postgresql_where=text("kind = 'spend' AND reference IS NOT NULL"),
        ),
        # A Stripe object (checkout session, invoice) grants credits once.
        Index(
            "uq_credit_entries_stripe_grant",
            "kind",
            "reference",
            unique=True,
            postgresql_where=text("kind IN ('purchase', 'subscription_grant', 'refund') AND reference IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    profile_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("profiles.id", ondelete="CASCADE"), nullable=False
    )
    amount: Mapped[int] = mapped_column(Integer, nullable=False)
    balance_after: Mapped[int] = mapped_column(Integer, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    # Stripe object id, or the client's Idempotency-Key for a spend.
    reference: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class StripeEvent(Base):
    """One row per Stripe event received, written in the same transaction as the event's effects."""

    __tablename__ = "stripe_events"

    # Stripe's event id (evt_...): a second delivery of the same event conflicts here and changes nothing.
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text, nullable=False)
    # When Stripe created the event.
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    # What processing did (e.g. "granted 500 credits"), for troubleshooting.
    outcome: Mapped[str | None] = mapped_column(Text)
