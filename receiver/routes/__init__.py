"""HTTP routes, one module per concern; each lists its ``operations`` (route and API doc)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from receiver.apidoc import Operation
from receiver.routes import (
    alerts,
    analytics,
    docs,
    enrichment,
    health,
    pages,
    reconciliation,
    runs,
    webhooks,
)

# Routes are matched in this order: the webhook first, as nearly every request is one.
MODULES = (webhooks, pages, alerts, health, runs, analytics, enrichment, reconciliation, docs)


def all_operations() -> list[Operation]:
    """Every endpoint the app serves, in the order routes are matched."""
    return [operation for module in MODULES for operation in module.operations]


def static_routes() -> list[BaseRoute]:
    """Routes outside the API document (the pages' static assets)."""
    return [route for module in MODULES for route in getattr(module, "mounts", [])]
