"""``runflow-receiver alerts list`` and ``alerts test <rule>``."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.alerts.notify import SIGNATURE_HEADER, post_hook, render
from receiver.alerts.store import get_rule, list_rules, rule_states, unsent_notifications
from receiver.alerts.targets import redact_url
from receiver.ingest.signature import sign
from receiver.settings import ConfigError, Settings
from receiver.startup import open_engine


async def print_states(engine: AsyncEngine) -> None:
    rules = await list_rules(engine)
    if not rules:
        print("no alert rules")
    for rule_id, rule in rules:
        states = await rule_states(engine, rule_id)
        flag = "" if rule.enabled else " (disabled)"
        breach = "<=" if rule.metric == "no_callbacks" else ">"
        print(f"{rule.name}{flag}: {rule.metric} {breach} {rule.threshold} over {rule.window}s")
        for state in states:
            group = ", ".join(f"{k}={v}" for k, v in state["group"].items())
            print(f"  {group or 'all runs':40} {state['state']:9} value={state['value']}")
        if not states:
            print("  ok (no group has breached)")
    for row in await unsent_notifications(engine):  # pending: still retrying; failed: given up
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
            error, outcome = await post_hook(settings, client, target.url, body, headers)
            failures += error is not None
            print(f"{redact_url(target.url)} ({target.format}): {outcome}")
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
    parser = sub.add_parser("alerts", help="alert rules: list states, send a test notification")
    commands = parser.add_subparsers(dest="alerts_command", required=True)
    commands.add_parser("list", help="print every rule and the state of its groups")
    test = commands.add_parser("test", help="send a sample notification to a rule's targets")
    test.add_argument("rule", help="the rule's name")
    parser.set_defaults(handler=lambda args, settings: run(args, settings, open_engine(settings)))
