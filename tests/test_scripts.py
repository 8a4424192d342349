"""The Poetry scripts (`poetry run dev | start | test | lint | type-check`), run as a user runs them.

They are started through the console scripts installed in the project's virtualenv, which is exactly what
`poetry run NAME` starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.conftest import PROJECT_ROOT, free_port, in_checkout, wait_for_http

BIN = Path(sys.executable).parent
DECLARED: dict[str, str] = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"`{name}` is not installed in {BIN}: run `pip install --no-deps -e .` (or `poetry install`)")
    return str(path)


def run(name: str, *args: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
    """Run a script to completion; stdout and stderr together, as a terminal shows them."""
    return subprocess.run(
        [script(name), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_script_is_declared_callable_and_installed() -> None:
    for name in ("dev", "start", "test", "lint", "type-check", "dev-token", "new-migration", "embedded-db"):
        assert name in DECLARED, f"{name} missing from [project.scripts]"
    for name, target in DECLARED.items():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), target
        script(name)


def test_lint_passes_on_the_tree() -> None:
    result = run("lint")
    assert result.returncode == 0, result.stdout
    assert "-m ruff format --check .\n" in result.stdout  # says what it runs
    assert "-m ruff check .\n" in result.stdout


def test_lint_reports_problems_and_fix_repairs_them(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx = {'a':1}\n")  # an unused import, and not formatted

    checked = run("lint", str(tmp_path))
    assert checked.returncode == 1
    assert "F401" in checked.stdout
    assert "would be reformatted" in checked.stdout
    assert bad.read_text() == "import os\nx = {'a':1}\n"  # checking never rewrites

    fixed = run("lint", "--fix", str(tmp_path))
    assert fixed.returncode == 0, fixed.stdout
    assert bad.read_text() == 'x = {"a": 1}\n'
    assert run("lint", str(tmp_path)).returncode == 0


def test_type_check_passes_on_the_tree() -> None:
    result = run("type-check")
    assert result.returncode == 0, result.stdout
    assert "-m mypy\n" in result.stdout
    assert "Success: no issues found" in result.stdout


def test_type_check_is_strict_and_fails_on_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('def untyped(x):\n    return x\n\n\ncount: int = "three"\n')
    result = run("type-check", str(bad))
    assert result.returncode == 1
    assert "Incompatible types in assignment" in result.stdout
    assert "missing a type annotation" in result.stdout  # the project's strict configuration applies


def test_test_runs_pytest_with_arguments_and_its_status(tmp_path: Path) -> None:
    # From inside tests/, a node id relative to there, as `cd tests && poetry run test FILE::NAME` gives it.
    selected = run(
        "test", "test_scripts.py::test_every_script_is_declared_callable_and_installed", cwd=PROJECT_ROOT / "tests"
    )
    assert selected.returncode == 0, selected.stdout
    assert "1 passed" in selected.stdout

    sample = tmp_path / "test_sample.py"
    sample.write_text(
        textwrap.dedent(
            """
            def test_passes():
                assert True

            def test_fails():
                assert 1 + 1 == 3
            """
        )
    )
    assert run("test", str(sample), "-k", "passes").returncode == 0
    failing = run("test", str(sample))
    assert failing.returncode == 1  # pytest's own status: tests failed
    assert "1 failed, 1 passed" in failing.stdout


async def _wait_gone(process: asyncio.subprocess.Process, seconds: float) -> int:
    """The process's exit status, once it and everything it started (its process group) have exited."""
    status = await asyncio.wait_for(process.wait(), seconds)
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return status
        if time.monotonic() > deadline:
            pytest.fail("a child process outlived the script after SIGTERM")
        await asyncio.sleep(0.1)


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def _serve_until_sigterm(name: str, env: dict[str, str], port: int, log: Path) -> str:
    """Run a server script until /health answers, send SIGTERM to the script's own process only (it must stop
    everything it started, and exit 0), and return what it printed."""
    with log.open("w") as output:
        process = await asyncio.create_subprocess_exec(
            script(name),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, to see that nothing outlives it
        )
    try:
        assert (await wait_for_http(f"http://127.0.0.1:{port}/health", 30)).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert await _wait_gone(process, 10) == 0
    finally:
        _kill_group(process)
    return await asyncio.to_thread(log.read_text)


