"""What the fuzz campaign (tests/fuzz/) shares: the in-process app, the per-answer checks, the
case budget and the report .ci/fuzz prints.

The app runs in-process (httpx's ASGI transport; its lifespan and every request on one event
loop in a thread of its own, so hypothesis's synchronous tests can drive it), without
background work: no alert sender, so no fuzzed hook URL is ever contacted, and nothing leaves
the process but its PostgreSQL connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from receiver.app import create_app
from receiver.ingest.signature import sign
from receiver.settings import Settings
from tests.support.builders import API_TOKEN, SIGNING_SECRET, auth

# Total cases for the schemathesis part and for the payload part (the CI stage raises both).
CASES_ENV = "RECEIVER_FUZZ_CASES"
PAYLOADS_ENV = "RECEIVER_FUZZ_PAYLOADS"
REPORT_ENV = "RECEIVER_FUZZ_REPORT"
# A directory where the request body of every finding is written whole, to reproduce it.
FINDINGS_ENV = "RECEIVER_FUZZ_FINDINGS"


def budget(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


T = TypeVar("T")
CALL_SECONDS = 120.0


class InProcess:
    """Synchronous requests to the app, served on the event loop of a private thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> None:
        self._loop = loop
        self._client = client

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_SECONDS)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.run(self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@contextmanager
def fuzz_client(database_url: str) -> Iterator[InProcess]:
    """The receiver in-process with its lifespan running; 500s come back as answers."""
    settings = Settings(
        database_url=database_url,
        signing_secrets=[SIGNING_SECRET],
        api_tokens=[API_TOKEN],
        runflow_api_key=None,
        # Fuzzed rules are saved without resolving their random host names (no DNS traffic);
        # with no sender running they are never contacted either.
        alert_allow_private_targets=True,
    )
    app = create_app(settings, run_worker=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-app", daemon=True)
    thread.start()
    lifespan = app.router.lifespan_context(app)
    # The app's own 500 answer is what the fuzzer checks; the exception is not re-raised here.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60)
    caller = InProcess(loop, client)
    caller.run(lifespan.__aenter__())
    try:
        yield caller
    finally:
        try:
            caller.run(client.aclose())
            caller.run(lifespan.__aexit__(None, None, None))
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()


def signed_post(client: InProcess, body: bytes) -> httpx.Response:
    headers = {"content-type": "application/json", "runflow-signature": sign(body, SIGNING_SECRET)}
    return client.post("/webhooks/runflow", content=body, headers=headers)


def delivery_id_of(response: httpx.Response) -> int | None:
    """The delivery id an answer names (``delivery_id``, or ``error.delivery_id``)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    found = body.get("delivery_id")
    if found is None and isinstance(body.get("error"), dict):
        found = body["error"].get("delivery_id")
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def read_back_problem(client: InProcess, response: httpx.Response) -> str | None:
    """Why the delivery an answer names cannot be read back, or None when it can (or none)."""
    delivery_id = delivery_id_of(response)
    if delivery_id is None:
        return None
    kept = client.get(f"/deliveries/{delivery_id}", headers=auth())
    if kept.status_code != 200:
        return f"delivery {delivery_id} named in the answer reads back as {kept.status_code}"
    if kept.json().get("id") != delivery_id:
        return f"delivery {delivery_id} reads back as another id"
    return None


def _excerpt(body: bytes) -> str:
    if len(body) <= 400:
        return repr(body)
    return f"{body[:250]!r} ... {body[-100:]!r} ({len(body)} bytes)"


@dataclass
class Tally:
    """Cases, answers by status, and failures of one operation or payload kind."""

    suite: str
    name: str
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def record(
        self, response: httpx.Response, problem: str | None, request: str, body: bytes | None
    ) -> None:
        self.cases += 1
        self.statuses[response.status_code] += 1
        if problem is None or len(self.failures) >= 20:
            return
        shown = _excerpt(body or b"")
        kept = os.environ.get(FINDINGS_ENV)
        if kept and body is not None:
            safe = "".join(c if c.isalnum() else "_" for c in f"{self.suite}-{self.name}")
            path = os.path.join(kept, f"{safe}-{len(self.failures)}.body")
            os.makedirs(kept, exist_ok=True)
            with open(path, "wb") as out:
                out.write(body)
            shown += f" (whole body in {path})"
        self.failures.append(f"{problem}\n    request: {request[:300]} body={shown}")

    def write(self) -> None:
        """Append this tally to the report file, when the CI stage asked for one."""
        path = os.environ.get(REPORT_ENV)
        if not path:
            return
        line = {
            "suite": self.suite,
            "name": self.name,
            "cases": self.cases,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "server_errors": sum(v for k, v in self.statuses.items() if k >= 500 and k != 503),
            "failures": len(self.failures),
            "examples": self.failures[:3],
        }
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")

    def verdict(self) -> str:
        head = f"{self.suite} {self.name}: {self.cases} cases, statuses {dict(self.statuses)}"
        return head + "".join(f"\n  - {f}" for f in self.failures)
