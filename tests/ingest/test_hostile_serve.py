"""Hostile traffic against the real ``serve`` (uvicorn workers on 127.0.0.1): what strangers
can make it store (nothing), hold (connections only for a bounded time) and read (a 413)."""

from __future__ import annotations

import asyncio
import http.client
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson
import pytest

from receiver.db import plain_url
from receiver.ingest.signature import sign as sign_with
from tests.support.builders import SIGNING_SECRET, envelope
from tests.support.database import truncate_all
from tests.support.processes import receiver_env, serving

MAX_BODY = 65536


def sign(body: bytes) -> str:
    return sign_with(body, SIGNING_SECRET)


KEEPALIVE = 2
BODY_DEADLINE = 2


async def _table_counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        names = [
            r["tablename"]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'alembic_version' ORDER BY tablename"
            )
        ]
        return {name: await conn.fetchval(f'SELECT count(*) FROM "{name}"') for name in names}
    finally:
        await conn.close()


def table_counts(url: str) -> dict[str, int]:
    return asyncio.run(_table_counts(url))


def metric(base: str, name: str, **labels: str) -> float:
    """One sample of /metrics (summed over every worker by the multiprocess collector)."""
    wanted = sorted(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("#"):
            continue
        key, _, number = line.rpartition(" ")
        if key.split("{")[0] == name and sorted(key.partition("{")[2].rstrip("}").split(",")) == (
            wanted or [""]
        ):
            total += float(number)
    return total


@pytest.fixture(scope="module")
def served(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    asyncio.run(truncate_all(database_url))
    cwd = tmp_path_factory.mktemp("hostile")
    env = receiver_env(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_DATA_DIR=str(cwd / "data"),
        RECEIVER_MAX_BODY_BYTES=str(MAX_BODY),
        RECEIVER_KEEPALIVE_TIMEOUT_SECONDS=str(KEEPALIVE),
        RECEIVER_BODY_READ_TIMEOUT_SECONDS=str(BODY_DEADLINE),
        RECEIVER_ENRICHMENT_CONCURRENCY="0",
    )
    with serving(env, cwd, workers=2, ready_seconds=120) as (base, _):
        yield base


def _connect(base: str) -> socket.socket:
    parts = urlsplit(base)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def test_413_reaches_a_sender_that_writes_its_whole_body_before_reading(served, database_url):
    before = table_counts(database_url)
    body = b'{"run_id": "run_big", "metadata": "' + b"x" * (3 * MAX_BODY) + b'"}'
    parts = urlsplit(served)
    # http.client sends headers and the whole body, then reads: what urllib and many
    # clients do. A reset connection would raise here instead of giving the answer.
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(
            "POST",
            "/webhooks/runflow",
            body=body,
            headers={"content-type": "application/json", "runflow-signature": "0" * 64},
        )
        answer = conn.getresponse()
        assert answer.status == 413
        assert answer.getheader("connection") == "close"
        assert orjson.loads(answer.read())["error"]["code"] == "payload_too_large"
    finally:
        conn.close()
    request = urllib.request.Request(
        f"{served}/webhooks/runflow",
        data=body,
        headers={"content-type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert orjson.loads(refused.value.read())["error"]["code"] == "payload_too_large"
    assert table_counts(database_url) == before


def test_a_thousand_unauthenticated_requests_with_junk_headers_store_nothing(served, database_url):
    # One real delivery first, so "unchanged" is measured against tables that hold rows.
    signed = orjson.dumps(envelope("run_known"))
    known = httpx.post(
        f"{served}/webhooks/runflow",
        content=signed,
        headers={"content-type": "application/json", "runflow-signature": sign(signed)},
        timeout=60,
    )
    assert known.status_code == 200, known.text
    before = table_counts(database_url)
    assert before["deliveries"] >= 1 and before["runs"] >= 1
    refused = metric(served, "runflow_receiver_refused_total", cause="invalid_signature")
    rejected = metric(
        served, "runflow_receiver_deliveries_total", outcome="rejected", cause="invalid_signature"
    )
    junk = {
        "runflow-request-id": "r" * 2048,
        "user-agent": "u" * 2048,
        "x-forwarded-for": "f" * 2048,
        "x-junk": "j" * 2048,
    }
    assert sum(len(v) for v in junk.values()) == 8192
    body = orjson.dumps(envelope("run_stranger"))
    statuses: dict[int, int] = {}
    started = time.monotonic()
    with httpx.Client(base_url=served, timeout=60) as client:
        for i in range(1000):
            response = client.post(
                "/webhooks/runflow",
                content=body,
                headers={
                    "content-type": "application/json",
                    "runflow-signature": f"{i:064x}",
                    **junk,
                },
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    elapsed = time.monotonic() - started
    after = table_counts(database_url)
    refused_after = metric(served, "runflow_receiver_refused_total", cause="invalid_signature")
    rejected_after = metric(
        served, "runflow_receiver_deliveries_total", outcome="rejected", cause="invalid_signature"
    )
    print(f"\n1000 unauthenticated requests, 8 KB junk headers each, in {elapsed:.1f} s")
    print(f"answers: {statuses}")
    print(f"rows before: {before}")
    print(f"rows after:  {after}")
    print(f"refused_total{{invalid_signature}}: {refused:g} -> {refused_after:g}")
    print(f"deliveries_total{{rejected,invalid_signature}}: {rejected:g} -> {rejected_after:g}")
    assert statuses == {401: 1000}
    assert after == before
    assert refused_after - refused == 1000
    assert rejected_after - rejected == 1000


def test_headers_over_the_limit_are_refused_and_store_nothing(served, database_url):
    before = table_counts(database_url)
    body = orjson.dumps(envelope("run_fat_headers"))
    junk = {f"x-junk-{i}": "j" * 8192 for i in range(8)}  # 64 KB, the default limit is 16 KB
    try:
        response = httpx.post(
            f"{served}/webhooks/runflow",
            content=body,
            headers={"content-type": "application/json", **junk},
            timeout=60,
        )
        status: int | None = response.status_code
    except httpx.TransportError:
        status = None  # cut off: also fine, as long as nothing was read in
    assert status in (431, None)
    # Arriving slowly, they are refused before they are complete: lines of 1 KB, a pause after
    # each so every one is a read of its own, up to the first byte past the 16 KB limit, then
    # nothing more (more bytes after the server's close would reset the connection under the
    # answer).
    sock = _connect(served)
    try:
        sock.sendall(b"POST /webhooks/runflow HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(30)
        head = 42  # the request line and Host
        for i in range(64):
            line = b"X-Junk-%02d: " % i + b"j" * 1011 + b"\r\n"
            sock.sendall(line)
            head += len(line)
            if head > 16 * 1024:
                break
            time.sleep(0.01)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    assert b'"code":"headers_too_large"' in answer.replace(b" ", b""), answer
    assert table_counts(database_url) == before
    assert httpx.get(f"{served}/healthz", timeout=30).status_code == 200


def _closed_within(sock: socket.socket, seconds: float, drip: bytes | None) -> float | None:
    """Seconds until the server closed ``sock`` (sending ``drip`` every 0.5 s), or None."""
    started = time.monotonic()
    sock.settimeout(0.5)
    for _ in range(int(seconds / 0.5) + 1):
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionError:
            return time.monotonic() - started
        if drip is not None:
            try:
                sock.sendall(drip)
            except OSError:
                return time.monotonic() - started
        if time.monotonic() - started > seconds:
            return None
    return None


def test_idle_and_half_sent_headers_do_not_hold_a_connection(served):
    dripping = _connect(served)
    try:
        dripping.sendall(b"POST /webhooks/runflow HTTP/1.1\r\nHost: x\r\n")
        # A header line every half second: never complete, never silent.
        dripped = _closed_within(dripping, 30, b"X-Drip: a\r\n")
    finally:
        dripping.close()
    idle = _connect(served)
    try:
        silent = _closed_within(idle, 30, None)
    finally:
        idle.close()
    assert dripped is not None, "a connection dripping header lines stayed open 30 s"
    assert silent is not None, "an idle connection stayed open 30 s"
    print(f"\nclosed after: dripping headers {dripped:.1f} s, idle {silent:.1f} s")


def test_a_body_that_does_not_arrive_in_time_is_408_and_stores_nothing(served, database_url):
    before = table_counts(database_url)
    sock = _connect(served)
    try:
        sock.sendall(
            b"POST /webhooks/runflow HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\nrunflow-signature: " + b"0" * 64 + b'\r\n\r\n{"run_id"'
        )
        sock.settimeout(30)
        answer = b""
        for _ in range(100):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer and b"}" in answer.partition(b"\r\n\r\n")[2]:
                break
    finally:
        sock.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert orjson.loads(payload)["error"]["code"] == "request_timeout"
    assert table_counts(database_url) == before


def test_connections_beyond_the_cap_are_answered_503(database_url, tmp_path):
    env = receiver_env(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_DATA_DIR=str(tmp_path / "data"),
        RECEIVER_MAX_CONNECTIONS="3",
        RECEIVER_KEEPALIVE_TIMEOUT_SECONDS="60",
        RECEIVER_ENRICHMENT_CONCURRENCY="0",
    )
    with serving(env, tmp_path, workers=1, ready_seconds=120) as (base, _):
        held = [_connect(base) for _ in range(3)]
        try:
            time.sleep(0.5)
            response = httpx.get(f"{base}/healthz", timeout=30)
            assert response.status_code == 503
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/healthz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the cap did not free up"
            time.sleep(0.2)


@pytest.mark.parametrize("secrets", [",", " ", "whsec_a,,whsec_b"])
def test_an_empty_signing_secret_stops_start_up_with_one_line(tmp_path: Path, secrets: str):
    env = receiver_env(RECEIVER_SIGNING_SECRETS=secrets, RECEIVER_DATA_DIR=str(tmp_path / "d"))
    done = subprocess.run(
        [sys.executable, "-m", "receiver", "serve", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "RECEIVER_SIGNING_SECRETS" in lines[0] and "empty secret" in lines[0]
