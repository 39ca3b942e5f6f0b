"""Ingest: ``serve --workers 2`` on the embedded database under wrk, against baselines run alike.

    python bench/ingest.py [--rounds 5] [--seconds 6] [--connections 32] [--history 1000]

Needs ``wrk`` (Debian: ``apt-get install -y wrk``): it replays pre-signed bodies from a file
(bench/wrk_bodies.lua) and costs far less CPU than a Python sender on a machine whose cores
the server, PostgreSQL and the load generator share. Every round runs, in turn and with the
same bodies, the same number of uvicorn workers and the same load:

- ceiling: bench/baseline_app.py ``ceiling``, a bare Starlette POST handler that stores nothing;
- plain: bench/plain_receiver.py, signature + validation + one upsert committed per request;
- receiver: the real ``serve`` (group commit; each answer sent once its batch committed).

The traffic is ``simulate``'s mix (envelopes, Run objects with node runs and logs, stale
Run objects, rebuilt redeliveries, exact duplicates, batch callbacks), with 1-2 KB of input
and output added to every Run object. Printed: medians over the rounds of throughput, the
receiver's ratios to both baselines, its p99 latency, the largest worker RSS seen, the bytes
PostgreSQL holds (every table, index and TOAST, ``pg_total_relation_size``) against the body
bytes kept, and throughput for runs with ``--history`` stored deliveries against runs with
one (each round on fresh runs, interleaved). Also printed: CPU per request of each app's own
processes and of PostgreSQL, steadier than rates on a shared machine; ``--variant`` adds the
same ``serve`` with other settings (a default measured against its alternatives in one run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.ingest.signature import sign  # noqa: E402
from receiver.simulate import EPOCH, SimDelivery, generate_traffic, send  # noqa: E402
from tests.support.processes import (  # noqa: E402
    embedded_url,
    free_port,
    receiver_env,
    serving,
)

SECRET = "whsec_bench_secret"
THREADS = 2
WORDS = str.split(
    "a portrait of an astronaut riding a horse on mars cinematic lighting highly detailed "
    "photorealistic volumetric fog golden hour studio ghibli style watercolor oil painting "
    "concept art trending on artstation sharp focus depth of field octane render 8k ultra "
    "wide angle lens bokeh dramatic clouds soft shadows pastel colours minimalistic vintage "
    "film grain neon city at night rain reflections cyberpunk forest mountains lake sunrise"
)


def realistic(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A Run object with 1-2 KB of input and output, as image models return them."""
    if "id" not in doc:
        return doc
    prompt = " ".join(rng.choices(WORDS, k=rng.randrange(60, 140)))
    doc["input"] = {
        "prompt": prompt,
        "negative_prompt": " ".join(rng.choices(WORDS, k=rng.randrange(5, 20))),
        "width": 1024,
        "height": rng.choice([768, 1024, 1536]),
        "num_inference_steps": rng.choice([20, 28, 30, 50]),
        "guidance_scale": rng.choice([3.5, 5.0, 7.5]),
        "seed": rng.randrange(2**32),
    }
    if doc.get("status_code") in ("succeeded", "partial_succeeded"):
        doc["output"] = {
            "images": [
                {
                    "url": f"https://cdn.runflow.io/outputs/{doc['id']}/{rng.randrange(16**12):012x}.png",
                    "width": 1024,
                    "height": doc["input"]["height"],
                    "content_type": "image/png",
                }
                for _ in range(rng.randrange(1, 4))
            ],
            "timings": {"inference": rng.random() * 10, "upload": rng.random()},
            "has_nsfw_concepts": [False],
        }
    return doc


def traffic(count: int, seed: int) -> list[SimDelivery]:
    rng = random.Random(seed)
    out: list[SimDelivery] = []
    previous = b""
    # A fixed epoch: every run of the bench sends the same bytes for the same seed.
    for delivery in generate_traffic(count=count, seed=seed, prefix="bench", start=EPOCH):
        if delivery.body == previous:  # simulate's exact duplicate: the same bytes again
            out.append(out[-1])
            continue
        previous = delivery.body
        if delivery.kind == "run_object":
            body = orjson.dumps(realistic(orjson.loads(delivery.body), rng))
            delivery = SimDelivery(body, delivery.run_id, delivery.batch_id, delivery.kind)
        out.append(delivery)
    return out


