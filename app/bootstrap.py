"""Database set-up beyond the migrations: Supabase's roles and `auth` functions where they are missing,
row level security, the realtime publication and the optional signup trigger.

Everything here is idempotent and runs under the migration advisory lock, so any number of deploys may run
it, at the same time or one after another. Each step leaves objects alone when they are already as wanted,
so a redeploy does not take table locks that would stall the running service.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.config import SignupGrants
from app.models import Base
from app.schema import MIGRATION_LOCK_ID
from app.services.profiles import ANONYMOUS_NOTE, SIGNUP_NOTE, SIGNUP_REFERENCE

# Supabase's API roles. PostgREST switches to `anon` or `authenticated` per request.
API_ROLES = ("anon", "authenticated")
SERVICE_ROLE = "service_role"
# Marks an `auth` schema made here on plain PostgreSQL; any other `auth` schema (Supabase's) is never touched.
AUTH_SCHEMA_MARKER = "picads: stand-in for Supabase's auth schema on plain PostgreSQL"
# Policies made here carry this comment prefix and a fingerprint of their definition.
POLICY_MARKER = "picads policy "
REALTIME_PUBLICATION = "supabase_realtime"
SIGNUP_FUNCTION = "create_profile_for_new_user"
SIGNUP_TRIGGER = "picads_create_profile"
INSUFFICIENT_PRIVILEGE = "42501"


class BootstrapError(Exception):
    """A set-up step cannot proceed; the message says why and what to do."""


class StepSkipped(Exception):
    """The step does not apply to this database; the message says why."""


@dataclass(frozen=True)
class TableAccess:
    """What a signed-in user may do with a table through Supabase's data API (PostgREST).

    `owner_column` holds the user's id (`auth.uid()`); rows where it matches are the user's own.
    The default, no access at all, is right for anything only the backend writes.
    """

    owner_column: str | None = None
    read_own: bool = False
    update_own_columns: tuple[str, ...] = ()


NO_ACCESS = TableAccess()

# Every table of ours, by name. A table of ours that is missing here (a new model, say) gets NO_ACCESS:
# add it here to open anything up.
TABLE_ACCESS: dict[str, TableAccess] = {
    "profiles": TableAccess(owner_column="id", read_own=True, update_own_columns=("full_name",)),
    "credit_entries": TableAccess(owner_column="profile_id", read_own=True),
    "credit_holds": TableAccess(owner_column="profile_id", read_own=True),
    "stripe_events": NO_ACCESS,
    "checkout_sessions": NO_ACCESS,
    "stripe_payments": NO_ACCESS,
    "stripe_disputes": NO_ACCESS,
    "alembic_version": NO_ACCESS,
}

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


def _ident(name: str) -> str:
    """A plain lower-case identifier, safe to put into SQL as is (all of ours are)."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def lock(connection: AsyncConnection) -> None:
    """Serialize with migrations and other deploys until the transaction ends."""
    await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})


async def _scalar_bool(connection: AsyncConnection, sql: str, **params: object) -> bool:
    return bool(await connection.scalar(text(sql), params))


async def _table_exists(connection: AsyncConnection, table: str) -> bool:
    return await _scalar_bool(connection, "SELECT to_regclass(:name) IS NOT NULL", name=f"public.{_ident(table)}")


async def our_tables(connection: AsyncConnection) -> list[str]:
    """The tables of ours that exist now: the models' tables, the registry's, and Alembic's bookkeeping."""
    names = sorted(set(Base.metadata.tables) | set(TABLE_ACCESS))
    return [name for name in names if await _table_exists(connection, name)]


# --- Supabase compatibility ------------------------------------------------------------------------------

_AUTH_FUNCTIONS = (
    # As Supabase defines them: the claims PostgREST puts into `request.jwt.claims` for each request
    # (and the older one-setting-per-claim form), empty when there is no request.
    """
    CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
        SELECT coalesce(
            nullif(current_setting('request.jwt.claim', true), ''),
            nullif(current_setting('request.jwt.claims', true), '')
        )::jsonb
    $$
    """,
    """
    CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
        SELECT coalesce(
            nullif(current_setting('request.jwt.claim.sub', true), ''),
            nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
        )::uuid
    $$
    """,
    """
    CREATE OR REPLACE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
        SELECT coalesce(
            nullif(current_setting('request.jwt.claim.role', true), ''),
            nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
        )::text
    $$
    """,
)


