"""``runflow-receiver``: serve, migrate, simulate and the other operator commands."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Sequence

from receiver.errors import ReceiverError
from receiver.settings import ConfigError, Settings, load_settings
from receiver.startup import open_engine, prepare_database

Command = Callable[[argparse.Namespace, Settings], int]


def _fail(message: str) -> int:
    print(f"runflow-receiver: {message}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from receiver.server import serve

    return serve(
        settings, host=args.host, port=args.port, workers=args.workers, migrate=args.migrate
    )


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from receiver.migrations import head_revision

    prepare_database(settings, migrate=True)
    print(f"database is at revision {head_revision()}")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from receiver.enrichment import Enricher

    if not settings.runflow_api_key:
        raise ConfigError("RECEIVER_RUNFLOW_API_KEY is not set: there is nothing to enrich with")
    if args.concurrency is not None:
        # Lets `serve` keep RECEIVER_ENRICHMENT_CONCURRENCY=0 while workers share its env.
        settings = settings.model_copy(update={"enrichment_concurrency": args.concurrency})
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

    print(f"enrichment worker: {settings.enrichment_concurrency} tasks", flush=True)
    asyncio.run(work())
    return 0


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from receiver.backfill import BackfillError, backfill
    from receiver.queryparams import parse_datetime

    if not settings.runflow_api_key:
        raise ConfigError("RECEIVER_RUNFLOW_API_KEY is not set: backfill reads Runflow's API")
    try:
        since = parse_datetime("--since", args.since)
        until = parse_datetime("--until", args.until) if args.until else None
    except ReceiverError as exc:
        raise ConfigError(exc.message) from None
    engine = open_engine(settings)

    async def run() -> dict[str, int]:
        try:
            return await backfill(
                settings, engine, since=since, until=until, page_size=args.page_size
            )
        finally:
            await engine.dispose()

    try:
        counts = asyncio.run(run())
    except BackfillError as exc:
        print(f"backfill stopped: {exc}", file=sys.stderr)
        return 1
    print(
        f"backfill done: {counts['stored']} stored, {counts['duplicate']} already known,"
        f" {counts['rejected']} rejected (earlier runs of this backfill: {counts['previously']})"
    )
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Process kept deliveries again: the ids given, or every rejected one."""
    from receiver.ingest import replay, replayable_rejections

    if not args.ids and not args.all_rejected:
        raise ConfigError("name delivery ids, or pass --all-rejected")
    engine = open_engine(settings)

    async def run() -> int:
        ids = list(args.ids)
        if args.all_rejected:
            ids += await replayable_rejections(engine)
        still_rejected = 0
        try:
            for delivery_id in ids:
                try:
                    result = await replay(
                        engine,
                        delivery_id,
                        enrich=settings.enrichment_queueing,
                        allow_unsigned=settings.allow_unsigned,
                    )
                except ReceiverError as exc:
                    print(f"delivery {delivery_id}: {exc.code}: {exc.message}")
                    still_rejected += 1
                    continue
                where = result.run_id or result.batch_id or ""
                cause = f" ({result.cause})" if result.cause else ""
                print(f"delivery {delivery_id}: {result.outcome} {where}{cause}".rstrip())
                still_rejected += result.outcome == "rejected"
        finally:
            await engine.dispose()
        print(f"replayed {len(ids)}: {len(ids) - still_rejected} accepted, {still_rejected} not")
        return 1 if still_rejected else 0

    return asyncio.run(run())


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from receiver.retention import prune_command

    return prune_command(settings, dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runflow-receiver",
        description="Receive Runflow callbacks into PostgreSQL and answer failure analytics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP receiver")
    serve.add_argument("--host", default=None, help="bind address (RECEIVER_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (RECEIVER_PORT)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.add_argument(
        "--migrate", action="store_true", help="upgrade an external database before serving"
    )
    serve.set_defaults(handler=cmd_serve)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to head")
    migrate.set_defaults(handler=cmd_migrate)

    replay = sub.add_parser("replay", help="process kept deliveries again (after a fix)")
    replay.add_argument("ids", nargs="*", type=int, help="delivery ids")
    replay.add_argument(
        "--all-rejected", action="store_true", help="every rejected delivery that kept its body"
    )
    replay.set_defaults(handler=cmd_replay)

    worker = sub.add_parser("worker", help="run the enrichment worker on its own")
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        choices=range(1, 65),
        metavar="1..64",
        help="tasks in this process (default RECEIVER_ENRICHMENT_CONCURRENCY)",
    )
    worker.set_defaults(handler=cmd_worker)

    back = sub.add_parser("backfill", help="import runs from Runflow's API")
    back.add_argument("--since", required=True, help="ISO 8601 date or datetime (inclusive)")
    back.add_argument("--until", default=None, help="ISO 8601 date or datetime (exclusive)")
    back.add_argument("--page-size", type=int, default=500, choices=range(1, 501), metavar="1..500")
    back.set_defaults(handler=cmd_backfill)

    prune = sub.add_parser("prune", help="drop archive partitions and rows past retention")
    prune.add_argument("--dry-run", action="store_true", help="print what would go; drop nothing")
    prune.set_defaults(handler=cmd_prune)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Subcommands that live with their own modules."""
    from receiver import simulate
    from receiver.alerts import cli as alerts_cli

    return [simulate.register, alerts_cli.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        from receiver.logs import configure_logging

        configure_logging(settings)
        handler: Command = args.handler
        return handler(args, settings)
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