def history_traffic(run_ids: list[str], count: int, seed: int) -> list[SimDelivery]:
    """Fresh deliveries for a few runs, round robin: envelopes and Run objects."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        run_id = run_ids[i % len(run_ids)]
        if i % 2:
            doc: dict[str, Any] = {
                "event": "run.completed",
                "run_id": run_id,
                "status": "succeeded",
                "output": {"images": [f"https://cdn.runflow.io/{run_id}/{i}.png"]},
                "completed_at": "2026-11-01T12:00:05+00:00",
                "metadata": {"attempt": i},
            }
        else:
            doc = realistic(
                {
                    "id": run_id,
                    "status_code": "running",
                    "org_id": "org_bench",
                    "target_type": "model",
                    "model": {"id": "mdl_flux", "slug": "flux-dev"},
                    "created_at": "2026-11-01T12:00:00+00:00",
                    "client_ref": f"ref-{i}",
                },
                rng,
            )
        out.append(SimDelivery(orjson.dumps(doc), run_id))
    return out


def write_bodies(path: Path, deliveries: list[SimDelivery]) -> None:
    with path.open("wb") as out:
        for delivery in deliveries:
            out.write(sign(delivery.body, SECRET).encode() + b"\t" + delivery.body + b"\n")


def wrk(url: str, bodies: Path, seconds: float, connections: int) -> dict[str, Any]:
    done = subprocess.run(
        [
            "wrk",
            f"-t{THREADS}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(ROOT / "bench" / "wrk_bodies.lua"),
            url,
        ],
        env={**os.environ, "BENCH_BODIES": str(bodies), "BENCH_THREADS": str(THREADS)},
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["rate"] = figures["requests"] / figures["seconds"]
    if figures["non2xx"] or figures["errors"]:
        raise SystemExit(f"{url}: not every request answered 2xx: {figures}\n{done.stdout}")
    return figures


def start_app(app: str, workers: int, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--app-dir",
            str(ROOT / "bench"),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/", timeout=5)
            return base, process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{app} did not start")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cpu(pid: int) -> tuple[str, float]:
    """A process's name and the CPU seconds it has used (user + system)."""
    head, _, rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
    fields = rest.split()
    return head.partition("(")[2], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(app_pid: int) -> tuple[float, float]:
    """CPU seconds so far of an app's own processes (not PostgreSQL) and of every PostgreSQL
    process on the machine: during one app's wrk run the others are idle, so the difference
    across the run is what that load cost, a steadier figure than a rate on a shared machine."""
    app = 0.0
    for pid in [app_pid, *descendants(app_pid)]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            name, seconds = _cpu(pid)
            app += 0 if name == "postgres" else seconds
    postgres = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                name, seconds = _cpu(int(entry.name))
                postgres += seconds if name == "postgres" else 0
    return app, postgres


