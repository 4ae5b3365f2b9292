"""A PostgreSQL server for the tests that need one.

``FAILOVER_TEST_POSTGRES_DSN`` points the tests at a server (default: the local one,
``postgresql://postgres@127.0.0.1:5432/test``).  Without a server those tests skip,
saying so; with ``FAILOVER_REQUIRE_POSTGRES=1`` (CI) they fail instead.  Every schema a
test run creates is named ``failover_t<run>_...`` and dropped when the run ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import os
import re
import secrets
import time
from typing import Any

import pytest

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
RUN = f"{int(time.time())}_{secrets.token_hex(2)}"
PREFIX = f"failover_t{RUN}_"
STALE_S = 6 * 3600
"""Schemas of runs older than this (killed before they could clean up) are dropped too."""


def dsn() -> str:
    return os.environ.get("FAILOVER_TEST_POSTGRES_DSN", DEFAULT_DSN)


@functools.cache
def _unreachable() -> str | None:
    """Why the server cannot be used, or None."""
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed (pip install 'failover[postgres]')"

    async def probe() -> None:
        conn = await asyncpg.connect(dsn(), timeout=3)
        await conn.close()

    try:
        run(probe())
    except Exception as exc:  # any failure to connect means: no server for the tests
        return f"{type(exc).__name__}: {exc}"
    return None


def require() -> str:
    """The DSN, or skip (fail under FAILOVER_REQUIRE_POSTGRES=1) when there is no server."""
    problem = _unreachable()
    if problem is not None:
        message = (f"no PostgreSQL at {dsn()} ({problem}); set FAILOVER_TEST_POSTGRES_DSN"
                   " to a server's postgresql:// URL to run these tests")
        if os.environ.get("FAILOVER_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return dsn()


def schema_for(name: str) -> str:
    """A schema name of this run for ``name`` (a path, a test id): the same name, the
    same schema, so a second journal sees what a first one wrote."""
    return PREFIX + hashlib.sha1(name.encode()).hexdigest()[:16]


def new_schema() -> str:
    return PREFIX + secrets.token_hex(8)


def drop_run_schemas() -> None:
    if _unreachable() is not None:
        return
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(dsn(), timeout=5)
        try:
            names = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'failover\\_t%'")
            for (name,) in names:
                started = re.match(r"failover_t(\d+)_", name)
                stale = started is not None and time.time() - int(started[1]) > STALE_S
                if name.startswith(PREFIX) or stale:
                    await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
        finally:
            await conn.close()

    run(drop())


def run(coroutine: Any) -> Any:
    """Run ``coroutine`` to its end on a loop of its own (callable from async tests)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
