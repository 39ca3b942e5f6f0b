"""The receiver app in-process, with its lifespan running and an HTTP client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette

from receiver.app import create_app
from receiver.settings import Settings


@asynccontextmanager
async def running_app(
    settings: Settings, *, database_url: str | None = None, run_worker: bool = True
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """``create_app`` started (engine, background tasks) and a client that talks to it."""
    app = create_app(settings, database_url=database_url, run_worker=run_worker)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://receiver.test"
        ) as client:
            yield app, client
