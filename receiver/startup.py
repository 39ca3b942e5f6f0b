"""Start-up helpers the commands share: credentials, the schema gate, an engine on the database.

Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import DATABASE_DOWN, async_url, create_engine, plain_url, resolve_database_url
from receiver.migrations import current_revision, head_revision, state_of, upgrade
from receiver.settings import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

CONNECT_SECONDS = 10.0


def command_settings(flags: object) -> Settings:
    """Settings for a command, with this process's logging configured from them.

    The top command's flags (a mapping of setting names to values, None when not given) win
    over the environment; they are put in the environment so that processes started from
    here (serve's workers) resolve the same values.
    """
    from receiver.logs import configure_logging

    overrides = flags if isinstance(flags, dict) else {}
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"RECEIVER_{name.upper()}"] = str(value)
    settings = load_settings()
    configure_logging(settings)
    return settings


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
        log.info("%s signing secret in %s (give it to Runflow as the callback secret)", verb, path)
    if not settings.api_tokens:
        value, path, made = _keep_secret(
            settings.data_dir, "api_token", lambda: secrets.token_urlsafe(32)
        )
        updates["api_tokens"] = [value]
        verb = "generated" if made else "using"
        log.info("%s API token in %s (send it as Authorization: Bearer <token>)", verb, path)
    return settings.model_copy(update=updates) if updates else settings


def database_address(url: str) -> str:
    """``host:port`` of a database URL (the socket directory for a Unix socket), no password."""
    parsed = make_url(async_url(url))

    def query(name: str) -> str | None:
        value = parsed.query.get(name)
        return value if isinstance(value, str) or value is None else value[0]

    return f"{parsed.host or query('host') or 'localhost'}:{parsed.port or query('port') or 5432}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_SECONDS:g}s"
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class DatabaseUnreachable(ConfigError):
    """The configured database does not answer, or refuses us: nothing can start."""

    def __init__(self, url: str, exc: BaseException) -> None:
        super().__init__(f"cannot reach the database at {database_address(url)}: {_reason(exc)}")


async def _probe(url: str) -> None:
    conn = await asyncpg.connect(plain_url(url), timeout=CONNECT_SECONDS)
    await conn.close()


def check_reachable(url: str) -> None:
    """Connect once (bounded): an unreachable database becomes one line, not a traceback."""
    try:
        asyncio.run(asyncio.wait_for(_probe(url), CONNECT_SECONDS + 1))
    except (*DATABASE_DOWN, asyncpg.PostgresError) as exc:
        raise DatabaseUnreachable(url, exc) from None


def prepare_database(settings: Settings, *, migrate: bool) -> str:
    """The database URL to serve from: embedded ones are migrated, external ones checked."""
    url, embedded = resolve_database_url(settings)
    check_reachable(url)
    try:
        return _prepare(url, embedded=embedded, migrate=migrate, pgbouncer=settings.db_pgbouncer)
    except DATABASE_DOWN as exc:
        # Reachable a moment ago; gone (or refusing) now: still one line.
        raise DatabaseUnreachable(url, exc) from None


def _prepare(url: str, *, embedded: bool, migrate: bool, pgbouncer: bool = False) -> str:
    if embedded or migrate:
        upgrade(url)
        return url

    async def revision() -> str | None:
        engine = create_engine(url, pool_size=1, pgbouncer=pgbouncer)
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
    # The commands' work is background work: its time limits, not the library defaults.
    return create_engine(
        url,
        pool_size=max(2, settings.enrichment_concurrency + 1),
        connect_timeout=settings.db_connect_timeout_seconds,
        pool_timeout=max(settings.db_pool_timeout_seconds, 10.0),
        command_timeout=settings.background_statement_timeout_seconds,
        pgbouncer=settings.db_pgbouncer,
    )
