"""``simulate``'s traffic is seeded, valid and as varied as Runflow's; the command's exit code."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

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
from tests.support.builders import SIGNING_SECRET, auth
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


def _recording_app(received: list[tuple[bytes, dict[str, str]]]) -> Starlette:
    """Acknowledges every delivery and keeps its bytes and headers."""

    async def hook(request: Request) -> JSONResponse:
        received.append((await request.body(), dict(request.headers)))
        return JSONResponse({"status": "stored", "delivery_id": len(received), "run_id": None})

    return Starlette(routes=[Route("/webhooks/runflow", hook, methods=["POST"])])


def _clean_env(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("RECEIVER_")]:
        monkeypatch.delenv(name)


def _created(body: bytes) -> datetime:
    return datetime.fromisoformat(orjson.loads(body)["created_at"])


def test_simulate_dates_its_runs_up_to_now_unless_given_an_epoch(monkeypatch, tmp_path, capsys):
    _clean_env(monkeypatch, tmp_path)
    received: list[tuple[bytes, dict[str, str]]] = []
    with serve_in_thread(_recording_app(received)) as port:
        url = f"http://127.0.0.1:{port}/webhooks/runflow"
        argv = ["simulate", "--url", url, "--count", "200", "--secret", "whsec_sim"]
        before = datetime.now(UTC)
        assert main(argv) == 0
        after = datetime.now(UTC)
        recent = [body for body, _ in received]
        received.clear()
        assert main([*argv, "--epoch", "2026-11-01T00:00:00+00:00"]) == 0
        fixed = [body for body, _ in received]
        received.clear()
        assert main([*argv, "--epoch", "2026-11-01T00:00:00+00:00"]) == 0
        again = [body for body, _ in received]
    capsys.readouterr()

    # The default: every run created within the last few hours, the newest within minutes.
    stamps = [_created(b) for b in recent if b"created_at" in b]
    assert min(stamps) >= before - timedelta(hours=3, minutes=2)
    assert max(stamps) <= after
    assert max(stamps) >= before - timedelta(minutes=5)
    assert max(stamps) - min(stamps) >= timedelta(hours=2)  # spread, not bunched at one time
    # The analytics default window (the last 24 hours) holds all of them.
    assert all(after - s < timedelta(hours=24) for s in stamps)

    # A fixed epoch: the same bytes every time (for benchmarks), starting at that moment.
    assert sorted(fixed) == sorted(again)
    epoch_stamps = [_created(b) for b in fixed if b"created_at" in b]
    assert min(epoch_stamps) >= datetime(2026, 11, 1, tzinfo=UTC)
    assert max(epoch_stamps) < datetime(2026, 11, 2, tzinfo=UTC)


def test_generated_traffic_is_pure_for_a_given_window():
    end = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    start = end - timedelta(hours=3)
    first = generate_traffic(count=300, seed=3, start=start, end=end)
    assert [d.body for d in first] == [
        d.body for d in generate_traffic(count=300, seed=3, start=start, end=end)
    ]
    stamps = [_created(d.body) for d in first if b"created_at" in d.body]
    assert start <= min(stamps) and max(stamps) <= end + timedelta(seconds=1)
    # Without a window the traffic keeps its historical fixed start (2026-11-01).
    assert min(_created(d.body) for d in TRAFFIC if b"created_at" in d.body) >= datetime(
        2026, 11, 1, tzinfo=UTC
    )


def test_simulate_event_sends_signed_run_objects_and_envelopes_of_that_event(
    monkeypatch, tmp_path, capsys
):
    _clean_env(monkeypatch, tmp_path)
    received: list[tuple[bytes, dict[str, str]]] = []
    with serve_in_thread(_recording_app(received)) as port:
        url = f"http://127.0.0.1:{port}/webhooks/runflow"
        argv = ["simulate", "--url", url, "--secret", "whsec_sim", "--event", "run.failed"]
        assert main([*argv, "--failure-code", "no_capacity", "--model", "flux-dev"]) == 0
        assert main([*argv, "--failure-code", "gpu_on_fire", "--count", "3"]) == 0
        assert main([*argv, "--failure-stage", "callback", "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert "sent 2  acknowledged 2" in out and "sent 6  acknowledged 6" in out

    docs = [orjson.loads(body) for body, _ in received]
    for body, headers in received:
        assert verify_signature(body, headers["runflow-signature"], ["whsec_sim"])
    objects = [d for d in docs if "id" in d]
    envelopes = [d for d in docs if "run_id" in d]
    assert len(objects) == len(envelopes) == 6
    assert all(e["event"] == "run.failed" and e["status"] == "failed" for e in envelopes)
    assert {o["id"] for o in objects} == {e["run_id"] for e in envelopes}
    assert all(o["status_code"] == "failed" for o in objects)
    first, *gpu, cb1, cb2 = objects
    # Runflow puts no_capacity at dispatch; an unknown code defaults to execution.
    assert (first["failure_code"], first["failure_stage_code"]) == ("no_capacity", "dispatch")
    assert first["model"]["slug"] == "flux-dev"
    assert {(o["failure_code"], o["failure_stage_code"]) for o in gpu} == {
        ("gpu_on_fire", "execution")
    }
    assert cb1["failure_stage_code"] == cb2["failure_stage_code"] == "callback"
    for doc in docs:
        parse_payload(doc)  # each is a valid delivery


def test_simulate_event_rejects_a_failure_code_on_a_success(monkeypatch, tmp_path, capsys):
    _clean_env(monkeypatch, tmp_path)
    argv = ["simulate", "--event", "run.completed", "--failure-code", "no_capacity"]
    assert main(argv) == 2
    assert "only goes with run.failed" in capsys.readouterr().err


def test_simulate_sends_over_https_verifying_the_certificate(monkeypatch, tmp_path, capsys):
    _clean_env(monkeypatch, tmp_path)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    received: list[tuple[bytes, dict[str, str]]] = []
    app = _recording_app(received)
    with serve_in_thread(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as port:
        url = f"https://127.0.0.1:{port}/webhooks/runflow"
        argv = ["simulate", "--url", url, "--count", "20", "--secret", "whsec_sim"]
        assert main([*argv, "--ca-file", str(cert)]) == 0
        assert len(received) == 20
        # A certificate nobody vouches for is refused: every request an error, exit 1.
        assert main([*argv, "--timeout", "5"]) == 1
    assert len(received) == 20
    out = capsys.readouterr().out
    counts = [
        dict(re.findall(r"(sent|acknowledged|errors) (\d+)", line)) for line in out.splitlines()
    ]
    assert counts == [
        {"sent": "20", "acknowledged": "20", "errors": "0"},
        {"sent": "20", "acknowledged": "0", "errors": "20"},
    ]


def test_simulate_reports_progress_as_log_lines_when_not_on_a_terminal(
    monkeypatch, tmp_path, capsys
):
    _clean_env(monkeypatch, tmp_path)
    received: list[tuple[bytes, dict[str, str]]] = []
    with serve_in_thread(_recording_app(received)) as port:
        url = f"http://127.0.0.1:{port}/webhooks/runflow"
        assert main(["simulate", "--url", url, "--count", "50", "--secret", "whsec_sim"]) == 0
    err = capsys.readouterr().err
    steps = re.findall(r"simulate: (\d+)/50", err)
    assert steps and steps[-1] == "50" and len(steps) <= 10
    assert "\r" not in err  # no bar drawn into a file


async def test_a_triggered_failure_shows_in_the_failure_analytics(
    client, db, monkeypatch, tmp_path, capsys
):
    _clean_env(monkeypatch, tmp_path)
    received: list[tuple[bytes, dict[str, str]]] = []
    with serve_in_thread(_recording_app(received)) as port:
        url = f"http://127.0.0.1:{port}/webhooks/runflow"
        argv = ["simulate", "--url", url, "--secret", SIGNING_SECRET, "--event", "run.failed"]
        argv += ["--failure-code", "no_capacity", "--model", "flux-dev", "--count", "4"]
        assert await asyncio.to_thread(main, argv) == 0
    capsys.readouterr()
    # The same bytes and signatures, relayed to the receiver under test.
    for body, headers in received:
        keep = {k: headers[k] for k in ("content-type", "runflow-signature")}
        answer = await client.post("/webhooks/runflow", content=body, headers=keep)
        assert answer.status_code == 200, answer.text
    found = await client.get(
        "/analytics/failures?group_by=failure_code,failure_stage,model", headers=auth()
    )
    assert found.json()["failed_runs"] == 4
    assert found.json()["groups"] == [
        {
            "failure_code": "no_capacity",
            "failure_stage": "dispatch",
            "model": "flux-dev",
            "count": 4,
            "share": 1.0,
        }
    ]
