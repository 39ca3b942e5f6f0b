"""Where alerting keeps its data: rules, per-group states, the event log and the outbox.

Rule CRUD and single-row reads use the SQLModel tables; the listings the API and the CLI show
are a few hand-written reads. The evaluator's and the sender's transactional SQL stays beside
their loops (``evaluate.py``, ``notify.py``), where its locking reads best.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.alerts.rules import Rule
from receiver.db import driver_connection
from receiver.tables import AlertNotification, AlertRule


async def upsert_rule(engine: AsyncEngine, rule: Rule) -> None:
    """Create the rule, or replace the definition of the rule with its name."""
    statement = insert(AlertRule).values(name=rule.name, definition=rule.definition())
    statement = statement.on_conflict_do_update(
        index_elements=[AlertRule.__table__.c.name],  # type: ignore[attr-defined]
        set_={"definition": statement.excluded.definition, "updated_at": func.now()},
    )
    async with engine.begin() as conn:
        await conn.execute(statement)


async def list_rules(engine: AsyncEngine) -> list[tuple[int, Rule]]:
    """Every rule with its id, by name."""
    table = AlertRule.__table__  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        rows = await conn.execute(select(table.c.id, table.c.definition).order_by(table.c.name))
        return [(row.id, Rule.model_validate(row.definition)) for row in rows]


async def get_rule(engine: AsyncEngine, name: str) -> tuple[int, Rule] | None:
    table = AlertRule.__table__  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(table.c.id, table.c.definition).where(table.c.name == name))
        ).first()
    return (row.id, Rule.model_validate(row.definition)) if row else None


async def delete_rule(engine: AsyncEngine, name: str) -> bool:
    """Delete a rule (its states go with it); False when there was none."""
    table = AlertRule.__table__  # type: ignore[attr-defined]
    async with engine.begin() as conn:
        result = await conn.execute(delete(table).where(table.c.name == name))
    return bool(result.rowcount)


async def rule_states(engine: AsyncEngine, rule_id: int) -> list[dict[str, Any]]:
    """The stored state of each group of one rule, by group."""
    async with driver_connection(engine) as conn:
        rows = await conn.fetch(
            "SELECT group_key, state, value, updated_at FROM alert_states WHERE rule_id = $1"
            " ORDER BY group_key",
            rule_id,
        )
    return [
        {
            "group": orjson.loads(row["group_key"]),
            "state": row["state"],
            "value": row["value"],
            "updated_at": row["updated_at"],
        }
        for row in rows
    ]


async def unsent_notifications(engine: AsyncEngine) -> list[dict[str, Any]]:
    """Counts of notifications not sent, by state (pending: retrying; failed: given up)."""
    table = AlertNotification.__table__  # type: ignore[attr-defined]
    query = (
        select(table.c.state, func.count().label("n"), func.max(table.c.last_error).label("error"))
        .where(table.c.state != "sent")
        .group_by(table.c.state)
        .order_by(table.c.state)
    )
    async with engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]


async def events_page(
    engine: AsyncEngine, *, rule: str | None, before_id: int | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Events newest first (one page, each with its notifications) and whether more follow."""
    args: list[Any] = []
    conditions = []
    if rule is not None:
        args.append(rule)
        conditions.append(f"rule_name = ${len(args)}")
    if before_id is not None:
        args.append(before_id)
        conditions.append(f"id < ${len(args)}")
    where = " AND ".join(conditions) or "TRUE"
    async with driver_connection(engine) as conn:
        rows = await conn.fetch(
            "SELECT id, rule_name AS rule, group_key, from_state, to_state, value, threshold,"
            f" notified, at FROM alert_events WHERE {where} ORDER BY id DESC LIMIT {limit + 1}",
            *args,
        )
        notices = await conn.fetch(
            "SELECT event_id, url, state, attempts, last_error, sent_at FROM alert_notifications"
            " WHERE event_id = ANY($1::bigint[]) ORDER BY id",
            [r["id"] for r in rows[:limit]],
        )
    by_event: dict[int, list[dict[str, Any]]] = {}
    for notice in notices:
        entry = dict(notice)
        by_event.setdefault(entry.pop("event_id"), []).append(entry)
    items = []
    for row in rows[:limit]:
        item = dict(row)
        item["group"] = orjson.loads(item.pop("group_key"))
        item["notifications"] = by_event.get(row["id"], [])
        items.append(item)
    return items, len(rows) > limit


async def enabled_rule_states(engine: AsyncEngine) -> list[Any]:
    """Rule name, group, state and value of every group of every enabled rule (for /metrics).

    A disabled rule's states stay as they were; shown, a firing one would page forever.
    """
    async with driver_connection(engine) as conn:
        return list(
            await conn.fetch(
                "SELECT r.name, s.group_key, s.state, s.value FROM alert_states s"
                " JOIN alert_rules r ON r.id = s.rule_id"
                " WHERE (r.definition ->> 'enabled')::boolean IS NOT FALSE"
            )
        )
