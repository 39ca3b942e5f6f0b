"""``runflow-receiver simulate``: realistic signed Runflow traffic (placeholder, being built)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub.add_parser("simulate", help="send realistic signed Runflow callbacks to a URL")
