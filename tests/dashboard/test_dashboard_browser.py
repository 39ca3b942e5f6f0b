"""The dashboard and /docs in Debian's headless chromium, against a real server on 127.0.0.1.

Data is posted through the real webhook first; every count the page must show is computed here
from what was posted. Run by ``.ci/browser``; the main suite deselects it (``-m "not browser"``).
Without chromium it skips, except under ``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.app import create_app
from tests.support.builders import API_TOKEN, auth, failed_envelope, iso, post_delivery, run_object
from tests.support.hook_server import HookServer, serve_hook
from tests.support.processes import serve_in_thread

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("DASHBOARD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DASHBOARD_CHROMEDRIVER", "/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 20
TOKEN_KEY = "runflow-receiver.token"
HOSTILE = '<img src=x onerror="document.title=1">&amp; "quoted"'

FAILURES = [
    ("out_of_memory", "execution"),
    ("out_of_memory", "execution"),
    ("out_of_memory", "execution"),
    ("no_capacity", "dispatch"),
    ("no_capacity", "dispatch"),
    ("timeout", "execution"),
    ("callback_rejected", "callback"),
]
MODELS = ["flux-dev", "sdxl", "llama-3"]


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: apt-get install -y chromium chromium-driver"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = _missing_browser()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def live(db: Any, settings: Any) -> Iterator[str]:
    """The receiver on a free 127.0.0.1 port with alert evaluation every second."""
    app = create_app(settings.model_copy(update={"alert_interval_seconds": 1.0}))
    with serve_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}"


def wait_for(what: str, check: Callable[[], Any], seconds: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # the page is mid-redraw: elements come and go
            last = exc
        else:
            if value:
                return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def give_token(driver: Any, token: str) -> None:
    wait_for("the token dialog", lambda: css(driver, "dialog#token-dialog[open]"))
    field = css(driver, "#token-input")[0]
    field.clear()
    field.send_keys(token)
    css(driver, "#token-submit")[0].click()


def console_problems(driver: Any) -> list[str]:
    """Console errors other than the answers the test provokes on purpose (401, 404)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE"
        and not ("401" in entry["message"] or "/reconciliation/status" in entry["message"])
    ]


