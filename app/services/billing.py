"""Stripe billing: the catalogue, Checkout and the customer portal, and webhook events processed exactly once.

Credits always come from the configured catalogue (CREDIT_PACKS, SUBSCRIPTION_PLANS), never from a client.
A webhook event is recorded in `stripe_events` in the same transaction as its effects, so a second delivery
changes nothing; grants are also unique per Stripe object (checkout session, invoice) in the ledger.

Event payloads are read in the shape of Stripe API versions from 2025-03-31 on (the pinned library's
version and newer): an invoice's subscription in `parent.subscription_details`, a line's price in
`pricing.price_details.price`, the billing period on subscription items. The older top-level fields are
read as a fallback, because a webhook endpoint sends events in its own configured API version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import stripe
from sqlalchemy import exists, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from app.auth import User
from app.config import CatalogueItem, Settings
from app.errors import BadGateway, BadRequest, Conflict, NotFound, Unprocessable
from app.models import CreditKind, Profile, StripeEvent
from app.services import credits, profiles

logger = logging.getLogger(__name__)

# Where Stripe sends the user back to, on FRONTEND_URL. Checkout fills in {CHECKOUT_SESSION_ID} itself.
SUCCESS_PATH = "/billing/success?session_id={CHECKOUT_SESSION_ID}"
CANCEL_PATH = "/billing/cancel"
PORTAL_RETURN_PATH = "/billing"

NO_CUSTOMER = "no Stripe customer yet: buy a credit pack or subscribe first"
STRIPE_NOT_CONFIGURED = "payments are not configured on this server (STRIPE_SECRET_KEY is not set)"
WEBHOOK_NOT_CONFIGURED = "webhooks are not configured on this server (STRIPE_WEBHOOK_SECRET is not set)"

# Subscription statuses after which nothing more happens to that subscription.
ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})
PAID_CHECKOUT = frozenset({"paid", "no_payment_required"})


Mode = Literal["payment", "subscription"]


@dataclass(frozen=True, slots=True)
class Offer:
    price_id: str
    item: CatalogueItem
    mode: Mode


def find_offer(settings: Settings, price_id: str) -> Offer:
    """The catalogue entry for `price_id` (a pack is bought once, a plan is a subscription), or 422."""
    if price_id in settings.credit_packs:
        return Offer(price_id, settings.credit_packs[price_id], "payment")
    if price_id in settings.subscription_plans:
        return Offer(price_id, settings.subscription_plans[price_id], "subscription")
    raise Unprocessable(f"unknown price_id {price_id!r}: choose one from GET /billing/plans")


@dataclass(frozen=True, slots=True)
class StripeConnection:
    """The Stripe client and the async HTTP client under it (ours to close)."""

    client: stripe.StripeClient
    http: stripe.HTTPXClient

    async def aclose(self) -> None:
        await self.http.close_async()  # type: ignore[no-untyped-call]


def connect_stripe(settings: Settings) -> StripeConnection | None:
    """An async Stripe client with the configured timeout and address; None without a secret key."""
    if settings.stripe_secret_key is None:
        return None
    http = stripe.HTTPXClient(timeout=settings.stripe_timeout)
    client = stripe.StripeClient(
        settings.stripe_secret_key.get_secret_value(),
        http_client=http,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
        max_network_retries=settings.stripe_max_network_retries,
    )
    return StripeConnection(client, http)


def _upstream_error(action: str, exc: stripe.StripeError) -> BadGateway:
    """A Stripe failure as a 502 that says what went wrong, without echoing anything secret."""
    logger.warning(
        "Stripe could not %s: %s (code %s, request %s)", action, type(exc).__name__, exc.code, exc.request_id
    )
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        reason = "Stripe refused this server's API key (check STRIPE_SECRET_KEY)"
    elif isinstance(exc, stripe.APIConnectionError):
        reason = "Stripe could not be reached"
    elif isinstance(exc, stripe.InvalidRequestError) and exc.user_message:
        reason = f"Stripe refused the request: {exc.user_message}"
    else:
        reason = "Stripe failed"
    return BadGateway(f"could not {action}: {reason}; try again shortly")


# --- Checkout and the customer portal -------------------------------------------------------------------------


async def _create_customer(sessions: async_sessionmaker[AsyncSession], client: stripe.StripeClient, user: User) -> str:
    """The user's Stripe customer, created at Stripe and stored on the profile (first writer wins)."""
    params: stripe.params.CustomerCreateParams = {"metadata": {"user_id": str(user.id)}}
    if user.email:
        params["email"] = user.email
    try:
        # Keyed by user: a retry (or a concurrent first checkout) gets the same customer, not a second one.
        customer = await client.v1.customers.create_async(params, {"idempotency_key": f"customer-{user.id}"})
    except stripe.StripeError as exc:
        raise _upstream_error("create the Stripe customer", exc) from None
    async with sessions.begin() as session:
        stored = await session.scalar(
            update(Profile)
            .where(Profile.id == user.id, Profile.stripe_customer_id.is_(None))
            .values(stripe_customer_id=customer.id)
            .returning(Profile.stripe_customer_id)
        )
        if stored is None:  # a concurrent request stored it first (the same customer, by the idempotency key)
            stored = await session.scalar(select(Profile.stripe_customer_id).where(Profile.id == user.id))
    return stored or customer.id


