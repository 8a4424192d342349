"""create_tables.py run as a deploy runs it: a real process against real, fresh databases.

Row level security is checked the way Supabase's data API (PostgREST) applies it: inside a transaction,
`SET ROLE authenticated` (or `anon`) and the request's claims in `request.jwt.claims`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.application import create_app
from app.config import split_sslmode
from app.embedded import start_embedded_postgres
from tests.conftest import (
    PROJECT_ROOT,
    TokenFactory,
    admin_execute,
    bearer,
    free_port,
    make_settings,
    throwaway_database,
)

SCRIPT = PROJECT_ROOT / "create_tables.py"
ALL_STEPS = ("--enable-rls", "--enable-realtime")
SECRET_PASSWORD = "never-shown-5ecret"


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


async def run_script(env: dict[str, str], cwd: Path, *args: str) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def script_env(url: URL | None, data_dir: Path, **extra: str) -> dict[str, str]:
    """The user's environment without any database or Supabase settings, plus the given database."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DB", "SUPABASE_", "DATABASE"))}
    env.update({"ENVIRONMENT": "development", "DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra})
    if url is not None:
        env["DATABASE_URL"] = url.render_as_string(hide_password=False)
    return env


def engine_for(url: URL) -> AsyncEngine:
    url, connect_args = split_sslmode(url)
    return create_async_engine(url, connect_args=connect_args)


@pytest.fixture(scope="module")
async def new_database(server_url: URL) -> AsyncIterator[Callable[[], Awaitable[URL]]]:
    """Make empty databases on the test server; all dropped when the module is done."""
    async with AsyncExitStack() as databases:

        async def create() -> URL:
            return await databases.enter_async_context(throwaway_database(server_url, "deploy"))

        yield create


@asynccontextmanager
async def as_api(engine: AsyncEngine, role: str, user: uuid.UUID | None = None) -> AsyncIterator[AsyncConnection]:
    """A connection acting as PostgREST does for one request; everything it did is rolled back after."""
    claims = {"role": role} if user is None else {"sub": str(user), "role": role, "aud": "authenticated"}
    async with engine.connect() as connection:
        transaction = await connection.begin()
        try:
            await connection.execute(text(f"SET LOCAL ROLE {role}"))
            await connection.execute(
                text("SELECT set_config('request.jwt.claims', :claims, true)"), {"claims": json.dumps(claims)}
            )
            yield connection
        finally:
            await transaction.rollback()


# --- A database deployed twice, with data written between the deploys ------------------------------------


@dataclass(frozen=True)
class Deployed:
    url: URL
    engine: AsyncEngine
    first: Run
    second: Run
    ada: uuid.UUID
    bob: uuid.UUID


@pytest.fixture(scope="module")
async def deployed(
    new_database: Callable[[], Awaitable[URL]], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployed]:
    url = await new_database()
    if not url.password:  # the embedded server trusts local users: any password works, and must not be shown
        url = url.set(password=SECRET_PASSWORD)
    cwd = tmp_path_factory.mktemp("deploy")
    env = script_env(url, cwd)
    first = await run_script(env, cwd, *ALL_STEPS)
    assert first.returncode == 0, first.output
    ada, bob = uuid.uuid4(), uuid.uuid4()
    engine = engine_for(url)
    async with engine.begin() as connection:
        for user, name, credits in ((ada, "Ada", 1000), (bob, "Bob", 500)):
            await connection.execute(
                text("INSERT INTO profiles (id, full_name, credits) VALUES (:id, :name, :credits)"),
                {"id": user, "name": name, "credits": credits},
            )
            await connection.execute(
                text(
                    "INSERT INTO credit_entries (profile_id, amount, balance_after, kind, reference) "
                    "VALUES (:id, :credits, :credits, 'signup_grant', 'signup')"
                ),
                {"id": user, "credits": credits},
            )
        # A backend-only table as the billing work will add it (kept if a migration already made it).
        await connection.execute(
            text("CREATE TABLE IF NOT EXISTS stripe_events (id text PRIMARY KEY, type text, processed_at timestamptz)")
        )
        # A policy someone added by hand in the dashboard: it would show every profile to everyone.
        await connection.execute(
            text('CREATE POLICY "Enable read access for all users" ON profiles FOR SELECT USING (true)')
        )
    second = await run_script(env, cwd, *ALL_STEPS)
    assert second.returncode == 0, second.output
    yield Deployed(url, engine, first, second, ada, bob)
    await engine.dispose()


async def test_a_redeploy_keeps_every_row(deployed: Deployed) -> None:
    assert "migrations     ok      at revision" in deployed.first.stdout
    assert "migrations     ok      up to date" in deployed.second.stdout
    async with deployed.engine.connect() as connection:
        profiles = (
            await connection.execute(text("SELECT id, full_name, credits FROM profiles ORDER BY credits"))
        ).all()
        entries = await connection.scalar(text("SELECT count(*) FROM credit_entries"))
    assert [tuple(row) for row in profiles] == [(deployed.bob, "Bob", 500), (deployed.ada, "Ada", 1000)]
    assert entries == 2


async def test_each_step_prints_one_line_and_never_the_password(deployed: Deployed) -> None:
    password = str(deployed.url.password)
    host = str(deployed.url.host or deployed.url.query["host"])
    names = (
        f"user {deployed.url.username}, host {host}, port {deployed.url.port or 5432}, database {deployed.url.database}"
    )
    for run in (deployed.first, deployed.second):
        steps = [line.split()[0] for line in run.stdout.splitlines()]
        assert steps == ["settings", "connection", "migrations", "rls", "realtime", "signup"]
        assert names in run.stdout
        # A password that is also the user's or the database's name (postgres:postgres, as TEST_DATABASE_URL
        # often is) is printed as that name: it must appear nowhere else.
        assert password not in run.output.replace(names, "").replace(f"at {host}:", "at ")
        assert run.stderr == ""


async def test_each_policy_exists_once_and_hand_made_ones_are_gone(deployed: Deployed) -> None:
    async with deployed.engine.connect() as connection:
        policies = (
            await connection.execute(
                text("SELECT tablename, policyname, cmd, roles::text FROM pg_policies ORDER BY 1, 2")
            )
        ).all()
    assert [tuple(row) for row in policies] == [
        ("credit_entries", "credit_entries_select_own", "SELECT", "{authenticated}"),
        ("credit_holds", "credit_holds_select_own", "SELECT", "{authenticated}"),
        ("profiles", "profiles_select_own", "SELECT", "{authenticated}"),
        ("profiles", "profiles_update_own", "UPDATE", "{authenticated}"),
    ]


async def test_every_table_has_rls_and_backend_tables_grant_nothing(deployed: Deployed) -> None:
    async with deployed.engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT relname, relrowsecurity FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'"
            )
        )
        tables: dict[str, bool] = {row[0]: row[1] for row in rows}
        assert {"profiles", "credit_entries", "stripe_events", "alembic_version"} <= set(tables)
        assert all(tables.values()), tables
        for table in ("stripe_events", "alembic_version"):
            for role in ("anon", "authenticated"):
                granted = await connection.scalar(
                    text("SELECT has_table_privilege(:role, :table, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')"),
                    {"role": role, "table": table},
                )
                assert granted is False, (role, table)


