"""Deploy bootstrap: wait for the database, apply the migrations, then row level security and realtime.

Safe to run on every deploy and restart: it migrates (never drops), every step is idempotent, and two
copies started at once take turns on a PostgreSQL advisory lock.

    python create_tables.py --enable-rls --wait 30     # what the Docker image runs before gunicorn
    python create_tables.py --check                    # connection and ledger check only

Each step prints one line. On failure the last line names the cause and a fix, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from app import bootstrap
from app.config import Settings, describe, load_settings
from app.database import create_engine
from app.errors import StartupError, exception_chain
from app.schema import migrate
from app.services.credits import find_ledger_mismatches

DEFAULT_ENV_FILE = ".env"
STEP_WIDTH = 15


class StepFailed(Exception):
    """A step failed for a reason the message explains; no traceback is shown."""

    def __init__(self, message: str, step: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.step = step


def print_step(step: str, status: str, detail: str = "", stream: TextIO | None = None) -> None:
    line = f"{step:<{STEP_WIDTH}}{status:<8}{detail}".rstrip()
    print(line, file=stream or sys.stdout, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="create_tables.py",
        description="Bring the database up to date: migrations (never drops), then optional RLS and realtime.",
    )
    parser.add_argument(
        "--env", metavar="PATH", help=f"settings file to read (default: {DEFAULT_ENV_FILE}, if present)"
    )
    parser.add_argument("--no-env-file", action="store_true", help="read the process environment only")
    parser.add_argument("--enable-rls", action="store_true", help="row level security, grants and policies")
    parser.add_argument(
        "--enable-realtime", action="store_true", help="add profiles to the supabase_realtime publication"
    )
    parser.add_argument(
        "--signup-trigger", action="store_true", help="create each new Supabase user's profile at signup"
    )
    parser.add_argument(
        "--check", action="store_true", help="test the connection and the ledger invariant only, then exit"
    )
    parser.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="keep retrying the connection this long (for a database that starts alongside the app)",
    )
    args = parser.parse_args(argv)
    if args.wait < 0:
        parser.error("--wait must be zero or more seconds")
    if args.env and args.no_env_file:
        parser.error("--env and --no-env-file exclude each other")
    return args


def read_settings(args: argparse.Namespace) -> tuple[Settings, str]:
    """The app's own Settings, and where they came from."""
    env_file: Path | None = None
    if not args.no_env_file:
        env_file = Path(args.env or DEFAULT_ENV_FILE)
        if not env_file.is_file():
            if args.env:  # asked for by name: a typo must not silently select another database
                raise StepFailed(f"settings file {env_file} not found: fix the --env path, or leave --env out")
            env_file = None
    try:
        settings = load_settings(_env_file=env_file)
    except SystemExit as exc:  # the message names the setting at fault
        raise StepFailed(str(exc.code)) from None
    if not settings.database_configured:
        raise StepFailed(
            "no database configured: set DATABASE_URL (or DB_HOST, DB_PORT, DB_USER, DB_PASSWORD, DB_NAME) "
            "in the environment or in .env; this deploy step never starts the embedded development database "
            "(python main.py migrates that one by itself)"
        )
    source = f"{env_file} and the environment" if env_file else "the environment"
    return settings, source


def describe_settings(settings: Settings, url: URL, source: str) -> str:
    address = describe(url)
    pooler = ", pooler mode" if settings.pooler_mode_for(url) else ""
    return (
        f"user {address.user or '(default)'}, host {address.host}, port {address.port}, "
        f"database {address.database or '(default)'}{pooler} (from {source})"
    )


@dataclass(frozen=True)
class Problem:
    sentence: str
    # Worth retrying under --wait: the database may simply not be up yet.
    transient: bool


@dataclass(frozen=True)
class Failure:
    """What one error in the chain says: its type, PostgreSQL's SQLSTATE, its message."""

    error: BaseException
    state: str | None
    message: str

    def ssl_required(self) -> bool:
        encryption = self.state == "28000" and ("no encryption" in self.message or "SSL off" in self.message)
        return encryption or ("SSL" in self.message and "required" in self.message)


