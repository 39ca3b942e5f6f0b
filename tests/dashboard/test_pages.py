"""GET / and GET /docs load without a token, their assets are served, and the token stays out
of URLs and out of localStorage."""

from __future__ import annotations

import re
from importlib import resources as package_files
from pathlib import Path

import pytest

from receiver.openapi import build_document
from receiver.routes import all_operations

STATIC = Path(str(package_files.files("receiver").joinpath("static")))
OUR_SCRIPTS = sorted((STATIC / "dashboard").glob("*.js")) + sorted((STATIC / "docs").glob("*.js"))


@pytest.mark.parametrize("path", ["/", "/docs"])
async def test_pages_answer_html_without_a_token(client, path):
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-eval" not in policy
    assert "<script" in response.text


async def test_dashboard_page_loads_only_local_assets(client):
    page = (await client.get("/")).text
    for reference in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert reference.startswith("/"), f"{reference} is not served by the receiver"
        if reference.startswith("/static/"):
            assert (await client.get(reference)).status_code == 200, reference


async def test_docs_page_uses_the_vendored_swagger_ui(client):
    page = (await client.get("/docs")).text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page
    assert "/static/swagger-ui/swagger-ui.css" in page
    assert "http://" not in page and "https://" not in page
    assert (STATIC / "swagger-ui" / "LICENSE").is_file()


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/static/dashboard/app.js", "text/javascript"),
        ("/static/dashboard/api.js", "text/javascript"),
        ("/static/dashboard/dom.js", "text/javascript"),
        ("/static/dashboard/chart.js", "text/javascript"),
        ("/static/dashboard/dashboard.css", "text/css"),
        ("/static/docs/docs.js", "text/javascript"),
        ("/static/swagger-ui/swagger-ui-bundle.js", "text/javascript"),
        ("/static/swagger-ui/swagger-ui.css", "text/css"),
    ],
)
async def test_static_assets_have_their_content_types(client, path, media_type):
    response = await client.get(path)
    assert response.status_code == 200
    served = response.headers["content-type"].split(";")[0]
    # Some systems' mime tables still say application/javascript; browsers accept both.
    accepted = {media_type}
    if media_type == "text/javascript":
        accepted.add("application/javascript")
    assert served in accepted


async def test_a_missing_asset_is_the_usual_404(client):
    response = await client.get("/static/dashboard/nope.js")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert (await client.get("/static/../settings.py")).status_code == 404


async def test_data_routes_still_need_the_token(client):
    assert (await client.get("/analytics/failures")).status_code == 401


def test_the_token_is_kept_in_session_storage_and_never_in_a_url():
    sources = {path.name: path.read_text() for path in OUR_SCRIPTS}
    api = sources["api.js"]
    assert "window.sessionStorage.setItem(TOKEN_KEY, token)" in api
    assert "Authorization: `Bearer ${token}`" in api
    for name, text in sources.items():
        assert not re.search(r"localStorage\s*[.\[]", text), name  # comments may name it
        assert not re.search(r"[?&]token=", text), name
        assert not re.search(r"searchParams\.(set|append)\(\s*[\"']token", text), name
    # The hash holds filters only; anything called token found there is dropped.
    assert 'params.delete("token")' in sources["app.js"]


def test_our_scripts_never_parse_data_as_html():
    for path in OUR_SCRIPTS:
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{path.name} uses {sink}"


def test_pages_are_documented_as_public_html():
    paths = build_document(all_operations())["paths"]
    for path in ("/", "/docs"):
        operation = paths[path]["get"]
        assert "security" not in operation
        assert list(operation["responses"]["200"]["content"]) == ["text/html"]


def test_every_static_file_is_package_data():
    """A wheel carries the assets: each file under receiver/static matches a package-data glob.

    setuptools expands those globs from the package directory; building a real wheel needs the
    network for build isolation, so this expands them the same way instead.
    """
    import tomllib

    package = STATIC.parent
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["receiver"]
    shipped = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    files = {path for path in STATIC.rglob("*") if path.is_file()}
    assert files and not files - shipped, sorted(str(p) for p in files - shipped)
