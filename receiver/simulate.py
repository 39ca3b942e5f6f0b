"""``runflow-receiver simulate``: realistic signed Runflow traffic, for demos and load.

``generate_traffic`` is a pure, seeded function: the same seed gives the same bytes, so a test
can compute what the receiver must end up storing. ``send`` posts them concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

from receiver.ingest.signature import sign
from receiver.settings import Settings

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


def _make_run(rng: random.Random, index: int, prefix: str, start: datetime) -> _Run:
    roll = rng.random()
    status = (
        "succeeded"
        if roll < 0.80
        else "failed"
        if roll < 0.92
        else "cancelled"
        if roll < 0.97
        else "partial_succeeded"
    )
    target = rng.choice(TARGETS)
    return _Run(
        id=f"{prefix}run_{index:07d}",
        status=status,
        model=rng.choice(MODELS),
        target=target,
        source=rng.choice(SOURCES),
        created=start + timedelta(seconds=index * 0.7, microseconds=rng.randrange(10**6)),
        duration_ms=int(rng.lognormvariate(8.0, 0.8)),
        client_ref=f"order-{rng.randrange(10**9):09d}",
        failure=rng.choice(FAILURES) if status == "failed" else None,
        cost=f"{rng.uniform(0.0005, 0.25):.6f}",
        node_types=tuple(rng.choices(NODE_TYPES, k=rng.randrange(2, 6)))
        if target in ("flow", "comfyui")
        else (),
    )


def _envelope(rng: random.Random, run: _Run, *, attempt: int = 1) -> dict[str, Any]:
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
    if rng.random() < 0.05:
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


def generate_traffic(
    *,
    count: int,
    seed: int = 0,
    runs: int | None = None,
    duplicate_rate: float = 0.05,
    batch_rate: float = 0.02,
    prefix: str = "sim",
    start: datetime | None = None,
) -> list[SimDelivery]:
    """``count`` deliveries over ``runs`` runs (default: about count / 2), in arrival order.

    Per run: the terminal callback envelope; often a Run object (sometimes a stale
    ``running`` one, sent after the terminal one); sometimes a rebuilt redelivery with
    different bytes; exact duplicates; and now and then a batch callback over several runs.
    """
    rng = random.Random(seed)
    start = start or datetime(2026, 11, 1, tzinfo=UTC)
    prefix = f"{prefix}{seed}_"
    run_total = runs or max(1, count // 2)
    all_runs = [_make_run(rng, i, prefix, start) for i in range(run_total)]
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
    """A minimal keep-alive HTTP/1.1 client for plain http:// URLs.

    httpx costs more CPU per request than the receiver does, so on a small machine it, not the
    server, would set the pace of a load test.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
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
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
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
) -> SendReport:
    """POST every delivery over ``concurrency`` keep-alive connections; never retries.

    A request without an answer within ``request_seconds`` counts as an error, as Runflow
    would count it, so a hung server cannot hang the sender.
    """
    target = httpx.URL(url)
    if target.scheme != "http":
        raise ValueError("simulate sends to http:// URLs on this machine or network")
    report = SendReport()
    queue: asyncio.Queue[SimDelivery] = asyncio.Queue()
    for delivery in deliveries:
        queue.put_nowait(delivery)
    path = target.raw_path.decode("ascii")

    async def worker(number: int) -> None:
        connection = _Http11(target.host, target.port or 80)
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
                    # Whatever was half sent or half read, this connection is done.
                    await connection.close()
                    report.errors += 1
                    continue
                report.statuses[status] += 1
                if status == 200:
                    answer = orjson.loads(payload)
                    report.outcomes[answer["status"]] += 1
                    report.delivery_ids.append(answer["delivery_id"])
                elif status >= 500:
                    report.errors += 1
                else:
                    report.outcomes["rejected"] += 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    report.seconds = time.perf_counter() - started
    return report


def _secret(args: argparse.Namespace, settings: Settings) -> str | None:
    if args.secret:
        return str(args.secret)
    if settings.signing_secrets:
        return settings.signing_secrets[0]
    kept = Path(settings.data_dir) / "signing_secret"
    if kept.exists():
        return kept.read_text().strip()
    return None


def run_simulate(args: argparse.Namespace, settings: Settings) -> int:
    secret = _secret(args, settings)
    if secret is None:
        print(
            "simulate: no signing secret (pass --secret, set RECEIVER_SIGNING_SECRETS, "
            "or run it where serve keeps its data directory); sending unsigned",
            file=sys.stderr,
        )
    traffic = generate_traffic(
        count=args.count,
        seed=args.seed,
        runs=args.runs,
        duplicate_rate=args.duplicate_rate,
        batch_rate=args.batch_rate,
        prefix=args.prefix,
    )
    report = asyncio.run(
        send(
            args.url,
            traffic,
            secret=secret,
            concurrency=args.concurrency,
            request_seconds=args.timeout,
        )
    )
    print(report.summary())
    return 0 if report.acknowledged == report.sent else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("simulate", help="send realistic signed Runflow callbacks to a URL")
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000/webhooks/runflow", help="webhook URL"
    )
    parser.add_argument("--count", type=int, default=500, help="deliveries to send")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--runs", type=int, default=None, help="distinct runs (default count/2)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--secret", default=None, help="signing secret (default: configured)")
    parser.add_argument("--duplicate-rate", type=float, default=0.05)
    parser.add_argument("--batch-rate", type=float, default=0.02)
    parser.add_argument("--prefix", default="sim", help="run id prefix")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each answer"
    )
    parser.set_defaults(handler=run_simulate)