# The ways connecting to PostgreSQL usually fails, first match wins: (test, sentence with the cause and a fix,
# transient). Sentences may name {host}, {target} (host:port), {user}, {database}, {timeout}, {message}.
_PROBLEMS: list[tuple[Callable[[Failure], bool], str, bool]] = [
    (
        lambda f: isinstance(f.error, socket.gaierror),
        'host "{host}" not found: check DB_HOST or the host in DATABASE_URL '
        "(Supabase: Connect > connection string in the dashboard)",
        True,
    ),
    (
        lambda f: isinstance(f.error, ConnectionRefusedError),
        "connection refused by {target}: no database listens there; check the port (5432 for PostgreSQL, "
        "6543 for Supabase's transaction pooler) and that the database is running",
        True,
    ),
    (
        lambda f: isinstance(f.error, TimeoutError),
        "timed out after {timeout:g}s connecting to {target}: check the host and port and that no firewall "
        "blocks them (DB_CONNECT_TIMEOUT sets the limit)",
        True,
    ),
    (
        lambda f: f.state == "28P01",
        'password rejected for user "{user}": check DB_PASSWORD or the password in DATABASE_URL '
        "(special characters there must be percent-encoded, @ as %40)",
        False,
    ),
    (
        lambda f: "rejected SSL upgrade" in f.message or "does not support SSL" in f.message,
        "the server at {target} does not accept SSL but the settings require it: remove sslmode from "
        "DATABASE_URL or enable SSL on the server",
        False,
    ),
    (Failure.ssl_required, "the server at {target} requires SSL: add ?sslmode=require to DATABASE_URL", False),
    (
        lambda f: f.state == "3D000",
        'database "{database}" does not exist on {target}: create it, or fix DB_NAME or the database name in '
        "DATABASE_URL (Supabase's is postgres)",
        False,
    ),
    (
        lambda f: f.state == "28000" and "does not exist" in f.message,
        'user "{user}" does not exist on {target}: check DB_USER or the user in DATABASE_URL',
        False,
    ),
    (
        lambda f: "Tenant or user not found" in f.message,
        "Supabase's pooler does not know user \"{user}\": use the pooler's user name, postgres.<project-ref>, "
        "from Connect in the dashboard",
        False,
    ),
    (
        lambda f: f.state == "28000",
        'the server at {target} refuses user "{user}" for database "{database}" ({message}): check its '
        "pg_hba.conf or network restrictions",
        False,
    ),
    (  # starting up / too many connections
        lambda f: f.state in {"57P03", "53300"},
        "the database at {target} is not accepting connections yet: {message}",
        True,
    ),
    (
        lambda f: isinstance(f.error, OSError),
        "cannot reach {target}: {message}; check the host, port and network",
        True,
    ),
]


def explain_connection_error(exc: BaseException, url: URL, settings: Settings) -> Problem | None:
    """One sentence with the cause and a fix, for the ways connecting to PostgreSQL usually fails."""
    address = describe(url)
    for error in exception_chain(exc):
        message = (error.strerror if isinstance(error, OSError) else None) or str(error)
        failure = Failure(error, getattr(error, "sqlstate", None), message)
        for matches, sentence, transient in _PROBLEMS:
            if matches(failure):
                details = {
                    "host": address.host,
                    "target": address.target,
                    "user": address.user,
                    "database": address.database,
                    "timeout": settings.db_connect_timeout,
                    "message": message,
                }
                return Problem(sentence.format(**details), transient)
    return None


async def connect(engine: AsyncEngine, url: URL, settings: Settings, wait: float) -> str:
    """The server version, once the database answers (retrying transient failures for `wait` seconds)."""
    deadline = time.monotonic() + wait
    announced = False
    while True:
        try:
            async with engine.connect() as connection:
                version = await connection.scalar(text("SHOW server_version"))
                return f"PostgreSQL {str(version).split()[0]} at {describe(url).target}"
        except Exception as exc:
            problem = explain_connection_error(exc, url, settings)
            if problem is None:
                raise
            remaining = deadline - time.monotonic()
            if not problem.transient or remaining <= 0:
                raise StepFailed(problem.sentence) from None
            if not announced:
                print_step("connection", "waiting", f"{problem.sentence.split(': ', 1)[0]}; retrying for {wait:g}s")
                announced = True
            await asyncio.sleep(min(1.0, remaining))


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        if not await connection.scalar(text("SELECT to_regclass('public.alembic_version') IS NOT NULL")):
            return None
        versions = list(await connection.scalars(text("SELECT version_num FROM alembic_version ORDER BY 1")))
        return ", ".join(versions) or None


