"""Start-up helpers the commands share: credentials, the schema gate, an engine on the database.

Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import create_engine, resolve_database_url
from receiver.migrations import current_revision, head_revision, state_of, upgrade
from receiver.settings import ConfigError, Settings


def _keep_secret(data_dir: Path, name: str, make: Callable[[], str]) -> tuple[str, Path, bool]:
    """A generated credential kept in the data directory (mode 0600); created on first use."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / name
    if path.exists():
        return path.read_text().strip(), path, False
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value, path, True


def ensure_credentials(settings: Settings) -> Settings:
    """Fill in a signing secret and an API token from the data directory when none is set."""
    updates: dict[str, object] = {}
    if not settings.signing_secrets and not settings.allow_unsigned:
        value, path, made = _keep_secret(
            settings.data_dir, "signing_secret", lambda: "whsec_" + secrets.token_hex(24)
        )
        updates["signing_secrets"] = [value]
        verb = "generated" if made else "using"
        print(f"{verb} signing secret in {path} (give it to Runflow as the callback secret)")
    if not settings.api_tokens:
        value, path, made = _keep_secret(
            settings.data_dir, "api_token", lambda: secrets.token_urlsafe(32)
        )
        updates["api_tokens"] = [value]
        verb = "generated" if made else "using"
        print(f"{verb} API token in {path} (send it as Authorization: Bearer <token>)")
    return settings.model_copy(update=updates) if updates else settings


def prepare_database(settings: Settings, *, migrate: bool) -> str:
    """The database URL to serve from: embedded ones are migrated, external ones checked."""

    url, embedded = resolve_database_url(settings)
    if embedded or migrate:
        upgrade(url)
        return url

    async def revision() -> str | None:
        engine = create_engine(url, pool_size=1, pgbouncer=settings.db_pgbouncer)
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    current, head = asyncio.run(revision()), head_revision()
    # Ahead (a newer version migrated first, mid-rollout) is fine: migrations keep the
    # previous version working. Behind is not: this code needs its migration.
    if state_of(current) == "behind":
        raise ConfigError(
            f"database schema is at {current or 'nothing'}, this code needs {head}: "
            "run `runflow-receiver migrate` (or serve --migrate)"
        )
    return url


def open_engine(settings: Settings) -> AsyncEngine:
    """An engine on the configured database, whose schema must be at head (or ahead of it)."""
    url = prepare_database(settings, migrate=False)
    return create_engine(
        url,
        pool_size=max(2, settings.enrichment_concurrency + 1),
        pgbouncer=settings.db_pgbouncer,
    )
