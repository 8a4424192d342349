"""`main:app` with a new database connection per request (SQLAlchemy's NullPool): the benchmark's baseline,
the original design, for `bench.py --baseline-via wrapper`. Benchmark-only; the app itself is unchanged.

Served as `gunicorn nullpool_main:app` with this folder and the project root on PYTHONPATH.
"""

from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

import app.database as database

_pooled_engine = database.create_async_engine
_POOL_ONLY_OPTIONS = ("pool_size", "max_overflow", "pool_timeout", "pool_recycle", "pool_use_lifo")


def _nullpool_engine(url: str | URL, **options: Any) -> AsyncEngine:
    for name in _POOL_ONLY_OPTIONS:
        options.pop(name, None)
    options["poolclass"] = NullPool
    return _pooled_engine(url, **options)


database.create_async_engine = _nullpool_engine  # type: ignore[assignment]

from main import app  # noqa: E402 - after the patch, so the app's engine is built with it

__all__ = ["app"]
