"""Ingest throughput: ``simulate`` traffic against ``serve --workers 2`` on the embedded database.

    python bench/ingest.py [--rounds 5] [--count 3000] [--concurrency 32]

Two baselines are measured in the same run, interleaved round by round, with the same client
and the same number of uvicorn workers (bench/baseline_app.py):

- floor: one INSERT of the raw body per request into the same embedded PostgreSQL, committed
  before answering: the least any durable receiver must do. receiver/floor is the figure to
  watch: what signature, parsing, archive, fingerprint, merge and node rows cost on top.
- ceiling: reads the body and answers, stores nothing: the HTTP ceiling of this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.simulate import EPOCH, generate_traffic, send  # noqa: E402
from tests.support.processes import (  # noqa: E402
    embedded_url,
    free_port,
    receiver_env,
    serving,
)

SECRET = "whsec_bench_secret"


def start_baseline(
    app: str, workers: int, env: dict[str, str]
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"baseline_app:{app}",
            "--app-dir",
            str(ROOT / "bench"),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ],
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.post(f"{base}/webhooks/runflow", content=b"{}", timeout=5)
            return base, process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("baseline app did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    rates: dict[str, list[float]] = {"receiver": [], "floor": [], "ceiling": []}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        env = receiver_env(RECEIVER_DATA_DIR=f"{tmp}/data", RECEIVER_SIGNING_SECRETS=SECRET)
        with serving(env, Path(tmp), workers=args.workers) as (base, _):
            # The floor writes to the receiver's own embedded server, in a table of its own.
            database = embedded_url(Path(tmp) / "data")
            urls = {"receiver": f"{base}/webhooks/runflow"}
            baselines = []
            for app in ("floor", "ceiling"):
                url, process = start_baseline(
                    app, args.workers, {**env, "BENCH_DATABASE_URL": database}
                )
                urls[app] = f"{url}/webhooks/runflow"
                baselines.append(process)
            try:
                for round_no in range(args.rounds):
                    # A fixed epoch: every round and every run of the bench sends the same bytes.
                    traffic = generate_traffic(count=args.count, seed=1000 + round_no, start=EPOCH)
                    for name, url in urls.items():
                        report = asyncio.run(
                            send(url, traffic, secret=SECRET, concurrency=args.concurrency)
                        )
                        if report.acknowledged != report.sent:
                            raise SystemExit(f"{name}: not all acknowledged: {report.summary()}")
                        rates[name].append(report.sent / report.seconds)
                    print(
                        f"round {round_no + 1}: "
                        + "   ".join(f"{n} {r[-1]:6.0f}/s" for n, r in rates.items()),
                        flush=True,
                    )
            finally:
                for process in baselines:
                    process.terminate()
                    process.wait(timeout=20)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"\nmedian of {args.rounds} rounds x {args.count} deliveries, concurrency "
        f"{args.concurrency}, {args.workers} workers each:\n"
        f"  receiver (full durable ingest)    {medians['receiver']:7.0f} deliveries/s\n"
        f"  floor (one INSERT per request)    {medians['floor']:7.0f} deliveries/s\n"
        f"  ceiling (HTTP only, no storage)   {medians['ceiling']:7.0f} deliveries/s\n"
        f"  receiver / floor                  {medians['receiver'] / medians['floor']:7.2f}\n"
        f"  receiver / ceiling                {medians['receiver'] / medians['ceiling']:7.2f}"
    )
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (results / f"ingest-{stamp}.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "rates": rates,
                "medians": medians,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
