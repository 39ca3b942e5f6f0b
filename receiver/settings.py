"""Settings, read once from the environment (prefix ``RECEIVER_``) and passed down explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the receiver; SPEC section 4 names the public ones."""

    model_config = SettingsConfigDict(env_prefix="RECEIVER_", extra="ignore", frozen=True)

    database_url: str | None = None
    data_dir: Path = Path(".receiver")
    signing_secrets: CommaList = Field(default_factory=list)
    allow_unsigned: bool = False
    api_tokens: CommaList = Field(default_factory=list)
    max_body_bytes: int = Field(default=5 * 1024 * 1024, gt=0)
    # What `serve` lets one connection cost (receiver.server): the request line and headers
    # together, the time a body may take to arrive, the time a connection may sit idle or
    # half-way through its headers, and connections per worker (beyond it: 503).
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    body_read_timeout_seconds: float = Field(default=30.0, gt=0)
    keepalive_timeout_seconds: int = Field(default=5, ge=1)
    max_connections: int = Field(default=1000, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    runflow_api_url: str = "https://api.runflow.io"
    runflow_api_key: str | None = None
    runflow_org_id: str | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "console"] = "console"
    # Ingest pool size per worker process; with overflow and the read and background pools a
    # worker opens up to 2 x (db_pool_size + read_pool_size + background_pool_size)
    # connections, which times the workers must stay under PostgreSQL's max_connections.
    db_pool_size: int = Field(default=10, ge=1, le=200)
    # Group commit (receiver.ingest.batcher): the most deliveries one ingest transaction
    # writes, and how many such transactions a worker keeps in flight.
    ingest_batch_max: int = Field(default=64, ge=1, le=10000)
    ingest_flushers: int = Field(default=2, ge=1, le=32)
    # Database time limits (seconds). Ingest's are short so a stuck database or a stuck lock
    # holder turns a delivery into a 503 + Retry-After within seconds (Runflow retries it);
    # reads (queries, analytics) and background work get their own, longer limits and their
    # own pools, so neither can take the connections ingest needs.
    db_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    db_pool_timeout_seconds: float = Field(default=2.0, gt=0)
    ingest_statement_timeout_seconds: float = Field(default=5.0, gt=0)
    ingest_lock_timeout_seconds: float = Field(default=2.0, gt=0)
    read_statement_timeout_seconds: float = Field(default=30.0, gt=0)
    background_statement_timeout_seconds: float = Field(default=60.0, gt=0)
    read_pool_size: int = Field(default=4, ge=1, le=200)
    background_pool_size: int = Field(default=4, ge=1, le=200)
    # Analytics requests running at once per process; more wait this long, then get 503.
    analytics_concurrency: int = Field(default=2, ge=1, le=64)
    analytics_queue_seconds: float = Field(default=1.0, ge=0)
    # Supervision of the embedded PostgreSQL (serve without RECEIVER_DATABASE_URL).
    embedded_check_seconds: float = Field(default=0.5, gt=0)
    embedded_restart_backoff_seconds: float = Field(default=0.5, gt=0)
    embedded_restart_backoff_max_seconds: float = Field(default=10.0, gt=0)
    # Enrichment from Runflow's API: runs are queued whenever runflow_api_key is set; the
    # concurrency is this process's worker tasks (0: no worker here, e.g. an HTTP-only serve
    # next to separate `runflow-receiver worker` processes).
    enrichment_concurrency: int = Field(default=4, ge=0, le=64)
    enrichment_rps: float = Field(default=10.0, gt=0)
    enrichment_max_attempts: int = Field(default=8, ge=1)
    enrichment_backoff_seconds: float = Field(default=1.0, gt=0)
    enrichment_backoff_max_seconds: float = Field(default=300.0, gt=0)
    enrichment_timeout_seconds: float = Field(default=10.0, gt=0)
    enrichment_lease_seconds: float = Field(default=60.0, gt=0)
    enrichment_poll_seconds: float = Field(default=1.0, gt=0)
    enrichment_auth_pause_seconds: float = Field(default=300.0, gt=0)
    # Reconciliation (receiver.reconciliation): with an API key, one process at a time lists
    # recent runs from Runflow and imports what callbacks never brought; 0 turns it off.
    reconcile_interval_seconds: float = Field(default=300.0, ge=0)
    reconcile_lookback_seconds: float = Field(default=86400.0, gt=0)
    reconcile_stale_seconds: float = Field(default=1800.0, gt=0)
    reconcile_page_size: int = Field(default=500, ge=1, le=500)
    reconcile_refetch_limit: int = Field(default=200, ge=0, le=10000)
    reconcile_lease_seconds: float = Field(default=120.0, gt=0)

    # Data lifecycle (receiver.retention). The archive keeps whole UTC days: a delivery stays at
    # least retention_days and at most one day more; the duplicate window is the same.
    retention_days: int = Field(default=30, ge=1, le=36500)
    run_retention_days: int | None = Field(default=None, ge=1, le=36500)  # None: keep runs
    enrichment_done_retention_days: int = Field(default=7, ge=1)
    alert_notification_retention_days: int = Field(default=30, ge=1)
    alert_event_retention_days: int = Field(default=90, ge=1)
    partition_days_ahead: int = Field(default=7, ge=1, le=366)
    prune_interval_seconds: float = Field(default=86400.0, ge=0)  # 0: serve never prunes
    maintenance_poll_seconds: float = Field(default=3600.0, gt=0)
    maintenance_lease_seconds: float = Field(default=3600.0, gt=0)
    maintenance_lock_timeout_seconds: float = Field(default=5.0, gt=0)
    prune_batch_rows: int = Field(default=10000, ge=1, le=1000000)
    prune_max_batches: int = Field(default=1000, ge=1)
    # PgBouncer in transaction pooling: no prepared statements cached on (or named for) a
    # server connection, since consecutive transactions may land on different ones.
    db_pgbouncer: bool = False
    # Query and analytics routes read here (a replica, or any read-only connection); unset:
    # the primary.
    read_database_url: str | None = None

    # Alerting.
    alert_rules_file: Path | None = None
    alert_interval_seconds: float = Field(default=15.0, gt=0)
    alert_poll_seconds: float = Field(default=1.0, gt=0)
    alert_max_attempts: int = Field(default=8, ge=1)
    alert_backoff_seconds: float = Field(default=1.0, gt=0)
    alert_backoff_max_seconds: float = Field(default=300.0, gt=0)
    alert_timeout_seconds: float = Field(default=10.0, gt=0)
    # Hooks may point at loopback/private/link-local addresses (in-cluster hooks, tests);
    # off, any token holder could make the server POST into its own network.
    alert_allow_private_targets: bool = False
    public_url: str | None = None  # base of the /runs links in notifications
    metrics_top_failure_codes: int = Field(default=20, ge=1, le=500)
    # Read side: each /runs, /deliveries and /analytics request's statements are cancelled
    # after this long (SET LOCAL in its transaction) and answered 503.
    query_statement_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)

    @property
    def enrichment_queueing(self) -> bool:
        """Envelope-only runs are queued for enrichment (whoever works the queue)."""
        return bool(self.runflow_api_key)

    @property
    def enrichment_enabled(self) -> bool:
        """This process runs enrichment worker tasks."""
        return self.enrichment_queueing and self.enrichment_concurrency > 0

    @property
    def reconcile_enabled(self) -> bool:
        """A reconciler runs (in every process that runs background work; one pass at a time)."""
        return bool(self.runflow_api_key) and self.reconcile_interval_seconds > 0

    @field_validator("signing_secrets", mode="before")
    @classmethod
    def _secrets(cls, value: object) -> object:
        # An empty entry is a typo (a stray comma, a blank value), not "no secret": said so at
        # start-up rather than silently signing with fewer secrets than the operator meant.
        if isinstance(value, str):
            if value == "":
                return []
            parts = [part.strip() for part in value.split(",")]
            if not all(parts):
                raise ValueError("has an empty secret (a stray comma or a blank value)")
            return parts
        return value

    @field_validator("signing_secrets")
    @classmethod
    def _no_empty_secret(cls, value: list[str]) -> list[str]:
        if any(not secret.strip() for secret in value):
            raise ValueError("has an empty secret (a stray comma or a blank value)")
        return value

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("run_retention_days", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        return None if value in ("", "0", 0, "off", "none") else value

    @field_validator("database_url", "read_database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
            raise ValueError("must be a postgresql:// URL")
        return value


class ConfigError(Exception):
    """Configuration that stops start-up; the message is one line for the operator."""


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into one clear line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "RECEIVER_" + "_".join(str(part) for part in error["loc"]).upper()
            problems.append(f"{name}: {error['msg']}")
        raise ConfigError("bad configuration: " + "; ".join(problems)) from None