async def test_start_serves_like_production_and_stops_on_sigterm(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    # gunicorn must be the script's own process, not a child of it.
    env = {**subprocess_env, "PORT": str(port), "WEB_CONCURRENCY": "1"}
    text = await _serve_until_sigterm("start", env, port, tmp_path / "start.log")
    # Development binds this machine only; no control socket (it needs a writable home, see the Dockerfile).
    command = (
        "-m gunicorn main:app --config python:app.gunicorn_conf --worker-class uvicorn_worker.UvicornWorker "
        f"--bind 127.0.0.1:{port} "
    )
    assert command + "--no-control-socket\n" in text
    assert text.count("Booting worker") == 1  # WEB_CONCURRENCY=1
    assert "Shutting down: Master" in text


async def test_dev_serves_with_reload_and_stops_on_sigterm(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    # uvicorn's reloader is signalled; it must stop its server process too.
    env = {**subprocess_env, "HOST": "127.0.0.1", "PORT": str(port)}
    text = await _serve_until_sigterm("dev", env, port, tmp_path / "dev.log")
    versions = PROJECT_ROOT / "app" / "migrations" / "versions"
    assert f"-m uvicorn main:app --reload --reload-exclude {versions} --host 127.0.0.1 --port {port}\n" in text
    assert "Started reloader process" in text
    assert "Application shutdown complete" in text  # a graceful stop


# --- In a copy of the checkout, where a test may write migrations and a .env -------------------------------------


async def test_a_migration_written_while_dev_runs_waits_for_its_review(
    checkout: Path, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    from app.schema import code_head

    port = free_port()
    argv, env = in_checkout(checkout, "app.scripts:dev", {**subprocess_env, "PORT": str(port)})
    log = tmp_path / "dev.log"
    with log.open("w") as output:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=checkout / "app", env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        assert (await wait_for_http(f"http://127.0.0.1:{port}/health", 30)).status_code == 200
        (checkout / "app" / "migrations" / "versions" / "0999_unreviewed.py").write_text(
            f"revision = '0999'\ndown_revision = '{code_head()}'\n\n\n"
            "def upgrade() -> None:\n    from alembic import op\n\n    op.execute('CREATE TABLE unreviewed (id int)')\n"
        )
        await asyncio.sleep(2)  # the reloader would have seen it by now
        with (checkout / "main.py").open("a") as main:
            main.write("# edited\n")  # any code change reloads the server
        health = await _wait_for_status(f"http://127.0.0.1:{port}/health", 503, 30)
    finally:
        process.send_signal(signal.SIGTERM)
        await _wait_gone(process, 10)
        _kill_group(process)
    text = log.read_text()
    assert "detected changes in 'main.py'" in text
    assert "0999_unreviewed.py" not in text  # the new migration alone did not reload the server
    assert "revision 0999 was written after `poetry run dev` started and is not applied" in text
    assert "this code needs revision 0999" in health.json()["detail"]


async def _wait_for_status(url: str, status: int, seconds: float) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = await wait_for_http(url, seconds)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == status:
            return response
        if time.monotonic() > deadline:
            pytest.fail(f"{url} never answered {status}")
        await asyncio.sleep(0.3)


async def test_start_reads_port_from_the_checkouts_env_and_binds_this_machine_only(
    checkout: Path, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    (checkout / ".env").write_text(f"PORT={port}\nWEB_CONCURRENCY=1\n")
    env = {key: value for key, value in subprocess_env.items() if key not in ("PORT", "HOST", "WEB_CONCURRENCY")}
    argv, env = in_checkout(checkout, "app.scripts:start", env)
    log = tmp_path / "start.log"
    with log.open("w") as output:  # from a subfolder, as `cd app && poetry run start`
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=checkout / "app", env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        assert (await wait_for_http(f"http://127.0.0.1:{port}/health", 30)).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        await _wait_gone(process, 10)
        _kill_group(process)
    assert f"--bind 127.0.0.1:{port} --no-control-socket" in log.read_text()


def test_new_migration_writes_the_next_numbered_revision(checkout: Path, subprocess_env: dict[str, str]) -> None:
    from app.schema import next_revision_id

    argv, env = in_checkout(checkout, "app.scripts:new_migration", subprocess_env)
    written = subprocess.run([*argv, "add widgets"], cwd=checkout / "app", env=env, capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    number = next_revision_id()
    revision = checkout / "app" / "migrations" / "versions" / f"{number}_add_widgets.py"
    assert f"revision = '{number}'" in revision.read_text()
    assert "alembic revision --autogenerate --rev-id" in written.stderr  # says what it runs

    unnamed = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True)
    assert unnamed.returncode == 1
    assert unnamed.stderr == 'Give the migration a message: poetry run new-migration "add widgets"\n'