async def create_checkout(
    sessions: async_sessionmaker[AsyncSession],
    client: stripe.StripeClient,
    settings: Settings,
    user: User,
    price_id: str,
) -> tuple[str, str]:
    """A Checkout Session for a catalogue price: (url, session id). Credits are granted by the webhook.

    Unlike other requests this one commits in steps, and holds no database connection while Stripe answers:
    a slow Stripe must not drain the pool for everyone else. The profile (made here if it is missing) and
    the Stripe customer are kept even when the checkout itself then fails; a retry reuses them.
    """
    offer = find_offer(settings, price_id)
    async with sessions.begin() as session:
        profile, _ = await profiles.get_or_create_profile(session, user.id, None, settings.signup_credits)
        status = profile.subscription_status
        if offer.mode == "subscription" and status is not None and status not in ENDED_STATUSES:
            raise Conflict(f"you already have a subscription ({status}): change or cancel it with POST /billing/portal")
        customer = profile.stripe_customer_id
    if customer is None:
        customer = await _create_customer(sessions, client, user)
    base = settings.billing_return_base
    # What was sold travels with the purchase: if the price later leaves the catalogue, the payments still due
    # for it (a subscription's renewals) are granted what the customer bought.
    metadata = {
        "user_id": str(user.id),
        "price_id": offer.price_id,
        "credits": str(offer.item.credits),
        "name": offer.item.name,
    }
    params: stripe.params.checkout.SessionCreateParams = {
        "mode": offer.mode,
        "customer": customer,
        "line_items": [{"price": offer.price_id, "quantity": 1}],
        "client_reference_id": str(user.id),
        "metadata": metadata,
        "success_url": base + SUCCESS_PATH,
        "cancel_url": base + CANCEL_PATH,
    }
    if offer.mode == "subscription":
        # Copied onto every invoice of the subscription, so each renewal finds its user.
        params["subscription_data"] = {"metadata": metadata}
    try:
        checkout = await client.v1.checkout.sessions.create_async(params)
    except stripe.StripeError as exc:
        raise _upstream_error("create the checkout session", exc) from None
    if not checkout.url:
        raise BadGateway("could not create the checkout session: Stripe returned no URL; try again shortly")
    return checkout.url, checkout.id


