"""The archive keeps bodies zlib-compressed when that is smaller (revision 0012), and gives back
the bytes exactly as received: through the API, to a replay, and to older code after a
downgrade. Rows written before 0012 (no encoding) read as they always did."""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from alembic import command
from receiver.migrations import alembic_config
from tests.support.builders import auth, post_delivery, run_object
from tests.support.database import connect, migrated_database


async def archived(db, delivery_id: int) -> dict:
    async with db.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT body, body_encoding, body_size, body_sha256 FROM deliveries"
                    " WHERE id = :id"
                ),
                {"id": delivery_id},
            )
        ).one()
    return dict(row._mapping)


def long_run_object(run_id: str, **fields: Any) -> bytes:
    """A Run object as image models send them: a prompt of a few hundred bytes."""
    prompt = "a watercolor of a lighthouse at dawn, soft light, " * 12
    return orjson.dumps(run_object(run_id, input={"prompt": prompt, "seed": 7}, **fields))


async def test_a_compressible_body_is_kept_smaller_and_read_back_exactly(client, db):
    raw = long_run_object("run_zip", status_code="succeeded")
    response = await post_delivery(client, raw)
    assert response.status_code == 200
    delivery_id = response.json()["delivery_id"]

    row = await archived(db, delivery_id)
    assert row["body_encoding"] == "zlib"
    assert len(row["body"]) < len(raw) / 2  # a repetitive prompt: far smaller
    assert zlib.decompress(row["body"]) == raw  # RFC 1950, readable by any zlib
    assert row["body_size"] == len(raw)
    assert bytes(row["body_sha256"]) == hashlib.sha256(raw).digest()

    detail = (await client.get(f"/deliveries/{delivery_id}", headers=auth())).json()
    assert detail["body"] == raw.decode()
    assert "body_encoding" not in detail  # the API shows the body, not how it is kept

    # The same bytes again are still a duplicate: fingerprints hash what was received.
    again = await post_delivery(client, raw)
    assert again.json()["status"] == "duplicate"


async def test_a_large_body_is_kept_compressed_and_read_back_exactly(client, db):
    # Over 64 KiB, so the receiver compresses it off the event loop.
    raw = orjson.dumps(
        run_object("run_big", input={"frames": [f"frame {n} of a long clip" for n in range(20000)]})
    )
    assert len(raw) > 256 * 1024
    response = await post_delivery(client, raw)
    assert response.status_code == 200
    row = await archived(db, response.json()["delivery_id"])
    assert row["body_encoding"] == "zlib" and len(row["body"]) < len(raw) / 4
    assert zlib.decompress(row["body"]) == raw


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id": "r"}',  # under 64 bytes: zlib's header and checksum would not pay
        os.urandom(300),  # noise: compressed it would be larger
    ],
)
async def test_small_or_incompressible_bodies_are_kept_as_received(client, db, raw):
    response = await post_delivery(client, raw)
    delivery_id = (response.json().get("error") or response.json())["delivery_id"]
    row = await archived(db, delivery_id)
    assert row["body_encoding"] is None and bytes(row["body"]) == raw


async def test_a_compressed_rejection_replays_once_its_run_exists(client, db):
    orphan = orjson.dumps(
        {"client_ref": "later-zip", "status_code": "failed", "failure_message": "oom " * 40}
    )
    rejected = await post_delivery(client, orphan)
    assert rejected.status_code == 422
    delivery_id = rejected.json()["error"]["delivery_id"]
    assert (await archived(db, delivery_id))["body_encoding"] == "zlib"

    await post_delivery(
        client, run_object("run_later", client_ref="later-zip", status_code="running")
    )
    fixed = await client.post(f"/deliveries/{delivery_id}/replay", headers=auth())
    assert fixed.json()["status"] == "stored" and fixed.json()["run_id"] == "run_later"
    run = (await client.get("/runs/run_later", headers=auth())).json()
    assert run["status"] == "failed" and run["failure_message"] == "oom " * 40


async def test_rows_kept_before_0012_read_and_replay_as_before(client, db):
    orphan = orjson.dumps({"client_ref": "old-row", "status_code": "failed", "pad": "x" * 200})
    async with db.begin() as conn:
        delivery_id = (
            await conn.execute(
                text(
                    "INSERT INTO deliveries (received_at, content_type, body, body_sha256,"
                    " body_size, signature, outcome, cause)"
                    " VALUES (now(), 'application/json', :body, :sha, :size, 'valid', 'rejected',"
                    " 'invalid_payload') RETURNING id"
                ),
                {"body": orphan, "sha": hashlib.sha256(orphan).digest(), "size": len(orphan)},
            )
        ).scalar_one()
    detail = (await client.get(f"/deliveries/{delivery_id}", headers=auth())).json()
    assert detail["body"] == orphan.decode()
    await post_delivery(client, run_object("run_old", client_ref="old-row", status_code="running"))
    fixed = await client.post(f"/deliveries/{delivery_id}/replay", headers=auth())
    assert fixed.json()["status"] == "stored" and fixed.json()["run_id"] == "run_old"


@pytest.fixture
def scratch_url(server_url: str) -> Iterator[str]:
    with migrated_database(server_url, "rfzip") as url:
        yield url


async def test_the_downgrade_writes_every_body_back_as_received(scratch_url: str) -> None:
    bodies = [orjson.dumps({"n": n, "text": "same words again " * (5 + n)}) for n in range(2500)]
    conn = await connect(scratch_url)
    try:
        await conn.executemany(
            "INSERT INTO deliveries (body, body_encoding, body_size, signature, outcome)"
            " VALUES ($1, 'zlib', $2, 'valid', 'stored')",
            [(zlib.compress(b), len(b)) for b in bodies],
        )
        await conn.execute(
            "INSERT INTO deliveries (body, body_size, signature, outcome)"
            " VALUES ('{\"raw\": true}', 13, 'valid', 'stored')"
        )
    finally:
        await conn.close()

    # env.py runs its own event loop, so Alembic goes to a thread from inside this test.
    await asyncio.to_thread(command.downgrade, alembic_config(scratch_url), "0011")
    conn = await connect(scratch_url)
    try:
        kept = [
            bytes(r["body"]) for r in await conn.fetch("SELECT body FROM deliveries ORDER BY id")
        ]
        encoding = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'deliveries' AND column_name = 'body_encoding'"
        )
    finally:
        await conn.close()
    assert kept == [*bodies, b'{"raw": true}']
    assert encoding == 0
    await asyncio.to_thread(command.upgrade, alembic_config(scratch_url), "head")