def worker_rss_mb(serve_pid: int) -> float:
    """The largest RSS among the receiver's Python worker processes (not PostgreSQL's)."""
    largest = 0.0
    for pid in descendants(serve_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if b"python" not in cmdline or b"postgres" in cmdline:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                largest = max(largest, int(line.split()[1]) / 1024)
    return largest


async def storage(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
            "  JOIN pg_namespace n ON n.oid = c.relnamespace"
            "  WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'm')) AS db_bytes,"
            # The bodies kept, as received (a duplicate keeps none); since 0012 the archive
            # may hold them compressed, so their stored size is a figure of its own.
            " (SELECT sum(body_size) FILTER (WHERE body IS NOT NULL) FROM deliveries)"
            "  AS kept_body_bytes,"
            " (SELECT sum(octet_length(body)) FROM deliveries) AS stored_body_bytes,"
            " (SELECT sum(body_size) FROM deliveries) AS received_body_bytes,"
            " (SELECT count(*) FROM deliveries) AS deliveries"
        )
        tables = await conn.fetch(
            "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 2 DESC LIMIT 8"
        )
    finally:
        await conn.close()
    out = {key: int(value or 0) for key, value in row.items()}
    out.update({f"table {r['relname']}": int(r["bytes"]) for r in tables})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bodies", type=int, default=30000, help="distinct bodies per round")
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--history-runs", type=int, default=4)
    parser.add_argument(
        "--before",
        type=Path,
        help="also run `serve` from this checkout (e.g. a worktree of the previous main)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="also run this code's `serve` with these RECEIVER_ settings, under NAME, in every"
        " round (e.g. flushers1:RECEIVER_INGEST_FLUSHERS=1); may repeat",
    )
    args = parser.parse_args()

    names: tuple[str, ...] = ("ceiling", "plain", "receiver")
    if args.before:
        names = (*names, "before")
    variants: dict[str, dict[str, str]] = {}
    for spec in args.variant:
        name, _, settings = spec.partition(":")
        variants[name] = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    names = (*names, *variants)
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    history: dict[str, list[float]] = {"1": [], str(args.history): []}
    rss: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        env = receiver_env(RECEIVER_DATA_DIR=f"{tmp}/data", RECEIVER_SIGNING_SECRETS=SECRET)
        with serving(env, tmp_path, workers=args.workers) as (base, serve_process):
            database = embedded_url(tmp_path / "data")
            baseline_db = database.replace("@/postgres?", "@/bench_baselines?")
            asyncio.run(_create_database(database, "bench_baselines"))
            base_env = {
                **env,
                "BENCH_DATABASE_URL": baseline_db,
                "BENCH_SECRET": SECRET,
                "PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}",
            }
            urls = {"receiver": f"{base}/webhooks/runflow"}
            pids = {"receiver": serve_process.pid}
            processes = []
            for name, app in (("ceiling", "baseline_app:ceiling"), ("plain", "plain_receiver:app")):
                url, process = start_app(app, args.workers, base_env)
                urls[name] = f"{url}/webhooks/runflow"
                pids[name] = process.pid
                processes.append(process)
            others = contextlib.ExitStack()  # the --before and --variant servers
            if args.before:
                old_tmp = tmp_path / "before"
                old_tmp.mkdir()
                old_env = {
                    **env,
                    "RECEIVER_DATA_DIR": str(old_tmp / "data"),
                    "PYTHONPATH": str(args.before.resolve()),
                }
                old_base, old_process = others.enter_context(
                    serving(old_env, old_tmp, workers=args.workers)
                )
                urls["before"] = f"{old_base}/webhooks/runflow"
                pids["before"] = old_process.pid
            for name, settings in variants.items():
                variant_tmp = tmp_path / name
                variant_tmp.mkdir()
                variant_env = {**env, **settings, "RECEIVER_DATA_DIR": str(variant_tmp / "data")}
                variant_base, variant_process = others.enter_context(
                    serving(variant_env, variant_tmp, workers=args.workers)
                )
                urls[name] = f"{variant_base}/webhooks/runflow"
                pids[name] = variant_process.pid
            try:
                for round_no in range(args.rounds):
                    bodies = tmp_path / f"bodies-{round_no}.txt"
                    write_bodies(bodies, traffic(args.bodies, seed=1000 + round_no))
                    for name in names:
                        app_before, postgres_before = cpu_seconds(pids[name])
                        result = wrk(urls[name], bodies, args.seconds, args.connections)
                        app_after, postgres_after = cpu_seconds(pids[name])
                        per = 1e6 / max(1, result["requests"])
                        result["app_cpu_us"] = (app_after - app_before) * per
                        result["postgres_cpu_us"] = (postgres_after - postgres_before) * per
                        figures[name].append(result)
                        if name == "receiver":
                            rss.append(worker_rss_mb(serve_process.pid))
                    print(
                        f"round {round_no + 1}: "
                        + "   ".join(
                            f"{n} {f[-1]['rate']:6.0f}/s p99 {f[-1]['p99_ms']:5.1f} ms"
                            for n, f in figures.items()
                        )
                        + f"   receiver sent {figures['receiver'][-1]['requests']} of"
                        f" {args.bodies} bodies; worker RSS {rss[-1]:.0f} MB",
                        flush=True,
                    )
                stored = asyncio.run(storage(database))
                if args.before:
                    old = asyncio.run(storage(embedded_url(tmp_path / "before" / "data")))
                    print(
                        f"before: storage / kept body bytes"
                        f" {old['db_bytes'] / old['kept_body_bytes']:.2f}",
                        flush=True,
                    )

                for round_no in range(args.rounds):
                    for depth in (1, args.history):
                        ids = [f"hist{depth}_r{round_no}_{k}" for k in range(args.history_runs)]
                        preload = history_traffic(ids, depth * len(ids), seed=round_no)
                        report = asyncio.run(
                            send(urls["receiver"], preload, secret=SECRET, concurrency=16)
                        )
                        assert report.acknowledged == report.sent, report.summary()
                        bodies = tmp_path / f"hist-{depth}-{round_no}.txt"
                        write_bodies(
                            bodies, history_traffic(ids, args.bodies // 2, seed=10**6 + round_no)
                        )
                        result = wrk(urls["receiver"], bodies, args.seconds, args.connections)
                        history[str(depth)].append(result["rate"])
                    print(
                        f"history round {round_no + 1}: "
                        + "   ".join(f"at {d}: {r[-1]:6.0f}/s" for d, r in history.items()),
                        flush=True,
                    )
            finally:
                others.close()
                for process in processes:
                    process.terminate()
                    process.wait(timeout=30)

    rate = {name: statistics.median(f["rate"] for f in figures[name]) for name in names}
    cpu = {
        name: (
            statistics.median(f["app_cpu_us"] for f in figures[name]),
            statistics.median(f["postgres_cpu_us"] for f in figures[name]),
        )
        for name in names
    }
    p99 = statistics.median(f["p99_ms"] for f in figures["receiver"])
    at = {depth: statistics.median(rates) for depth, rates in history.items()}
    ratio_history = at[str(args.history)] / at["1"]
    ratio_storage = stored["db_bytes"] / stored["kept_body_bytes"]
    body_ratio = stored["stored_body_bytes"] / stored["kept_body_bytes"]
    print(
        f"\nmedians of {args.rounds} rounds, wrk {THREADS} threads x {args.connections}"
        f" connections x {args.seconds:g} s, {args.workers} uvicorn workers each:\n"
        f"  ceiling (bare Starlette POST)        {rate['ceiling']:7.0f} req/s\n"
        f"  plain (verify + validate + upsert)   {rate['plain']:7.0f} req/s\n"
        f"  receiver (durable, group commit)     {rate['receiver']:7.0f} deliveries/s\n"
        f"  receiver / ceiling                   {rate['receiver'] / rate['ceiling']:7.2f}"
        "   (target >= 0.20)\n"
        f"  receiver / plain                     {rate['receiver'] / rate['plain']:7.2f}"
        "   (target >= 1.2)\n"
        + (
            f"  before (--before checkout)           {rate['before']:7.0f} deliveries/s,"
            f" receiver / before {rate['receiver'] / rate['before']:.2f}\n"
            if args.before
            else ""
        )
        + "".join(
            f"  {name} ({','.join(variants[name])}) {rate[name]:7.0f} deliveries/s,"
            f" p99 {statistics.median(f['p99_ms'] for f in figures[name]):.1f} ms,"
            f" / receiver {rate[name] / rate['receiver']:.2f}\n"
            for name in variants
        )
        + "  CPU per request, the app's processes + PostgreSQL's (medians, us):\n"
        + "".join(f"    {name:<20} {cpu[name][0]:6.0f} + {cpu[name][1]:6.0f}\n" for name in names)
        + f"  receiver p99                         {p99:7.1f} ms (target <= 50)\n"
        f"  receiver worker RSS, largest seen    {max(rss):7.0f} MB (target <= 150)\n"
        f"  history {args.history} / history 1          {ratio_history:7.2f}"
        f"   ({at[str(args.history)]:.0f} vs {at['1']:.0f}/s; target >= 0.90)\n"
        f"  storage / kept body bytes            {ratio_storage:7.2f}"
        f"   ({stored['db_bytes'] / 2**20:.1f} MB for {stored['kept_body_bytes'] / 2**20:.1f} MB"
        f" kept, {stored['received_body_bytes'] / 2**20:.1f} MB received in"
        f" {stored['deliveries']} deliveries; target <= 2.0)\n"
        f"  archived bodies, stored / kept       {body_ratio:7.2f}"
        "   (the column's bytes before PostgreSQL's own compression)"
    )
    for key, value in stored.items():
        if key.startswith("table "):
            print(f"    {key[6:]:<24} {value / 2**20:8.1f} MB")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (results / f"ingest-{stamp}.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "figures": figures,
                "history": history,
                "rss_mb": rss,
                "storage": stored,
                "medians": rate,
            },
            indent=2,
            default=str,
        )
    )
    return 0


async def _create_database(url: str, name: str) -> None:
    """The baselines' database on the same server, with the plain receiver's table."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(url.replace("@/postgres?", f"@/{name}?"))
    try:
        await conn.execute(
            "CREATE TABLE bench_plain_runs"
            " (id text PRIMARY KEY, status text, data jsonb, updated_at timestamptz)"
        )
    finally:
        await conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
