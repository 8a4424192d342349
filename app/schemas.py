"""Request and response bodies."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

TEXT_MAX = 200
SPEND_MAX = 1_000_000


# Refused in text: control characters (Cc); unpaired surrogates (Cs: a broken UTF-16 escape in the JSON, which no
# database can store); format characters (Cf), which are invisible and some of which reorder what follows them
# (U+202E shows it backwards, U+200B and U+FEFF are nothing to see). The two joiners stay: Persian and Indic names
# and emoji sequences need them.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Cf"})
_JOINERS = frozenset({"\u200c", "\u200d"})


def _refused(char: str) -> bool:
    return unicodedata.category(char) in _REFUSED_CATEGORIES and char not in _JOINERS


def _clean_text(value: str, max_length: int) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if len(value) > max_length:
        raise ValueError(f"must be at most {max_length} characters")
    # isprintable() is False for every refused character (and for a few that are fine, such as U+00A0): one pass
    # in C for the usual text, the precise look only when it finds something.
    if not value.isprintable():
        found = next((char for char in value if _refused(char)), None)
        if found is not None:
            raise ValueError(
                f"must not contain U+{ord(found):04X}: control characters, invisible formatting characters "
                "and unpaired surrogates are refused"
            )
    return value


# The rules of `_clean_text` in the API description (not enforced by it: the validator's messages are clearer).
# The format characters of the Basic Multilingual Plane, but the joiners (U+200C, U+200D).
_FORMAT = (
    r"\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b\u200e\u200f\u202a-\u202e"
    r"\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
)
_ALLOWED = rf"[^\x00-\x1f\x7f-\x9f{_FORMAT}]"
_TEXT_PATTERN = rf"^{_ALLOWED}*[^\s\x00-\x1f\x7f-\x9f{_FORMAT}]{_ALLOWED}*$"

# A display name or a reason: trimmed, 1 to 200 characters, no control or invisible formatting characters.
ShortText = Annotated[
    str,
    Field(json_schema_extra={"pattern": _TEXT_PATTERN, "maxLength": TEXT_MAX}),
    AfterValidator(lambda value: _clean_text(value, TEXT_MAX)),
]
NAME_DESCRIPTION = "Display name: trimmed, 1 to 200 characters, no control or invisible formatting characters"
REASON_DESCRIPTION = "Why: trimmed, 1 to 200 characters, no control or invisible formatting characters"


class Message(BaseModel):
    message: str


class ErrorResponse(BaseModel):
    detail: Any = Field(description="What went wrong, in words a person can act on")


class HealthOut(BaseModel):
    status: str
    database: str


class PublicDataOut(BaseModel):
    message: str
    authenticated: bool
    user_id: UUID | None = None
    email: str | None = None
    role: str | None = None


class BalanceOut(BaseModel):
    credits: int = Field(
        description="Posted: the sum of your ledger. Below 0 when a refunded or disputed purchase was already spent"
    )
    held: int = Field(description="Reserved by your active holds")
    available: int = Field(description="What you can spend or hold now: credits - held")


class ProfileOut(BaseModel):
    id: UUID
    full_name: str | None
    credits: int = Field(
        description="Posted: the sum of your ledger. Below 0 when a refunded or disputed purchase was already spent"
    )
    held: int = Field(description="Reserved by your active holds")
    available: int = Field(description="What you can spend or hold now: credits - held")
    anonymous: bool = Field(description="Signed in anonymously: the signup credits come with a permanent account")
    stripe_customer_id: str | None
    subscription_status: str | None
    subscription_price_id: str | None
    subscription_current_period_end: datetime | None
    subscription_cancel_at_period_end: bool = Field(description="The subscription ends at the period end")
    created_at: datetime
    updated_at: datetime


class _ProfileInput(BaseModel):
    """What a user may send about their profile: unknown fields are 422 (protected ones are refused with 403
    before this model sees them, by the route's dependency)."""

    model_config = ConfigDict(extra="forbid")


class ProfileCreate(_ProfileInput):
    full_name: ShortText | None = Field(None, description=NAME_DESCRIPTION, examples=["Ada Lovelace"])


class ProfileUpdate(_ProfileInput):
    full_name: ShortText | None = Field(
        description=f"The new display name, or null to clear it. {NAME_DESCRIPTION}", examples=["Ada Lovelace"]
    )


def _number_not_text(value: Any) -> Any:
    # JSON numbers only: "30" and true are mistakes, not amounts. (30.0 is the number 30, as JSON Schema
    # says; 2.5 is refused by the integer type itself.)
    if isinstance(value, str | bool):
        raise ValueError("Input should be a valid integer (a JSON number, not a string or boolean)")
    return value


WholeNumber = Annotated[int, BeforeValidator(_number_not_text)]


class CreditEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    amount: int = Field(description="Signed: positive adds credits, negative takes them")
    balance_after: int
    kind: str = Field(examples=["spend"])
    reference: str | None = Field(description="The Stripe object id, or the spend's Idempotency-Key")
    note: str | None
    created_at: datetime


class SpendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: WholeNumber = Field(ge=1, le=SPEND_MAX, description="Credits to spend, a whole number")
    reason: ShortText | None = Field(None, description=REASON_DESCRIPTION, examples=["ad image generation"])


class AdjustmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: WholeNumber = Field(
        ge=-SPEND_MAX, le=SPEND_MAX, description="Signed: positive adds credits, negative takes them"
    )
    reason: ShortText = Field(description=REASON_DESCRIPTION, examples=["support: failed generation"])

    @model_validator(mode="after")
    def _not_zero(self) -> AdjustmentRequest:
        if self.amount == 0:
            raise ValueError("amount must not be 0")
        return self


class BalanceChangeOut(BaseModel):
    balance: int = Field(description="The balance after this change")
    entry: CreditEntryOut

    @classmethod
    def of(cls, entry: CreditEntryOut) -> BalanceChangeOut:
        return cls(balance=entry.balance_after, entry=entry)


HOLD_TTL_MAX = 86_400


class HoldRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: WholeNumber = Field(ge=1, le=SPEND_MAX, description="Credits to reserve, a whole number")
    reason: ShortText | None = Field(None, description=REASON_DESCRIPTION, examples=["ad image generation"])
    ttl_seconds: WholeNumber = Field(
        900, ge=1, le=HOLD_TTL_MAX, description="Seconds until the hold expires by itself if nobody settles it"
    )


class CaptureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: Annotated[int, Field(ge=1, le=SPEND_MAX), BeforeValidator(_number_not_text)] | None = Field(
        None, description="Credits to spend, at most the held amount; all of it when left out"
    )


class HoldOut(BaseModel):
    id: UUID
    amount: int = Field(description="Credits reserved")
    reason: str | None
    state: str = Field(description="active, captured, released or expired", examples=["active"])
    captured: int = Field(description="Credits the capture spent (0 unless captured)")
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None


class HoldAnswer(BaseModel):
    hold: HoldOut
    balance: BalanceOut
    entry: CreditEntryOut | None = Field(None, description="The spend entry a capture wrote")


class HoldsOut(BaseModel):
    holds: list[HoldOut] = Field(description="Your active holds, oldest first")


class PageQuery(BaseModel):
    # A misspelt parameter (`?limt=5`) is a 422 that names it, not a silently ignored wish.
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=100, description="Entries per page")
    before: int | None = Field(None, ge=1, le=2**63 - 1, description="`next_cursor` of the previous page")


