"""``runflow-receiver simulate``: realistic signed Runflow traffic, for demos and load.

``generate_traffic`` is a pure, seeded function: the same seed gives the same bytes, so a test
can compute what the receiver must end up storing. ``send`` posts them concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import httpx
import orjson

from receiver.ingest.signature import sign
from receiver.logs import Progress
from receiver.settings import Settings

log = logging.getLogger(__name__)

MODELS = [
    "flux-dev",
    "flux-schnell",
    "sdxl-turbo",
    "sd3-medium",
    "llama-3-70b",
    "whisper-large",
    "kandinsky-3",
    "animatediff",
]
FAILURES = [
    ("out_of_memory", "execution"),
    ("model_timeout", "execution"),
    ("nsfw_blocked", "execution"),
    ("invalid_input", "dispatch"),
    ("no_capacity", "dispatch"),
    ("quota_exceeded", "dispatch"),
    ("callback_unreachable", "callback"),
    ("callback_timeout", "callback"),
    ("lost_worker", "reconciliation"),
    ("stale_run", "reconciliation"),
]
TARGETS = ["model", "model", "model", "flow", "comfyui"]
SOURCES = ["api", "api", "playground", "flow-node"]
NODE_TYPES = ["LoadImage", "CLIPTextEncode", "KSampler", "VAEDecode", "llm", "SaveImage"]
_EVENT = {
    "succeeded": "run.completed",
    "failed": "run.failed",
    "cancelled": "run.cancelled",
    "partial_succeeded": "run.partial_succeeded",
}


@dataclass(frozen=True)
class SimDelivery:
    """One request to send: its exact bytes and what it is about."""

    body: bytes
    run_id: str | None
    batch_id: str | None = None
    kind: str = "run_envelope"


def _stamp(rng: random.Random, moment: datetime) -> str:
    # Runflow sends +00:00 offsets, sometimes without fractional seconds.
    if rng.random() < 0.5:
        return moment.replace(microsecond=0).isoformat()
    return moment.isoformat()


@dataclass
class _Run:
    id: str
    status: str
    model: str
    target: str
    source: str
    created: datetime
    duration_ms: int
    client_ref: str
    failure: tuple[str, str] | None
    batch_id: str | None = None
    cost: str = "0"
    node_types: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def node_count(self) -> int:
        return len(self.node_types)

    @property
    def completed(self) -> datetime:
        return self.created + timedelta(milliseconds=self.duration_ms + 400)


def _make_run(
    rng: random.Random,
    index: int,
    prefix: str,
    created: datetime,
    *,
    status: str | None = None,
    failure: tuple[str, str] | None = None,
    model: str | None = None,
) -> _Run:
    """One run created at about ``created``; ``status``/``failure``/``model`` force a value."""
    roll = rng.random()
    status = status or (
        "succeeded"
        if roll < 0.80
        else "failed"
        if roll < 0.92
        else "cancelled"
        if roll < 0.97
        else "partial_succeeded"
    )
    target = rng.choice(TARGETS)
    picked_model = rng.choice(MODELS)
    return _Run(
        id=f"{prefix}run_{index:07d}",
        status=status,
        model=model or picked_model,
        target=target,
        source=rng.choice(SOURCES),
        created=created + timedelta(microseconds=rng.randrange(10**6)),
        duration_ms=int(rng.lognormvariate(8.0, 0.8)),
        client_ref=f"order-{rng.randrange(10**9):09d}",
        failure=(failure or rng.choice(FAILURES)) if status == "failed" else None,
        cost=f"{rng.uniform(0.0005, 0.25):.6f}",
        node_types=tuple(rng.choices(NODE_TYPES, k=rng.randrange(2, 6)))
        if target in ("flow", "comfyui")
        else (),
    )


def _envelope(
    rng: random.Random, run: _Run, *, attempt: int = 1, legacy: bool = True
) -> dict[str, Any]:
    status = run.status
    output: Any
    if status == "failed" and run.failure:
        code, stage = run.failure
        error = {"code": code, "message": f"{code.replace('_', ' ')}", "stage": stage}
        output = {"error": error} if rng.random() < 0.7 else error
    elif status == "cancelled":
        output = None
    else:
        output = {"images": [f"https://cdn.example.invalid/{run.id}/{i}.png" for i in range(2)]}
    doc: dict[str, Any] = {
        "event": _EVENT[status],
        "run_id": run.id,
        "status": "canceled" if status == "cancelled" and rng.random() < 0.5 else status,
        "output": output,
        "duration_ms": run.duration_ms,
        "created_at": _stamp(rng, run.created),
        "completed_at": _stamp(rng, run.completed),
        "metadata": {"attempt": attempt},
    }
    if rng.random() < 0.05 and legacy:
        # Old deliveries carry neither event nor status.
        del doc["event"], doc["status"]
    return doc


def _node_status(run_status: str, *, last: bool) -> str:
    """A node's status in a run of ``run_status``: the last node is where it failed or stopped."""
    if run_status not in _EVENT:
        return "succeeded" if not last else run_status
    if last and run_status in ("failed", "cancelled"):
        return run_status
    return "succeeded"