async def create_portal(
    sessions: async_sessionmaker[AsyncSession], client: stripe.StripeClient, settings: Settings, user_id: UUID
) -> str:
    """A customer portal URL (manage the subscription, cards, invoices); 404 without a Stripe customer.
    The database is read first and let go of before Stripe is asked."""
    async with sessions() as session:
        customer = await session.scalar(select(Profile.stripe_customer_id).where(Profile.id == user_id))
    if not customer:
        raise NotFound(NO_CUSTOMER)
    params: stripe.params.billing_portal.SessionCreateParams = {
        "customer": customer,
        "return_url": settings.billing_return_base + PORTAL_RETURN_PATH,
    }
    try:
        portal = await client.v1.billing_portal.sessions.create_async(params)
    except stripe.StripeError as exc:
        raise _upstream_error("open the customer portal", exc) from None
    return portal.url


# --- Webhook ----------------------------------------------------------------------------------------------------


def verify_event(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The event, once its Stripe-Signature is verified on the raw body (default 300 s tolerance); else 400."""
    if not signature:
        raise BadRequest("missing Stripe-Signature header")
    try:
        event = stripe.Webhook.construct_event(payload, signature, secret)
    except stripe.SignatureVerificationError as exc:
        if str(exc).startswith("Timestamp outside the tolerance zone"):
            raise BadRequest(
                "Stripe signature timestamp is too old: check this server's clock, or resend the event"
            ) from None
        raise BadRequest(
            "invalid Stripe signature: STRIPE_WEBHOOK_SECRET must be the signing secret of this endpoint "
            "(or of `stripe listen`), and the body must reach the server unchanged"
        ) from None
    except ValueError:  # not UTF-8 or not JSON (UnicodeDecodeError is a ValueError)
        raise BadRequest("the webhook body is not a Stripe event") from None
    data: dict[str, Any] = event.to_dict()
    if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str):
        raise BadRequest("the webhook body is not a Stripe event")
    return data


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    created: datetime
    object: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WebhookResult:
    duplicate: bool
    outcome: str


async def process_event(session: AsyncSession, settings: Settings, data: dict[str, Any]) -> WebhookResult:
    """Record the event and apply it, in the caller's transaction; a duplicate delivery changes nothing."""
    event = Event(
        id=data["id"],
        type=data["type"],
        created=datetime.fromtimestamp(int(data.get("created") or 0), UTC),
        object=_dict((data.get("data") or {}).get("object")),
    )
    recorded = await session.scalar(
        insert(StripeEvent)
        .values(id=event.id, type=event.type, created=event.created)
        .on_conflict_do_nothing(index_elements=[StripeEvent.id])
        .returning(StripeEvent.id)
    )
    if recorded is None:
        logger.info("Stripe event %s (%s) already processed", event.id, event.type)
        return WebhookResult(duplicate=True, outcome="duplicate: already processed")
    handler = _HANDLERS.get(event.type)
    outcome = await handler(session, settings, event) if handler else "ignored: event type not handled"
    await session.execute(update(StripeEvent).where(StripeEvent.id == event.id).values(outcome=outcome))
    logger.info("Stripe event %s (%s): %s", event.id, event.type, outcome)
    return WebhookResult(duplicate=False, outcome=outcome)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _id(value: Any) -> str | None:
    """An object's id, whether Stripe sent it as a string or expanded."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _time(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) and not isinstance(value, bool) else None


async def _find_user(session: AsyncSession, settings: Settings, user_id: Any, customer_id: str | None) -> UUID | None:
    """The user an event is for: by the user id we put in metadata (their profile is created if missing,
    so paid credits have somewhere to go), else by the stored Stripe customer."""
    if isinstance(user_id, str) and user_id:
        try:
            found = UUID(user_id)
        except ValueError:
            logger.warning("Stripe metadata user_id %r is not a UUID", user_id)
        else:
            await profiles.get_or_create_profile(session, found, None, settings.signup_credits)
            return found
    if customer_id:
        by_customer: UUID | None = await session.scalar(
            select(Profile.id).where(Profile.stripe_customer_id == customer_id)
        )
        return by_customer
    return None


async def _link_customer(session: AsyncSession, user_id: UUID, customer_id: str | None) -> None:
    """Store the Stripe customer on a profile that has none, unless another profile already holds it."""
    if not customer_id:
        return
    other = aliased(Profile)
    await session.execute(
        update(Profile)
        .where(
            Profile.id == user_id,
            Profile.stripe_customer_id.is_(None),
            ~exists().where(other.stripe_customer_id == customer_id),
        )
        .values(stripe_customer_id=customer_id)
    )


# Checkout Sessions


async def _checkout_completed(session: AsyncSession, settings: Settings, event: Event) -> str:
    checkout = event.object
    metadata = _dict(checkout.get("metadata"))
    customer = _id(checkout.get("customer"))
    user_id = await _find_user(
        session, settings, metadata.get("user_id") or checkout.get("client_reference_id"), customer
    )
    if user_id is None:
        logger.warning("Stripe checkout session %s: no user found", checkout.get("id"))
        return "ignored: no user found for this checkout session"
    await _link_customer(session, user_id, customer)
    mode = checkout.get("mode")
    if mode == "payment":
        if checkout.get("payment_status") not in PAID_CHECKOUT:
            return "waiting: the payment is not complete yet (async_payment_succeeded will grant the pack)"
        return await _grant_pack(session, settings, user_id, checkout)
    if mode == "subscription":
        subscription_id = _id(checkout.get("subscription"))
        if subscription_id is None:
            return "ignored: subscription checkout without a subscription"
        status = "active" if checkout.get("payment_status") in PAID_CHECKOUT else "incomplete"
        price_id = metadata.get("price_id") if isinstance(metadata.get("price_id"), str) else None
        state = SubscriptionState(subscription_id, status, price_id, None, None)
        # The subscription's own events carry its full state; this only links a subscription not seen yet.
        return await _apply_subscription_state(session, user_id, state, event.created, only_if_new=True)
    return f"ignored: checkout mode {mode!r}"


async def _grant_pack(session: AsyncSession, settings: Settings, user_id: UUID, checkout: dict[str, Any]) -> str:
    metadata = _dict(checkout.get("metadata"))
    price_id = metadata.get("price_id")
    pack = settings.credit_packs.get(price_id) if isinstance(price_id, str) else None
    pack = pack or _sold(metadata, price_id)
    if pack is None:
        logger.error(
            "Stripe checkout session %s was paid for price %r, which is not in CREDIT_PACKS: no credits granted",
            checkout.get("id"),
            price_id,
        )
        return f"ignored: price {price_id!r} is not in CREDIT_PACKS"
    entry = await credits.grant(session, user_id, pack.credits, CreditKind.PURCHASE, str(checkout["id"]), pack.name)
    return f"granted {pack.credits} credits" if entry else "already granted"


async def _checkout_payment_failed(session: AsyncSession, settings: Settings, event: Event) -> str:
    logger.warning("Stripe checkout session %s: the delayed payment failed; no credits granted", event.object.get("id"))
    return "payment failed: no credits granted"


# Invoices


def _invoice_subscription(invoice: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The invoice's subscription id and its metadata snapshot (2025-03-31+: under `parent`)."""
    details = _dict(_dict(invoice.get("parent")).get("subscription_details"))
    if details:
        return _id(details.get("subscription")), _dict(details.get("metadata"))
    legacy = _dict(invoice.get("subscription_details"))
    return _id(invoice.get("subscription")), _dict(legacy.get("metadata"))


def _sold(metadata: dict[str, Any], price_id: Any) -> CatalogueItem | None:
    """What our checkout recorded it sold for `price_id` (a price since taken out of the catalogue)."""
    credits_sold = metadata.get("credits")
    if not isinstance(price_id, str) or metadata.get("price_id") != price_id or not isinstance(credits_sold, str):
        return None
    try:
        return CatalogueItem(name=str(metadata.get("name") or price_id), credits=int(credits_sold))
    except ValueError:  # not a whole number in range: not ours
        return None


def _plan_lines(
    settings: Settings, invoice: dict[str, Any], metadata: dict[str, Any]
) -> list[tuple[CatalogueItem, int]]:
    """The plans an invoice charges for a period (subscription lines, prorations left out): from the
    catalogue, or, for a price since retired, what the subscription's checkout sold."""
    found = []
    for line in _dict(invoice.get("lines")).get("data") or []:
        line = _dict(line)
        parent = _dict(line.get("parent"))
        if parent:
            details = _dict(parent.get("subscription_item_details"))
            is_subscription = parent.get("type") == "subscription_item_details"
            proration = bool(details.get("proration"))
        else:  # before 2025-03-31
            is_subscription = line.get("type") == "subscription"
            proration = bool(line.get("proration"))
        price_id = _id(_dict(_dict(line.get("pricing")).get("price_details")).get("price")) or _id(line.get("price"))
        plan = (settings.subscription_plans.get(price_id) if price_id else None) or _sold(metadata, price_id)
        if is_subscription and not proration and plan is not None:
            quantity = line.get("quantity")
            found.append((plan, quantity if isinstance(quantity, int) and quantity > 0 else 1))
    return found


async def _invoice_paid(session: AsyncSession, settings: Settings, event: Event) -> str:
    invoice = event.object
    subscription_id, metadata = _invoice_subscription(invoice)
    if subscription_id is None:
        return "ignored: not a subscription invoice"
    plans = _plan_lines(settings, invoice, metadata)
    if not plans:
        logger.error(
            "Stripe invoice %s (subscription %s) has no price from SUBSCRIPTION_PLANS: no credits granted",
            invoice.get("id"),
            subscription_id,
        )
        return "ignored: no SUBSCRIPTION_PLANS price on this invoice"
    user_id = await _find_user(session, settings, metadata.get("user_id"), _id(invoice.get("customer")))
    if user_id is None:
        logger.warning("Stripe invoice %s: no user found", invoice.get("id"))
        return "ignored: no user found for this invoice"
    await _link_customer(session, user_id, _id(invoice.get("customer")))
    amount = sum(plan.credits * quantity for plan, quantity in plans)
    note = ", ".join(plan.name for plan, _ in plans)[:500]
    entry = await credits.grant(session, user_id, amount, CreditKind.SUBSCRIPTION_GRANT, str(invoice["id"]), note)
    return f"granted {amount} credits" if entry else "already granted"


async def _invoice_payment_failed(session: AsyncSession, settings: Settings, event: Event) -> str:
    invoice = event.object
    subscription_id, metadata = _invoice_subscription(invoice)
    if subscription_id is None:
        return "ignored: not a subscription invoice"
    user_id = await _find_user(session, settings, metadata.get("user_id"), _id(invoice.get("customer")))
    if user_id is None:
        logger.warning("Stripe invoice %s: no user found", invoice.get("id"))
        return "ignored: no user found for this invoice"
    state = SubscriptionState(subscription_id, "past_due", None, None, None)
    return await _apply_subscription_state(session, user_id, state, event.created, same_subscription_only=True)


# Subscriptions


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    subscription_id: str
    status: str
    # None: not known from this event (kept when it is about the stored subscription).
    price_id: str | None
    current_period_end: datetime | None
    cancel_at_period_end: bool | None


def _lifecycle(status: str | None) -> int:
    """Order within one subscription's life, to settle two events stamped in the same second."""
    if status == "incomplete":
        return 0
    return 2 if status in ENDED_STATUSES else 1


def _why_not_applied(profile: Profile, state: SubscriptionState, at: datetime) -> str | None:
    """Why an event at `at` may not replace the stored subscription state (an older one never does); None if it may."""
    stored_at = profile.subscription_event_at
    if stored_at is None or profile.subscription_id is None:
        return None
    if profile.subscription_id != state.subscription_id:
        stored_live = profile.subscription_status not in ENDED_STATUSES
        new_live = state.status not in ENDED_STATUSES
        if stored_live and not new_live:  # another subscription ending never hides a live one
            return f"ignored: subscription {profile.subscription_id} is live"
        if new_live and not stored_live:  # and a live one replaces an ended one
            return None
        return None if at >= stored_at else "ignored: older than the stored subscription state"
    if at > stored_at or (at == stored_at and _lifecycle(state.status) >= _lifecycle(profile.subscription_status)):
        return None
    return "ignored: older than the stored subscription state"


async def _apply_subscription_state(
    session: AsyncSession,
    user_id: UUID,
    state: SubscriptionState,
    at: datetime,
    *,
    only_if_new: bool = False,
    same_subscription_only: bool = False,
) -> str:
    # Locked, so two events for one profile are compared and written one after the other.
    profile = await session.scalar(
        select(Profile).where(Profile.id == user_id).with_for_update().execution_options(populate_existing=True)
    )
    if profile is None:
        raise NotFound(profiles.PROFILE_NOT_FOUND)
    same = profile.subscription_id == state.subscription_id
    if only_if_new and same:
        return "subscription already linked"
    if same_subscription_only and profile.subscription_id is not None and not same:
        return "ignored: not the profile's current subscription"
    refused = _why_not_applied(profile, state, at)
    if refused:
        return refused
    values: dict[str, Any] = {
        "subscription_id": state.subscription_id,
        "subscription_status": state.status,
        "subscription_price_id": state.price_id,
        "subscription_current_period_end": state.current_period_end,
        "subscription_cancel_at_period_end": state.cancel_at_period_end or False,
        "subscription_event_at": at,
    }
    if same:  # what this event does not say about the stored subscription stays as it is
        if state.price_id is None:
            del values["subscription_price_id"]
        if state.current_period_end is None:
            del values["subscription_current_period_end"]
        if state.cancel_at_period_end is None:
            del values["subscription_cancel_at_period_end"]
    await session.execute(update(Profile).where(Profile.id == user_id).values(**values))
    return f"subscription {state.subscription_id} is {state.status}"


def _subscription_state(settings: Settings, subscription: dict[str, Any], deleted: bool) -> SubscriptionState | None:
    subscription_id = _id(subscription.get("id"))
    if subscription_id is None:
        return None
    items = [_dict(item) for item in _dict(subscription.get("items")).get("data") or []]
    # The item on a catalogue plan, else the first one.
    item = next((i for i in items if _id(i.get("price")) in settings.subscription_plans), items[0] if items else {})
    # 2025-03-31+: the period is per item; before, on the subscription.
    period_end = _time(item.get("current_period_end")) or _time(subscription.get("current_period_end"))
    status = "canceled" if deleted else str(subscription.get("status") or "incomplete")
    # `cancel_at` set (the portal may use it instead of cancel_at_period_end) also means "will not renew".
    ending = bool(subscription.get("cancel_at_period_end")) or subscription.get("cancel_at") is not None
    return SubscriptionState(
        subscription_id, status, _id(item.get("price")), period_end, ending and status not in ENDED_STATUSES
    )


async def _subscription_changed(session: AsyncSession, settings: Settings, event: Event) -> str:
    subscription = event.object
    state = _subscription_state(settings, subscription, deleted=event.type == "customer.subscription.deleted")
    if state is None:
        return "ignored: no subscription id"
    metadata = _dict(subscription.get("metadata"))
    customer = _id(subscription.get("customer"))
    user_id = await _find_user(session, settings, metadata.get("user_id"), customer)
    if user_id is None:
        logger.warning("Stripe subscription %s: no user found", state.subscription_id)
        return "ignored: no user found for this subscription"
    await _link_customer(session, user_id, customer)
    return await _apply_subscription_state(session, user_id, state, event.created)


_HANDLERS = {
    "checkout.session.completed": _checkout_completed,
    "checkout.session.async_payment_succeeded": _checkout_completed,
    "checkout.session.async_payment_failed": _checkout_payment_failed,
    "invoice.paid": _invoice_paid,
    "invoice.payment_failed": _invoice_payment_failed,
    "customer.subscription.created": _subscription_changed,
    "customer.subscription.updated": _subscription_changed,
    "customer.subscription.deleted": _subscription_changed,
}
HANDLED_EVENTS = tuple(_HANDLERS)
