"""``runflow-receiver alerts list``, ``alerts test <rule>`` and ``alerts check FILE``."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import click
import httpx
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.alerts.notify import SIGNATURE_HEADER, post_hook, render
from receiver.alerts.rules import load_rules_file, read_rule_items, validate_rule
from receiver.alerts.store import get_rule, list_rules, rule_states, unsent_notifications
from receiver.alerts.targets import redact_url
from receiver.errors import ReceiverError
from receiver.ingest.signature import sign
from receiver.settings import ConfigError, Settings
from receiver.startup import command_settings, open_engine


async def print_states(engine: AsyncEngine) -> None:
    rules = await list_rules(engine)
    if not rules:
        click.echo("no alert rules")
    for rule_id, rule in rules:
        states = await rule_states(engine, rule_id)
        flag = "" if rule.enabled else " (disabled)"
        breach = "<=" if rule.metric == "no_callbacks" else ">"
        click.echo(
            f"{rule.name}{flag}: {rule.metric} {breach} {rule.threshold} over {rule.window}s"
        )
        for state in states:
            group = ", ".join(f"{k}={v}" for k, v in state["group"].items())
            click.echo(f"  {group or 'all runs':40} {state['state']:9} value={state['value']}")
        if not states:
            click.echo("  ok (no group has breached)")
    for row in await unsent_notifications(engine):  # pending: still retrying; failed: given up
        click.echo(f"notifications {row['state']}: {row['n']} (an error: {row['error']})")


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
            click.echo(f"{redact_url(target.url)} ({target.format}): {outcome}")
    return 1 if failures else 0


def check_file(path: Path) -> int:
    """Validate a rules file offline; prints each rule OK or its errors. 0 when all are valid."""
    try:
        items = read_rule_items(path)
    except yaml.YAMLError as exc:
        click.echo(f"{path}: not valid YAML: {' '.join(str(exc).split())}")
        return 1
    except (OSError, ReceiverError) as exc:
        click.echo(f"{path}: {exc}")
        return 1
    bad, names = 0, Counter[str]()
    for number, item in enumerate(items, start=1):
        label = item.get("name") if isinstance(item, dict) else None
        where = f"rule {number}" + (f" ({label})" if isinstance(label, str) else "")
        try:
            rule = validate_rule(item)
        except ReceiverError as exc:
            bad += 1
            click.echo(f"{where}: {exc.message}")
            for detail in exc.details:
                if isinstance(detail, dict):
                    click.echo(f"  {detail.get('loc') or '(rule)'}: {detail.get('msg')}")
                else:
                    click.echo(f"  {detail}")
            continue
        names[rule.name] += 1
        click.echo(f"{where}: OK ({rule.metric}, {len(rule.targets)} target(s))")
    for name, seen in names.items():
        if seen > 1:
            click.echo(f"warning: {seen} rules are named {name!r}; loading keeps the last")
    if not bad:
        try:
            load_rules_file(path)  # the same path serve takes, whatever it checks beyond rules
        except (OSError, ReceiverError) as exc:
            click.echo(f"{path}: {exc}")
            return 1
    click.echo(f"{path}: {len(items) - bad} of {len(items)} rules valid")
    return 1 if bad else 0


def _engine(ctx: click.Context) -> tuple[Settings, AsyncEngine]:
    settings = command_settings(ctx.find_root().obj)
    return settings, open_engine(settings)


@click.group("alerts")
def alerts() -> None:
    """Alert rules: list states, send a test notification, check a rules file."""


@alerts.command("list")
@click.pass_context
def list_command(ctx: click.Context) -> int:
    """Print every rule, the state of its groups and unsent notifications."""
    _, engine = _engine(ctx)

    async def main() -> int:
        try:
            await print_states(engine)
            return 0
        finally:
            await engine.dispose()

    return asyncio.run(main())


@alerts.command("test")
@click.argument("rule")
@click.pass_context
def test_command(ctx: click.Context, rule: str) -> int:
    """Send a sample notification to RULE's targets; exits 1 if one did not answer 2xx."""
    settings, engine = _engine(ctx)

    async def main() -> int:
        try:
            return await send_test(settings, engine, rule)
        finally:
            await engine.dispose()

    return asyncio.run(main())


@alerts.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check_command(file: Path) -> int:
    """Validate a rules YAML file offline (no database): each rule OK or its errors; exit 0/1."""
    return check_file(file)
