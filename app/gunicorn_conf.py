"""gunicorn's configuration: `gunicorn --config python:app.gunicorn_conf main:app ...`, as `poetry run start` and the
Docker image run it. Everything else comes from the command line; this module only sets up the metrics' multiprocess
mode (prometheus-client's documented set-up), when METRICS_ENABLED:

- before any worker starts, PROMETHEUS_MULTIPROC_DIR names an empty folder the workers write their figures to
  (PROMETHEUS_MULTIPROC_DIR's own, emptied; else a new one in /dev/shm, the one place a `--read-only` container may
  write, removed by `on_exit`), so nothing from a previous run is added in;
- `child_exit`: a worker that ended (restarted, or killed) stops counting in the live gauges;
- `when_ready`: with METRICS_PORT, the master serves every worker's figures there.

gunicorn reads this module's globals as its settings: the names of its own are prefixed with an underscore.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.config import load_settings

_settings = load_settings()
_SHARED_MEMORY = Path("/dev/shm")  # noqa: S108 - a tmpfs, writable in every container


def _empty_folder(configured: Path | None) -> tuple[Path, bool]:
    """The configured folder (made if missing) without the files of an earlier run, or a new one of our own; and
    whether it is ours (removed at exit)."""
    if configured is not None:
        configured.mkdir(parents=True, exist_ok=True)
        for old in configured.glob("*.db"):
            old.unlink()
        return configured, False
    parent = _SHARED_MEMORY if _SHARED_MEMORY.is_dir() and os.access(_SHARED_MEMORY, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="picads-metrics-", dir=parent)), True


_folder, _ours = _empty_folder(_settings.prometheus_multiproc_dir) if _settings.metrics_enabled else (None, False)
if _folder is not None:
    # Before prometheus-client is imported anywhere: it chooses its mode when imported, and the workers inherit both.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_folder)


def child_exit(server: Any, worker: Any) -> None:
    if _settings.metrics_enabled:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def when_ready(server: Any) -> None:
    if _settings.metrics_enabled and _settings.metrics_port is not None:
        from app.metrics import MetricsPortUnavailable, serve_port

        try:
            serve_port(_settings.metrics_port, _settings.metrics_host)
        except MetricsPortUnavailable as exc:
            raise SystemExit(str(exc)) from None  # one line, no traceback
        server.log.info("metrics: http://%s:%d/metrics", _settings.metrics_host, _settings.metrics_port)


def on_exit(server: Any) -> None:
    # The master only (an atexit handler would also run in every worker that exits).
    if _folder is not None and _ours:
        shutil.rmtree(_folder, ignore_errors=True)