async def ensure_supabase_roles_and_auth(connection: AsyncConnection) -> str:
    """On plain PostgreSQL, create what Supabase provides so the same policies work; on Supabase, only check."""
    auth_comment = await connection.execute(
        text("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = 'auth'")
    )
    row = auth_comment.first()
    if row is not None and row[0] != AUTH_SCHEMA_MARKER:
        if not await _scalar_bool(connection, "SELECT to_regprocedure('auth.uid()') IS NOT NULL"):
            raise BootstrapError(
                "the database has an auth schema without auth.uid(), so the policies cannot be written; "
                "is this a Supabase database? (on plain PostgreSQL, drop or rename that schema)"
            )
        missing = await _missing_roles(connection)
        if missing:
            raise BootstrapError(f"the database has an auth schema but no role {', '.join(missing)}")
        return "Supabase auth schema found (left as is)"

    created = await _missing_roles(connection)
    try:
        for role in created:
            options = "NOLOGIN NOINHERIT BYPASSRLS" if role == SERVICE_ROLE else "NOLOGIN NOINHERIT"
            # Roles belong to the whole server, not to this database's advisory lock: tolerate a twin.
            await connection.execute(
                text(
                    f"DO $$ BEGIN CREATE ROLE {_ident(role)} {options}; "
                    "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
                )
            )
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE:
            raise BootstrapError(
                f"the database user may not create the roles {', '.join(created)}: create them once as a "
                "superuser, or connect as a user with CREATEROLE"
            ) from None
        raise
    await connection.execute(text("CREATE SCHEMA IF NOT EXISTS auth"))
    await connection.execute(text(f"COMMENT ON SCHEMA auth IS {_literal(AUTH_SCHEMA_MARKER)}"))
    for statement in _AUTH_FUNCTIONS:
        await connection.execute(text(statement))
    roles = ", ".join((*API_ROLES, SERVICE_ROLE))
    await connection.execute(text(f"GRANT USAGE ON SCHEMA auth TO {roles}"))
    await connection.execute(text(f"GRANT USAGE ON SCHEMA public TO {roles}"))
    made = f"created roles {', '.join(created)}; " if created else ""
    return f"plain PostgreSQL: {made}auth.uid(), auth.role(), auth.jwt() in place"


