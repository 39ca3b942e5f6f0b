"""Alert rules: the model the API and the YAML file share, and their storage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from receiver.alerts.targets import is_redacted, redact_url
from receiver.errors import InvalidRule

FILTERABLE = ("failure_code", "failure_stage", "model", "target_type", "source")
GROUPABLE = ("failure_code", "failure_stage", "model", "target_type", "source", "status")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# What the API shows instead of a hook secret; sent back unchanged, it keeps the stored one.
REDACTED = "********"


def seconds(value: object) -> object:
    """``90``, ``"90s"``, ``"5m"``, ``"1h"`` or ``"1d"`` as whole seconds."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not a duration like 90s, 5m, 1h or 1d")
        return int(match.group(1)) * _UNITS[match.group(2) or "s"]
    return value


class HookTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://", max_length=2000)
    secret: str | None = Field(default=None, max_length=500)
    format: Literal["json", "slack"] = "json"

    @field_validator("url")
    @classmethod
    def _usable(cls, value: str) -> str:
        if is_redacted(value):
            return value  # stands for a stored URL; restore_secrets swaps it back
        try:
            url = httpx.URL(value)
            urlsplit(value).port  # noqa: B018 (a port out of 0-65535 raises here)
        except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
            raise ValueError(f"not a usable URL: {exc}") from None
        if not url.host:
            raise ValueError("the URL names no host")
        return value


class Rule(BaseModel):
    """One alert rule. ``for`` and ``cooldown`` are durations; ``window`` too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    metric: Literal["failure_count", "failure_rate", "no_callbacks", "duration_p95_ms"]
    filters: dict[str, list[str]] = Field(default_factory=dict)
    group_by: str | None = None
    window: int = Field(default=300, ge=1, le=7 * 86400)
    threshold: float = 0
    min_runs: int = Field(default=0, ge=0)
    for_: int = Field(default=0, ge=0, le=86400, alias="for")
    cooldown: int = Field(default=0, ge=0, le=7 * 86400)
    targets: list[HookTarget] = Field(min_length=1, max_length=10)
    enabled: bool = True
    max_groups: int = Field(default=50, ge=1, le=500)

    @field_validator("window", "for_", "cooldown", mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return seconds(value)

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for key in value:
            if key not in FILTERABLE:
                raise ValueError(f"cannot filter on {key!r}; use {', '.join(FILTERABLE)}")
        return value

    @field_validator("group_by")
    @classmethod
    def _known_dimension(cls, value: str | None) -> str | None:
        if value is not None and value not in GROUPABLE:
            raise ValueError(f"cannot group by {value!r}; use one of {', '.join(GROUPABLE)}")
        return value

    @model_validator(mode="after")
    def _silence_is_global(self) -> Rule:
        if self.metric == "no_callbacks" and self.group_by is not None:
            raise ValueError("no_callbacks watches all traffic matching the filters: no group_by")
        return self

    def definition(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def public_definition(self) -> dict[str, Any]:
        """The definition for API answers: hook secrets replaced by ``REDACTED``, hook URLs
        shown as ``scheme://host/***`` (their userinfo and path are credentials too)."""
        shown = self.definition()
        for target in shown["targets"]:
            target["url"] = redact_url(target["url"])
            if target["secret"] is not None:
                target["secret"] = REDACTED
        return shown


def _stored_target(url: str, index: int, stored: Rule | None) -> HookTarget | None:
    """The stored target a redacted ``url`` stands for: the one at the same position if it
    redacts to it, else the only one that does."""
    if stored is None:
        return None
    if index < len(stored.targets) and redact_url(stored.targets[index].url) == url:
        return stored.targets[index]
    matching = [t for t in stored.targets if redact_url(t.url) == url]
    return matching[0] if len(matching) == 1 else None


def restore_secrets(data: dict[str, Any], stored: Rule | None) -> dict[str, Any]:
    """``data`` with each redacted URL and ``REDACTED`` secret replaced by the stored ones.

    So a rule read from the API can be sent back changed without repeating its hook URLs and
    secrets: a URL shown as ``scheme://host/***`` stands for the stored target it came from.
    """
    targets = data.get("targets")
    if not isinstance(targets, list):
        return data
    restored: list[Any] = []
    for index, target in enumerate(targets):
        if isinstance(target, dict):
            url = target.get("url")
            if isinstance(url, str) and is_redacted(url):
                kept = _stored_target(url, index, stored)
                if kept is None:
                    raise InvalidRule(
                        f"target {url!r}: the url is redacted, and no stored target it"
                        " stands for; send the url itself"
                    )
                target = {**target, "url": kept.url}
            if target.get("secret") == REDACTED:
                url = target.get("url")
                known = {t.url: t.secret for t in stored.targets} if stored else {}
                secret = known.get(url) if isinstance(url, str) else None
                if secret is None:
                    raise InvalidRule(
                        f"target {redact_url(str(url))!r}: the secret is {REDACTED}, and no"
                        " stored target with that url has one to keep; send the secret itself"
                    )
                target = {**target, "secret": secret}
        restored.append(target)
    return {**data, "targets": restored}


def validate_rule(data: object) -> Rule:
    try:
        rule = Rule.model_validate(data)
    except ValidationError as exc:
        details = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise InvalidRule("alert rule is not valid", details) from None
    try:
        stored = orjson.dumps(rule.definition())
    except orjson.JSONEncodeError as exc:
        raise InvalidRule(f"alert rule is not storable: {exc}") from None
    if b"\\u0000" in stored:
        raise InvalidRule("alert rule strings may not contain NUL characters")
    return rule


def read_rule_items(path: Path) -> list[Any]:
    """The unvalidated rules of a YAML file: a list of rules, or ``{"rules": [...]}``."""
    data = yaml.safe_load(path.read_text())
    items = data.get("rules", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InvalidRule(f"{path}: expected a list of rules")
    return items


def load_rules_file(path: Path) -> list[Rule]:
    """Rules from a YAML file: a list of rules, or ``{"rules": [...]}``."""
    return [validate_rule(item) for item in read_rule_items(path)]
