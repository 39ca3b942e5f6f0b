"""The Starlette application: ``create_app(settings)`` wires routes, errors and resources.

Resources (the engine, background tasks) live in the lifespan, so importing this module or
building the app opens nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from receiver.alerts.evaluate import run_evaluator
from receiver.alerts.notify import run_sender
from receiver.alerts.rules import load_rules_file
from receiver.alerts.store import upsert_rule
from receiver.db import DATABASE_DOWN, down_cause, resolve_database_url
from receiver.enrichment import Enricher
from receiver.errors import MethodNotAllowed, NotFound, ReceiverError, Unavailable
from receiver.reconciliation import run_reconciler
from receiver.resources import open_resources
from receiver.responses import error_response
from receiver.retention import partitions_at_start, run_maintenance
from receiver.routes import all_operations, static_routes
from receiver.settings import Settings

log = logging.getLogger(__name__)


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


async def _dbapi_error(request: Request, exc: Exception) -> Response:
    """SQLAlchemy's wrapper of a driver error: 503 when the database is unavailable."""
    if down_cause(exc) is not None:
        return await _database_down(request, exc)
    return await _internal_error(request, exc)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ReceiverError("internal error; the request was not processed"))


async def _start_background(
    settings: Settings, engine: AsyncEngine, stop: asyncio.Event
) -> list[asyncio.Task[None]]:
    """The enrichment worker and the reconciler (when enabled), the alert evaluator and sender."""
    await partitions_at_start(engine, settings)
    if settings.alert_rules_file is not None:
        for rule in load_rules_file(settings.alert_rules_file):
            await upsert_rule(engine, rule)
    tasks = [
        asyncio.create_task(run_evaluator(settings, engine, stop)),
        asyncio.create_task(run_sender(settings, engine, stop)),
    ]
    if settings.enrichment_enabled:
        tasks.append(asyncio.create_task(Enricher(settings, engine).run(stop)))
    if settings.reconcile_enabled:
        tasks.append(asyncio.create_task(run_reconciler(settings, engine, stop)))
    tasks.append(asyncio.create_task(run_maintenance(engine, settings, stop)))
    return tasks


def create_app(
    settings: Settings, *, database_url: str | None = None, run_worker: bool = True
) -> Starlette:
    """The receiver app. ``database_url`` overrides settings (``serve`` passes the embedded one).

    With ``run_worker`` (the default) the background work runs inside the app: enrichment and
    reconciliation (when enabled), alert evaluation and alert notifications.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        url = database_url or resolve_database_url(settings)[0]
        res = open_resources(settings, url)
        app.state.resources = res
        stop = asyncio.Event()
        background: list[asyncio.Task[None]] = []
        if run_worker:
            # Background work has its own pool: it can never hold the connections ingest needs.
            background += await _start_background(settings, res.background, stop)
        try:
            yield
        finally:
            # uvicorn runs this after the in-flight requests have finished (or its graceful
            # timeout ran out): the loops stop at their next safe point, then the pools close.
            stop.set()
            if background:
                _, pending = await asyncio.wait(background, timeout=15)
                for task in pending:
                    log.warning("background task %s did not stop in 15s; cancelling", task)
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=5)
            await res.dispose()

    operations = all_operations()
    app = Starlette(
        routes=[*(operation.route() for operation in operations), *static_routes()],
        lifespan=lifespan,
        exception_handlers={
            ReceiverError: _receiver_error,
            HTTPException: _http_error,
            **dict.fromkeys(DATABASE_DOWN, _database_down),
            DBAPIError: _dbapi_error,
            Exception: _internal_error,
        },
    )
    app.state.operations = operations
    return app
