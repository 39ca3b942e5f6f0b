"""Builders for Runflow payloads and signed requests: the one place tests make them."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from receiver.alerts.rules import Rule, validate_rule
from receiver.ingest.signature import sign
from receiver.settings import Settings

SIGNING_SECRET = "whsec_test_secret_0123456789"
API_TOKEN = "test-token-abcdef"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


def iso(moment: datetime) -> str:
    return moment.isoformat()


def new_run_id() -> str:
    return f"run_{next(_ids):06d}"


def envelope(
    run_id: str | None = None,
    *,
    status: str | None = "succeeded",
    event: str | None = None,
    output: Any = None,
    duration_ms: int | None = 1200,
    created_at: datetime | None = T0,
    completed_at: datetime | None = T0 + timedelta(seconds=2),
    metadata: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """A per-run callback envelope; ``None`` drops a key entirely."""
    events = {
        "succeeded": "run.completed",
        "failed": "run.failed",
        "cancelled": "run.cancelled",
        "canceled": "run.cancelled",
        "partial_succeeded": "run.partial_succeeded",
    }
    doc: dict[str, Any] = {
        "event": event if event is not None else events.get(status or ""),
        "run_id": run_id or new_run_id(),
        "status": status,
        "output": output
        if output is not None
        else ({"images": ["a.png"]} if status == "succeeded" else None),
        "duration_ms": duration_ms,
        "created_at": iso(created_at) if created_at else None,
        "completed_at": iso(completed_at) if completed_at else None,
        "metadata": metadata,
        **extra,
    }
    return {key: value for key, value in doc.items() if value is not None or key == "output"}


def failed_envelope(
    run_id: str | None = None, *, code: str = "out_of_memory", stage: str = "execution", **kw: Any
) -> dict[str, Any]:
    error = {"error": {"code": code, "message": f"{code} happened", "stage": stage}}
    return envelope(run_id, status="failed", output=error, **kw)


def run_object(
    run_id: str | None = None, *, status_code: str = "succeeded", **fields: Any
) -> dict[str, Any]:
    """A Run object as the Runflow API returns it."""
    doc: dict[str, Any] = {
        "id": run_id or new_run_id(),
        "status_code": status_code,
        "failure_code": None,
        "failure_message": None,
        "failure_stage_code": None,
        "client_ref": None,
        "cost": "0.0125",
        "cost_breakdown": {"compute": "0.0125"},
        "node_runs": [],
        "logs": [],
        "model": {"id": "mdl_flux", "slug": "flux-dev"},
        "batch_id": None,
        "org_id": "org_1",
        "target_type": "model",
        "source_code": "api",
        "created_at": iso(T0),
        "started_at": iso(T0 + timedelta(seconds=1)),
        "completed_at": iso(T0 + timedelta(seconds=3)),
        "duration_ms": 2000,
    }
    doc.update(fields)
    return doc


def batch_envelope(
    batch_id: str, items: list[dict[str, Any]], *, event: str = "batch.succeeded"
) -> dict[str, Any]:
    counts = {
        s: sum(1 for i in items if i.get("status_code") == s)
        for s in ("succeeded", "failed", "cancelled")
    }
    return {
        "event": event,
        "batch_id": batch_id,
        "status": None,
        "output": {"items": items, **counts, "total": len(items)},
        "duration_ms": 5000,
        "created_at": iso(T0),
        "completed_at": iso(T0 + timedelta(seconds=5)),
        "metadata": None,
    }


def body_of(doc: dict[str, Any] | bytes) -> bytes:
    return doc if isinstance(doc, bytes) else orjson.dumps(doc)


def signed_headers(body: bytes, secret: str = SIGNING_SECRET, **extra: str) -> dict[str, str]:
    return {"content-type": "application/json", "runflow-signature": sign(body, secret), **extra}


async def post_delivery(
    client: httpx.AsyncClient,
    doc: dict[str, Any] | bytes,
    *,
    secret: str | None = SIGNING_SECRET,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a payload to the webhook, signed unless ``secret`` is None."""
    body = body_of(doc)
    sent = {"content-type": "application/json"}
    if secret is not None:
        sent["runflow-signature"] = sign(body, secret)
    sent.update(headers or {})
    return await client.post("/webhooks/runflow", content=body, headers=sent)


def auth(token: str = API_TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def varied_runs(count: int, *, seed: int = 7, start: datetime = T0) -> list[dict[str, Any]]:
    """Run objects with known statuses, models, failures, durations and costs, for query tests.

    created_at steps 17 minutes per run from ``start``; every value is chosen so tests can
    compute the expected answers themselves.
    """
    import random

    rng = random.Random(seed)
    models = ["flux-dev", "sdxl", "llama"]
    failures = [("oom", "execution"), ("timeout", "execution"), ("no_capacity", "dispatch")]
    runs = []
    for i in range(count):
        status = rng.choice(["succeeded"] * 5 + ["failed"] * 3 + ["cancelled", "running"])
        code, stage = rng.choice(failures) if status == "failed" else (None, None)
        created = start + timedelta(minutes=17 * i)
        runs.append(
            run_object(
                f"q{seed}_{i:04d}",
                status_code=status,
                failure_code=code,
                failure_stage_code=stage,
                client_ref=f"ref-{i % 5}",
                cost=f"{rng.randrange(1, 5000) / 10000:.4f}" if rng.random() < 0.9 else None,
                model={"id": f"mdl_{i % 3}", "slug": models[i % 3]},
                target_type=rng.choice(["model", "flow", "comfyui"]),
                source_code=rng.choice(["api", "playground"]),
                org_id=rng.choice(["org_a", "org_b"]),
                batch_id=f"batch_{i % 4}" if i % 2 else None,
                created_at=iso(created),
                started_at=iso(created + timedelta(seconds=1)),
                completed_at=iso(created + timedelta(seconds=30)) if status != "running" else None,
                duration_ms=rng.randrange(100, 60000) if status != "running" else None,
            )
        )
    return runs


def rule(**fields) -> Rule:
    base = {
        "name": "r",
        "metric": "failure_count",
        "threshold": 3,
        "window": "5m",
        "targets": [{"url": "http://127.0.0.1:9/hook"}],
    }
    return validate_rule({**base, **fields})


def enrichment_settings(database_url: str, api_url: str, **overrides) -> Settings:
    values = {
        "database_url": database_url,
        "signing_secrets": [SIGNING_SECRET],
        "api_tokens": [API_TOKEN],
        "runflow_api_url": api_url,
        "runflow_api_key": "rf_test_key",
        "enrichment_concurrency": 4,
        "enrichment_rps": 1000,
        "enrichment_backoff_seconds": 0.05,
        "enrichment_backoff_max_seconds": 0.3,
        "enrichment_poll_seconds": 0.05,
        "enrichment_lease_seconds": 3,
        **overrides,
    }
    return Settings(**values)
