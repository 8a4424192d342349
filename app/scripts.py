"""The project's commands, as Poetry scripts: `poetry run dev | start | test | lint | type-check`.

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


def _tool(module: str, *args: str) -> list[str]:
    # This interpreter's own copy of the tool: the project's virtualenv, whatever PATH says.
    return [sys.executable, "-m", module, *args]


def _announce(argv: Sequence[str]) -> None:
    print(f"$ {shlex.join(argv)}", file=sys.stderr, flush=True)


def _enter_project() -> list[str]:
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
    """The development server, reloading on code changes; HOST and PORT as for `python main.py`."""
    args = _enter_project()
    from app.config import load_settings  # here, so `lint` and `test` do not need valid settings

    settings = load_settings()
    _exec(_tool("uvicorn", "main:app", "--reload", "--host", settings.host, "--port", str(settings.port), *args))


def start() -> NoReturn:
    """Production serving, the same command line as the Dockerfile's (gunicorn reads WEB_CONCURRENCY itself)."""
    args = _enter_project()
    port = os.environ.get("PORT") or "8000"  # the shell's ${PORT:-8000}: empty counts as unset
    bind = f"0.0.0.0:{port}"
    _exec(_tool("gunicorn", "main:app", "--worker-class", "uvicorn_worker.UvicornWorker", "--bind", bind, *args))


def test() -> NoReturn:
    """pytest, with any arguments (paths, -k, -x ...) passed on."""
    _exec(_tool("pytest", *_enter_project()))


def lint() -> NoReturn:
    """Check formatting and lint with ruff; `lint --fix` rewrites instead of checking."""
    args = _enter_project()
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
    _exec(_tool("mypy", *_enter_project()))
