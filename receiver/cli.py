"""``runflow-receiver``: serve, migrate, simulate and the other operator commands (click).

Exit codes: 0 done; 1 the command ran and failed (deliveries still rejected, a backfill that
stopped, a simulation not fully acknowledged); 2 a usage error (click's); 3 configuration or
environment (bad settings, an unreachable database, a schema not at head).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from receiver import __version__
from receiver.errors import ReceiverError
from receiver.settings import ConfigError, Settings
from receiver.startup import command_settings, open_engine, prepare_database

log = logging.getLogger("receiver.cli")

EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 1, 2, 3

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


def _settings(ctx: click.Context) -> Settings:
    """Settings from the environment and the top command's flags, with logging set up."""
    return command_settings(ctx.find_root().obj)


@click.group(context_settings=CONTEXT)
@click.version_option(
    __version__, "--version", prog_name="runflow-receiver", message="%(prog)s %(version)s"
)
@click.option(
    "--database-url",
    metavar="URL",
    default=None,
    show_default="RECEIVER_DATABASE_URL, else the embedded PostgreSQL under --data-dir",
    help="PostgreSQL URL (postgresql://user:pass@host:5432/db); wins over the environment.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="RECEIVER_DATA_DIR, else ./.receiver",
    help="Embedded PostgreSQL data and generated credentials; wins over the environment.",
)
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, data_dir: Path | None) -> None:
    """Receive Runflow callbacks into PostgreSQL and answer failure analytics.

    Settings come from RECEIVER_* environment variables (see the README); the options above
    override the two that say where the data is.
    """
    ctx.obj = {"database_url": database_url, "data_dir": data_dir}


@cli.command()
@click.option(
    "--host", default=None, show_default="RECEIVER_HOST, else 127.0.0.1", help="Bind address."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    show_default="RECEIVER_PORT, else 8000",
    help="Port to listen on.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=1, help="Worker processes.")
@click.option(
    "--migrate", is_flag=True, help="Upgrade an external database to the newest schema first."
)
@click.pass_context
def serve(
    ctx: click.Context, host: str | None, port: int | None, workers: int, migrate: bool
) -> int:
    """Run the HTTP receiver (and its enrichment, reconciliation and alert tasks).

    On the embedded database it creates and migrates its own; on an external one it refuses a
    schema that is not at head unless --migrate.
    """
    from receiver.server import serve as run_server

    return run_server(_settings(ctx), host=host, port=port, workers=workers, migrate=migrate)


@cli.command()
@click.pass_context
def migrate(ctx: click.Context) -> int:
    """Upgrade the database schema to the newest revision."""
    from receiver.migrations import head_revision

    prepare_database(_settings(ctx), migrate=True)
    log.info("database is at revision %s", head_revision())
    return 0


@cli.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=None,
    show_default="RECEIVER_ENRICHMENT_CONCURRENCY",
    help="Enrichment tasks in this process.",
)
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None) -> int:
    """Run the enrichment worker on its own (serve also runs it by default)."""
    from receiver.enrichment import Enricher

    settings = _settings(ctx)
    if not settings.runflow_api_key:
        raise ConfigError("RECEIVER_RUNFLOW_API_KEY is not set: there is nothing to enrich with")
    if concurrency is not None:
        # Lets `serve` keep RECEIVER_ENRICHMENT_CONCURRENCY=0 while workers share its env.
        settings = settings.model_copy(update={"enrichment_concurrency": concurrency})
    if settings.enrichment_concurrency == 0:
        raise ConfigError("RECEIVER_ENRICHMENT_CONCURRENCY is 0: the worker would do nothing")
    engine = open_engine(settings)

    async def work() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await Enricher(settings, engine).run(stop)
        finally:
            await engine.dispose()

    log.info(
        "enrichment worker: %d tasks",
        settings.enrichment_concurrency,
    )
    asyncio.run(work())
    return 0


def _datetime(option: str, value: str | None) -> datetime | None:
    from receiver.queryparams import parse_datetime

    if value is None:
        return None
    try:
        return parse_datetime(option, value)
    except ReceiverError as exc:
        raise click.BadParameter(exc.message, param_hint=option) from None


