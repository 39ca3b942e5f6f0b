"""Fail when processes a test run started are still running after it (CI's leak check).

    python scripts/leftover_processes.py ROOT [--grace SECONDS]

ROOT is the temporary directory the run used (CI points TMPDIR at a fresh one): a leftover is
a ``postgres`` whose command line names a data directory under ROOT, or a receiver
(``python -m receiver``, ``runflow-receiver``) or test helper whose working directory or
command line is under ROOT. The system PostgreSQL and other users' runs live elsewhere and are
never counted. Waits up to ``--grace`` seconds for stragglers to exit, then lists them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil


def leftovers(root: Path) -> list[str]:
    found = []
    me = psutil.Process().pid
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        try:
            if proc.info["pid"] == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            try:
                cwd = proc.cwd()
            except psutil.Error:
                cwd = ""
            under = str(root) in cmdline or cwd.startswith(str(root))
            receiver = "receiver" in cmdline or "runflow-receiver" in cmdline
            if under and (proc.info["name"] == "postgres" or receiver or "python" in cmdline):
                found.append(f"{proc.info['pid']} {cmdline[:200]}")
        except psutil.Error:
            continue
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--grace", type=float, default=15.0)
    args = parser.parse_args()
    root = args.root.resolve()
    deadline = time.monotonic() + args.grace
    while True:
        found = leftovers(root)
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if found:
        print(f"processes the test run left running (under {root}):", file=sys.stderr)
        for line in found:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"no processes left running under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
