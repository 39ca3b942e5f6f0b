"""``runflow-receiver alerts list`` and ``alerts test <rule>``."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime

import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.alerts.notify import SIGNATURE_HEADER, render
from receiver.alerts.rules import get_rule, list_rules
from receiver.db import driver_connection
from receiver.ingest.signature import sign
from receiver.settings import ConfigError, Settings


async def print_states(engine: AsyncEngine) -> None:
    rules = await list_rules(engine)
    if not rules:
        print("no alert rules")
    for rule_id, rule in rules:
        async with driver_connection(engine) as conn:
            rows = await conn.fetch(
                "SELECT group_key, state, value, updated_at FROM alert_states WHERE rule_id = $1"
                " ORDER BY group_key",
                rule_id,
            )
        flag = "" if rule.enabled else " (disabled)"
        breach = "<=" if rule.metric == "no_callbacks" else ">"
        print(f"{rule.name}{flag}: {rule.metric} {breach} {rule.threshold} over {rule.window}s")
        for row in rows:
            group = ", ".join(f"{k}={v}" for k, v in orjson.loads(row["group_key"]).items())
            print(f"  {group or 'all runs':40} {row['state']:9} value={row['value']}")
        if not rows:
            print("  ok (no group has breached)")
    async with driver_connection(engine) as conn:
        waiting = await conn.fetch(
            "SELECT state, count(*) AS n, max(last_error) AS error FROM alert_notifications"
            " WHERE state <> 'sent' GROUP BY state ORDER BY state"
        )
    for row in waiting:  # pending: still being retried; failed: given up
        print(f"notifications {row['state']}: {row['n']} (an error: {row['error']})")


async def send_test(settings: Settings, engine: AsyncEngine, name: str) -> int:
    found = await get_rule(engine, name)
    if found is None:
        raise ConfigError(f"no alert rule named {name!r}")
    _, rule = found
    notice = {
        "rule": rule.name,
        "metric": rule.metric,
        "group": {rule.group_by: "example"} if rule.group_by else {},
        "state": "test",
        "value": rule.threshold,
        "threshold": rule.threshold,
        "window_seconds": rule.window,
        "filters": rule.filters,
        "sample_run_ids": [],
        "link": (settings.public_url or f"http://{settings.host}:{settings.port}") + "/runs",
        "at": datetime.now(UTC).isoformat(),
    }
    failures = 0
    async with httpx.AsyncClient(timeout=settings.alert_timeout_seconds) as client:
        for target in rule.targets:
            body = render(notice, target.format)
            headers = {"content-type": "application/json"}
            if target.secret:
                headers[SIGNATURE_HEADER] = sign(body, target.secret)
            try:
                response = await client.post(target.url, content=body, headers=headers)
                outcome = f"HTTP {response.status_code}"
                failures += not response.is_success
            except httpx.HTTPError as exc:
                outcome = f"failed: {exc}"
                failures += 1
            print(f"{target.url} ({target.format}): {outcome}")
    return 1 if failures else 0


def run(args: argparse.Namespace, settings: Settings, engine: AsyncEngine) -> int:
    async def main() -> int:
        try:
            if args.alerts_command == "list":
                await print_states(engine)
                return 0
            return await send_test(settings, engine, args.rule)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from receiver.cli import open_engine

    parser = sub.add_parser("alerts", help="alert rules: list states, send a test notification")
    commands = parser.add_subparsers(dest="alerts_command", required=True)
    commands.add_parser("list", help="print every rule and the state of its groups")
    test = commands.add_parser("test", help="send a sample notification to a rule's targets")
    test.add_argument("rule", help="the rule's name")
    parser.set_defaults(handler=lambda args, settings: run(args, settings, open_engine(settings)))