async def load_data(base: str, hook_url: str) -> dict[str, Any]:
    """Post runs, failures, a drill-down run and a rejected delivery; return what was sent."""
    now = datetime.now(UTC).replace(microsecond=0)
    posted: dict[str, Any] = {"runs": 0}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def post(doc: dict[str, Any], expect: int = 200) -> httpx.Response:
            response = await post_delivery(client, doc)
            assert response.status_code == expect, response.text
            return response

        for i in range(12):
            created = now - timedelta(minutes=23 * i + 3)
            await post(
                run_object(
                    f"ok_{i:02d}",
                    model={"id": f"mdl_{i % 3}", "slug": MODELS[i % 3]},
                    created_at=iso(created),
                    started_at=iso(created + timedelta(seconds=1)),
                    completed_at=iso(created + timedelta(seconds=4)),
                    duration_ms=800 + 250 * i,
                )
            )
            posted["runs"] += 1
        for i, (code, stage) in enumerate(FAILURES):
            created = now - timedelta(minutes=41 * i + 5)
            await post(
                run_object(
                    f"fail_{i:02d}",
                    status_code="failed",
                    failure_code=code,
                    failure_stage_code=stage,
                    failure_message=HOSTILE if i == 1 else f"{code} in {stage}",
                    model={"id": f"mdl_{i % 3}", "slug": MODELS[i % 3]},
                    created_at=iso(created),
                    started_at=iso(created + timedelta(seconds=1)),
                    completed_at=iso(created + timedelta(seconds=9)),
                    duration_ms=8000 + 100 * i,
                )
            )
            posted["runs"] += 1

        # The drill-down run: its envelope first, then the Run object with its node runs.
        drill = "drill_run_1"
        created = now - timedelta(minutes=2)
        done = created + timedelta(seconds=20)
        await post(
            failed_envelope(
                drill,
                code="out_of_memory",
                stage="execution",
                created_at=created,
                completed_at=done,
            )
        )
        nodes = [
            {
                "id": "node_load_1",
                "node_id": "load_checkpoint",
                "node_type": "CheckpointLoader",
                "status_code": "succeeded",
                "duration_ms": 3100,
            },
            {
                "id": "node_sample_1",
                "node_id": "ksampler",
                "node_type": "KSampler",
                "status_code": "failed",
                "failure_code": "cuda_oom",
                "failure_message": "CUDA out of memory",
                "duration_ms": 15400,
            },
        ]
        await post(
            run_object(
                drill,
                status_code="failed",
                failure_code="out_of_memory",
                failure_stage_code="execution",
                failure_message="out_of_memory happened",
                target_type="comfyui",
                node_runs=nodes,
                created_at=iso(created),
                completed_at=iso(done),
                duration_ms=20000,
            )
        )
        posted["runs"] += 1
        posted["drill"] = drill
        posted["nodes"] = [n["id"] for n in nodes]
        posted["failures"] = Counter([*FAILURES, ("out_of_memory", "execution")])
        posted["llama_failures"] = Counter(f for i, f in enumerate(FAILURES) if i % 3 == 2)

        # Rejected: names a client_ref no run has yet; replayable once that run arrives.
        rejected = await post({"client_ref": "late-ref", "status_code": "succeeded"}, expect=422)
        posted["rejected"] = rejected.json()["error"]["delivery_id"]
        await post(
            run_object(
                "late_run",
                status_code="running",
                client_ref="late-ref",
                created_at=iso(now - timedelta(minutes=1)),
                completed_at=None,
                duration_ms=None,
            )
        )
        posted["runs"] += 1

        rule = {
            "name": "failure-burst",
            "metric": "failure_count",
            "window": "1h",
            "threshold": 2,
            "targets": [{"url": hook_url}],
        }
        created_rule = await client.post("/alerts/rules", json=rule, headers=auth())
        assert created_rule.status_code == 201, created_rule.text

        async def firing() -> bool:
            rules = (await client.get("/alerts/rules", headers=auth())).json()["items"]
            return any(s["state"] == "firing" for r in rules for s in r["states"])

        deadline = time.monotonic() + WAIT_SECONDS
        while not await firing():
            assert time.monotonic() < deadline, "the alert rule never fired"
            await asyncio.sleep(0.2)
    return posted