async def test_a_user_reads_only_their_own_rows(deployed: Deployed) -> None:
    async with as_api(deployed.engine, "authenticated", deployed.ada) as api:
        assert list(await api.scalars(text("SELECT id FROM profiles"))) == [deployed.ada]
        assert set(await api.scalars(text("SELECT profile_id FROM credit_entries"))) == {deployed.ada}


async def test_a_user_cannot_write_their_credits_or_ledger(deployed: Deployed) -> None:
    for statement in (
        "UPDATE profiles SET credits = 1000000 WHERE id = :id",
        "UPDATE profiles SET stripe_customer_id = 'cus_x' WHERE id = :id",
        "INSERT INTO credit_entries (profile_id, amount, balance_after, kind) VALUES (:id, 5, 5, 'adjustment')",
        "DELETE FROM profiles WHERE id = :id",
        "INSERT INTO profiles (id) VALUES (gen_random_uuid())",
    ):
        async with as_api(deployed.engine, "authenticated", deployed.ada) as api:
            with pytest.raises(DBAPIError, match="permission denied"):
                await api.execute(text(statement), {"id": deployed.ada})


async def test_a_user_renames_themselves_but_nobody_else(deployed: Deployed) -> None:
    rename = text("UPDATE profiles SET full_name = 'Mallory' WHERE id = :id")
    async with as_api(deployed.engine, "authenticated", deployed.ada) as api:
        assert (await api.execute(rename, {"id": deployed.bob})).rowcount == 0
        assert (await api.execute(rename, {"id": deployed.ada})).rowcount == 1
        assert await api.scalar(text("SELECT full_name FROM profiles")) == "Mallory"
        # The policy's WITH CHECK: a row cannot be handed to another user either.
        with pytest.raises(DBAPIError, match="permission denied"):
            await api.execute(
                text("UPDATE profiles SET id = :other WHERE id = :id"), {"id": deployed.ada, "other": deployed.bob}
            )