class TransactionsOut(BaseModel):
    entries: list[CreditEntryOut]
    next_cursor: int | None = Field(description="Pass as `before` for the next (older) page; null on the last")


class DashboardUser(BaseModel):
    id: UUID
    email: str | None
    role: str


class DashboardOut(BaseModel):
    user: DashboardUser
    profile: ProfileOut | None
    balance: int | None = Field(description="Your credits (posted); null until your profile exists")
    held: int | None = Field(description="Reserved by your active holds; null until your profile exists")
    available: int | None = Field(description="What you can spend or hold now; null until your profile exists")
    recent_entries: list[CreditEntryOut] = Field(description="Your five newest ledger entries")


class CatalogueEntryOut(BaseModel):
    price_id: str = Field(examples=["price_1PackStarter"])
    name: str = Field(examples=["Starter pack"])
    credits: int = Field(description="Credits granted: once for a pack, on every paid invoice for a plan")


class PlansOut(BaseModel):
    publishable_key: str | None = Field(description="Stripe's publishable key, for Stripe.js; null when not set")
    checkout_enabled: bool = Field(description="Whether this server can start a checkout (STRIPE_SECRET_KEY set)")
    credit_packs: list[CatalogueEntryOut] = Field(description="One-time purchases")
    subscription_plans: list[CatalogueEntryOut] = Field(description="Monthly subscriptions")


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    price_id: str = Field(
        min_length=1, max_length=255, description="A price from GET /billing/plans", examples=["price_1PackStarter"]
    )


