"""What the routes share for the life of the process, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from receiver.db import create_engine, use_transaction_timeouts
from receiver.limits import ConcurrencyLimit
from receiver.settings import Settings


@dataclass
class Resources:
    """The settings and the database engines every route works with.

        Three pools so no kind of work can take the connections another needs: ``engine`` is the
        ingest path's (webhooks, replay, readiness), with short time limits; ``read_engine`` serves
        the query and analytics routes (``RECEIVER_READ_DATABASE_URL``, a replica or any read-only
    connection, when set); ``background_engine``
        is for the alert evaluator and sender, enrichment and the reconciler. Unset, the read and
        background engines are the ingest one (tests that build Resources by hand).
    """

    settings: Settings
    engine: AsyncEngine
    read_engine: AsyncEngine | None = None
    background_engine: AsyncEngine | None = None
    analytics_limit: ConcurrencyLimit = field(default_factory=lambda: ConcurrencyLimit(2, 1.0))

    def __post_init__(self) -> None:
        if self.read_engine is None:
            self.read_engine = self.engine
        if self.background_engine is None:
            self.background_engine = self.engine

    @property
    def reads(self) -> AsyncEngine:
        """The query and analytics routes' engine."""
        assert self.read_engine is not None
        return self.read_engine

    @property
    def background(self) -> AsyncEngine:
        """The background loops' engine."""
        assert self.background_engine is not None
        return self.background_engine

    async def dispose(self) -> None:
        for engine in {id(e): e for e in (self.engine, self.reads, self.background)}.values():
            await engine.dispose()


def open_resources(settings: Settings, url: str) -> Resources:
    """The three engines on ``url``, each with its own pool and time limits."""
    connect, pool = settings.db_connect_timeout_seconds, settings.db_pool_timeout_seconds
    bouncer = settings.db_pgbouncer
    # The client-side limit sits a little above the server-side statement_timeout the ingest
    # transaction sets, so a live server cancels first and a frozen one is caught anyway.
    ingest = create_engine(
        url,
        pool_size=settings.db_pool_size,
        connect_timeout=connect,
        pool_timeout=pool,
        command_timeout=settings.ingest_statement_timeout_seconds + 1,
        pgbouncer=bouncer,
    )
    use_transaction_timeouts(
        ingest, settings.ingest_statement_timeout_seconds, settings.ingest_lock_timeout_seconds
    )
    reads = create_engine(
        settings.read_database_url or url,
        pool_size=settings.read_pool_size,
        connect_timeout=connect,
        pool_timeout=max(pool, 5.0),
        command_timeout=settings.read_statement_timeout_seconds,
        pgbouncer=bouncer,
    )
    background = create_engine(
        url,
        pool_size=settings.background_pool_size,
        connect_timeout=connect,
        pool_timeout=max(pool, 10.0),
        command_timeout=settings.background_statement_timeout_seconds,
        pgbouncer=bouncer,
    )
    return Resources(
        settings=settings,
        engine=ingest,
        read_engine=reads,
        background_engine=background,
        analytics_limit=ConcurrencyLimit(
            settings.analytics_concurrency, settings.analytics_queue_seconds
        ),
    )


def resources(request: Request) -> Resources:
    """The process's resources, from the app the request arrived at."""
    res: Resources = request.app.state.resources
    return res
