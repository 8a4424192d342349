"""The project's commands, as Poetry scripts: `poetry run dev | start | test | lint | type-check | new-migration`.

Each prints the command it runs and exits with that tool's status; extra arguments are passed on.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

# The checkout: where main.py, pyproject.toml and a developer's .env live.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# gunicorn's hooks for the metrics (the Dockerfile names the same module).
GUNICORN_CONFIG = "python:app.gunicorn_conf"


def _tool(module: str, *args: str) -> list[str]:
    # This interpreter's own copy of the tool: the project's virtualenv, whatever PATH says.
    return [sys.executable, "-m", module, *args]


def _announce(argv: Sequence[str]) -> None:
    print(f"$ {shlex.join(argv)}", file=sys.stderr, flush=True)


def enter_project() -> list[str]:
    """Work from the checkout, wherever in it the command was typed; return the extra arguments.

    `main:app`, `.env` and the tools' configuration are all found relative to the checkout. Arguments naming
    a path from the caller's directory (`tests/test_profile.py::test_x` from inside `tests/`...) are made
    absolute first, so they still point where the caller meant.
    """
    args = sys.argv[1:]
    here = Path.cwd()
    if not (PROJECT_ROOT / "main.py").is_file() or here == PROJECT_ROOT:
        return args
    os.chdir(PROJECT_ROOT)
    return [_absolute(arg, here) for arg in args]


def _absolute(arg: str, base: Path) -> str:
    path, sep, node = arg.partition("::")
    if arg.startswith("-") or Path(path).is_absolute() or not (base / path).exists():
        return arg
    return f"{os.path.normpath(base / path)}{sep}{node}"


def _exec(argv: list[str]) -> NoReturn:
    """Become the tool, so signals (SIGTERM from a process manager, Ctrl-C) reach it directly."""
    _announce(argv)
    os.execv(argv[0], argv)


def _run(argv: list[str]) -> int:
    _announce(argv)
    return subprocess.run(argv, check=False).returncode


def dev() -> NoReturn:
    """The development server, reloading on code changes; HOST and PORT as for `python main.py`.

    A migration written while it runs waits for its review: the reloader ignores the migrations folder, and a
    reload applies only the revisions that existed when this command started."""
    args = enter_project()
    from app.config import load_settings  # here, so `lint` and `test` do not need valid settings
    from app.schema import MIGRATE_UP_TO_VARIABLE, MIGRATIONS, code_head

    settings = load_settings()
    os.environ[MIGRATE_UP_TO_VARIABLE] = code_head()
    # An absolute folder: uvicorn matches a relative one against nothing.
    versions = str(MIGRATIONS / "versions")
    address = ["--host", settings.bind_host, "--port", str(settings.port)]
    _exec(_tool("uvicorn", "main:app", "--reload", "--reload-exclude", versions, *address, *args))


def start() -> NoReturn:
    """Production serving, the same command line as the Dockerfile's (gunicorn reads WEB_CONCURRENCY itself).

    HOST and PORT come from the settings, as for every command: 127.0.0.1 in development, 0.0.0.0 in
    production, unless HOST says otherwise. No control socket: nothing uses it, and it needs a writable home.
    app/gunicorn_conf.py sets up the metrics' multiprocess mode when METRICS_ENABLED."""
    args = enter_project()
    from app.config import load_settings

    settings = load_settings()
    bind = f"{settings.bind_host}:{settings.port}"
    worker = "uvicorn_worker.UvicornWorker"
    config = ("--config", GUNICORN_CONFIG)
    _exec(
        _tool("gunicorn", "main:app", *config, "--worker-class", worker, "--bind", bind, "--no-control-socket", *args)
    )


def new_migration() -> NoReturn:
    """`alembic revision --autogenerate` with the next number: `poetry run new-migration "add widgets"`."""
    args = enter_project()
    if not args or args[0].startswith("-"):
        sys.exit('Give the migration a message: poetry run new-migration "add widgets"')
    from app.schema import next_revision_id

    message, *rest = args
    _exec(_tool("alembic", "revision", "--autogenerate", "--rev-id", next_revision_id(), "-m", message, *rest))


def test() -> NoReturn:
    """pytest, with any arguments (paths, -k, -x ...) passed on."""
    _exec(_tool("pytest", *enter_project()))


def lint() -> NoReturn:
    """Check formatting and lint with ruff; `lint --fix` rewrites instead of checking."""
    args = enter_project()
    fix = "--fix" in args
    rest = [arg for arg in args if arg != "--fix"] or ["."]
    if fix:
        # Fixes first (they may reorder imports), then formatting over the result.
        commands = [_tool("ruff", "check", "--fix", *rest), _tool("ruff", "format", *rest)]
    else:
        commands = [_tool("ruff", "format", "--check", *rest), _tool("ruff", "check", *rest)]
    # Run both even when the first fails, so one run shows every finding.
    statuses = [_run(command) for command in commands]
    sys.exit(next((status for status in statuses if status), 0))


def type_check() -> NoReturn:
    """mypy, as configured in pyproject.toml (the whole project by default, or the paths given)."""
    _exec(_tool("mypy", *enter_project()))
