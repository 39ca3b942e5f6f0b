"""Bearer-token authentication for the query, analytics and alert APIs."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from receiver.errors import Unauthorized

Handler = Callable[[Request], Awaitable[Response]]


def require_token(request: Request) -> None:
    """Raise Unauthorized unless the request carries one of the configured API tokens."""
    tokens: list[str] = request.app.state.resources.settings.api_tokens
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented or not tokens:
        raise Unauthorized("send Authorization: Bearer <token> with a configured API token")
    matched = False
    for token in tokens:
        # Compare against every token so timing says nothing about which one nearly matched.
        matched |= hmac.compare_digest(presented.strip().encode(), token.encode())
    if not matched:
        raise Unauthorized("the bearer token is not valid")


def authenticated(handler: Handler) -> Handler:
    """Wrap a route handler so it runs only for authenticated requests."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        require_token(request)
        return await handler(request)

    return wrapper
