"""The command line's contract: --version, exit codes (2 usage, 3 configuration, 1 failure),
the top command's --database-url, and ``alerts check`` validating a rules file offline."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tomllib
from datetime import timedelta
from pathlib import Path

import click
import pytest

from receiver.cli import cli as receiver_cli
from tests.support.builders import T0, iso, run_object
from tests.support.fake_runflow import FakeRunflow, serve_fake
from tests.support.processes import free_port, receiver_env

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        env=receiver_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def closed_port_url() -> tuple[str, int]:
    port = free_port()  # nothing listens there once the probe socket is closed
    return f"postgresql://postgres@127.0.0.1:{port}/nothing", port


def test_version_prints_the_package_version(tmp_path):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = cli("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == f"runflow-receiver {version}\n"


def test_help_shows_defaults_and_every_option_has_help(tmp_path):
    done = cli("backfill", "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "[default: 500; 1<=x<=500]" in " ".join(done.stdout.split())

    def commands(group: click.Group, path: str) -> list[tuple[str, click.Command]]:
        found: list[tuple[str, click.Command]] = [(path, group)]
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                found += commands(command, f"{path} {name}")
            else:
                found.append((f"{path} {name}", command))
        return found

    everything = commands(receiver_cli, "runflow-receiver")
    assert {name for name, _ in everything} >= {
        f"runflow-receiver {c}"
        for c in ("serve", "migrate", "simulate", "replay", "worker", "backfill", "alerts check")
    }
    for name, command in everything:
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"


@pytest.mark.parametrize(
    "args",
    [
        ["backfill", "--since", "2026-11-01", "--page-size", "9999"],
        ["serve", "--workers", "0"],
        ["worker", "--concurrency", "65"],
        ["simulate", "--url", "ftp://127.0.0.1/x"],
        ["no-such-command"],
        ["replay"],  # neither ids nor --all-rejected
    ],
)
def test_usage_errors_exit_2_with_a_short_message(tmp_path, args):
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Error:" in done.stderr
    # A range is named, never spelled out as every allowed value.
    assert len(done.stderr.splitlines()) <= 4 and len(done.stderr) < 400, done.stderr


@pytest.mark.parametrize("command", [["migrate"], ["serve"], ["alerts", "list"], ["replay", "1"]])
def test_an_unreachable_database_is_one_line_and_exit_3(tmp_path, command):
    url, port = closed_port_url()
    done = cli(*command, cwd=tmp_path, RECEIVER_DATABASE_URL=url, RECEIVER_DATA_DIR=str(tmp_path))
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()
    assert last[-1] == (
        f"runflow-receiver: cannot reach the database at 127.0.0.1:{port}: connection refused"
    )
    assert "Traceback" not in done.stderr
    # Before the failure only log lines (serve's credential messages), no traceback lines.
    assert len(last) <= 3, done.stderr


def test_database_url_flag_wins_over_the_environment(tmp_path, database_url):
    env_url, env_port = closed_port_url()
    flag_url, flag_port = closed_port_url()
    done = cli("--database-url", flag_url, "migrate", cwd=tmp_path, RECEIVER_DATABASE_URL=env_url)
    assert done.returncode == 3
    assert f"127.0.0.1:{flag_port}:" in done.stderr and f":{env_port}:" not in done.stderr

    done = cli(
        "--database-url", database_url, "migrate", cwd=tmp_path, RECEIVER_DATABASE_URL=env_url
    )
    assert done.returncode == 0, done.stderr
    assert "database is at revision" in done.stderr  # a log line, not command output
    assert done.stdout == ""


def test_data_dir_flag_wins_over_the_environment(tmp_path):
    chosen = tmp_path / "chosen"
    (chosen).mkdir()
    (chosen / "signing_secret").write_text("whsec_from_flag\n")
    # simulate reads serve's kept secret from the data directory; with none it warns.
    url = f"http://127.0.0.1:{free_port()}/webhooks/runflow"
    done = cli(
        "--data-dir",
        str(chosen),
        "simulate",
        "--url",
        url,
        "--count",
        "1",
        "--timeout",
        "2",
        cwd=tmp_path,
        RECEIVER_DATA_DIR=str(tmp_path / "elsewhere"),
    )
    assert done.returncode == 1  # nothing listens: one error, not acknowledged
    assert "sending unsigned" not in done.stderr
    assert "errors 1" in done.stdout


GOOD_RULES = """
rules:
  - name: burst
    metric: failure_count
    window: 5m
    threshold: 10
    targets: [{url: "https://hooks.example.com/a"}]
  - name: slow
    metric: duration_p95_ms
    window: 15m
    threshold: 60000
    targets: [{url: "https://hooks.example.com/b", format: slack}]
