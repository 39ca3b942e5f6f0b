"""Fixtures the enrichment, backfill and reconciliation tests share: a fake Runflow API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_runflow import FakeRunflow, serve_fake


@pytest.fixture
def fake() -> FakeRunflow:
    """Runflow's API as documented, in memory; tests put runs in it and read what it saw."""
    return FakeRunflow()


@pytest.fixture
def fake_url(fake: FakeRunflow) -> Iterator[str]:
    """The fake served on 127.0.0.1 for the test."""
    with serve_fake(fake) as url:
        yield url