def _run_object(rng: random.Random, run: _Run, *, status: str | None = None) -> dict[str, Any]:
    status = status or run.status
    terminal = status in _EVENT
    failure = run.failure if status == "failed" else None
    nodes = [
        {
            "id": f"{run.id}_node_{n}",
            "node_id": f"node_{n}",
            "node_type": node_type,
            "status_code": _node_status(status, last=n == run.node_count - 1),
            "failure_code": failure[0] if failure and n == run.node_count - 1 else None,
            "duration_ms": run.duration_ms // max(run.node_count, 1),
        }
        for n, node_type in enumerate(run.node_types)
    ]
    # Log lines never change once written; a later view of the run only has more of them.
    logs = [{"id": f"{run.id}_log_0", "level": "info", "message": "dispatched"}]
    if terminal:
        logs.append(
            {
                "id": f"{run.id}_log_1",
                "level": "error" if failure else "info",
                "message": f"{failure[0]} at {failure[1]}" if failure else status,
            }
        )
    return {
        "id": run.id,
        "status_code": "canceled" if status == "cancelled" else status,
        "failure_code": failure[0] if failure else None,
        "failure_message": failure[0].replace("_", " ") if failure else None,
        "failure_stage_code": failure[1] if failure else None,
        "client_ref": run.client_ref,
        "cost": run.cost if terminal else None,
        "cost_breakdown": {"compute": run.cost} if terminal else None,
        "node_runs": nodes,
        "logs": logs,
        "model": {"id": f"mdl_{run.model}", "slug": run.model},
        "batch_id": run.batch_id,
        "org_id": "org_demo",
        "target_type": run.target,
        "source_code": run.source,
        "created_at": _stamp(rng, run.created),
        "started_at": _stamp(rng, run.created + timedelta(milliseconds=300)),
        "completed_at": _stamp(rng, run.completed) if terminal else None,
        "duration_ms": run.duration_ms if terminal else None,
    }


def _batch(rng: random.Random, batch_id: str, runs: list[_Run]) -> dict[str, Any]:
    counts = Counter(run.status for run in runs)
    failed = counts["failed"]
    event = "batch.succeeded" if failed == 0 else "batch.partial_succeeded"
    return {
        "event": event,
        "batch_id": batch_id,
        "output": {
            "items": [
                {"run_id": r.id, "status_code": r.status, "client_ref": r.client_ref} for r in runs
            ],
            "succeeded": counts["succeeded"],
            "failed": failed,
            "cancelled": counts["cancelled"],
            "total": len(runs),
        },
        "duration_ms": max(r.duration_ms for r in runs),
        "created_at": _stamp(rng, min(r.created for r in runs)),
        "completed_at": _stamp(rng, max(r.completed for r in runs)),
        "metadata": None,
    }


EPOCH = datetime(2026, 11, 1, tzinfo=UTC)
SPREAD = timedelta(hours=3)
STEP = timedelta(seconds=0.7)


def _schedule(
    total: int, start: datetime | None, end: datetime | None
) -> Callable[[int], datetime]:
    """When run ``index`` of ``total`` was created (before its sub-second jitter)."""
    if end is None:
        first = start or EPOCH
        return lambda index: first + index * STEP
    first = start if start is not None else end - SPREAD
    if first > end:
        raise ValueError("the traffic's start is after its end")
    gap = (end - first) / max(total - 1, 1)
    # A single run lands at the end ("now"), several reach from the start to the end.
    return lambda index: end if total == 1 else first + index * gap


