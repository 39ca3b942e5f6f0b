"""Alert notifications: bodies (JSON or Slack-compatible), signing, and the outbox sender.

Notifications are rows in ``alert_notifications``, written in the evaluator's transaction.
Senders in every process claim them with SKIP LOCKED under a lease and POST them; failures back
off with the shared full-jitter back-off (``receiver.backoff``) and are recorded; nothing here
is on the ingest path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.alerts.targets import BlockedTarget, checked_addresses, redact_url
from receiver.backoff import full_jitter
from receiver.db import driver_connection
from receiver.ingest.signature import sign
from receiver.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Receiver-Signature"

# Due, not leased, and no earlier notification to the same URL about the same rule and group
# still pending: a "resolved" never overtakes the "firing" it answers while that one retries.
_CLAIM = """
UPDATE alert_notifications n
SET locked_until = now() + make_interval(secs => $1), attempts = n.attempts + 1
WHERE n.id = (
    SELECT c.id FROM alert_notifications c
    WHERE c.state = 'pending' AND c.next_attempt_at <= now()
      AND (c.locked_until IS NULL OR c.locked_until < now())
      AND NOT EXISTS (
        SELECT 1 FROM alert_notifications p
        JOIN alert_events pe ON pe.id = p.event_id
        JOIN alert_events ce ON ce.id = c.event_id
        WHERE p.state = 'pending' AND p.id < c.id AND p.url = c.url
          AND pe.rule_id = ce.rule_id AND pe.group_key = ce.group_key
      )
    ORDER BY c.next_attempt_at LIMIT 1 FOR UPDATE OF c SKIP LOCKED
)
RETURNING n.id, n.url, n.secret, n.body, n.attempts
"""


def render(notice: dict[str, Any], fmt: str) -> bytes:
    """The body a hook target receives, in its format."""
    if fmt == "slack":
        group = ", ".join(f"{k}={v}" for k, v in notice["group"].items()) or "all runs"
        icon = ":rotating_light:" if notice["state"] == "firing" else ":white_check_mark:"
        text = (
            f"{icon} *{notice['state'].upper()}* {notice['rule']} ({group}): {notice['metric']}"
            f" = {notice['value']} (threshold {notice['threshold']},"
            f" window {notice['window_seconds']}s) <{notice['link']}|matching runs>"
        )
        return orjson.dumps({"text": text})
    return orjson.dumps(notice)


def _refused(exc: BaseException) -> bool:
    """Whether a ConnectionRefusedError is among the causes (anyio groups them per address)."""
    seen: list[BaseException] = [exc]
    for error in seen:
        if isinstance(error, ConnectionRefusedError):
            return True
        if len(seen) < 50:
            seen.extend(e for e in (error.__cause__, error.__context__) if e is not None)
            if isinstance(error, BaseExceptionGroup):
                seen.extend(error.exceptions)
    return False


async def post_hook(
    settings: Settings, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
) -> tuple[str | None, str]:
    """POST ``body`` to a hook: (None, detail) when it answered 2xx, else (code, detail).

    The code (``blocked``, ``http_error``, ``timeout``, ``refused``, ``connect_error``) is what
    token holders see; the detail (the status, the exception) is for the server log and the
    operator's command line only, so a hook URL cannot be used to map what answers on which
    port. The host is resolved and every address checked (``receiver.alerts.targets``); the
    request goes only to those checked addresses, with the URL's host name kept for the Host
    header and TLS; redirects are never followed.
    """
    try:
        addresses = await checked_addresses(url, allow_private=settings.alert_allow_private_targets)
        target = httpx.URL(url)
        request_headers = {**headers, "host": target.netloc.decode("ascii")}
        # httpx's timeout bounds each phase; a hook trickling its answer needs a total deadline.
        async with asyncio.timeout(settings.alert_timeout_seconds):
            for index, address in enumerate(addresses):
                try:
                    response = await client.post(
                        target.copy_with(host=str(address)),
                        content=body,
                        headers=request_headers,
                        follow_redirects=False,
                        extensions={"sni_hostname": target.raw_host.decode("ascii")},
                    )
                    break
                except httpx.ConnectError:
                    # The next checked address (localhost: ::1, then 127.0.0.1), as any
                    # client would; the last one's error is the answer.
                    if index == len(addresses) - 1:
                        raise
    except BlockedTarget as exc:
        return "blocked", f"refused: {exc}"
    except (httpx.TimeoutException, TimeoutError):
        return "timeout", f"no answer within {settings.alert_timeout_seconds} s"
    except httpx.ConnectError as exc:
        code = "refused" if _refused(exc) else "connect_error"
        return code, f"cannot connect: {exc}"
    except (httpx.HTTPError, ValueError) as exc:
        return "connect_error", f"{type(exc).__name__}: {exc}"
    detail = f"HTTP {response.status_code}"
    return (None if response.is_success else "http_error"), detail


async def send_one(settings: Settings, engine: AsyncEngine, client: httpx.AsyncClient) -> bool:
    """Claim and POST one due notification; False when none is due."""
    async with driver_connection(engine) as conn:
        # The lease outlasts the whole POST (bounded below), so no second sender takes it over.
        row = await conn.fetchrow(_CLAIM, settings.alert_timeout_seconds + 30)
    if row is None:
        return False
    body = bytes(row["body"])
    headers = {"content-type": "application/json", "user-agent": "runflow-receiver"}
    if row["secret"]:
        headers[SIGNATURE_HEADER] = sign(body, row["secret"])
    error, detail = await post_hook(settings, client, row["url"], body, headers)
    if error is None:
        async with driver_connection(engine) as conn:
            await conn.execute(
                "UPDATE alert_notifications SET state = 'sent', sent_at = now(),"
                " locked_until = NULL, last_error = NULL WHERE id = $1",
                row["id"],
            )
        return True
    attempts = row["attempts"]
    give_up = attempts >= settings.alert_max_attempts
    delay = full_jitter(
        attempts, base=settings.alert_backoff_seconds, cap=settings.alert_backoff_max_seconds
    )
    async with driver_connection(engine) as conn:
        await conn.execute(
            "UPDATE alert_notifications SET state = $2, last_error = $3, locked_until = NULL,"
            " next_attempt_at = now() + make_interval(secs => $4) WHERE id = $1",
            row["id"],
            "failed" if give_up else "pending",
            error,
            delay,
        )
    shown = redact_url(row["url"])
    log.warning("alert notification %s to %s failed: %s (%s)", row["id"], shown, error, detail)
    return True


async def run_sender(settings: Settings, engine: AsyncEngine, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=settings.alert_timeout_seconds) as client:
        while not stop.is_set():
            try:
                if await send_one(settings, engine, client):
                    continue
            except Exception:
                log.exception("alert sender error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.alert_poll_seconds)
