"""Evaluating alert rules: metric queries and the per-group state machine.

Windows are on ``last_received_at``: an alert is about what the receiver heard recently,
however long ago the run was created. A rule breaches when its value is above the threshold
(for ``no_callbacks``: when the runs heard in the window are at or below it). States per rule
and group: ok → pending (breaching, waiting ``for``) → firing → resolved. Firing notifies unless
the group fired a notification less than ``cooldown`` ago; resolved notifies only what fired.
A quiet group with no runs in the window is forgotten once its cooldown has passed.

One process evaluates at a time: each tick takes ``pg_try_advisory_xact_lock`` and does all its
work in that transaction, so state, events and queued notifications commit together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.alerts.notify import render
from receiver.alerts.rules import Rule
from receiver.alerts.store import list_rules
from receiver.db import driver_connection
from receiver.queries import Where
from receiver.settings import Settings
from receiver.vocabulary import TERMINAL_STATUSES

log = logging.getLogger(__name__)

EVALUATOR_LOCK = 0x52465F414C455254  # "RF_ALERT"


@dataclass(frozen=True)
class GroupState:
    state: str = "ok"
    pending_since: datetime | None = None
    last_fired_notice_at: datetime | None = None
    notified_firing: bool = False


@dataclass(frozen=True)
class Step:
    state: GroupState
    transition: tuple[str, str] | None = None
    notify: str | None = None  # "firing" | "resolved"


def breaching(rule: Rule, value: float | None) -> bool:
    if value is None:
        return False
    if rule.metric == "no_callbacks":
        return value <= rule.threshold
    return value > rule.threshold


def step(rule: Rule, current: GroupState, is_breaching: bool, now: datetime) -> Step:
    """The next state of one group; pure, so every transition is unit-testable."""
    state = current.state
    if is_breaching and state in ("ok", "resolved"):
        if rule.for_ > 0:
            return Step(replace(current, state="pending", pending_since=now), (state, "pending"))
        state, current = "pending", replace(current, pending_since=now)
    if is_breaching and state == "pending":
        assert current.pending_since is not None
        if now - current.pending_since < timedelta(seconds=rule.for_):
            return Step(current)
        quiet = (
            current.last_fired_notice_at is None
            or now - current.last_fired_notice_at >= timedelta(seconds=rule.cooldown)
        )
        fired = replace(
            current,
            state="firing",
            pending_since=None,
            notified_firing=quiet,
            last_fired_notice_at=now if quiet else current.last_fired_notice_at,
        )
        return Step(fired, (current.state, "firing"), "firing" if quiet else None)
    if not is_breaching and state == "pending":
        return Step(replace(current, state="ok", pending_since=None), ("pending", "ok"))
    if not is_breaching and state == "firing":
        resolved = replace(current, state="resolved", notified_firing=False)
        return Step(
            resolved, ("firing", "resolved"), "resolved" if current.notified_firing else None
        )
    return Step(current)


def forgettable(rule: Rule, result: Step, now: datetime) -> bool:
    """A quiet group past its cooldown: a fresh ``ok`` state would behave the same from here."""
    state = result.state
    return (
        result.transition is None
        and state.state in ("ok", "resolved")
        and (
            state.last_fired_notice_at is None
            or now - state.last_fired_notice_at >= timedelta(seconds=rule.cooldown)
        )
    )


def _where(rule: Rule, now: datetime) -> Where:
    where = Where()
    where.add("last_received_at >= {}", now - timedelta(seconds=rule.window))
    where.add("last_received_at <= {}", now)
    for column, values in rule.filters.items():
        where.add(f"{column} = ANY({{}}::text[])", values)
    return where


async def measure(
    conn: Any, rule: Rule, now: datetime
) -> dict[str, tuple[dict[str, Any], float | None]]:
    """Value per group (key JSON → (group, value)); a group lacking min_runs has value None."""
    where = _where(rule, now)
    dim = rule.group_by
    select_dim = f"{dim} AS g, " if dim else "NULL AS g, "
    group = "GROUP BY 1" if dim else ""
    terminal = "status = ANY('{" + ",".join(TERMINAL_STATUSES) + "}'::text[])"
    if rule.metric == "failure_count":
        value, runs = "count(*) FILTER (WHERE status = 'failed')", "count(*)"
    elif rule.metric == "failure_rate":
        value = (
            f"count(*) FILTER (WHERE status = 'failed')::float8"
            f" / NULLIF(count(*) FILTER (WHERE {terminal}), 0)"
        )
        runs = f"count(*) FILTER (WHERE {terminal})"
    elif rule.metric == "no_callbacks":
        value, runs = "count(*)", "count(*)"
    else:
        value = (
            "percentile_disc(0.95) WITHIN GROUP (ORDER BY duration_ms)"
            f" FILTER (WHERE {terminal} AND duration_ms IS NOT NULL)"
        )
        runs = f"count(*) FILTER (WHERE {terminal} AND duration_ms IS NOT NULL)"
    rows = await conn.fetch(
        f"SELECT {select_dim}{value} AS value, {runs} AS runs FROM runs WHERE {where.sql()}"
        f" {group} ORDER BY 2 DESC NULLS LAST LIMIT {rule.max_groups}",
        *where.args,
    )
    out: dict[str, tuple[dict[str, Any], float | None]] = {}
    for row in rows:
        key = {dim: row["g"]} if dim else {}
        amount = None if row["value"] is None else float(row["value"])
        if rule.metric in ("failure_rate", "duration_p95_ms") and row["runs"] < rule.min_runs:
            amount = None  # too little traffic to judge
        out[group_key(key)] = (key, amount)
    if not rows and not dim:
        out[group_key({})] = ({}, 0.0 if rule.metric in ("failure_count", "no_callbacks") else None)
    return out


def group_key(key: dict[str, Any]) -> str:
    return orjson.dumps(key, option=orjson.OPT_SORT_KEYS).decode()


async def sample_runs(conn: Any, rule: Rule, key: dict[str, Any], now: datetime) -> list[str]:
    where = _where(rule, now)
    for column, value in key.items():
        if value is None:
            where.raw(f"{column} IS NULL")
        else:
            where.add(f"{column} = {{}}", value)
    if rule.metric in ("failure_count", "failure_rate"):
        where.add("status = {}", "failed")
    rows = await conn.fetch(
        f"SELECT id FROM runs WHERE {where.sql()} ORDER BY last_received_at DESC LIMIT 5",
        *where.args,
    )
    return [row["id"] for row in rows]


def runs_link(settings: Settings, rule: Rule, key: dict[str, Any], now: datetime) -> str:
    base = settings.public_url or f"http://{settings.host}:{settings.port}"
    params: list[tuple[str, str]] = []
    for column, values in rule.filters.items():
        params += [(column, value) for value in values]
    params += [(column, str(value)) for column, value in key.items() if value is not None]
    if rule.metric in ("failure_count", "failure_rate"):
        params.append(("status", "failed"))
    params.append(("created_after", (now - timedelta(seconds=rule.window)).isoformat()))
    return f"{base.rstrip('/')}/runs?{urlencode(params)}"


async def evaluate_once(settings: Settings, engine: AsyncEngine, now: datetime) -> bool:
    """One evaluation of every enabled rule; False when another process holds the lock."""
    rules = await list_rules(engine)
    async with driver_connection(engine) as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", EVALUATOR_LOCK):
            return False
        for rule_id, rule in rules:
            if rule.enabled:
                await _evaluate_rule(settings, conn, rule_id, rule, now)
    return True


async def _evaluate_rule(
    settings: Settings, conn: Any, rule_id: int, rule: Rule, now: datetime
) -> None:
    measured = await measure(conn, rule, now)
    stored = {
        row["group_key"]: row
        for row in await conn.fetch("SELECT * FROM alert_states WHERE rule_id = $1", rule_id)
    }
    for key_text in set(measured) | set(stored):
        key, value = measured.get(key_text, (orjson.loads(key_text), None))
        if key_text not in measured and rule.metric in ("failure_count", "no_callbacks"):
            value = 0.0
        row = stored.get(key_text)
        current = (
            GroupState(
                row["state"],
                row["pending_since"],
                row["last_fired_notice_at"],
                row["notified_firing"],
            )
            if row
            else GroupState()
        )
        result = step(rule, current, breaching(rule, value), now)
        if row is None and result.state == current:
            continue  # nothing to remember about a quiet group
        if row is not None and key_text not in measured and forgettable(rule, result, now):
            # Keeps the states bounded by the groups with recent traffic or a running cooldown,
            # however many groups (or a changed group_by) came and went.
            await conn.execute(
                "DELETE FROM alert_states WHERE rule_id = $1 AND group_key = $2",
                rule_id,
                key_text,
            )
            continue
        await conn.execute(
            "INSERT INTO alert_states (rule_id, group_key, state, value, pending_since,"
            " last_fired_notice_at, notified_firing, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (rule_id, group_key) DO UPDATE"
            " SET state = $3, value = $4, pending_since = $5, last_fired_notice_at = $6,"
            " notified_firing = $7, updated_at = $8",
            rule_id,
            key_text,
            result.state.state,
            value,
            result.state.pending_since,
            result.state.last_fired_notice_at,
            result.state.notified_firing,
            now,
        )
        if result.transition is None:
            continue
        event_id = await conn.fetchval(
            "INSERT INTO alert_events (rule_id, rule_name, group_key, from_state, to_state,"
            " value, threshold, notified, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " RETURNING id",
            rule_id,
            rule.name,
            key_text,
            *result.transition,
            value,
            rule.threshold,
            result.notify is not None,
            now,
        )
        if result.notify is None:
            continue
        notice = {
            "rule": rule.name,
            "metric": rule.metric,
            "group": key,
            "state": result.notify,
            "value": value,
            "threshold": rule.threshold,
            "window_seconds": rule.window,
            "filters": rule.filters,
            "sample_run_ids": await sample_runs(conn, rule, key, now),
            "link": runs_link(settings, rule, key, now),
            "at": now.isoformat(),
        }
        for target in rule.targets:
            await conn.execute(
                "INSERT INTO alert_notifications (event_id, url, secret, format, body)"
                " VALUES ($1, $2, $3, $4, $5)",
                event_id,
                target.url,
                target.secret,
                target.format,
                render(notice, target.format),
            )


async def run_evaluator(settings: Settings, engine: AsyncEngine, stop: asyncio.Event) -> None:
    """Evaluate every ``alert_interval_seconds`` until ``stop``; survives transient errors."""
    while not stop.is_set():
        try:
            from datetime import UTC

            await evaluate_once(settings, engine, datetime.now(UTC))
        except Exception:
            log.exception("alert evaluation failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.alert_interval_seconds)
