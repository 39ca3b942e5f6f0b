"""Static checks of deploy/compose.yaml and the Grafana files it mounts (no Docker needed).

What `docker compose up` relies on: the services and their order, restart policies, tagged
images, bind-mount sources that exist, Prometheus' config and rules mounted where the config
says, Grafana's provisioning and a dashboard whose datasource is the provisioned one,
and the package's version in the image tags and the migration Job's name.
Run by .ci/deploy-checks; prints each problem and exits 1 when there is any.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SERVICES = ("postgres", "migrate", "receiver", "prometheus", "grafana")
RESTART = {"no", "always", "unless-stopped", "on-failure"}
problems: list[str] = []


def expect(ok: object, problem: str) -> None:
    if not ok:
        problems.append(problem)


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each bind mount (relative to deploy/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (DEPLOY / source).resolve()
    return out


def main() -> int:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services: dict[str, dict[str, Any]] = compose["services"]
    for name in SERVICES:
        expect(name in services, f"compose: no service {name}")
    for name, service in services.items():
        restart = str(service.get("restart", ""))
        expect(restart.split(":")[0] in RESTART, f"{name}: restart policy {restart!r}")
        image = service.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        expect(tag and tag != "latest", f"{name}: image {image!r} has no version tag")
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            dockerfile = context / service["build"]["dockerfile"]
            expect(dockerfile.is_file(), f"{name}: no {dockerfile}")
        for target, source in mounts(service).items():
            expect(source.exists(), f"{name}: bind mount source {source} for {target} missing")
        for port in service.get("ports", []):
            expect(str(port).startswith("127.0.0.1:"), f"{name}: port {port} not on 127.0.0.1")

    depends = {name: service.get("depends_on", {}) for name, service in services.items()}
    expect("healthcheck" in services["postgres"], "postgres: no healthcheck")
    expect(
        depends["migrate"].get("postgres", {}).get("condition") == "service_healthy",
        "migrate: does not wait for a healthy postgres",
    )
    expect(
        depends["receiver"].get("migrate", {}).get("condition") == "service_completed_successfully",
        "receiver: does not wait for the migration",
    )
    expect(services["migrate"].get("command") == ["runflow-receiver", "migrate"], "migrate cmd")

    # Prometheus: the config it is told to read is mounted, and so are its rule files.
    prometheus = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus.get("command", []) if "=" in arg)
    config_path = flags.get("--config.file", "/etc/prometheus/prometheus.yml")
    prom_mounts = mounts(prometheus)
    expect(config_path in prom_mounts, f"prometheus: {config_path} not mounted")
    config = yaml.safe_load(prom_mounts.get(config_path, DEPLOY / "prometheus.yml").read_text())
    for rule_file in config.get("rule_files", []):
        in_container = str(Path(config_path).parent / rule_file)
        expect(in_container in prom_mounts, f"prometheus: rule file {in_container} not mounted")
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    expect("receiver:8000" in targets, f"prometheus: does not scrape receiver:8000 ({targets})")

    # Grafana: provisioning mounted; the provider's path is where the dashboards are mounted;
    # every panel's datasource is one provisioned.
    grafana_mounts = mounts(services["grafana"])
    provisioning = grafana_mounts.get("/etc/grafana/provisioning")
    expect(provisioning, "grafana: /etc/grafana/provisioning not mounted")
    provisioning = provisioning or DEPLOY / "grafana" / "provisioning"
    uids = set()
    for path in sorted((provisioning / "datasources").glob("*.yaml")):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            uids.add(source["uid"])
            host = urlparse(source["url"]).hostname
            expect(host in services, f"{path.name}: datasource host {host} is no service")
    dashboards = 0
    for path in sorted((provisioning / "dashboards").glob("*.yaml")):
        for provider in yaml.safe_load(path.read_text())["providers"]:
            folder = grafana_mounts.get(provider["options"]["path"])
            expect(folder, f"{path.name}: {provider['options']['path']} not mounted")
            for board in sorted(folder.glob("*.json")) if folder else []:
                dashboards += 1
                doc = json.loads(board.read_text())
                for panel in doc["panels"]:
                    for item in [panel, *panel.get("targets", [])]:
                        uid = item.get("datasource", {}).get("uid")
                        expect(uid in uids, f"{board.name}: {panel['title']}: datasource {uid}")
                    expect(panel.get("targets"), f"{board.name}: {panel['title']}: no query")
    expect(dashboards, "grafana: no dashboard provisioned")

    # One version everywhere: the package's, the images' tags, the migration Job's name.
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = f"runflow-receiver:{version}"
    for name in ("migrate", "receiver"):
        expect(services[name].get("image") == image, f"compose: {name} image is not {image}")
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            template = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in template.get("containers", []):
                expect(container["image"] == image, f"{path.name}: {container['image']}")
            if doc["kind"] == "Job":
                job = "runflow-receiver-migrate-" + version.replace(".", "-")
                expect(doc["metadata"]["name"] == job, f"{path.name}: Job is not named {job}")

    for problem in problems:
        print(f"deploy files: {problem}")
    if not problems:
        print(
            f"deploy files: compose services {sorted(services)}; {dashboards} dashboard(s);"
            f" images {image} ok"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