async def _missing_roles(connection: AsyncConnection) -> list[str]:
    wanted = [*API_ROLES, SERVICE_ROLE]
    existing = set(
        await connection.scalars(text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"), {"names": wanted})
    )
    return [role for role in wanted if role not in existing]


# --- Row level security ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    name: str
    table: str
    statement: str

    @property
    def fingerprint(self) -> str:
        return POLICY_MARKER + hashlib.sha256(self.statement.encode()).hexdigest()[:16]


def policies_for(table: str, access: TableAccess) -> list[Policy]:
    """Supabase's recommended form: `(select auth.uid())` is evaluated once per statement, not per row."""
    if access.owner_column is None:
        return []
    own = f"((SELECT auth.uid()) = {_ident(access.owner_column)})"
    policies = []
    if access.read_own:
        name = f"{table}_select_own"
        policies.append(
            Policy(name, table, f"CREATE POLICY {name} ON public.{table} FOR SELECT TO authenticated USING {own}")
        )
    if access.update_own_columns:
        name = f"{table}_update_own"
        policies.append(
            Policy(
                name,
                table,
                f"CREATE POLICY {name} ON public.{table} FOR UPDATE TO authenticated USING {own} WITH CHECK {own}",
            )
        )
    return policies


async def apply_row_level_security(connection: AsyncConnection) -> list[str]:
    """RLS on every table of ours, grants only for what the front end may do, exactly our policies.

    Returns one short description per table. Policies on these tables that are not ours are removed: any
    permissive policy would widen what a user can read or write, so the set must be exactly this one.
    """
    summary = []
    for table in await our_tables(connection):
        access = TABLE_ACCESS.get(table, NO_ACCESS)
        qualified = f"public.{_ident(table)}"
        if not await _scalar_bool(
            connection, "SELECT relrowsecurity FROM pg_class WHERE oid = CAST(:t AS regclass)", t=qualified
        ):
            await connection.execute(text(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY"))

        # Supabase grants every privilege on new public tables to anon and authenticated by default;
        # take all of that back (column grants go with it), then give back exactly what is allowed.
        api_roles = ", ".join(API_ROLES)
        await connection.execute(text(f"REVOKE ALL ON TABLE {qualified} FROM {api_roles}"))
        for sequence in await connection.scalars(
            text(
                "SELECT s.oid::regclass::text FROM pg_class s JOIN pg_depend d ON d.objid = s.oid "
                "AND d.classid = 'pg_class'::regclass AND d.refobjid = CAST(:t AS regclass) "
                "AND d.deptype IN ('a', 'i') WHERE s.relkind = 'S'"
            ),
            {"t": qualified},
        ):
            await connection.execute(text(f"REVOKE ALL ON SEQUENCE {sequence} FROM {api_roles}"))
        await connection.execute(text(f"GRANT ALL ON TABLE {qualified} TO {SERVICE_ROLE}"))
        allowed = []
        if access.read_own:
            await connection.execute(text(f"GRANT SELECT ON TABLE {qualified} TO authenticated"))
            allowed.append("read own")
        if access.update_own_columns:
            columns = ", ".join(_ident(column) for column in access.update_own_columns)
            await connection.execute(text(f"GRANT UPDATE ({columns}) ON TABLE {qualified} TO authenticated"))
            allowed.append(f"update own {columns}")

        await _sync_policies(connection, table, policies_for(table, access))
        summary.append(f"{table} ({', '.join(allowed) or 'no access'})")
    return summary


async def _sync_policies(connection: AsyncConnection, table: str, wanted: list[Policy]) -> None:
    """Make the table's policies exactly `wanted`, touching (and locking) it only when something differs."""
    rows = await connection.execute(
        text(
            "SELECT p.polname, obj_description(p.oid, 'pg_policy') FROM pg_policy p "
            "WHERE p.polrelid = CAST(:t AS regclass)"
        ),
        {"t": f"public.{table}"},
    )
    existing: dict[str, str | None] = {row[0]: row[1] for row in rows}
    wanted_names = {policy.name for policy in wanted}
    for name in existing:
        if name not in wanted_names:
            await connection.execute(text(f'DROP POLICY "{name.replace(chr(34), chr(34) * 2)}" ON public.{table}'))
    for policy in wanted:
        if existing.get(policy.name) == policy.fingerprint:
            continue
        await connection.execute(text(f"DROP POLICY IF EXISTS {policy.name} ON public.{table}"))
        await connection.execute(text(policy.statement))
        await connection.execute(text(f"COMMENT ON POLICY {policy.name} ON public.{table} IS '{policy.fingerprint}'"))


# --- Realtime --------------------------------------------------------------------------------------------


async def enable_realtime(connection: AsyncConnection, table: str = "profiles") -> str:
    """Add the table to Supabase's realtime publication (made when missing), once."""
    publication = await connection.execute(
        text("SELECT puballtables FROM pg_publication WHERE pubname = :name"), {"name": REALTIME_PUBLICATION}
    )
    row = publication.first()
    if row is None:
        await connection.execute(text(f"CREATE PUBLICATION {REALTIME_PUBLICATION}"))
    elif row[0]:
        return f"{REALTIME_PUBLICATION} already publishes every table"
    listed = await _scalar_bool(
        connection,
        "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = :pub "
        "AND schemaname = 'public' AND tablename = :table)",
        pub=REALTIME_PUBLICATION,
        table=table,
    )
    if listed:
        return f"{table} already in {REALTIME_PUBLICATION}"
    await connection.execute(text(f"ALTER PUBLICATION {REALTIME_PUBLICATION} ADD TABLE public.{_ident(table)}"))
    created = " (publication created)" if row is None else ""
    return f"{table} added to {REALTIME_PUBLICATION}{created}"


# --- Signup trigger --------------------------------------------------------------------------------------


async def _auth_users_has(connection: AsyncConnection, column: str) -> bool:
    return await _scalar_bool(
        connection,
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'auth' "
        "AND table_name = 'users' AND column_name = :column)",
        column=column,
    )


# What the API refuses in a name, removed: control characters, and invisible or direction-changing ones.
_UNPRINTABLE = r"[[:cntrl:]\u00AD\u200B\u200E\u200F\u202A-\u202E\u2060-\u2064\u2066-\u2069\uFEFF]"


async def install_signup_trigger(connection: AsyncConnection, grants: SignupGrants) -> str:
    """Where Supabase's auth.users exists: create each new user's profile (and its ledger grant) at signup. An
    anonymous sign-in gets the anonymous grant; the API gives the full one with a permanent account."""
    if not await _scalar_bool(connection, "SELECT to_regclass('auth.users') IS NOT NULL"):
        raise StepSkipped("no auth.users table here (not a Supabase database)")
    signup, anonymous_credits = int(grants.signup), int(grants.anonymous)
    # The name a user typed at signup (or their OAuth provider's), cleaned as the API would store it.
    cleaned = f"regexp_replace(NEW.raw_user_meta_data ->> 'full_name', '{_UNPRINTABLE}', '', 'g')"
    full_name = (
        f"left(nullif(btrim({cleaned}), ''), 200)"
        if await _auth_users_has(connection, "raw_user_meta_data")
        else "NULL"
    )
    anonymous = "coalesce(NEW.is_anonymous, false)" if await _auth_users_has(connection, "is_anonymous") else "false"
    reference, note, anonymous_note = _literal(SIGNUP_REFERENCE), _literal(SIGNUP_NOTE), _literal(ANONYMOUS_NOTE)
    # SECURITY DEFINER: the signup runs as Supabase's auth service, which may not write our tables.
    await connection.execute(
        text(
            f"""
            CREATE OR REPLACE FUNCTION public.{SIGNUP_FUNCTION}() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
            DECLARE
                anonymous boolean := {anonymous};
                credits bigint := CASE WHEN anonymous THEN {anonymous_credits} ELSE {signup} END;
            BEGIN
                INSERT INTO public.profiles (id, full_name, credits, signup_pending)
                VALUES (NEW.id, {full_name}, credits, CASE WHEN anonymous THEN {signup} END)
                ON CONFLICT (id) DO NOTHING;
                IF FOUND AND (credits > 0 OR NOT anonymous) THEN
                    INSERT INTO public.credit_entries (profile_id, amount, balance_after, kind, reference, note)
                    VALUES (NEW.id, credits, credits,
                            CASE WHEN anonymous THEN 'anonymous_grant' ELSE 'signup_grant' END, {reference},
                            CASE WHEN anonymous THEN {anonymous_note} ELSE {note} END);
                END IF;
                RETURN NEW;
            END
            $$
            """  # noqa: S608 - integers and constants, no input
        )
    )
    await connection.execute(text(f"REVOKE ALL ON FUNCTION public.{SIGNUP_FUNCTION}() FROM PUBLIC"))
    if await _missing_roles(connection) == []:
        api_roles = ", ".join((*API_ROLES, SERVICE_ROLE))
        await connection.execute(text(f"REVOKE ALL ON FUNCTION public.{SIGNUP_FUNCTION}() FROM {api_roles}"))
    installed = await _scalar_bool(
        connection,
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'auth.users'::regclass AND tgname = :name)",
        name=SIGNUP_TRIGGER,
    )
    if not installed:
        await connection.execute(
            text(
                f"CREATE TRIGGER {SIGNUP_TRIGGER} AFTER INSERT ON auth.users "
                f"FOR EACH ROW EXECUTE FUNCTION public.{SIGNUP_FUNCTION}()"
            )
        )
    return (
        f"new users in auth.users get a profile with {signup} credits and a signup_grant ledger entry "
        f"({anonymous_credits} for an anonymous sign-in)"
    )
