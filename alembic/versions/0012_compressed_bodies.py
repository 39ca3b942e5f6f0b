"""``deliveries.body_encoding``: the archive keeps a body zlib-compressed when that is smaller.

PostgreSQL compresses a value only once its row passes about 2 KB, so the archive kept most
bodies as they came: on the bench's realistic mix (envelopes of a few hundred bytes, Run objects
with 1-2 KB of input and output) the archive's bodies took 76 % of the bytes received. The
receiver now compresses each body it keeps (zlib, level 6) when that saves bytes and marks it
``zlib``; a null encoding means the bytes as received, which is what every row written before
this revision holds, so nothing is rewritten on the way up. ``receiver.ingest.archive`` reads
both. Adding a nullable column without a default touches no row.

The downgrade writes the compressed bodies back as received before it drops the column, so the
older code reads every body it finds.

Revision ID: 0012
Revises: 0011
"""

import zlib
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 1000


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("body_encoding", sa.Text(), nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    # Onward by id (the key's first column), so each chunk is one index range, not a scan.
    select = sa.text(
        "SELECT id, received_at, body FROM deliveries WHERE id > :after"
        " AND body_encoding = 'zlib' ORDER BY id LIMIT :n"
    )
    update = sa.text(
        "UPDATE deliveries SET body = :body, body_encoding = NULL"
        " WHERE id = :id AND received_at = :received_at"
    )
    after = 0
    while rows := bind.execute(select, {"after": after, "n": _CHUNK}).all():
        bind.execute(
            update,
            [
                {"id": r.id, "received_at": r.received_at, "body": zlib.decompress(r.body)}
                for r in rows
            ],
        )
        after = rows[-1].id
    op.drop_column("deliveries", "body_encoding")