async def test_anonymous_callers_read_nothing(deployed: Deployed) -> None:
    for table in ("profiles", "credit_entries", "stripe_events"):
        async with as_api(deployed.engine, "anon") as api:
            with pytest.raises(DBAPIError, match="permission denied"):
                await api.execute(text(f"SELECT * FROM {table}"))  # noqa: S608 - fixed names
    async with as_api(deployed.engine, "authenticated", deployed.ada) as api:
        with pytest.raises(DBAPIError, match="permission denied"):
            await api.execute(text("SELECT * FROM stripe_events"))


async def test_the_service_role_sees_every_row(deployed: Deployed) -> None:
    async with as_api(deployed.engine, "service_role") as api:
        assert set(await api.scalars(text("SELECT id FROM profiles"))) == {deployed.ada, deployed.bob}


async def test_realtime_publishes_profiles_once(deployed: Deployed) -> None:
    assert "profiles added to supabase_realtime" in deployed.first.stdout
    assert "profiles already in supabase_realtime" in deployed.second.stdout
    async with deployed.engine.connect() as connection:
        published = list(
            await connection.scalars(
                text("SELECT tablename FROM pg_publication_tables WHERE pubname = 'supabase_realtime'")
            )
        )
    assert published == ["profiles"]


# --- Deploys starting together --------------------------------------------------------------------------


async def test_two_deploys_starting_at_once_both_succeed(
    new_database: Callable[[], Awaitable[URL]], subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    url = await new_database()
    env = {**subprocess_env, "DATABASE_URL": url.render_as_string(hide_password=False)}
    runs = await asyncio.gather(*(run_script(env, tmp_path, *ALL_STEPS) for _ in range(2)))
    assert [run.returncode for run in runs] == [0, 0], [run.output for run in runs]
    engine = engine_for(url)
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("SELECT count(*) FROM alembic_version")) == 1
            assert await connection.scalar(text("SELECT count(*) FROM pg_policies")) == 4
            assert await connection.scalar(text("SELECT count(*) FROM pg_publication_tables")) == 1
    finally:
        await engine.dispose()


