"""Every metric the deploy kit names (Prometheus rules, Grafana dashboard) is one the receiver
exposes, with the suffix its type takes in PromQL. The oracle is the files themselves."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from receiver.alerts.evaluate import evaluate_once
from tests.support.builders import SIGNING_SECRET, auth, envelope, post_delivery, run_object
from tests.support.processes import receiver_env, serving

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus-alerts.yaml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
NAME = re.compile(r"runflow_receiver_[a-z0-9_]+")
# The sample names PromQL uses for each type's family (prometheus_client's parser gives a
# counter's family without its _total).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
}


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))  # rows hold their panels when collapsed
    return out


def dashboard_expressions(path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    return [
        target["expr"]
        for panel in _panels(doc["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def named(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in NAME.findall(expr)}


def exposed_family(name: str, families: dict[str, str]) -> str | None:
    """The exposed family that series ``name`` belongs to, when its suffix fits the type."""
    for family, kind in families.items():
        if any(name == family + suffix for suffix in SUFFIXES.get(kind, ())):
            return family
    return None


def test_the_files_name_metrics_at_all():
    assert DASHBOARDS, "no Grafana dashboard in deploy/grafana/dashboards"
    assert len(named(rule_expressions())) >= 5
    for path in DASHBOARDS:
        assert len(named(dashboard_expressions(path))) >= 8, path.name
    # The suffix rules themselves, on names of each kind.
    families = {"a_total_x": "gauge", "c": "counter", "h": "histogram"}
    assert exposed_family("c_total", families) == "c"
    assert exposed_family("c", families) is None
    assert exposed_family("h_bucket", families) == "h"
    assert exposed_family("h", families) is None
    assert exposed_family("a_total_x", families) == "a_total_x"


async def test_every_metric_in_the_rules_and_dashboards_is_exposed(client, settings, db):
    now = datetime.now(UTC).isoformat()
    stored = envelope("names_ok")
    assert (await post_delivery(client, stored)).status_code == 200
    assert (await post_delivery(client, stored)).json()["status"] == "duplicate"
    failed = run_object("names_failed", status_code="failed", failure_code="oom", created_at=now)
    await post_delivery(client, failed)
    assert (await post_delivery(client, envelope("names_bad"), secret="whsec_wrong")).is_error
    # An enabled alert rule with a state, for runflow_receiver_alert_state.
    created = await client.post(
        "/alerts/rules",
        headers=auth(),
        json={
            "name": "metric-names",
            "metric": "failure_count",
            "window": "5m",
            "threshold": 0,
            "targets": [{"url": "http://127.0.0.1:9/hook"}],
        },
    )
    assert created.status_code in (200, 201), created.text
    await evaluate_once(settings, db, datetime.now(UTC))

    response = await client.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    samples = {s.name for f in text_string_to_metric_families(response.text) for s in f.samples}
    assert "runflow_receiver_alert_state" in samples  # the scrape above had every source

    sources = {RULES.name: named(rule_expressions())}
    sources.update({path.name: named(dashboard_expressions(path)) for path in DASHBOARDS})
    missing = {
        source: sorted(n for n in names if exposed_family(n, families) is None)
        for source, names in sources.items()
    }
    assert missing == {source: [] for source in sources}, families


@pytest.mark.slow
def test_a_fresh_serve_exposes_the_counters_rules_watch_at_zero(database_url, tmp_path):
    """After a restart with no traffic, the series alerts take rate() of exist, at 0."""
    env = receiver_env(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_DATA_DIR=str(tmp_path / "data"),
    )
    with serving(env, tmp_path, workers=2) as (base, _):
        text = httpx.get(f"{base}/metrics", timeout=10).text
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    deliveries = "runflow_receiver_deliveries_total"
    for outcome in ("stored", "duplicate"):
        assert found[(deliveries, (("cause", ""), ("outcome", outcome)))] == 0
    assert found[("runflow_receiver_runs_terminal_total", (("status", "failed"),))] == 0