async def check_ledger(engine: AsyncEngine) -> str:
    """Every balance must equal the sum of its ledger entries, and every held total the sum of its active holds;
    a mismatch fails --check (for monitoring)."""
    async with AsyncSession(engine) as session:
        if not await session.scalar(text("SELECT to_regclass('public.credit_holds') IS NOT NULL")):
            return "the ledger's tables are not all there yet (run without --check to migrate)"
        profiles = await session.scalar(text("SELECT count(*) FROM profiles"))
        mismatches = await find_ledger_mismatches(session)
    if mismatches:
        first = mismatches[0]
        raise StepFailed(
            f"{len(mismatches)} balance(s) differ from their ledger or holds, e.g. profile {first.profile_id}: "
            f"balance {first.balance}, entries sum to {first.ledger_sum}; held {first.held}, active holds sum to "
            f"{first.holds_sum}: something wrote them outside the API (an adjustment moves both, so it cannot close "
            "this gap); find that writer first"
        )
    return f"every balance equals the sum of its ledger entries, every held total its holds ({profiles} profiles)"


async def run_migrations(engine: AsyncEngine) -> str:
    before = await migrate(engine)
    after = await current_revision(engine)
    if before == after:
        return f"up to date at revision {after}"
    return f"at revision {after} (was {before or 'an empty database'})"


async def in_locked_transaction(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[str]]) -> str:
    async with engine.begin() as connection:
        await bootstrap.lock(connection)
        return await work(connection)


async def rls_step(connection: AsyncConnection) -> str:
    compat = await bootstrap.ensure_supabase_roles_and_auth(connection)
    tables = await bootstrap.apply_row_level_security(connection)
    return f"{'; '.join(tables)}. {compat}"


async def run(args: argparse.Namespace) -> None:
    try:
        settings, source = read_settings(args)
    except StepFailed as exc:
        raise StepFailed(exc.message, "settings") from None
    step = "settings"
    # The deploy step may run long migrations: no statement timeout, and one connection is plenty.
    settings = settings.model_copy(update={"db_statement_timeout_ms": 0, "db_pool_size": 1, "db_max_overflow": 0})
    url = settings.database_url_object
    print_step(step, "ok", describe_settings(settings, url, source))
    try:
        engine = create_engine(settings, url)
    except ValueError as exc:  # e.g. an unknown sslmode
        raise StepFailed(f"Configuration error: {exc}", step) from None
    try:
        step = "connection"
        print_step(step, "ok", await connect(engine, url, settings, args.wait))
        if args.check:
            step = "ledger"
            print_step(step, "ok", await check_ledger(engine))
            return
        step = "migrations"
        print_step(step, "ok", await run_migrations(engine))
        optional: list[tuple[str, bool, str, Callable[[AsyncConnection], Awaitable[str]]]] = [
            ("rls", args.enable_rls, "--enable-rls", rls_step),
            ("realtime", args.enable_realtime, "--enable-realtime", bootstrap.enable_realtime),
            (
                "signup trigger",
                args.signup_trigger,
                "--signup-trigger",
                lambda connection: bootstrap.install_signup_trigger(connection, settings.signup_grants),
            ),
        ]
        for step, enabled, flag, work in optional:
            if not enabled:
                print_step(step, "skipped", f"(add {flag})")
                continue
            try:
                print_step(step, "ok", await in_locked_transaction(engine, work))
            except bootstrap.StepSkipped as skipped:
                print_step(step, "skipped", str(skipped))
    except StepFailed as exc:
        raise StepFailed(exc.message, step) from None
    except (bootstrap.BootstrapError, StartupError) as exc:
        raise StepFailed(str(exc), step) from None
    except Exception as exc:
        problem = explain_connection_error(exc, url, settings)
        if problem is not None:
            raise StepFailed(problem.sentence, step) from None
        if isinstance(exc, DBAPIError):  # PostgreSQL refused a statement: its own message says why
            detail = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            raise StepFailed(f"PostgreSQL refused it: {detail}", step) from None
        raise
    finally:
        await engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except StepFailed as exc:
        print_step(exc.step or "failed", "FAILED", exc.message, stream=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