async def test_of_three_deploys_starting_at_once_one_migrates_and_says_so(
    new_database: Callable[[], Awaitable[URL]], subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    url = await new_database()
    env = {**subprocess_env, "DATABASE_URL": url.render_as_string(hide_password=False)}
    runs = await asyncio.gather(*(run_script(env, tmp_path) for _ in range(3)))
    assert [run.returncode for run in runs] == [0, 0, 0], [run.output for run in runs]
    migrations = sorted(line for run in runs for line in run.stdout.splitlines() if line.startswith("migrations"))
    assert len(migrations) == 3
    assert "(was an empty database)" in migrations[0]
    assert all(" ok      up to date at revision " in line for line in migrations[1:]), migrations


# --- The signup trigger ---------------------------------------------------------------------------------


async def test_signup_trigger_creates_the_profile_and_the_api_flow_still_works(
    new_database: Callable[[], Awaitable[URL]],
    subprocess_env: dict[str, str],
    tmp_path: Path,
    token: TokenFactory,
) -> None:
    url = await new_database()
    env = {**subprocess_env, "DATABASE_URL": url.render_as_string(hide_password=False), "SIGNUP_CREDITS": "250"}
    first = await run_script(env, tmp_path, "--enable-rls", "--signup-trigger")
    assert first.returncode == 0, first.output
    assert "signup trigger skipped no auth.users" in " ".join(first.stdout.split())
    engine = engine_for(url)
    try:
        # Supabase's auth.users, in the part that matters here.
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "CREATE TABLE auth.users (id uuid PRIMARY KEY, email text, raw_user_meta_data jsonb, "
                    "is_anonymous boolean NOT NULL DEFAULT false)"
                )
            )
        second = await run_script(env, tmp_path, "--enable-rls", "--signup-trigger")
        assert second.returncode == 0, second.output
        assert "profile with 250 credits and a signup_grant ledger entry" in second.stdout

        grace, newcomer, visitor = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        async with engine.begin() as connection:
            await connection.execute(
                text("INSERT INTO auth.users (id, email, raw_user_meta_data) VALUES (:id, 'g@example.com', :meta)"),
                {"id": grace, "meta": json.dumps({"full_name": " Grace\u202e Hopper\n"})},
            )
            # An anonymous sign-in: no signup grant (ANONYMOUS_SIGNUP_CREDITS is 0), nothing in the ledger.
            await connection.execute(
                text("INSERT INTO auth.users (id, is_anonymous) VALUES (:id, true)"), {"id": visitor}
            )
        async with engine.connect() as connection:
            ledger = (
                await connection.execute(
                    text("SELECT amount, balance_after, kind, reference FROM credit_entries WHERE profile_id = :id"),
                    {"id": grace},
                )
            ).all()
        assert [tuple(row) for row in ledger] == [(250, 250, "signup_grant", "signup")]
        async with engine.connect() as connection:
            anonymous = (
                await connection.execute(
                    text("SELECT credits, signup_pending FROM profiles WHERE id = :id"), {"id": visitor}
                )
            ).one()
            visitor_entries = await connection.scalar(
                text("SELECT count(*) FROM credit_entries WHERE profile_id = :id"), {"id": visitor}
            )
        assert (tuple(anonymous), visitor_entries) == ((0, 250), 0)  # the signup grant waits for a real account
    finally:
        await engine.dispose()

    application = create_app(make_settings(url, tmp_path, signup_credits=250))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            # The anonymous visitor makes their account permanent: the full grant, from the API, once.
            converted = await http.get("/profile", headers=bearer(token(visitor, is_anonymous=False)))
            assert (converted.json()["credits"], converted.json()["anonymous"]) == (250, False)
            found = await http.get("/profile", headers=bearer(token(grace)))
            assert found.status_code == 200
            assert (found.json()["full_name"], found.json()["credits"]) == ("Grace Hopper", 250)
            # A user the trigger has not seen still gets the usual GET 404, POST 201 flow.
            headers = bearer(token(newcomer))
            assert (await http.get("/profile", headers=headers)).status_code == 404
            assert (await http.post("/profile", headers=headers, json={"full_name": "New"})).status_code == 201
            assert (await http.get("/profile", headers=headers)).status_code == 200


# --- Failures: one clear sentence, non-zero exit, no traceback ------------------------------------------


