"""The receiver built the plain way, for bench/ingest.py: what group commit is measured against.

Per request: verify the HMAC signature, parse and validate the payload with the receiver's own
wire models, then one upsert of the run row (the payload's fields as jsonb, merged with ``||``)
committed before answering. No archive, no fingerprint, no merge rules, no node rows: less work
than the receiver does, so beating it by a margin is a fair claim. Run with uvicorn like the
receiver (``plain_receiver:app``); ``BENCH_DATABASE_URL`` and ``BENCH_SECRET`` configure it.
"""

import asyncio
import os

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from receiver.ingest.payloads import parse_payload
from receiver.ingest.signature import verify_signature

_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()

_UPSERT = """
INSERT INTO bench_plain_runs (id, status, data, updated_at) VALUES ($1, $2, $3::jsonb, now())
ON CONFLICT (id) DO UPDATE SET status = COALESCE(EXCLUDED.status, bench_plain_runs.status),
    data = bench_plain_runs.data || EXCLUDED.data, updated_at = now()
"""


async def _pool_once() -> asyncpg.Pool:
    """The pool, made on first use (bench/ingest.py has created the table)."""
    global _pool
    async with _lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(
                os.environ["BENCH_DATABASE_URL"], min_size=2, max_size=10
            )
    return _pool


async def _receive(request: Request) -> JSONResponse:
    body = await request.body()
    if not verify_signature(
        body, request.headers.get("runflow-signature"), [os.environ["BENCH_SECRET"]]
    ):
        return JSONResponse({"error": {"code": "invalid_signature"}}, status_code=401)
    parsed = parse_payload(orjson.loads(body))
    pool = await _pool_once()
    key = parsed.run_id or parsed.batch_id or "unknown"
    fields = parsed.runs[0].fields if parsed.runs else {}
    await pool.execute(
        _UPSERT, key, fields.get("status"), orjson.dumps(fields, default=str).decode()
    )
    return JSONResponse({"status": "stored", "run_id": parsed.run_id, "batch_id": parsed.batch_id})


app = Starlette(routes=[Route("/webhooks/runflow", _receive, methods=["POST"])])
