"""Support's view of one user ("where are my credits?"): the profile with its balance figures, the newest ledger
entries, active holds, the Stripe events that concerned them with what each did, their checkouts and the payments
behind their grants; and finding the user from what a customer writes: an email or a Stripe customer id.

Emails: Supabase's auth.users has each user's current one, where this database user may read it; the profile keeps
the one the user's token carried when the profile was made, for databases without it.
"""

from __future__ import annotations

from uuid import UUID

from app.database import Queries
from app.errors import AppError
from app.schemas import PaymentOut, RecordedCheckoutOut, StripeEventOut, SupportProfileOut
from app.services import credits, holds
from app.services.profiles import profile_by_id

RECENT_ENTRIES = 50
RECENT_EVENTS = 50
RECENT_CHECKOUTS = 20
RECENT_PAYMENTS = 20
# The most users one search answers with (an email can name a few: a deleted user's profile stays).
MAX_FOUND = 10


class UserNotFound(AppError):
    status_code = 404
    default_detail = "no profile with this user id"


_AUTH_USERS_READABLE_SQL = """
SELECT CASE WHEN to_regclass('auth.users') IS NULL THEN false ELSE has_table_privilege('auth.users', 'SELECT') END
"""
_EMAIL_SQL = "SELECT email FROM profiles WHERE id = $1"
_AUTH_EMAIL_SQL = (
    "SELECT coalesce(u.email, p.email) FROM profiles p LEFT JOIN auth.users u ON u.id = p.id WHERE p.id = $1"
)
_BY_EMAIL_SQL = "SELECT id FROM profiles WHERE email = lower($1) ORDER BY created_at LIMIT $2"
# Supabase keeps emails in lower case: both lookups use an index.
_BY_AUTH_EMAIL_SQL = """
SELECT id FROM profiles WHERE id IN (
    SELECT id FROM profiles WHERE email = lower($1) UNION SELECT id FROM auth.users WHERE email = lower($1)
) ORDER BY created_at LIMIT $2
"""
_BY_CUSTOMER_SQL = "SELECT id FROM profiles WHERE stripe_customer_id = $1"
_EVENT_COLUMNS = ", ".join(StripeEventOut.model_fields)
_EVENTS_SQL = f"""
SELECT {_EVENT_COLUMNS} FROM stripe_events WHERE profile_id = $1 ORDER BY processed_at DESC, id LIMIT $2
"""  # noqa: S608 - column names from the schema
_CHECKOUT_COLUMNS = ", ".join(RecordedCheckoutOut.model_fields)
_CHECKOUTS_SQL = f"""
SELECT {_CHECKOUT_COLUMNS} FROM checkout_sessions WHERE profile_id = $1 ORDER BY created_at DESC, id LIMIT $2
"""  # noqa: S608
_PAYMENT_COLUMNS = ", ".join(PaymentOut.model_fields)
_PAYMENTS_SQL = f"""
SELECT {_PAYMENT_COLUMNS} FROM stripe_payments WHERE profile_id = $1 ORDER BY created_at DESC, id LIMIT $2
"""  # noqa: S608


async def _auth_users_readable(db: Queries) -> bool:
    return bool(await db.fetchval(_AUTH_USERS_READABLE_SQL))


async def support_view(db: Queries, user_id: UUID) -> SupportProfileOut:
    profile = await profile_by_id(db, user_id)
    if profile is None:
        raise UserNotFound
    email_sql = _AUTH_EMAIL_SQL if await _auth_users_readable(db) else _EMAIL_SQL
    events = await db.fetch(_EVENTS_SQL, user_id, RECENT_EVENTS)
    checkouts = await db.fetch(_CHECKOUTS_SQL, user_id, RECENT_CHECKOUTS)
    payments = await db.fetch(_PAYMENTS_SQL, user_id, RECENT_PAYMENTS)
    return SupportProfileOut(
        profile=profile,
        email=await db.fetchval(email_sql, user_id),
        recent_entries=await credits.list_entries(db, user_id, RECENT_ENTRIES, before=None),
        active_holds=await holds.active(db, user_id),
        stripe_events=[StripeEventOut.model_validate(dict(row)) for row in events],
        checkouts=[RecordedCheckoutOut.model_validate(dict(row)) for row in checkouts],
        payments=[PaymentOut.model_validate(dict(row)) for row in payments],
    )


async def find_users(db: Queries, *, email: str | None, stripe_customer_id: str | None) -> list[UUID]:
    """The users with this email (in any case) or this Stripe customer, oldest first."""
    if stripe_customer_id is not None:
        rows = await db.fetch(_BY_CUSTOMER_SQL, stripe_customer_id)
    elif email is not None:
        email_sql = _BY_AUTH_EMAIL_SQL if await _auth_users_readable(db) else _BY_EMAIL_SQL
        rows = await db.fetch(email_sql, email.strip(), MAX_FOUND)
    else:
        rows = []
    return [row["id"] for row in rows]
