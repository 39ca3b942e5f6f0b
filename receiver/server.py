"""``runflow-receiver serve``: prepare the database and the environment, then run uvicorn.

The command line only parses arguments; everything about running the HTTP server (its
limits, its signals, the worker processes' environment) lives here.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import shutil
import signal
import sys
from typing import Any

from receiver.db import EmbeddedSupervisor
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
    # Without a database URL the embedded server is ours to keep alive while we serve.
    supervisor = (
        None
        if settings.database_url
        else EmbeddedSupervisor(
            settings.data_dir,
            check_seconds=settings.embedded_check_seconds,
            backoff_seconds=settings.embedded_restart_backoff_seconds,
            backoff_max_seconds=settings.embedded_restart_backoff_max_seconds,
        )
    )
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
    if supervisor is not None:
        _count_outages(supervisor)
        supervisor.start()
    host = host or settings.host
    port = port if port is not None else settings.port
    log.info(
        "receiving Runflow callbacks at http://%s:%s/webhooks/runflow",
        host,
        port,
    )
    # uvicorn re-raises SIGTERM after its graceful shutdown; with Python's default handler the
    # process would die without running atexit, leaving the embedded PostgreSQL running.
    # With --workers N uvicorn's supervisor replaces this handler with its own (SIGTERM: stop
    # the workers, which finish their in-flight requests, then return), and replaces a worker
    # that died. The embedded server is stopped last, at exit, after the workers are gone.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _run_uvicorn(
            uvicorn.Config(
                "receiver.server:worker_app",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                # Spawned workers apply this dict themselves: one format for uvicorn's and ours.
                log_config=logging_config(settings),
                log_level=settings.log_level,
                access_log=False,  # receiver.logs.AccessLog logs each request (with its duration)
                lifespan="on",
                timeout_graceful_shutdown=10,
                # httptools (C) rather than h11 (pure Python): about a tenth of the CPU per
                # request; BoundedHead adds the head limit h11 had (bench/README.md).
                http="receiver.server:BoundedHeadProtocol",
                timeout_keep_alive=settings.keepalive_timeout_seconds,
                limit_concurrency=settings.max_connections,
            )
        )
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def _run_uvicorn(config: Any) -> None:
    """``uvicorn.run`` with one change for several workers: the listener closes on SIGTERM.

    uvicorn's supervisor keeps its copy of the listening socket until every worker has
    drained and exited; meanwhile the kernel still completes handshakes into the backlog that
    no one will accept, and resets them all at exit. Closing the supervisor's copy as soon as
    the workers are told to stop makes late senders see a refused connection (retried at once
    elsewhere) instead of a request that was accepted and then reset.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if config.workers <= 1:
        server = uvicorn.Server(config=config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        if not server.started:
            sys.exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run would
        return

    class Draining(Multiprocess):
        def terminate_all(self) -> None:
            super().terminate_all()
            for sock in self.sockets:
                sock.close()

    with contextlib.suppress(KeyboardInterrupt):
        Draining(config, sockets=[config.bind_socket()]).run()


def _count_outages(supervisor: EmbeddedSupervisor) -> None:
    """Count the embedded server's deaths and restarts in /metrics (this process's files)."""
    if "prometheus_client" in sys.modules and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import values

        if values.ValueClass is values.MutexValue:  # imported too early: counts would be lost
            logging.getLogger(__name__).warning("embedded restarts will not show in /metrics")
            return
    from receiver import metrics

    supervisor.on_down = metrics.EMBEDDED_OUTAGES.inc
    supervisor.on_restart = metrics.EMBEDDED_RESTARTS.inc


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


@functools.cache
def _protocol_class() -> type:
    import httptools
    import orjson
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    # Built in each worker process, whose environment ``serve`` filled in.
    limit = load_settings().max_header_bytes

    class BoundedHead(HttpToolsProtocol):
        """uvicorn's httptools protocol with a size limit and a deadline on the request head.

        httptools (llhttp) sets no limit of its own on the request line plus headers, and
        uvicorn closes a keep-alive connection that stays silent but lets any byte cancel that
        timer, so a client dripping a header byte a second (or one that connects and never
        sends) would hold the connection forever. Here the bytes received while a request's
        head is incomplete are counted, and past ``max_head_bytes`` the request is answered 431
        and the connection closed; and the keep-alive timer starts when the connection opens
        and after each response, and only a complete head stops it. A head that arrives whole
        in one read is measured again by the webhook route (its 431 is the usual JSON error).
        """

        max_head_bytes = limit

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.head_bytes = 0
            self.awaiting_head = True
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def data_received(self, data: bytes) -> None:
            # Unlike the base class, data does not stop the timer: a complete head does.
            if self.awaiting_head:
                self.head_bytes += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.send_400_response("Invalid HTTP request received.")
                return
            except httptools.HttpParserUpgrade:
                self.send_400_response("Upgrades are not supported.")
                return
            if self.awaiting_head and self.head_bytes > self.max_head_bytes:
                self.refuse_head()

        def on_headers_complete(self) -> None:
            self.awaiting_head = False
            self._unset_keepalive_if_required()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self.awaiting_head, self.head_bytes = True, 0
            super().on_response_complete()

        def refuse_head(self) -> None:
            from receiver import metrics
            from receiver.errors import HeadersTooLarge

            error = HeadersTooLarge(f"request headers exceed {self.max_head_bytes} bytes")
            metrics.REFUSED.labels(error.code).inc()
            body = orjson.dumps(error.to_body())
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.transport.close()
            self.awaiting_head = False

    return BoundedHead


def __getattr__(name: str) -> Any:
    # Built on first use so importing this module does not import uvicorn.
    if name == "BoundedHeadProtocol":
        return _protocol_class()
    raise AttributeError(name)


def worker_app() -> object:
    """The app in a uvicorn worker process, configured from the environment ``serve`` set."""
    from receiver.app import create_app
    from receiver.logs import AccessLog, configure_logging

    settings = load_settings()
    configure_logging(settings)
    app = AccessLog(create_app(settings, database_url=settings.database_url))
    # What start-up built lives as long as the worker: moved out of the collector's sight,
    # the collections that the ingest path's allocations trigger no longer walk it (parsing a
    # delivery spent 3.5 us in the collector before, 0.7 us after; bench/README.md).
    gc.freeze()
    return app