"""

BAD_RULES = """
- name: burst
  metric: failure_count
  window: 5m
  threshold: 10
  targets: [{url: "https://hooks.example.com/a"}]
- name: nonsense
  metric: failure_vibes
  window: 5m
  threshold: lots
  targets: [{url: "https://hooks.example.com/a"}]
"""


def test_alerts_check_validates_a_rules_file_without_a_database(tmp_path):
    url, _ = closed_port_url()  # a database that does not answer: the check never needs one
    good = tmp_path / "good.yaml"
    good.write_text(GOOD_RULES)
    done = cli("alerts", "check", str(good), cwd=tmp_path, RECEIVER_DATABASE_URL=url)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("rule 1 (burst): OK")
    assert lines[1].startswith("rule 2 (slow): OK")
    assert lines[-1] == f"{good}: 2 of 2 rules valid"

    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RULES)
    done = cli("alerts", "check", str(bad), cwd=tmp_path, RECEIVER_DATABASE_URL=url)
    assert done.returncode == 1
    assert "rule 1 (burst): OK" in done.stdout
    assert "rule 2 (nonsense): alert rule is not valid" in done.stdout
    assert "  metric:" in done.stdout and "  threshold:" in done.stdout
    assert done.stdout.splitlines()[-1] == f"{bad}: 1 of 2 rules valid"

    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [ {name: x\n")
    done = cli("alerts", "check", str(broken), cwd=tmp_path, RECEIVER_DATABASE_URL=url)
    assert done.returncode == 1 and "not valid YAML" in done.stdout

    missing = cli("alerts", "check", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_the_shipped_example_rules_pass_the_check(tmp_path):
    example = ROOT / "deploy" / "alert-rules.example.yaml"
    done = cli("alerts", "check", str(example), cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    assert "rules valid" in done.stdout.splitlines()[-1]


async def test_backfill_command_reports_progress_and_exits_1_when_the_api_stops(
    db, database_url, tmp_path
):
    fake = FakeRunflow()
    for i in range(12):
        fake.runs[f"bf_{i:02d}"] = run_object(
            f"bf_{i:02d}", created_at=iso(T0 + timedelta(minutes=i))
        )
    fake.fail_pages_after = 1  # the second page fails (after the retries)
    since = (T0 - timedelta(hours=1)).isoformat()
    with serve_fake(fake) as url:
        env = {
            "RECEIVER_DATABASE_URL": database_url,
            "RECEIVER_RUNFLOW_API_URL": url,
            "RECEIVER_RUNFLOW_API_KEY": fake.api_key,
            "RECEIVER_ENRICHMENT_MAX_ATTEMPTS": "2",
            "RECEIVER_ENRICHMENT_BACKOFF_SECONDS": "0.05",
        }
        args = ("backfill", "--since", since, "--page-size", "5")
        stopped = await asyncio.to_thread(cli, *args, cwd=tmp_path, **env)
        fake.fail_pages_after = None
        done = await asyncio.to_thread(cli, *args, cwd=tmp_path, **env)
    assert stopped.returncode == 1
    assert "backfill stopped" in stopped.stderr and "5 runs imported" in stopped.stderr
    assert done.returncode == 0, done.stderr
    # Off a terminal: one progress line per page, then the summary on stdout.
    assert re.findall(r"backfill: (\d+) \(", done.stderr) == ["10", "12"]
    assert done.stdout == (
        "backfill done: 7 stored, 0 already known, 0 rejected (earlier runs of this backfill: 5)\n"
    )
