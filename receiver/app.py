"""The Starlette application: ``create_app(settings)`` wires routes, errors and resources.

Resources (the engine, background tasks) live in the lifespan, so importing this module or
building the app opens nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from receiver.db import create_engine, resolve_database_url
from receiver.errors import MethodNotAllowed, NotFound, ReceiverError, Unavailable
from receiver.responses import error_response
from receiver.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """What the routes share for the life of the process."""

    settings: Settings
    engine: AsyncEngine


def resources(request: Request) -> Resources:
    res: Resources = request.app.state.resources
    return res


def _routes() -> list[BaseRoute]:
    from receiver import openapi
    from receiver.routes import alerts, analytics, enrichment, health, pages, runs, webhooks

    return [
        *pages.routes,
        *alerts.routes,
        *webhooks.routes,
        *health.routes,
        *runs.routes,
        *analytics.routes,
        *enrichment.routes,
        *openapi.routes,
    ]


async def _receiver_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ReceiverError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ReceiverError
    if exc.status_code == 404:
        error = NotFound(f"no route {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = ReceiverError(exc.detail)
    response = error_response(error)
    response.headers.update(exc.headers or {})
    return response


async def _database_down(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return error_response(Unavailable("storage is unavailable; retry later"))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ReceiverError("internal error; the request was not processed"))


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


async def _start_background(
    settings: Settings, engine: AsyncEngine, stop: asyncio.Event
) -> list[asyncio.Task[None]]:
    """The enrichment worker (when enabled), the alert evaluator and the alert sender."""
    from receiver.alerts.evaluate import run_evaluator
    from receiver.alerts.notify import run_sender
    from receiver.alerts.rules import load_rules_file, upsert_rule

    if settings.alert_rules_file is not None:
        for rule in load_rules_file(settings.alert_rules_file):
            await upsert_rule(engine, rule)
    tasks = [
        asyncio.create_task(run_evaluator(settings, engine, stop)),
        asyncio.create_task(run_sender(settings, engine, stop)),
    ]
    if settings.enrichment_enabled:
        from receiver.enrichment import Enricher

        tasks.append(asyncio.create_task(Enricher(settings, engine).run(stop)))
    return tasks


def create_app(
    settings: Settings, *, database_url: str | None = None, run_worker: bool = True
) -> Starlette:
    """The receiver app. ``database_url`` overrides settings (``serve`` passes the embedded one).

    With ``run_worker`` (the default) the background work runs inside the app: enrichment
    (when enabled), alert evaluation and alert notifications.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        url = database_url or resolve_database_url(settings)[0]
        engine = create_engine(url, pool_size=settings.db_pool_size)
        app.state.resources = Resources(settings=settings, engine=engine)
        stop = asyncio.Event()
        background: list[asyncio.Task[None]] = []
        if run_worker:
            background += await _start_background(settings, engine, stop)
        try:
            yield
        finally:
            stop.set()
            if background:
                await asyncio.wait(background, timeout=15)
            await engine.dispose()

    return Starlette(
        routes=_routes(),
        lifespan=lifespan,
        exception_handlers={
            ReceiverError: _receiver_error,
            HTTPException: _http_error,
            **dict.fromkeys(DATABASE_DOWN, _database_down),
            Exception: _internal_error,
        },
    )
