"""``simulate``'s traffic is seeded, valid and as varied as Runflow's; the command's exit code."""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter, defaultdict

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from receiver.cli import main
from receiver.ingest.payloads import parse_payload
from receiver.ingest.signature import verify_signature
from receiver.simulate import generate_traffic
from receiver.vocabulary import PRECEDENCE, precedence
from tests.support.processes import serve_in_thread

TRAFFIC = generate_traffic(count=2000, seed=5)
DOCS = [orjson.loads(d.body) for d in TRAFFIC]


def test_same_seed_same_bytes_other_seed_other_bytes():
    again = generate_traffic(count=2000, seed=5)
    assert [d.body for d in again] == [d.body for d in TRAFFIC]
    assert [d.body for d in generate_traffic(count=2000, seed=6)] != [d.body for d in TRAFFIC]
    assert len(TRAFFIC) == 2000
    assert len({d.run_id for d in generate_traffic(count=300, runs=20)} - {None}) == 20


def test_every_delivery_is_valid_and_about_the_run_or_batch_it_names():
    for delivery, doc in zip(TRAFFIC, DOCS, strict=True):
        parsed = parse_payload(doc)
        assert parsed.kind == delivery.kind
        assert parsed.run_id == delivery.run_id
        assert parsed.batch_id == delivery.batch_id


def test_traffic_has_the_variety_runflow_sends():
    envelopes = [d for d in DOCS if "run_id" in d]
    objects = [d for d in DOCS if "id" in d]
    batches = [d for d in DOCS if "batch_id" in d and "id" not in d]
    statuses = {parse_payload(d).runs[0].fields.get("status") for d in envelopes}
    assert statuses >= {"succeeded", "failed", "cancelled", "partial_succeeded"}
    spellings = {d.get("status") for d in envelopes} | {d["status_code"] for d in objects}
    assert {"canceled", "cancelled"} <= spellings
    assert any("event" not in d and "status" not in d for d in envelopes)  # old deliveries
    failed = [d for d in envelopes if d.get("event") == "run.failed"]
    assert any("error" in d["output"] for d in failed)
    assert any("code" in d["output"] for d in failed)
    stamps = [d[k] for d in envelopes + objects for k in ("created_at", "completed_at") if d.get(k)]
    assert all(s.endswith("+00:00") for s in stamps)
    assert any("." in s for s in stamps) and any("." not in s for s in stamps)
    stages = {d["failure_stage_code"] for d in objects if d["failure_stage_code"]}
    assert stages == {"dispatch", "execution", "callback", "reconciliation"}
    assert len({d["model"]["slug"] for d in objects}) >= 5
    assert {d["target_type"] for d in objects} == {"model", "flow", "comfyui"}
    assert any(d["node_runs"] for d in objects) and all(d["logs"] for d in objects)
    assert batches and all(d["output"]["items"] for d in batches)


def test_traffic_has_duplicates_and_out_of_order_redeliveries():
    bodies = Counter(d.body for d in TRAFFIC)
    assert any(n > 1 for n in bodies.values())  # the same bytes again
    seen_terminal: set[str] = set()
    stale_after_terminal = 0
    terminal_bodies: dict[str, set[bytes]] = defaultdict(set)
    for delivery in TRAFFIC:
        if delivery.run_id is None:
            continue
        status = parse_payload(orjson.loads(delivery.body)).runs[0].fields.get("status")
        if precedence(status) == PRECEDENCE["succeeded"]:
            seen_terminal.add(delivery.run_id)
            terminal_bodies[delivery.run_id].add(delivery.body)
        elif status == "running" and delivery.run_id in seen_terminal:
            stale_after_terminal += 1
    assert stale_after_terminal > 0
    # A redelivery is rebuilt from the run's state: same run, different bytes.
    assert any(len(found) > 1 for found in terminal_bodies.values())


def _flaky_app(reject_every: int) -> Starlette:
    seen = Counter[str]()

    async def hook(request: Request) -> JSONResponse:
        body = await request.body()
        assert verify_signature(body, request.headers["runflow-signature"], ["whsec_sim"])
        seen["n"] += 1
        if reject_every and seen["n"] % reject_every == 0:
            error = {"code": "invalid_payload", "message": "no", "details": []}
            return JSONResponse({"error": error}, status_code=422)
        return JSONResponse({"status": "stored", "delivery_id": seen["n"], "run_id": None})

    return Starlette(routes=[Route("/webhooks/runflow", hook, methods=["POST"])])


@pytest.mark.parametrize(("reject_every", "code", "rejected"), [(0, 0, 0), (5, 1, 6)])
def test_simulate_prints_counts_and_fails_unless_everything_was_acknowledged(
    reject_every, code, rejected, capsys, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("RECEIVER_")]:
        monkeypatch.delenv(name)
    with serve_in_thread(_flaky_app(reject_every)) as port:
        url = f"http://127.0.0.1:{port}/webhooks/runflow"
        argv = ["simulate", "--url", url, "--count", "30", "--concurrency", "4"]
        assert main([*argv, "--secret", "whsec_sim"]) == code
    out = capsys.readouterr().out
    counts = dict(re.findall(r"(sent|acknowledged|rejected|errors) (\d+)", out))
    assert counts == {
        "sent": "30",
        "acknowledged": str(30 - rejected),
        "rejected": str(rejected),
        "errors": "0",
    }
    assert "deliveries/s" in out


def test_simulate_gives_up_on_a_server_that_does_not_answer(capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("RECEIVER_")]:
        monkeypatch.delenv(name)

    async def hang(request: Request) -> JSONResponse:
        await asyncio.sleep(2)
        return JSONResponse({"status": "stored", "delivery_id": 1, "run_id": None})

    app = Starlette(routes=[Route("/webhooks/runflow", hang, methods=["POST"])])
    with serve_in_thread(app) as port:
        url = f"http://127.0.0.1:{port}/webhooks/runflow"
        argv = ["simulate", "--url", url, "--count", "4", "--concurrency", "2", "--timeout", "0.3"]
        assert main([*argv, "--secret", "whsec_sim"]) == 1
    counts = dict(re.findall(r"(sent|acknowledged|errors) (\d+)", capsys.readouterr().out))
    assert counts == {"sent": "4", "acknowledged": "0", "errors": "4"}