class CheckoutOut(BaseModel):
    url: str = Field(description="Stripe Checkout: send the browser here")
    session_id: str = Field(examples=["cs_test_a1b2c3"])


class PortalOut(BaseModel):
    url: str = Field(description="Stripe's customer portal: send the browser here")


class WebhookOut(BaseModel):
    received: bool = True
    duplicate: bool = Field(description="The event was already processed; nothing changed")
    outcome: str = Field(description="What processing did", examples=["granted 500 credits"])


class ReplayOut(BaseModel):
    event_id: str
    type: str = Field(examples=["invoice.paid"])
    duplicate: bool = Field(description="The event was already processed; nothing changed")
    outcome: str = Field(description="What processing did", examples=["granted 2000 credits"])


# --- Support (service role) ------------------------------------------------------------------------------------


class StripeEventOut(BaseModel):
    id: str = Field(examples=["evt_1Q2w3E"])
    type: str = Field(examples=["checkout.session.completed"])
    created: datetime = Field(description="When Stripe created the event")
    processed_at: datetime
    outcome: str | None = Field(description="What processing did", examples=["granted 500 credits"])


class RecordedCheckoutOut(BaseModel):
    id: str = Field(examples=["cs_test_a1b2c3"])
    mode: str = Field(examples=["payment"])
    price_id: str
    name: str
    credits: int
    subscription_id: str | None
    created_at: datetime


class PaymentOut(BaseModel):
    id: str = Field(description="The PaymentIntent", examples=["pi_3Q2w3E"])
    grant_kind: str
    grant_reference: str = Field(description="The checkout session or invoice it paid for")
    credits_granted: int
    amount_paid: int = Field(description="In the currency's smallest unit")
    currency: str | None
    amount_refunded: int
    credits_refunded: int
    credits_disputed: int
    created_at: datetime


class SupportProfileOut(BaseModel):
    """One user as support sees them: the profile with its balance figures, and what moved it."""

    profile: ProfileOut
    email: str | None = Field(description="Supabase's, where its auth.users is readable; else the one stored")
    recent_entries: list[CreditEntryOut] = Field(description="The newest ledger entries, newest first")
    active_holds: list[HoldOut]
    stripe_events: list[StripeEventOut] = Field(description="Stripe events that concerned this user, newest first")
    checkouts: list[RecordedCheckoutOut] = Field(description="Checkouts started, newest first (paid or not)")
    payments: list[PaymentOut] = Field(description="Payments behind grants, with what was refunded or disputed")


class SupportSearchOut(BaseModel):
    profiles: list[SupportProfileOut] = Field(description="Every user found (none, one, or a few sharing an email)")


class SupportQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str | None = Field(None, min_length=3, max_length=320, examples=["ada@example.com"])
    stripe_customer_id: str | None = Field(None, min_length=1, max_length=255, examples=["cus_Q2w3E"])

    @model_validator(mode="after")
    def _one_of(self) -> SupportQuery:
        if (self.email is None) == (self.stripe_customer_id is None):
            raise ValueError("give email or stripe_customer_id (one of them)")
        return self
