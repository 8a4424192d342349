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

import pytest

from tests.conftest import PROJECT_ROOT, free_port, wait_for_http

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
    for name in ("dev", "start", "test", "lint", "type-check", "dev-token"):
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
    command = f"-m gunicorn main:app --worker-class uvicorn_worker.UvicornWorker --bind 0.0.0.0:{port}\n"
    assert command in text
    assert text.count("Booting worker") == 1  # WEB_CONCURRENCY=1
    assert "Shutting down: Master" in text


async def test_dev_serves_with_reload_and_stops_on_sigterm(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    # uvicorn's reloader is signalled; it must stop its server process too.
    env = {**subprocess_env, "HOST": "127.0.0.1", "PORT": str(port)}
    text = await _serve_until_sigterm("dev", env, port, tmp_path / "dev.log")
    assert f"-m uvicorn main:app --reload --host 127.0.0.1 --port {port}\n" in text
    assert "Started reloader process" in text
    assert "Application shutdown complete" in text  # a graceful stop