def screenshot(driver: Any) -> Path:
    target = Path(
        os.environ.get("DASHBOARD_SCREENSHOT") or REPO / "build" / "screenshots" / "dashboard.png"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    # The whole page, not just the viewport: Chrome renders beyond it on request. From the
    # top, so the sticky header sits where it belongs.
    driver.execute_script("window.scrollTo({top: 0, behavior: 'instant'})")
    wait_for("the top of the page", lambda: driver.execute_script("return window.scrollY") == 0)
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    target.write_bytes(base64.b64decode(shot["data"]))
    print(f"dashboard screenshot: {target}")
    return target


async def test_dashboard_shows_failures_drills_into_a_run_and_replays(browser, live):
    driver = browser
    hook = HookServer()
    with serve_hook(hook) as hook_url:
        posted = await load_data(live, hook_url)

        # The page itself needs no token; it asks for one before any data call.
        driver.get(f"{live}/#bucket=hour")
        give_token(driver, API_TOKEN)
        wait_for("the first refresh", lambda: "updated at" in css(driver, "#updated")[0].text)

        # Failures by code x stage: exactly the groups posted, with their counts and shares.
        expected = posted["failures"]
        failed_total = sum(expected.values())
        rows = wait_for(
            "the failure breakdown",
            lambda: len(r := css(driver, "#failures tr.failure-row")) == len(expected) and r,
        )
        shown: Counter[tuple[str, ...]] = Counter()
        for row in rows:
            cells = [cell.text for cell in row.find_elements("css selector", "td")]
            code, stage, count, share = cells
            assert row.get_attribute("data-code") == code
            assert row.get_attribute("data-stage") == stage
            shown[(code, stage)] = int(count)
            assert share == f"{int(count) / failed_total * 100:.1f}%"
        assert shown == expected
        assert [int(r.find_elements("css selector", "td")[2].text) for r in rows] == sorted(
            expected.values(), reverse=True
        )
        tiles = {t.get_attribute("data-tile"): t.text for t in css(driver, "#tiles .tile")}
        assert tiles["failed"].splitlines()[1] == str(failed_total)
        assert tiles["runs"].splitlines()[1] == str(posted["runs"])
        assert "out_of_memory" in tiles["top"]
        wait_for("the firing alert", lambda: "1" in css(driver, '[data-tile="alerts"]')[0].text)

        # The failure-rate chart: one point per bucket with terminal runs; the failed counts
        # on the points add up to the failed runs posted.
        points = wait_for("chart points", lambda: css(driver, "#timeseries svg.chart circle.point"))
        assert sum(int(p.get_attribute("data-failed")) for p in points) == failed_total
        assert css(driver, "#timeseries svg.chart path.rate")
        css(driver, '#bucket-switch input[value="minute"]')[0].find_element("xpath", "..").click()
        wait_for(
            "minute buckets",
            lambda: (
                int(css(driver, "#timeseries svg.chart")[0].get_attribute("data-points")) >= 24 * 60
            ),
        )
        assert "bucket=minute" in driver.current_url
        css(driver, '#bucket-switch input[value="hour"]')[0].find_element("xpath", "..").click()
        wait_for(
            "hour buckets",
            lambda: int(css(driver, "#timeseries svg.chart")[0].get_attribute("data-points")) <= 25,
        )

        # Data from outside is shown as text, never parsed as markup.
        assert not css(driver, "#runs img, #failures img")
        assert HOSTILE in css(driver, "#runs")[0].text

        # Drill into the failed run: its node runs and both deliveries appear.
        link = wait_for(
            "the drill-down run in the list",
            lambda: css(driver, f'#runs .run-link[data-run="{posted["drill"]}"]'),
        )[0]
        link.click()
        nodes = wait_for("node runs", lambda: css(driver, "#run tr.node-row"))
        node_text = " ".join(n.text for n in nodes)
        for node_id in posted["nodes"]:
            assert node_id in node_text
        assert "cuda_oom" in node_text and "KSampler" in node_text
        deliveries = wait_for("deliveries", lambda: css(driver, "#run tr.delivery-row"))
        assert len(deliveries) == 2
        assert all("stored" in d.text for d in deliveries)
        assert f"run={posted['drill']}" in driver.current_url

        # Replay the rejected delivery: the shown outcome turns from rejected to stored.
        row_selector = f'#rejected tr.rejected-row[data-delivery="{posted["rejected"]}"]'
        row = wait_for("the rejected delivery", lambda: css(driver, row_selector))[0]
        assert row.find_element("css selector", ".outcome").text == "rejected"
        row.find_element("css selector", "button.replay").click()
        wait_for(
            "the replay's outcome",
            lambda: "stored" in css(driver, f"{row_selector} .outcome")[0].text,
        )
        assert "late_run" in css(driver, f"{row_selector} .outcome")[0].text
        assert "replayed: stored" in css(driver, "#rejected .note")[0].text

        # Enrichment and reconciliation panels answer (reconciliation may not exist yet).
        assert "Pending" in css(driver, "#enrichment")[0].text
        wait_for("reconciliation", lambda: css(driver, "#reconciliation")[0].text.strip())
        assert not css(driver, "#reconciliation .error")
        assert "failure-burst" in css(driver, "#alerts")[0].text
        assert not css(driver, ".body .error"), [e.text for e in css(driver, ".body .error")]

        path = screenshot(driver)
        assert path.stat().st_size > 10_000

        # The form's filters reach the API: one model's failures only, kept in the hash.
        model = css(driver, '#filters input[name="model"]')[0]
        model.send_keys("llama-3")
        css(driver, '#filters button[type="submit"]')[0].click()
        llama = posted["llama_failures"]
        wait_for(
            "the llama-3 breakdown",
            lambda: (
                Counter(
                    {
                        (r.get_attribute("data-code"), r.get_attribute("data-stage")): int(
                            r.get_attribute("data-count")
                        )
                        for r in css(driver, "#failures tr.failure-row")
                    }
                )
                == llama
            ),
        )
        assert "model=llama-3" in driver.current_url
        wait_for(
            "only llama-3's failed runs",
            lambda: (
                [r.text.split()[3] for r in css(driver, "#runs tr.run-row")]
                == ["llama-3"] * sum(llama.values())
            ),
        )
        css(driver, "#reset-filters")[0].click()
        wait_for("the reset", lambda: len(css(driver, "#failures tr.failure-row")) == len(expected))
        assert "model=" not in driver.current_url

    # The token stays in this tab's sessionStorage: not in the URL, not in localStorage.
    assert driver.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") == API_TOKEN
    assert driver.execute_script("return localStorage.length") == 0
    assert API_TOKEN not in driver.current_url

    # A refused token (401) asks again, and the new one is used.
    driver.execute_script(f"sessionStorage.setItem('{TOKEN_KEY}', 'not-the-token')")
    css(driver, "#refresh")[0].click()
    wait_for("the token dialog again", lambda: css(driver, "dialog#token-dialog[open]"))
    assert "refused" in css(driver, "#token-reason")[0].text
    give_token(driver, API_TOKEN)
    wait_for("a refresh with the new token", lambda: "updated" in css(driver, "#updated")[0].text)
    assert console_problems(driver) == []


def test_docs_page_lets_a_user_authorize_and_try_a_request(browser, live):
    driver = browser
    # A token the dashboard holds in this tab is offered to Swagger UI...
    driver.get(f"{live}/docs")
    driver.execute_script(f"sessionStorage.setItem('{TOKEN_KEY}', '{API_TOKEN}')")
    driver.refresh()
    wait_for("pre-authorized", lambda: css(driver, ".auth-wrapper .btn.authorize.locked"))
    # ...and without one, the user enters it with Authorize.
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    wait_for("the operations", lambda: css(driver, "#operations-runs-get_runs"))
    assert css(driver, ".auth-wrapper .btn.authorize.unlocked")
    assert css(driver, "#operations-pages-get_")  # GET / is documented too

    css(driver, ".auth-wrapper .btn.authorize")[0].click()
    field = wait_for("the bearer field", lambda: css(driver, ".auth-container input"))[0]
    field.send_keys(API_TOKEN)
    css(driver, ".auth-btn-wrapper .btn.authorize")[0].click()
    wait_for("authorized", lambda: css(driver, ".auth-btn-wrapper .btn-done"))[0].click()

    css(driver, "#operations-runs-get_runs .opblock-summary")[0].click()
    execute = wait_for(
        "the execute button",
        lambda: (
            css(driver, "#operations-runs-get_runs .btn.execute")
            or css(driver, "#operations-runs-get_runs .try-out__btn")
        ),
    )[0]
    if "try-out__btn" in (execute.get_attribute("class") or ""):
        execute.click()
        execute = wait_for(
            "the execute button", lambda: css(driver, "#operations-runs-get_runs .btn.execute")
        )[0]
    execute.click()
    status = wait_for(
        "the live response",
        lambda: css(
            driver, "#operations-runs-get_runs .live-responses-table tbody .response-col_status"
        ),
    )[0]
    # /runs answers 200 only with the token, so the request carried what was entered.
    assert status.text.strip().startswith("200"), status.text
    assert driver.execute_script("return localStorage.length") == 0
    assert console_problems(driver) == []
