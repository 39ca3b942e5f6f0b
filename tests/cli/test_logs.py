"""One log stream: in JSON mode every line ``serve`` prints is a JSON object, uvicorn's too."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.support.builders import API_TOKEN, SIGNING_SECRET, body_of, envelope, signed_headers
from tests.support.processes import receiver_env, serving

pytestmark = pytest.mark.slow


def test_every_line_serve_prints_in_json_mode_is_a_json_object(tmp_path):
    env = receiver_env(
        RECEIVER_LOG_FORMAT="json",
        RECEIVER_DATA_DIR=str(tmp_path / "data"),  # the embedded database: its start is logged
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_API_TOKENS=API_TOKEN,
    )
    long_request_id = "req-" + "x" * 300
    body = body_of(envelope("log-run-1"))
    with serving(env, tmp_path, workers=2) as (base, _):
        port = base.rsplit(":", 1)[1]
        stored = httpx.post(
            f"{base}/webhooks/runflow",
            content=body,
            headers=signed_headers(body, **{"runflow-request-id": long_request_id}),
            timeout=30,
        )
        forged = httpx.post(
            f"{base}/webhooks/runflow",
            content=body,
            headers=signed_headers(body, "whsec_wrong", **{"runflow-request-id": "req-forged"}),
            timeout=30,
        )
        listed = httpx.get(
            f"{base}/runs?status=succeeded&limit=5",
            headers={"authorization": f"Bearer {API_TOKEN}"},
            timeout=30,
        )
    assert stored.status_code == 200 and forged.status_code == 401 and listed.status_code == 200

    text = (tmp_path / f"serve-{port}.log").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"line {number} of serve's output is not JSON: {line!r}")
        assert isinstance(entries[-1], dict), line
        assert {"ts", "level", "logger", "message"} <= entries[-1].keys(), line

    loggers = {e["logger"] for e in entries}
    # uvicorn's lines (parent and both workers) went through the same formatter.
    assert "uvicorn.error" in loggers
    assert sum("Started server process" in e["message"] for e in entries) == 2
    assert any(e["message"].startswith("receiving Runflow callbacks at http://") for e in entries)

    deliveries = {e["request_id"]: e for e in entries if e["message"].startswith("delivery ")}
    answer = stored.json()
    ingest = deliveries[long_request_id[:127] + "\u2026"]  # clipped to 128 characters
    assert ingest["delivery_id"] == answer["delivery_id"]
    assert ingest["run_id"] == "log-run-1"
    assert ingest["outcome"] == "stored" and ingest["status"] == 200
    assert isinstance(ingest["duration_ms"], int | float)
    # The delivery line is the request's access line too: method, path and client, no second.
    assert ingest["method"] == "POST" and ingest["path"] == "/webhooks/runflow"
    assert ingest["client"].startswith("127.0.0.1:")
    # A forged request is anyone's to send: no per-delivery line (a flood would flood the
    # log), but the bounded refusal warning names it, and the access line counts it.
    assert "req-forged" not in deliveries
    [refusal] = [e for e in entries if "refused webhook request" in e["message"]]
    assert refusal["level"] == "warning" and "invalid_signature" in refusal["message"]
    assert "request_id=req-forged" in refusal["message"]
    webhook_posts = [e for e in entries if e.get("path") == "/webhooks/runflow"]
    assert sorted((e["logger"], e["status"]) for e in webhook_posts) == [
        ("receiver.access", 401),
        ("receiver.routes.webhooks", 200),
    ]

    access = [e for e in entries if e.get("path") == "/runs"]
    assert [(e["method"], e["status"]) for e in access] == [("GET", 200)]
    # Neither the query string nor the bearer token reaches the log.
    assert API_TOKEN not in text and "status=succeeded" not in text


PROGRAM = """
import logging, warnings
from receiver.logs import configure_logging
from receiver.settings import Settings

configure_logging(Settings(log_format="json", log_level="info"))
log = logging.getLogger("receiver.example")
log.info("with fields", extra={"request_id": "r-1", "delivery_id": 7, "nested": {"a": [1]}})
warnings.warn("something odd", UserWarning, stacklevel=1)
logging.getLogger("uvicorn.error").info("from uvicorn")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("it broke")
"""


def test_json_lines_carry_extra_fields_warnings_and_tracebacks(tmp_path):
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", PROGRAM],
        env=receiver_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == ""
    fields, warned, uvicorn, broke = (json.loads(line) for line in done.stderr.splitlines())
    assert fields["message"] == "with fields" and fields["logger"] == "receiver.example"
    assert (fields["request_id"], fields["delivery_id"], fields["nested"]) == ("r-1", 7, {"a": [1]})
    assert warned["logger"] == "py.warnings" and "something odd" in warned["message"]
    assert (uvicorn["logger"], uvicorn["message"]) == ("uvicorn.error", "from uvicorn")
    assert broke["level"] == "error" and "ZeroDivisionError" in broke["exc"]
