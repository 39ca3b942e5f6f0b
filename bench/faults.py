"""Ingest latency beside heavy analytics: the same paced ingest load, alone and next to 16
dashboards asking for 7-day analytics again and again, against ``serve --workers 2``.

    python bench/faults.py [--runs 200000] [--rate 30] [--seconds 15] [--dashboards 16]

Latency is taken from each delivery's scheduled send time, as a sender experiences it. Three
rounds per repetition, in the same run on the same database: ingest alone (the baseline),
beside the dashboards with the default analytics limit (2 per worker process), and beside them
with the limit lifted (64), to show what the limit buys. Prints p50/p99/max, error counts and
the p99 ratios against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.db import start_embedded  # noqa: E402
from tests.support.builders import API_TOKEN, SIGNING_SECRET  # noqa: E402
from tests.support.database import admin_sql, with_database  # noqa: E402
from tests.support.load import ingest_beside_analytics, seed_runs  # noqa: E402
from tests.support.processes import receiver_env, serving  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=30)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--dashboards", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-faults-") as scratch:
        work = Path(scratch)
        server = start_embedded(work / "db")
        admin_sql(server, 'CREATE DATABASE "bench"')
        url = with_database(server, "bench")
        from receiver.migrations import upgrade

        upgrade(url)
        asyncio.run(seed_runs(url, args.runs))
        print(f"seeded {args.runs} runs over 7 days", flush=True)
        rows: list[tuple[str, float, float, float, int, str]] = []
        for repeat in range(args.repeat):
            for label, limit, dashboards in (
                ("alone", "2", 0),
                ("beside, limit 2", "2", args.dashboards),
                ("beside, limit 64", "64", args.dashboards),
            ):
                env = receiver_env(
                    RECEIVER_DATABASE_URL=url,
                    RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
                    RECEIVER_API_TOKENS=API_TOKEN,
                    RECEIVER_DATA_DIR=str(work / "data"),
                    RECEIVER_ANALYTICS_CONCURRENCY=limit,
                )
                with serving(env, work, workers=2) as (base, _):
                    report, seen = asyncio.run(
                        ingest_beside_analytics(
                            base,
                            API_TOKEN,
                            rate=args.rate,
                            seconds=args.seconds,
                            prefix=f"b{repeat}-{limit}-{dashboards}",
                            analytics_clients=dashboards,
                        )
                    )
                errors = len(report.sent) - len(report.acknowledged)
                rows.append(
                    (
                        label,
                        report.percentile(50),
                        report.percentile(99),
                        max(report.latencies(), default=0.0),
                        errors,
                        str(dict(seen)),
                    )
                )
                print(f"{label}: {report.summary()} dashboards {dict(seen)}", flush=True)
        baseline = [r[2] for r in rows if r[0] == "alone"]
        base_p99 = sum(baseline) / len(baseline)
        print("\n| round | ingest p50 s | p99 s | max s | non-2xx | p99 / alone | dashboards |")
        print("|---|---|---|---|---|---|---|")
        for label, p50, p99, most, errors, seen in rows:
            print(
                f"| {label} | {p50:.3f} | {p99:.3f} | {most:.3f} | {errors} |"
                f" {p99 / max(base_p99, 1e-9):.2f} | {seen} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
