"""``runflow-receiver serve``: prepare the database and the environment, then run uvicorn.

The command line only parses arguments; everything about running the HTTP server (its
limits, its signals, the worker processes' environment) lives here.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal

from receiver.errors import ReceiverError
from receiver.logs import logging_config
from receiver.settings import ConfigError, Settings, load_settings
from receiver.startup import ensure_credentials, prepare_database

log = logging.getLogger(__name__)


def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int = 1,
    migrate: bool = False,
) -> int:
    """Serve until stopped; returns the exit code."""
    import uvicorn

    settings = ensure_credentials(settings)
    if settings.alert_rules_file is not None:
        from receiver.alerts.rules import load_rules_file

        try:
            load_rules_file(settings.alert_rules_file)
        except (OSError, ReceiverError) as exc:
            detail = getattr(exc, "details", None) or ""
            raise ConfigError(f"RECEIVER_ALERT_RULES_FILE: {exc} {detail}".strip()) from None
    url = prepare_database(settings, migrate=migrate)
    # Worker processes build their settings from the environment: hand them what was resolved.
    os.environ["RECEIVER_DATABASE_URL"] = url
    os.environ["RECEIVER_SIGNING_SECRETS"] = ",".join(settings.signing_secrets)
    os.environ["RECEIVER_API_TOKENS"] = ",".join(settings.api_tokens)
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Counters from every worker are summed at scrape time; start from nothing.
        metrics_dir = settings.data_dir.resolve() / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    host = host or settings.host
    port = port if port is not None else settings.port
    log.info(
        "receiving Runflow callbacks at http://%s:%s/webhooks/runflow",
        host,
        port,
    )
    # uvicorn re-raises SIGTERM after its graceful shutdown; with Python's default handler the
    # process would die without running atexit, leaving the embedded PostgreSQL running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    uvicorn.run(
        "receiver.server:worker_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # Spawned workers apply this dict themselves: one format for uvicorn's lines and ours.
        log_config=logging_config(settings),
        log_level=settings.log_level,
        access_log=False,  # receiver.logs.AccessLog logs each request (with its duration)
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def worker_app() -> object:
    """The app in a uvicorn worker process, configured from the environment ``serve`` set."""
    from receiver.app import create_app
    from receiver.logs import AccessLog, configure_logging

    settings = load_settings()
    configure_logging(settings)
    return AccessLog(create_app(settings, database_url=settings.database_url))
