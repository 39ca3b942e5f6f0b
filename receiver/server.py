"""``runflow-receiver serve``: prepare the database and the environment, then run uvicorn.

The command line only parses arguments; everything about running the HTTP server (its
limits, its signals, the worker processes' environment) lives here.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from typing import Any

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
        # h11, not httptools: h11 enforces a limit on the request line plus headers.
        http="receiver.server:HeaderDeadlineH11Protocol",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keepalive_timeout_seconds,
        limit_concurrency=settings.max_connections,
    )
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _protocol_class() -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        """uvicorn's h11 protocol with a deadline on headers as well as on idleness.

        uvicorn closes a keep-alive connection that stays silent, but any byte cancels that
        timer, so a client dripping a header byte a second (or one that connects and never
        sends) holds the connection forever. Here the same timer starts when the connection
        opens and after each response, and only a complete request line and headers stop it.
        """

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def data_received(self, data: bytes) -> None:
            # Unlike the base class, data does not stop the timer: a parsed request does.
            self.conn.receive_data(data)
            self.handle_events()

        def timeout_keep_alive_handler(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def __getattr__(name: str) -> Any:
    # Built on first use so importing this module does not import uvicorn.
    if name == "HeaderDeadlineH11Protocol":
        return _protocol_class()
    raise AttributeError(name)


def worker_app() -> object:
    """The app in a uvicorn worker process, configured from the environment ``serve`` set."""
    from receiver.app import create_app
    from receiver.logs import AccessLog, configure_logging

    settings = load_settings()
    configure_logging(settings)
    return AccessLog(create_app(settings, database_url=settings.database_url))
