"""A real HTTP server on 127.0.0.1 standing in for an alert hook target."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.processes import serve_in_thread


@dataclass
class HookServer:
    """Records every POST; answers from ``statuses`` in turn (then 200); can hold requests."""

    statuses: list[int] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    hold: threading.Event | None = None  # while set to an unset Event, requests wait
    waiting: int = 0

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        self.attempts += 1
        if self.hold is not None:
            self.waiting += 1
            await asyncio.to_thread(self.hold.wait)
            self.waiting -= 1
        status = self.statuses.pop(0) if self.statuses else 200
        if status < 300:
            self.received.append(
                {"body": orjson.loads(body), "raw": body, "headers": dict(request.headers)}
            )
        return Response(b"{}", status, media_type="application/json")

    def notices(self) -> list[tuple[str, dict[str, Any]]]:
        return [(r["body"]["state"], r["body"]["group"]) for r in self.received]


@contextmanager
def serve_hook(hook: HookServer) -> Iterator[str]:
    """The hook on a free 127.0.0.1 port in a thread; yields its URL."""
    app = Starlette(routes=[Route("/hook", hook.hook, methods=["POST"])])
    with serve_in_thread(app) as port:
        try:
            yield f"http://127.0.0.1:{port}/hook"
        finally:
            if hook.hold is not None:
                hook.hold.set()  # release held requests before the server shuts down
