"""Where alert hooks may point, and how their URLs are shown.

A hook URL is chosen by any API-token holder, so the server must not become their way into
the network it runs in: a target whose host is, or resolves to, a loopback, private, link-local
(cloud metadata), unspecified, multicast or reserved address is refused when the rule is saved
and again right before each POST, which then connects to the address that was checked (no
second lookup a rebinding DNS server could answer differently) and follows no redirect.
``RECEIVER_ALERT_ALLOW_PRIVATE_TARGETS`` lifts the address check for in-cluster hooks.

Hook URLs carry credentials (``user:password@``, Slack's token in the path), so answers and
logs show them as ``scheme://host[:port]/***``; the stored URL is what is sent to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from receiver.errors import InvalidRule

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REDACTED_PATH = "/***"
RESOLVE_TIMEOUT_SECONDS = 5.0


class BlockedTarget(Exception):
    """A hook target that may not be contacted; the message is for the server log only."""


def redact_url(url: str) -> str:
    """``scheme://host[:port]/***``: no userinfo, path, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "***"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{REDACTED_PATH}"


def is_redacted(url: str) -> bool:
    return url == redact_url(url) and url.endswith(REDACTED_PATH)


def forbidden(address: IPAddress) -> bool:
    """True for any address that is not a public unicast one."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        return forbidden(mapped)
    return (
        not address.is_global
        or address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def host_and_port(url: str) -> tuple[str, int]:
    """The host and port a hook URL names; ``BlockedTarget`` when it names none."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise BlockedTarget(f"not a usable URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BlockedTarget("not an http(s) URL with a host")
    return host, port or (443 if parts.scheme == "https" else 80)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (just itself when it is an address)."""
    literal = _literal(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
        raise BlockedTarget(f"{host} does not resolve: {exc}") from None
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise BlockedTarget(f"{host} resolves to no address")
    return found


async def checked_addresses(url: str, *, allow_private: bool) -> list[IPAddress]:
    """The addresses to connect to for ``url`` (in the resolver's order), once every address
    its host has is checked: ``BlockedTarget`` when any is not public (unless
    ``allow_private``)."""
    host, port = host_and_port(url)
    addresses = await resolve(host, port)
    if not allow_private:
        bad = [str(a) for a in addresses if forbidden(a)]
        if bad:
            raise BlockedTarget(f"{host} is, or resolves to, a non-public address: {bad[0]}")
    return addresses


async def check_rule_targets(urls: list[str], *, allow_private: bool) -> None:
    """422 ``invalid_rule`` for a hook URL aimed at a non-public address, as a rule is saved.

    A name that does not resolve now is accepted: every send checks again.
    """
    if allow_private:
        return
    for index, url in enumerate(urls):
        try:
            host, port = host_and_port(url)
        except BlockedTarget as exc:
            raise InvalidRule(f"targets.{index}.url: {exc}") from None
        try:
            addresses = await resolve(host, port)
        except BlockedTarget:
            continue
        if any(forbidden(a) for a in addresses):
            raise InvalidRule(
                f"targets.{index}.url: {host} is, or resolves to, a loopback, private,"
                " link-local, multicast or reserved address; hooks must be public"
                " (an operator may allow private targets with"
                " RECEIVER_ALERT_ALLOW_PRIVATE_TARGETS)",
                [{"loc": f"targets.{index}.url", "msg": "non-public address"}],
            )