RUN_EVENTS = tuple(_EVENT.values())
_STATUS_OF = {event: status for status, event in _EVENT.items()}


def generate_event(
    event: str,
    *,
    count: int = 1,
    seed: int = 0,
    failure_code: str | None = None,
    failure_stage: str | None = None,
    model: str | None = None,
    prefix: str = "evt",
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[SimDelivery]:
    """``count`` runs that ended with ``event``, each as Runflow reports it: the Run object
    (failure code, stage, model, cost, nodes) and then the callback envelope.

    A ``failure_code`` with no ``failure_stage`` takes the stage Runflow uses for it (or
    ``execution``); neither given: a seeded pick. Same arguments, same bytes.
    """
    status = _STATUS_OF.get(event)
    if status is None:
        raise ValueError(f"unknown event {event!r}: one of {', '.join(RUN_EVENTS)}")
    if status != "failed" and (failure_code or failure_stage):
        raise ValueError("a failure code or stage only goes with run.failed")
    failure = None
    if failure_code or failure_stage:
        known = dict(FAILURES)
        code = failure_code or next(
            (c for c, s in FAILURES if s == failure_stage), "internal_error"
        )
        failure = (code, failure_stage or known.get(code, "execution"))
    rng = random.Random(seed)
    created = _schedule(count, start, end)
    out: list[SimDelivery] = []
    for index in range(count):
        run = _make_run(
            rng,
            index,
            f"{prefix}{seed}_",
            created(index),
            status=status,
            failure=failure,
            model=model,
        )
        for doc in (_run_object(rng, run), _envelope(rng, run, legacy=False)):
            out.append(
                SimDelivery(
                    orjson.dumps(doc), run.id, None, "run_object" if "id" in doc else "run_envelope"
                )
            )
    return out


def generate_traffic(
    *,
    count: int,
    seed: int = 0,
    runs: int | None = None,
    duplicate_rate: float = 0.05,
    batch_rate: float = 0.02,
    prefix: str = "sim",
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[SimDelivery]:
    """``count`` deliveries over ``runs`` runs (default: about count / 2), in arrival order.

    Per run: the terminal callback envelope; often a Run object (sometimes a stale
    ``running`` one, sent after the terminal one); sometimes a rebuilt redelivery with
    different bytes; exact duplicates; and now and then a batch callback over several runs.

    Runs are created 0.7 s apart from ``start`` (default ``EPOCH``), or, given ``end``, spread
    evenly over ``[start, end]`` (``start`` defaulting to ``end - SPREAD``). Nothing reads the
    clock: the same arguments give the same bytes.
    """
    rng = random.Random(seed)
    prefix = f"{prefix}{seed}_"
    run_total = runs or max(1, count // 2)
    created = _schedule(run_total, start, end)
    all_runs = [_make_run(rng, i, prefix, created(i)) for i in range(run_total)]
    out: list[SimDelivery] = []
    batch_no = 0

    def add(doc: dict[str, Any], run_id: str | None, batch_id: str | None = None) -> None:
        kind = "batch_envelope" if batch_id else ("run_object" if "id" in doc else "run_envelope")
        out.append(SimDelivery(orjson.dumps(doc), run_id, batch_id, kind))

    while len(out) < count:
        for run in all_runs:
            if len(out) >= count:
                break
            roll = rng.random()
            if roll < 0.2:
                # Out of order: a stale "running" Run object arrives after the terminal one.
                add(_envelope(rng, run), run.id)
                add(_run_object(rng, run, status="running"), run.id)
            elif roll < 0.6:
                add(_run_object(rng, run), run.id)
                add(_envelope(rng, run), run.id)
            else:
                add(_envelope(rng, run), run.id)
            if rng.random() < 0.1:
                add(_envelope(rng, run, attempt=2), run.id)  # rebuilt: different bytes
            if out and rng.random() < duplicate_rate:
                again = out[-1]
                out.append(SimDelivery(again.body, again.run_id, again.batch_id, again.kind))
            if rng.random() < batch_rate:
                members = rng.sample(all_runs, k=min(len(all_runs), rng.randrange(2, 6)))
                batch_no += 1
                batch_id = f"{prefix}batch_{batch_no:05d}"
                add(_batch(rng, batch_id, members), None, batch_id)
        # A second pass (count larger than the runs give) redelivers the same runs.
    return out[:count]


@dataclass
class SendReport:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    finished: int = 0  # requests answered or given up on
    seconds: float = 0.0
    delivery_ids: list[int] = field(default_factory=list)

    @property
    def acknowledged(self) -> int:
        return self.outcomes["stored"] + self.outcomes["duplicate"]

    @property
    def rejected(self) -> int:
        return self.sent - self.acknowledged - self.errors

    def summary(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (
            f"sent {self.sent}  acknowledged {self.acknowledged} "
            f"(stored {self.outcomes['stored']}, duplicate {self.outcomes['duplicate']})  "
            f"rejected {self.rejected}  errors {self.errors}  "
            f"in {self.seconds:.2f}s  ({rate:.0f} deliveries/s)"
        )


class _Http11:
    """A minimal keep-alive HTTP/1.1 client, over TLS when given an SSL context (https://).

    httpx costs more CPU per request than the receiver does, so on a small machine it, not the
    server, would set the pace of a load test.
    """

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )
            try:
                return await self._exchange(path, body, headers)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                # A kept-alive connection the server closed while idle: send again, once.
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before the response")
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            parts = []
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
            payload = b"".join(parts)
        else:
            payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload


async def send(
    url: str,
    deliveries: list[SimDelivery],
    *,
    secret: str | None,
    concurrency: int = 16,
    request_seconds: float = 30.0,
    ca_file: Path | None = None,
    on_answer: Callable[[SendReport], None] | None = None,
) -> SendReport:
    """POST every delivery over ``concurrency`` keep-alive connections; never retries.

    A request without an answer within ``request_seconds`` counts as an error, as Runflow
    would count it, so a hung server cannot hang the sender. https:// URLs are verified
    against the system's certificates, or ``ca_file``'s. ``on_answer`` is called after each
    request (answered or not), for progress.
    """
    target = httpx.URL(url)
    if target.scheme not in ("http", "https"):
        raise ValueError(f"simulate sends to http:// or https:// URLs, not {url!r}")
    tls = None
    if target.scheme == "https":
        tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    default_port = 443 if tls else 80
    report = SendReport()
    queue: asyncio.Queue[SimDelivery] = asyncio.Queue()
    for delivery in deliveries:
        queue.put_nowait(delivery)
    path = target.raw_path.decode("ascii")

    async def worker(number: int) -> None:
        connection = _Http11(target.host, target.port or default_port, tls)
        try:
            while not queue.empty():
                delivery = queue.get_nowait()
                headers = {
                    "Content-Type": "application/json",
                    "Runflow-Request-Id": f"sim-{number}-{report.sent}",
                }
                if secret:
                    headers["Runflow-Signature"] = sign(delivery.body, secret)
                report.sent += 1
                try:
                    status, payload = await asyncio.wait_for(
                        connection.post(path, delivery.body, headers), request_seconds
                    )
                except (OSError, asyncio.IncompleteReadError, ValueError):  # TimeoutError too
                    # Whatever was half sent or half read (TLS errors too), it is done.
                    await connection.close()
                    report.errors += 1
                else:
                    report.statuses[status] += 1
                    if status == 200:
                        answer = orjson.loads(payload)
                        report.outcomes[answer["status"]] += 1
                        report.delivery_ids.append(answer["delivery_id"])
                    elif status >= 500:
                        report.errors += 1
                    else:
                        report.outcomes["rejected"] += 1
                report.finished += 1
                if on_answer is not None:
                    on_answer(report)
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    report.seconds = time.perf_counter() - started
    return report


def _secret(given: str | None, settings: Settings) -> str | None:
    if given:
        return given
    if settings.signing_secrets:
        return settings.signing_secrets[0]
    kept = Path(settings.data_dir) / "signing_secret"
    if kept.exists():
        return kept.read_text().strip()
    return None


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 datetime: {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@click.command("simulate")
@click.option("--url", default="http://127.0.0.1:8000/webhooks/runflow", help="Webhook URL.")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    show_default="500, or 1 with --event",
    help="Deliveries to send; with --event, runs (two deliveries each).",
)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=16, help="Requests in flight.")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=None,
    show_default="count / 2",
    help="Distinct runs in the traffic.",
)
@click.option("--seed", type=int, default=0, help="Same seed and epoch, same bytes.")
@click.option(
    "--secret",
    default=None,
    show_default="RECEIVER_SIGNING_SECRETS, else DATA_DIR/signing_secret",
    help="Signing secret.",
)
@click.option(
    "--duplicate-rate",
    type=click.FloatRange(0, 1),
    default=0.05,
    help="Share of deliveries sent twice with the same bytes.",
)
@click.option(
    "--batch-rate",
    type=click.FloatRange(0, 1),
    default=0.02,
    help="Chance per run of a batch callback over a few runs.",
)
@click.option(
    "--prefix", default=None, show_default="sim, or evt with --event", help="Run id prefix."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    help="Seconds to wait for each answer.",
)
@click.option(
    "--epoch",
    default=None,
    metavar="DATETIME",
    show_default="now minus --spread-hours",
    help="Fixed first creation time (ISO 8601), for reproducible traffic (benchmarks, tests).",
)
@click.option(
    "--spread-hours",
    type=click.FloatRange(min=0),
    default=SPREAD.total_seconds() / 3600,
    help="Without --epoch: runs are created over this many hours, ending now.",
)
@click.option(
    "--event",
    type=click.Choice(RUN_EVENTS),
    default=None,
    help="Send only runs that ended with this event (Run object plus envelope).",
)
@click.option("--failure-code", default=None, help="With --event run.failed: the failure code.")
@click.option(
    "--failure-stage",
    default=None,
    show_default="the code's usual stage",
    help="With --event run.failed: dispatch, execution, callback, reconciliation, ...",
)
@click.option("--model", default=None, help="With --event: the model's slug.")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    show_default="the system's",
    help="CA certificates (PEM) to verify an https:// URL with.",
)
@click.pass_obj
def simulate(obj: object, /, **opts: Any) -> int:
    """Send realistic signed Runflow callbacks to a URL (the demo and the load source).

    Without --event: a mix of envelopes, Run objects (some stale), rebuilt redeliveries,
    exact duplicates and batch callbacks. With --event: only runs that ended that way, like
    `stripe trigger`, e.g. --event run.failed --failure-code no_capacity.
    """
    from receiver.startup import command_settings

    settings = command_settings(obj)
    if httpx.URL(opts["url"]).scheme not in ("http", "https"):
        raise click.BadParameter("an http:// or https:// URL", param_hint="--url")
    secret = _secret(opts["secret"], settings)
    if secret is None:
        log.warning(
            "no signing secret (pass --secret, set RECEIVER_SIGNING_SECRETS, or run it where"
            " serve keeps its data directory); sending unsigned"
        )
    start = _when(opts["epoch"])
    # Runs end a minute ago, so their completions (seconds later) are in the past too.
    end = None if start else datetime.now(UTC) - timedelta(minutes=1)
    if end is not None:
        start = end - timedelta(hours=opts["spread_hours"])
    if opts["event"] is None:
        opts["count"] = opts["count"] or 500
        if opts["failure_code"] or opts["failure_stage"] or opts["model"]:
            raise click.UsageError("--failure-code, --failure-stage and --model need --event")
        traffic = generate_traffic(
            count=opts["count"],
            seed=opts["seed"],
            runs=opts["runs"],
            duplicate_rate=opts["duplicate_rate"],
            batch_rate=opts["batch_rate"],
            prefix=opts["prefix"] or "sim",
            start=start,
            end=end,
        )
    else:
        # Each trigger makes new runs unless the ids are pinned (--prefix or --epoch).
        opts["count"] = opts["count"] or 1
        stamp = (end or start or EPOCH).strftime("%Y%m%d%H%M%S")
        try:
            traffic = generate_event(
                opts["event"],
                count=opts["count"],
                seed=opts["seed"],
                failure_code=opts["failure_code"],
                failure_stage=opts["failure_stage"],
                model=opts["model"],
                prefix=opts["prefix"] or f"evt{stamp}_",
                start=start,
                end=end,
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    with Progress("simulate", len(traffic)) as progress:
        report = asyncio.run(
            send(
                opts["url"],
                traffic,
                secret=secret,
                concurrency=opts["concurrency"],
                request_seconds=opts["timeout"],
                ca_file=opts["ca_file"],
                on_answer=lambda r: progress.update(r.finished, f"({r.acknowledged} acknowledged)"),
            )
        )
    click.echo(report.summary())
    return 0 if report.acknowledged == report.sent else 1