@cli.command()
@click.option(
    "--since", required=True, metavar="DATETIME", help="ISO 8601 date or datetime (inclusive)."
)
@click.option(
    "--until",
    default=None,
    metavar="DATETIME",
    show_default="no end",
    help="ISO 8601 date or datetime (exclusive).",
)
@click.option(
    "--page-size", type=click.IntRange(1, 500), default=500, help="Runs per page of Runflow's list."
)
@click.pass_context
def backfill(ctx: click.Context, since: str, until: str | None, page_size: int) -> int:
    """Import runs created in [--since, --until) from Runflow's API; rerun to resume."""
    from receiver.backfill import BackfillError
    from receiver.backfill import backfill as run_backfill
    from receiver.logs import Progress

    start, end = _datetime("--since", since), _datetime("--until", until)
    assert start is not None
    settings = _settings(ctx)
    if not settings.runflow_api_key:
        raise ConfigError("RECEIVER_RUNFLOW_API_KEY is not set: backfill reads Runflow's API")
    engine = open_engine(settings)

    async def run(progress: Progress) -> dict[str, int]:
        def page_done(imported: int, counts: dict[str, int]) -> None:
            progress.update(
                imported, f"({counts['stored']} stored, {counts['duplicate']} already known)"
            )

        try:
            return await run_backfill(
                settings, engine, since=start, until=end, page_size=page_size, progress=page_done
            )
        finally:
            await engine.dispose()

    try:
        with Progress("backfill", None) as progress:
            counts = asyncio.run(run(progress))
    except BackfillError as exc:
        log.error("backfill stopped: %s", exc)
        return EXIT_FAILED
    click.echo(
        f"backfill done: {counts['stored']} stored, {counts['duplicate']} already known,"
        f" {counts['rejected']} rejected (earlier runs of this backfill: {counts['previously']})"
    )
    return 0


@cli.command()
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@click.option("--all-rejected", is_flag=True, help="Every rejected delivery that kept its body.")
@click.pass_context
def replay(ctx: click.Context, ids: tuple[int, ...], all_rejected: bool) -> int:
    """Process kept deliveries again (after a fix): the IDS given, or every rejected one.

    Exits 1 when some are still not accepted.
    """
    from receiver.ingest import replay as replay_one
    from receiver.ingest import replayable_rejections

    if not ids and not all_rejected:
        raise click.UsageError("name delivery ids, or pass --all-rejected")
    settings = _settings(ctx)
    engine = open_engine(settings)

    async def run() -> int:
        todo = list(ids)
        if all_rejected:
            todo += await replayable_rejections(engine)
        still_rejected = 0
        try:
            for delivery_id in todo:
                try:
                    result = await replay_one(
                        engine,
                        delivery_id,
                        enrich=settings.enrichment_queueing,
                        allow_unsigned=settings.allow_unsigned,
                    )
                except ReceiverError as exc:
                    click.echo(f"delivery {delivery_id}: {exc.code}: {exc.message}")
                    still_rejected += 1
                    continue
                where = result.run_id or result.batch_id or ""
                cause = f" ({result.cause})" if result.cause else ""
                click.echo(f"delivery {delivery_id}: {result.outcome} {where}{cause}".rstrip())
                still_rejected += result.outcome == "rejected"
        finally:
            await engine.dispose()
        accepted = len(todo) - still_rejected
        click.echo(f"replayed {len(todo)}: {accepted} accepted, {still_rejected} not")
        return EXIT_FAILED if still_rejected else 0

    return asyncio.run(run())


@cli.command()
@click.option("--dry-run", is_flag=True, help="Print what would be dropped; drop nothing.")
@click.pass_context
def prune(ctx: click.Context, dry_run: bool) -> int:
    """Drop the archive's days past RECEIVER_RETENTION_DAYS and sweep the other tables.

    Prints what it drops. Exits 1 when another process holds the maintenance lease.
    """
    from receiver.retention import prune_command

    return prune_command(_settings(ctx), dry_run=dry_run)


def _add_module_commands() -> None:
    """Commands that live with their own modules."""
    from receiver.alerts.cli import alerts
    from receiver.simulate import simulate

    cli.add_command(simulate)
    cli.add_command(alerts)


_add_module_commands()


def _fail(message: str, code: int) -> int:
    from receiver.logs import json_logging

    line = f"runflow-receiver: {message}"
    if json_logging():  # one stream: the last line is JSON like the ones before it
        log.error(line)
    else:
        click.echo(line, err=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: runs the command and returns its exit code."""
    try:
        result: Any = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="runflow-receiver",
            standalone_mode=False,
        )
    except click.ClickException as exc:  # usage errors and bad parameters: 2
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        return _fail("aborted", 130)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or a failure nothing above names: logged with its trace
        log.exception("runflow-receiver: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILED
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
