"""Where a delivery's CPU goes: one receiver worker under wrk, with parts of its work taken away.

    python bench/cpu_parts.py [--rounds 5] [--seconds 5] [--connections 16]

Each variant is a real worker process (uvicorn with uvloop, the receiver's own HTTP protocol,
app and logging, as ``serve`` runs them) with one part of the work replaced, on a migrated
database of its own in one embedded PostgreSQL. Every round sends each of them the same fresh
bodies of bench/ingest.py's mix, in turn:

- ``full``: the receiver as served;
- ``no-write``: the group commit answers at once (no batcher, no database); left are HTTP, the
  signature, the archive entry and its compression, parsing and validation, the answer and
  its log line;
- ``no-write-no-log``: the same, logging at WARNING (no line per delivery);
- ``no-ingest-no-log``: ``receiver.ingest.receive`` answers at once, no log line; left are
  the HTTP and ASGI stack, the route, the metrics and the answer;
- ``ceiling``: bench/baseline_app.py's bare Starlette POST handler, one worker.

Printed: the medians over the rounds of each worker's own CPU per request (user + system,
read from /proc; PostgreSQL's is not in it), and what each part costs by difference. CPU
rather than rates: steadier on a shared two-core machine. Only 127.0.0.1; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# A worker of ``--before`` runs that checkout's receiver (the harness is this one's).
sys.path.insert(0, str(ROOT))
sys.path.insert(0, os.environ.get("BENCH_CODE", str(ROOT)))
sys.path.insert(1, str(ROOT / "bench"))

VARIANTS = ("full", "no-write", "no-write-no-log", "no-ingest-no-log")


def worker(variant: str, port: int) -> None:
    """Serve one worker on ``port`` with ``variant``'s part replaced (runs in a child)."""
    import uvicorn

    from receiver import ingest
    from receiver.ingest import batcher, store
    from receiver.vocabulary import DeliveryOutcome

    counter = iter(range(1, 1 << 62))

    async def answered_at_once(self: Any, item: Any) -> Any:
        return store.StoreResult(DeliveryOutcome.STORED, next(counter), run_id=item.parsed.run_id)

    async def received_at_once(engine: Any, settings: Any, raw: Any) -> Any:
        return store.StoreResult(DeliveryOutcome.STORED, next(counter), run_id="run")

    if variant.startswith("no-write"):
        batcher.Batcher.submit = answered_at_once  # type: ignore[method-assign]
    if variant.startswith("no-ingest"):
        ingest.receive = received_at_once
    config = uvicorn.Config(
        "receiver.server:worker_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        http="receiver.server:BoundedHeadProtocol",
    )
    uvicorn.Server(config).run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--bodies", type=int, default=30000)
    parser.add_argument(
        "--before",
        type=Path,
        help="also run the full receiver from this checkout (e.g. a worktree of the previous main)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return 0

    import httpx
    from ingest import SECRET, _cpu, start_app, traffic, write_bodies, wrk

    from tests.support.processes import embedded_url, free_port, receiver_env, serving

    runs = [(variant, variant, ROOT) for variant in VARIANTS]
    if args.before:
        runs.append(("before", "full", args.before.resolve()))
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    cpu["ceiling"] = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-parts-") as tmp:
        tmp_path = Path(tmp)
        env = receiver_env(RECEIVER_DATA_DIR=f"{tmp}/data", RECEIVER_SIGNING_SECRETS=SECRET)
        with serving(env, tmp_path, workers=1), contextlib.ExitStack() as stack:
            server = embedded_url(tmp_path / "data")
            (tmp_path / "metrics").mkdir()
            base_env = {
                **env,
                "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
                "PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}",
            }
            urls: dict[str, str] = {}
            pids: dict[str, int] = {}
            for number, (label, variant, code) in enumerate(runs):
                name = f"parts_{number}"
                asyncio.run(_create_database(server, name))
                url = server.replace("@/postgres?", f"@/{name}?")
                variant_env = {
                    **base_env,
                    "RECEIVER_DATABASE_URL": url,
                    "BENCH_CODE": str(code),
                    "PYTHONPATH": f"{code}:{ROOT / 'bench'}",
                }
                if variant.endswith("no-log"):
                    variant_env["RECEIVER_LOG_LEVEL"] = "warning"
                subprocess.run(
                    [sys.executable, "-m", "receiver", "migrate"],
                    env=variant_env,
                    cwd=tmp,
                    check=True,
                    capture_output=True,
                )
                port = free_port()
                log = stack.enter_context((tmp_path / f"{name}.log").open("wb"))
                process = subprocess.Popen(
                    [sys.executable, __file__, "--worker", variant, str(port)],
                    env=variant_env,
                    cwd=tmp,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                stack.callback(_stop, process)
                _wait_ready(httpx, f"http://127.0.0.1:{port}/readyz", process)
                urls[label], pids[label] = (
                    f"http://127.0.0.1:{port}/webhooks/runflow",
                    process.pid,
                )
            ceiling_url, ceiling = start_app("baseline_app:ceiling", 1, base_env)
            stack.callback(_stop, ceiling)
            urls["ceiling"], pids["ceiling"] = f"{ceiling_url}/webhooks/runflow", ceiling.pid
            for round_no in range(args.rounds):
                bodies = tmp_path / f"bodies-{round_no}.txt"
                write_bodies(bodies, traffic(args.bodies, seed=5000 + round_no))
                for name, url in urls.items():
                    before = _cpu(pids[name])[1]
                    result = wrk(url, bodies, args.seconds, args.connections)
                    cpu[name].append((_cpu(pids[name])[1] - before) * 1e6 / result["requests"])
                print(
                    f"round {round_no + 1}: "
                    + "   ".join(f"{name} {values[-1]:.0f} us" for name, values in cpu.items()),
                    flush=True,
                )
    median = {name: statistics.median(values) for name, values in cpu.items()}
    print(
        f"\nworker CPU per request, medians of {args.rounds} rounds, one worker, wrk 2 threads x"
        f" {args.connections} connections x {args.seconds} s:"
    )
    for name, value in median.items():
        print(f"  {name:18} {value:6.0f} us")
    parts = (
        ("the group commit (batcher, driver, database round trips)", "full", "no-write"),
        ("the log line of each delivery", "no-write", "no-write-no-log"),
        ("signature, archive entry, compression, parsing", "no-write-no-log", "no-ingest-no-log"),
        ("the receiver's HTTP, route and answer above the ceiling", "no-ingest-no-log", "ceiling"),
    )
    if args.before:
        print(f"  full / before      {median['full'] / median['before']:6.2f}")
    print("by difference:")
    for label, more, less in parts:
        share = (median[more] - median[less]) / median["full"]
        print(f"  {label:58} {median[more] - median[less]:6.0f} us  ({share:.0%} of full)")
    return 0


async def _create_database(url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


def _wait_ready(httpx: Any, url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"a worker exited at start ({process.args})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"a worker did not start ({process.args})")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


if __name__ == "__main__":
    raise SystemExit(main())