async def test_check_reports_the_ledger_invariant(new_database: Callable[[], Awaitable[URL]], tmp_path: Path) -> None:
    url = await new_database()
    env = script_env(url, tmp_path)
    assert (
        "ledger         ok      the ledger's tables are not all there yet"
        in (await run_script(env, tmp_path, "--check")).stdout
    )
    assert (await run_script(env, tmp_path)).returncode == 0
    engine = engine_for(url)
    try:
        async with engine.begin() as connection:
            user = uuid.uuid4()
            await connection.execute(text("INSERT INTO profiles (id, credits) VALUES (:id, 40)"), {"id": user})
            await connection.execute(
                text(
                    "INSERT INTO credit_entries (profile_id, amount, balance_after, kind) "
                    "VALUES (:id, 40, 40, 'signup_grant')"
                ),
                {"id": user},
            )
        healthy = await run_script(env, tmp_path, "--check")
        assert healthy.returncode == 0, healthy.output
        assert (
            "ledger         ok      every balance equals the sum of its ledger entries, every held total"
            in healthy.stdout
        )
        async with engine.begin() as connection:  # a balance changed behind the ledger's back
            await connection.execute(text("UPDATE profiles SET credits = 45 WHERE id = :id"), {"id": user})
        broken = await run_script(env, tmp_path, "--check")
    finally:
        await engine.dispose()
    assert_one_clear_sentence(
        broken,
        f"ledger         FAILED  1 balance(s) differ from their ledger or holds, e.g. profile {user}: balance 45",
    )


@pytest.fixture(scope="module")
async def password_server(tmp_path_factory: pytest.TempPathFactory) -> URL:
    """A small server of its own that checks passwords (the suite's embedded server trusts local users)."""
    root = tmp_path_factory.mktemp("password-server")
    admin = await asyncio.to_thread(start_embedded_postgres, root, "postgres", keep_running=False)
    await admin_execute(admin, "CREATE ROLE deployer LOGIN PASSWORD 'right-password'")
    (root / "pgdata" / "pg_hba.conf").write_text("local all postgres trust\nlocal all all scram-sha-256\n")
    await admin_execute(admin, "SELECT pg_reload_conf()")
    url = admin.set(username="deployer", password="right-password")
    engine = engine_for(url.set(password="wrong"))
    try:  # the reload is asynchronous: wait until passwords are checked
        for _ in range(50):
            try:
                async with engine.connect():
                    pass
            except DBAPIError:
                break
            await asyncio.sleep(0.1)
    finally:
        await engine.dispose()
    # Stopped at exit, with the suite's own server.
    return url


def assert_one_clear_sentence(run: Run, sentence: str) -> None:
    assert run.returncode == 1, run.output
    assert run.stderr.startswith(sentence), run.output
    assert run.stderr.count("\n") == 1
    assert "Traceback" not in run.output


