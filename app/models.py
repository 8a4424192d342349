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
        # No floor on credits: a refund or dispute of credits already spent leaves the balance owing.
        CheckConstraint("held >= 0", name="held_not_negative"),
        CheckConstraint("char_length(full_name) <= 200", name="full_name_length"),
    )

    # Equal to Supabase's auth.users.id.
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    full_name: Mapped[str | None] = mapped_column(Text)
    # The email the user's token carried when the profile was made (or first bought), in lower case: support finds
    # a user by it. Supabase's auth.users, where it exists, has the current one.
    email: Mapped[str | None] = mapped_column(Text, index=True)
    # No default worth having: a balance starts with its ledger's signup grant (rows made outside the API
    # start empty rather than with credits the ledger never recorded).
    credits: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # The sum of this profile's active holds (some may be past expiry until next touched); spends and new holds
    # check `credits - held` in the same statement that moves it, so two requests can never reserve the same credits.
    held: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # Signed in anonymously (Supabase's anonymous sign-in): the signup grant waiting for a permanent account,
    # given once when one is seen. Null: none waiting.
    signup_pending: Mapped[int | None] = mapped_column(BigInteger)
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
    ANONYMOUS_GRANT = "anonymous_grant"
    PURCHASE = "purchase"
    SUBSCRIPTION_GRANT = "subscription_grant"
    SPEND = "spend"
    REFUND = "refund"
    DISPUTE = "dispute"
    DISPUTE_REVERSAL = "dispute_reversal"
    ADJUSTMENT = "adjustment"


KINDS_SQL = ", ".join(f"'{kind.value}'" for kind in CreditKind)


class CreditEntry(Base):
    """One change of one balance. Append-only: profiles.credits == sum(amount) for every profile."""

    __tablename__ = "credit_entries"
    __table_args__ = (
        CheckConstraint(f"kind IN ({KINDS_SQL})", name="kind_known"),
        CheckConstraint("char_length(note) <= 500", name="note_length"),
        Index("ix_credit_entries_profile_id_id", "profile_id", text("id DESC")),
        # A profile's signup grant happens once.
        Index(
            "uq_credit_entries_signup_grant", "profile_id", unique=True, postgresql_where=text("kind = 'signup_grant'")
        ),
        # A spend or an adjustment with an Idempotency-Key happens once per user and key.
        Index(
            "uq_credit_entries_keyed",
            "profile_id",
            "kind",
            "reference",
            unique=True,
            postgresql_where=text("kind IN ('spend', 'adjustment') AND reference IS NOT NULL"),
        ),
        # A Stripe object grants credits once (a checkout session, an invoice); a dispute takes them back once and
        # gives them back once. Refunds are cumulative per payment (stripe_payments), so not unique here.
        Index(
            "uq_credit_entries_stripe_object",
            "kind",
            "reference",
            unique=True,
            postgresql_where=text("kind IN ('purchase', 'subscription_grant', 'dispute', 'dispute_reversal')"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    profile_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("profiles.id", ondelete="CASCADE"), nullable=False
    )
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance_after: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    # The Stripe object, the hold (hold:<id>), or the client's Idempotency-Key for a spend or an adjustment.
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
    # The user it concerned, when one was found (for support: "where are my credits?").
    profile_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("profiles.id", ondelete="SET NULL"), index=True
    )


class HoldState(StrEnum):
    ACTIVE = "active"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


class CreditHold(Base):
    """Credits reserved for a running job: captured (a spend entry), released, or expired. Not a ledger entry."""

    __tablename__ = "credit_holds"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("state IN ('active', 'captured', 'released', 'expired')", name="state_known"),
        CheckConstraint("captured >= 0 AND captured <= amount", name="captured_within_amount"),
        CheckConstraint("char_length(reason) <= 200", name="reason_length"),
        # The active ones per profile: what counts as held, and what a spend expires when it finds them due.
        Index("ix_credit_holds_active", "profile_id", "expires_at", postgresql_where=text("state = 'active'")),
        Index("ix_credit_holds_profile_id_created_at", "profile_id", "created_at"),
        Index(
            "uq_credit_holds_key",
            "profile_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    profile_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("profiles.id", ondelete="CASCADE"), nullable=False
    )
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'active'"))
    ttl_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # How it was resolved: when, what was captured, and the Idempotency-Key of the request that resolved it.
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    captured: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    resolved_key: Mapped[str | None] = mapped_column(Text)


class CheckoutSession(Base):
    """Each Stripe Checkout Session this service created, with what it sold: a checkout grants only for these."""

    __tablename__ = "checkout_sessions"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    profile_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("profiles.id", ondelete="CASCADE"), nullable=False, index=True
    )
    # Ours, in the session's (and its subscription's) metadata, so an invoice finds the checkout that sold it.
    reference: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False, unique=True)
    mode: Mapped[str] = mapped_column(Text, nullable=False)
    price_id: Mapped[str] = mapped_column(Text, nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    credits: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # The subscription it started, once known: a checkout's plan is granted for that subscription only.
    subscription_id: Mapped[str | None] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class StripePayment(Base):
    """The Stripe payment behind a grant, and how much of it refunds and disputes have taken back."""

    __tablename__ = "stripe_payments"
    __table_args__ = (
        CheckConstraint("credits_refunded + credits_disputed <= credits_granted", name="taken_back_within_granted"),
    )

    # The PaymentIntent (pi_...).
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    profile_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("profiles.id", ondelete="CASCADE"), nullable=False, index=True
    )
    # The grant's ledger kind and reference (the checkout session or the invoice).
    grant_kind: Mapped[str] = mapped_column(Text, nullable=False)
    grant_reference: Mapped[str] = mapped_column(Text, nullable=False)
    credits_granted: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # In the currency's smallest unit, as Stripe counts it.
    amount_paid: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str | None] = mapped_column(Text)
    amount_refunded: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    credits_refunded: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    credits_disputed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class StripeDispute(Base):
    """A dispute of a granted payment: what it took back, and whether it gave it back."""

    __tablename__ = "stripe_disputes"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    payment_id: Mapped[str] = mapped_column(Text, ForeignKey("stripe_payments.id", ondelete="CASCADE"), nullable=False)
    credits: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    returned: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
