"""Alert hooks cannot be aimed into the server's own network, and hook URLs are not shown.

Rules are refused when saved with a non-public target unless the operator allows private
targets; every send checks again (what was saved while allowed, or a name that resolves to
loopback, is not contacted once disallowed); redirects are not followed; what a token holder
sees of a failure is a generic code; hook URLs appear as scheme://host/*** in answers and logs.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import UTC, datetime

import asyncpg
import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.alerts.evaluate import evaluate_once
from receiver.alerts.notify import send_one
from receiver.alerts.store import upsert_rule
from receiver.alerts.targets import forbidden
from receiver.db import plain_url
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import API_TOKEN, SIGNING_SECRET, auth, post_delivery, rule, run_object
from tests.support.hook_server import HookServer, serve_hook
from tests.support.processes import serve_in_thread


def _settings(database_url: str, *, allow: bool) -> Settings:
    return Settings(
        database_url=database_url,
        signing_secrets=[SIGNING_SECRET],
        api_tokens=[API_TOKEN],
        alert_allow_private_targets=allow,
        alert_backoff_seconds=0.01,
        alert_backoff_max_seconds=0.05,
    )


def _definition(url: str, name: str = "hooked") -> dict[str, object]:
    return {"name": name, "metric": "failure_count", "threshold": 0, "targets": [{"url": url}]}


async def _notifications(database_url: str) -> list[dict[str, object]]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows = await conn.fetch("SELECT state, url, last_error FROM alert_notifications")
        return [dict(r) for r in rows]
    finally:
        await conn.close()


INWARD = [
    "http://127.0.0.1:2375/containers/json",
    "http://localhost:8080/admin",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://0.0.0.0:9/hook",
    "http://[::1]:9/hook",
    "http://[fe80::1]/hook",
    "http://[fd00:ec2::254]/latest",
    "http://[::ffff:127.0.0.1]:9/hook",
    "http://224.0.0.1/hook",
    "http://240.0.0.1/hook",
    "http://100.64.0.1/hook",
]


async def test_a_rule_aimed_inward_is_refused_by_default_and_accepted_when_allowed(
    db, database_url
):
    async with running_app(_settings(database_url, allow=False), run_worker=False) as (_, client):
        for url in INWARD:
            refused = await client.post("/alerts/rules", json=_definition(url), headers=auth())
            assert refused.status_code == 422, url
            error = refused.json()["error"]
            assert error["code"] == "invalid_rule"
            assert "RECEIVER_ALERT_ALLOW_PRIVATE_TARGETS" in error["message"]
        assert (await client.get("/alerts/rules", headers=auth())).json() == {"items": []}
    async with running_app(_settings(database_url, allow=True), run_worker=False) as (_, client):
        accepted = await client.post(
            "/alerts/rules", json=_definition("http://127.0.0.1:9/hook"), headers=auth()
        )
        assert accepted.status_code == 201
    async with running_app(_settings(database_url, allow=False), run_worker=False) as (_, client):
        # Changing a rule's targets is saving it: the same check.
        moved = {"targets": [{"url": "http://169.254.169.254/latest/meta-data/"}]}
        patched = await client.patch("/alerts/rules/hooked", json=moved, headers=auth())
        assert patched.status_code == 422
        assert patched.json()["error"]["code"] == "invalid_rule"


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("10.0.0.1", True),
        ("172.31.255.255", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("0.0.0.0", True),
        ("100.64.0.1", True),
        ("224.0.0.251", True),
        ("255.255.255.255", True),
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("fd12:3456::1", True),
        ("ff02::1", True),
        ("::ffff:10.0.0.1", True),
        ("8.8.8.8", False),
        ("1.1.1.1", False),
        ("2606:4700:4700::1111", False),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_which_addresses_a_hook_may_reach(address, refused):
    assert forbidden(ipaddress.ip_address(address)) is refused


async def test_the_send_time_check_blocks_a_name_resolving_to_loopback_saved_while_allowed(
    db, database_url
):
    hook = HookServer()
    with serve_hook(hook) as url:
        # A host name, not an address: "localhost" resolves to 127.0.0.1 (and maybe ::1).
        by_name = url.replace("127.0.0.1", "localhost")
        allowed = _settings(database_url, allow=True)
        async with running_app(allowed, run_worker=False) as (app, client):
            created = await client.post("/alerts/rules", json=_definition(by_name), headers=auth())
            assert created.status_code == 201
            await post_delivery(client, run_object("inward", status_code="failed"))
            engine = app.state.resources.engine
            assert await evaluate_once(allowed, engine, datetime.now(UTC))
            disallowed = _settings(database_url, allow=False)
            async with httpx.AsyncClient(timeout=10) as http:
                assert await send_one(disallowed, engine, http)
            assert hook.attempts == 0
            [notice] = await _notifications(database_url)
            assert (notice["state"], notice["last_error"]) == ("pending", "blocked")
            # Allowed again (an operator's in-cluster hook), the same notification goes out.
            conn = await asyncpg.connect(plain_url(database_url))
            try:
                await conn.execute("UPDATE alert_notifications SET next_attempt_at = now()")
            finally:
                await conn.close()
            async with httpx.AsyncClient(timeout=10) as http:
                assert await send_one(allowed, engine, http)
    assert len(hook.received) == 1
    # Sent to the checked address with the URL's own host name kept for the Host header.
    assert hook.received[0]["headers"]["host"] == by_name.split("/")[2]


async def test_a_redirect_is_not_followed_and_failures_read_as_generic_codes(
    db, database_url, caplog
):
    inner = HookServer()

    async def redirect(request: Request) -> Response:
        return Response(status_code=302, headers={"location": inner_url})

    bouncer = Starlette(routes=[Route("/hook", redirect, methods=["POST"])])
    settings = _settings(database_url, allow=True)
    with serve_hook(inner) as inner_url, serve_in_thread(bouncer) as port:
        async with running_app(settings, run_worker=False) as (app, client):
            engine = app.state.resources.engine
            await upsert_rule(
                engine,
                rule(
                    threshold=0,
                    targets=[
                        {"url": f"http://127.0.0.1:{port}/hook"},
                        {"url": "http://127.0.0.1:9/x"},
                    ],
                ),
            )
            await post_delivery(client, run_object("bounced", status_code="failed"))
            assert await evaluate_once(settings, engine, datetime.now(UTC))
            with caplog.at_level(logging.WARNING, logger="receiver.alerts.notify"):
                async with httpx.AsyncClient(timeout=10) as http:
                    assert await send_one(settings, engine, http)
                    assert await send_one(settings, engine, http)
            events = (await client.get("/alerts/events", headers=auth())).json()["items"]
    assert inner.attempts == 0
    errors = sorted(n["last_error"] for n in events[0]["notifications"])
    # Not "http_302" or the connection error's text: those only reach the server log.
    assert errors == ["http_error", "refused"]
    assert "HTTP 302" in caplog.text


async def test_hook_urls_are_redacted_in_answers_and_logs_and_a_round_trip_keeps_them(
    db, database_url, caplog
):
    secret_url = "http://hookuser:hookpass@127.0.0.1:9/services/T000/B000/XXXXSLACKTOKEN"
    settings = _settings(database_url, allow=True)
    async with running_app(settings, run_worker=False) as (app, client):
        definition = _definition(secret_url)
        created = await client.post("/alerts/rules", json=definition, headers=auth())
        assert created.status_code == 201
        listed = await client.get("/alerts/rules", headers=auth())
        one = await client.get("/alerts/rules/hooked", headers=auth())
        for answer in (created, listed, one):
            assert "hookpass" not in answer.text and "XXXXSLACKTOKEN" not in answer.text
            assert "hookuser" not in answer.text
        shown = one.json()["rule"]["targets"]
        assert [t["url"] for t in shown] == ["http://127.0.0.1:9/***"]
        # What GET showed, sent back with a new threshold, keeps the stored URL.
        patched = await client.patch(
            "/alerts/rules/hooked", json={"targets": shown, "threshold": 2}, headers=auth()
        )
        assert patched.status_code == 200
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            stored = await conn.fetchval("SELECT definition FROM alert_rules")
        finally:
            await conn.close()
        assert [t["url"] for t in orjson.loads(stored)["targets"]] == [secret_url]
        # A redacted URL with nothing stored behind it cannot be saved.
        fresh = await client.post(
            "/alerts/rules",
            json=_definition("http://127.0.0.1:9/***", name="copy"),
            headers=auth(),
        )
        assert fresh.status_code == 422 and fresh.json()["error"]["code"] == "invalid_rule"
        await client.patch("/alerts/rules/hooked", json={"threshold": 0}, headers=auth())
        await post_delivery(client, run_object("noisy", status_code="failed"))
        engine = app.state.resources.engine
        assert await evaluate_once(settings, engine, datetime.now(UTC))
        with caplog.at_level(logging.WARNING, logger="receiver.alerts.notify"):
            async with httpx.AsyncClient(timeout=10) as http:
                assert await send_one(settings, engine, http)  # port 9 refuses
        events = await client.get("/alerts/events", headers=auth())
    assert events.json()["items"][0]["notifications"][0]["url"] == "http://127.0.0.1:9/***"
    for text in (events.text, caplog.text):
        assert "hookpass" not in text and "XXXXSLACKTOKEN" not in text
    assert "127.0.0.1:9/***" in caplog.text