async def test_wrong_password_and_closed_port(
    password_server: URL, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """As a deploy sees them, from separate processes (run side by side: each is mostly start-up time)."""
    closed = f"postgresql://postgres:pw@127.0.0.1:{free_port()}/postgres"
    wrong, refused = await asyncio.gather(
        run_script(script_env(password_server.set(password="wrong"), tmp_path), tmp_path, "--check"),
        run_script({**subprocess_env, "DATABASE_URL": closed}, tmp_path, "--check"),
    )
    assert_one_clear_sentence(wrong, 'connection     FAILED  password rejected for user "deployer": check DB_PASSWORD')
    assert "right-password" not in wrong.output
    assert_one_clear_sentence(refused, "connection     FAILED  connection refused by 127.0.0.1:")


@pytest.fixture
def in_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Run]:
    """`create_tables.main(args)` in this process, from an empty directory, with only the given settings."""
    import create_tables

    for key in list(os.environ):
        if key.startswith(("DB", "SUPABASE_", "DATABASE")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def call(*args: str, **env: str) -> Run:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        returncode = create_tables.main(list(args))
        captured = capsys.readouterr()
        return Run(returncode, captured.out, captured.err)

    return call


def test_missing_database_is_named(in_process: Callable[..., Run], server_url: URL) -> None:
    url = server_url.set(database="picads_no_such_db").render_as_string(hide_password=False)
    run = in_process("--check", DATABASE_URL=url)
    assert_one_clear_sentence(run, 'connection     FAILED  database "picads_no_such_db" does not exist on')


def test_a_port_out_of_range_is_one_line(in_process: Callable[..., Run]) -> None:
    run = in_process("--check", DATABASE_URL="postgresql://u:p@127.0.0.1:99999/x")
    assert_one_clear_sentence(
        run, "settings       FAILED  Configuration error: DATABASE_URL's port must be 1 to 65535, not 99999"
    )


def test_a_silent_server_times_out(in_process: Callable[..., Run]) -> None:
    # The kernel accepts the connection and nothing ever answers: a firewall dropping packets looks the same.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"postgresql://u:p@127.0.0.1:{silent.getsockname()[1]}/x"
        run = in_process("--check", DATABASE_URL=url, DB_CONNECT_TIMEOUT="0.5")
    assert_one_clear_sentence(run, "connection     FAILED  timed out after 0.5s connecting to 127.0.0.1:")


def test_wait_retries_before_giving_up(in_process: Callable[..., Run]) -> None:
    run = in_process("--check", "--wait", "1", DATABASE_URL=f"postgresql://u:p@127.0.0.1:{free_port()}/x")
    assert "connection     waiting connection refused by 127.0.0.1:" in run.stdout
    assert_one_clear_sentence(run, "connection     FAILED  connection refused by 127.0.0.1:")


def test_settings_come_from_the_named_env_file(in_process: Callable[..., Run], password_server: URL) -> None:
    Path("deploy.env").write_text(f"DATABASE_URL={password_server.render_as_string(hide_password=False)}\n")
    run = in_process("--env", "deploy.env", "--check")
    assert run.returncode == 0, run.output
    assert "user deployer" in run.stdout
    assert "(from deploy.env and the environment)" in run.stdout
    assert "right-password" not in run.output


def test_a_mistyped_env_file_is_an_error_not_a_fallback(in_process: Callable[..., Run]) -> None:
    run = in_process("--env", "nowhere.env", "--check")
    assert_one_clear_sentence(run, "settings       FAILED  settings file nowhere.env not found")


def test_no_env_file_means_the_environment_only(in_process: Callable[..., Run], password_server: URL) -> None:
    Path(".env").write_text(f"DATABASE_URL={password_server.render_as_string(hide_password=False)}\n")
    assert "(from .env and the environment)" in in_process("--check").stdout
    run = in_process("--check", "--no-env-file")
    assert_one_clear_sentence(run, "settings       FAILED  no database configured")


def test_the_right_password_is_accepted(in_process: Callable[..., Run], password_server: URL) -> None:
    """So the password rejected above was rejected for being wrong, and for nothing else."""
    run = in_process("--check", DATABASE_URL=password_server.render_as_string(hide_password=False))
    assert run.returncode == 0, run.output
    assert "connection     ok      PostgreSQL" in run.stdout
    assert "right-password" not in run.output


def test_an_unencoded_at_in_the_password_is_named(in_process: Callable[..., Run]) -> None:
    run = in_process("--check", DATABASE_URL="postgresql://deployer:pw@2024@db.example.com:5432/postgres")
    assert_one_clear_sentence(
        run, "settings       FAILED  Configuration error: DATABASE_URL: the password contains an unencoded '@'"
    )
    assert "percent-encode it (@ as %40)" in run.stderr
    assert "pw@2024" not in run.output


async def test_a_revision_the_code_does_not_know_is_named_with_the_way_out(
    new_database: Callable[[], Awaitable[URL]], tmp_path: Path
) -> None:
    url = await new_database()
    env = script_env(url, tmp_path)
    assert (await run_script(env, tmp_path)).returncode == 0
    engine = engine_for(url)
    try:
        async with engine.begin() as connection:  # a migration applied, then its file deleted
            await connection.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    finally:
        await engine.dispose()
    run = await run_script(env, tmp_path)
    assert_one_clear_sentence(
        run, "migrations     FAILED  the database is at revision 0999, which this code does not have"
    )
    assert "`poetry run alembic stamp --purge head`" in run.stderr


def test_no_database_configured_is_refused(in_process: Callable[..., Run], tmp_path: Path) -> None:
    run = in_process("--enable-rls")
    assert_one_clear_sentence(run, "settings       FAILED  no database configured: set DATABASE_URL")
    assert "python main.py" in run.stderr
    assert not list(tmp_path.rglob("PG_VERSION"))  # no embedded server was started
