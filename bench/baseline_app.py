"""Baselines for bench/ingest.py, served by uvicorn like the receiver.

``ceiling``: reads the body and answers, stores nothing (the HTTP ceiling of the machine).
``floor``: one INSERT of the raw body per request, committed before answering, on the same
PostgreSQL (``BENCH_DATABASE_URL``): the least any durable receiver must do.
"""

import os

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_count = 0


async def _ceiling(request: Request) -> JSONResponse:
    global _count
    await request.body()
    _count += 1
    return JSONResponse({"status": "stored", "delivery_id": _count, "run_id": None})


ceiling = Starlette(routes=[Route("/webhooks/runflow", _ceiling, methods=["POST"])])

_pool: asyncpg.Pool | None = None


async def _floor(request: Request) -> JSONResponse:
    global _pool
    body = await request.body()
    if _pool is None:
        _pool = await asyncpg.create_pool(os.environ["BENCH_DATABASE_URL"], min_size=2, max_size=10)
        await _pool.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor (id bigserial PRIMARY KEY, body bytea)"
        )
    delivery_id = await _pool.fetchval(
        "INSERT INTO bench_floor (body) VALUES ($1) RETURNING id", body
    )
    return JSONResponse({"status": "stored", "delivery_id": delivery_id, "run_id": None})


floor = Starlette(routes=[Route("/webhooks/runflow", _floor, methods=["POST"])])
