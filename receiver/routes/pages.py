"""``GET /`` the operator dashboard, ``GET /docs`` the API explorer, ``/static`` their assets.

The pages are plain files shipped inside the package (``receiver/static``): no build step, no
CDN. They load without a token; the data calls they make send the one the operator types in.
"""

from __future__ import annotations

import functools
from importlib import resources as package_files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from receiver.apidoc import Operation

HTML = "text/html"
# Scripts and styles come only from this origin, so data that slips into markup cannot run.
# Swagger UI sets inline styles of its own, hence the looser style rule on /docs.
_DASHBOARD_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)


@functools.cache
def _page(name: str) -> bytes:
    return package_files.files("receiver").joinpath("static", name).read_bytes()


def _html(name: str, policy: str) -> Response:
    return Response(
        _page(name),
        media_type=HTML,
        headers={
            "Content-Security-Policy": policy,
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def dashboard(request: Request) -> Response:
    """The dashboard shell; its scripts fetch everything else with the operator's token."""
    return _html("dashboard/index.html", _DASHBOARD_POLICY)


async def docs(request: Request) -> Response:
    """Swagger UI over ``/openapi.json``, from vendored assets."""
    return _html("docs/index.html", _DOCS_POLICY)


operations = [
    Operation(
        "/",
        "get",
        "The operator dashboard (HTML; its data calls need a token)",
        {200: None},
        endpoint=dashboard,
        authenticated=False,
        tags=("pages",),
        response_media={200: HTML},
    ),
    Operation(
        "/docs",
        "get",
        "Interactive API documentation of /openapi.json (HTML)",
        {200: None},
        endpoint=docs,
        authenticated=False,
        tags=("pages",),
        response_media={200: HTML},
    ),
]
# Served beside the operations, outside the API document.
mounts: list[BaseRoute] = [
    Mount("/static", app=StaticFiles(packages=[("receiver", "static")]), name="static"),
]
